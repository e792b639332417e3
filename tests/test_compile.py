"""torch.compile of the personalized prior: no graph breaks, no recompilation for new users, same outputs.

``backend="eager"`` runs dynamo's tracing, guards and recompilation exactly as inductor would, without
generating kernels, so these tests are quick on a CPU; the speed itself is measured on a GPU
(``benchmarks/gpu_suite.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from ppd_diffusers._stable_cascade import RECOMPILE_LIMIT, _personalized_attn_block

from .conftest import randomize_, unet_inputs
from .test_pipeline import USERS, build_pipe, encoder, generate, stable_cascade_repos  # noqa: F401  (fixtures)

COMPILE = dict(backend="eager", fullgraph=True)  # fullgraph: a graph break raises
USER_A, USER_B = USERS[0], USERS[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    _personalized_attn_block._compiled_call_impl = None  # the personalized attention is shared by every model


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _users(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 2, 24, generator=torch.Generator().manual_seed(seed))


def test_regional_compilation_matches_eager_and_new_users_do_not_recompile(unet, adapter):
    randomize_(adapter)
    model, inputs = adapter.attach(unet), unet_inputs(unet, batch=4)
    calls = [
        dict(user_kv=adapter(_users(4, 0))),
        dict(user_kv=adapter(_users(4, 1), user_scale=0.5)),  # another user and scale
        dict(user_kv=adapter(_users(4, 2), user_scale=torch.tensor([1.0, 0.0, 2.0, 0.5]))),  # per-sample scales
        dict(user_kv=adapter(_users(2, 3)), user_rows=2),  # a guidance batch: users on half the rows
        dict(user_kv=adapter(_users(2, 4), user_scale=0.25), user_rows=2),
        dict(),  # no user: the plain blocks
    ]
    with torch.no_grad():
        expected = [model(**inputs, **call).sample for call in calls]
        model.compile_repeated_blocks(**COMPILE)
        outputs = [model(**inputs, **call).sample for call in calls[:1]]
        first = graphs()
        outputs += [model(**inputs, **call).sample for call in calls[1:3]]
        assert graphs() == first  # a new user or scale reuses the compiled code
        outputs += [model(**inputs, **call).sample for call in calls[3:]]
        with_rows = graphs()
        outputs += [model(**inputs, **call).sample for call in calls]
    assert graphs() == with_rows  # every layout compiled once
    assert first > 0 and not counters["graph_break"]
    for out, exp in zip(outputs, expected + expected):
        torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT


def test_regional_compilation_trains_with_checkpointing(unet, adapter):
    randomize_(adapter)
    model, inputs = adapter.attach(unet), unet_inputs(unet)
    eager = model(**inputs, user_embeds=_users(3, 0)).sample.square().mean()
    expected = torch.autograd.grad(eager, list(adapter.parameters()))
    unet.enable_gradient_checkpointing()
    model.compile_repeated_blocks(**COMPILE)
    for seed in (0, 1):  # the second user reuses the compiled forward and backward
        loss = model(**inputs, user_embeds=_users(3, seed)).sample.square().mean()
        grads = torch.autograd.grad(loss, list(adapter.parameters()))
        if seed == 0:
            torch.testing.assert_close(loss, eager)
            for g, e in zip(grads, expected):
                torch.testing.assert_close(g, e)
            first = graphs()
    assert graphs() == first and not counters["graph_break"]


@pytest.mark.parametrize("regional", [True, False])
def test_compiled_pipeline_gives_the_same_images_and_does_not_recompile(stable_cascade_repos, encoder, regional):  # noqa: F811
    pipe = build_pipe(stable_cascade_repos, encoder)
    randomize_(pipe.user_adapter)
    u_a, u_b = pipe.encode_user(USER_A), pipe.encode_user(USER_B)
    prompts = ["a red cat", "a blue dog"]
    calls = [
        dict(user_embeds=u_a),  # one user for both prompts
        dict(user_embeds=torch.cat([u_a, u_b])),  # two users
        dict(user_embeds=u_b, user_scale=[0.5, 2.0]),  # other scales
    ]
    expected = [generate(pipe, prompts, **call) for call in calls] + [generate(pipe, prompts)]
    pipe.compile_prior(regional=regional, **COMPILE)
    images = [generate(pipe, prompts, **calls[0])]
    first = graphs()
    images += [generate(pipe, prompts, **call) for call in calls[1:]]
    assert graphs() == first  # another user, number of users or scale: no recompilation
    images.append(generate(pipe, prompts))  # the plain prior runs compiled too
    assert graphs() > first and not counters["graph_break"]
    for image, exp in zip(images, expected):
        torch.testing.assert_close(image, exp, rtol=1e-5, atol=1e-5)


def test_whole_graph_compilation_follows_a_new_adapter(stable_cascade_repos, encoder):  # noqa: F811
    from ppd_diffusers import UserAdapter

    pipe = build_pipe(stable_cascade_repos, encoder)
    pipe.compile_prior(regional=False, **COMPILE)
    generate(pipe, user_embeds=pipe.encode_user(USER_A))
    compiled = pipe.personalized_model
    assert compiled._compiled_call_impl is not None and compiled.adapter is pipe.user_adapter
    pipe.load_user_adapter(randomize_(UserAdapter.from_model(pipe.prior, encoder.embed_dim, 2, 8)))
    generate(pipe, user_embeds=pipe.encode_user(USER_A))
    assert pipe.personalized_model is not compiled and pipe.personalized_model.adapter is pipe.user_adapter
    assert pipe.personalized_model._compiled_call_impl is not None


def test_whole_graph_compilation_refuses_an_offloaded_prior_and_regional_runs(stable_cascade_repos, encoder):  # noqa: F811
    pipe = build_pipe(stable_cascade_repos, encoder)
    randomize_(pipe.user_adapter)
    u = pipe.encode_user(USER_A)
    expected = generate(pipe, user_embeds=u)
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="cannot trace the offload hooks"):
        pipe.compile_prior(regional=False)
    pipe.compile_prior(**COMPILE)
    torch.testing.assert_close(generate(pipe, user_embeds=u), expected, rtol=1e-5, atol=1e-5)


def test_unloading_the_adapter_drops_the_kept_personalized_prior(stable_cascade_repos, encoder):  # noqa: F811
    pipe = build_pipe(stable_cascade_repos, encoder)
    generate(pipe, user_embeds=pipe.encode_user(USER_A))
    assert pipe.personalized_model is not None
    pipe.unload_user_adapter()
    assert pipe.personalized_model is None
