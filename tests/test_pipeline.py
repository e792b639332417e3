"""PersonalizedStableCascadePipeline end to end on tiny Stable Cascade repos laid out like the Hub's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

from ppd_diffusers import CLIPPreferenceEncoder, PersonalizedStableCascadePipeline, UserAdapter
from ppd_diffusers.testing_utils import save_tiny_stable_cascade

from .conftest import random_users, randomize_

# 32 px images: 4x4 Stage C latents, 8x8 Stage B latents, 4x that after the VQGAN
TINY = dict(resolution_multiple=8.0, latent_dim_scale=2.0)
CALL = dict(height=32, width=32, num_inference_steps=3, decoder_num_inference_steps=2)


@pytest.fixture(scope="session")
def stable_cascade_repos(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("stabilityai")
    prior, decoder = str(root / "stable-cascade-prior"), str(root / "stable-cascade")
    save_tiny_stable_cascade(prior, decoder, variant="bf16")
    return prior, decoder


@pytest.fixture(scope="session")
def encoder(tiny_clip_dir) -> CLIPPreferenceEncoder:
    return CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)


def build_pipe(repos, encoder=None, adapter=True, **kw) -> PersonalizedStableCascadePipeline:
    prior, decoder = repos
    pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
        preference_encoder=encoder, prior_model_name_or_path=prior, decoder_model_name_or_path=decoder, **TINY, **kw
    )
    if adapter:
        torch.manual_seed(0)
        embed_dim = encoder.embed_dim if encoder is not None else 8
        pipe.load_user_adapter(UserAdapter.from_unet(pipe.prior, embed_dim, num_user_tokens=2, user_token_dim=8))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(stable_cascade_repos, encoder) -> PersonalizedStableCascadePipeline:
    return build_pipe(stable_cascade_repos, encoder)


def generate(pipe, prompt="a red cat", seed=0, output_type="pt", **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type=output_type, **{**CALL, **kwargs}).images


USERS = random_users(3)


def test_end_to_end_to_pil(pipe):
    randomize_(pipe.user_adapter)
    adapter_calls = []
    pipe.user_adapter.register_forward_hook(lambda *args: adapter_calls.append(1))
    out = pipe(["a red cat", "a blue dog"], preference_pairs=USERS[0], num_images_per_prompt=2, **CALL)
    assert len(adapter_calls) == 1  # user keys/values once per call, not per step
    assert len(out.images) == 4
    assert all(isinstance(image, PIL.Image.Image) and image.size == (32, 32) for image in out.images)
    assert out.user_embeds.shape == (1, 4, pipe.preference_encoder.embed_dim)
    torch.testing.assert_close(out.user_embeds, pipe.encode_user(USERS[0]), rtol=0, atol=0)
    arrays = generate(pipe, preference_pairs=USERS[0], output_type="np")
    assert arrays.shape == (1, 32, 32, 3) and arrays.min() >= 0 and arrays.max() <= 1


def test_fresh_adapter_and_scale_zero_equal_plain_stable_cascade(pipe):
    plain = generate(pipe)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), plain)  # V' starts at zero
    randomize_(pipe.user_adapter)
    personalized = generate(pipe, preference_pairs=USERS[0])
    assert (personalized - plain).abs().max() > 1e-3
    assert torch.equal(generate(pipe, preference_pairs=USERS[0], user_scale=0.0), plain)
    pipe.set_user_adapter_scale(0)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), plain)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0], user_scale=1.0), personalized)


def test_plain_path_equals_diffusers_stable_cascade_pipelines(pipe):
    """Without a user the pipeline is diffusers' Stable Cascade prior + decoder pipelines, bit for bit."""
    from diffusers import StableCascadeDecoderPipeline, StableCascadePriorPipeline

    prior = StableCascadePriorPipeline(
        prior=pipe.prior, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
        resolution_multiple=TINY["resolution_multiple"],
    )  # fmt: skip
    decoder = StableCascadeDecoderPipeline(
        decoder=pipe.decoder, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler=pipe.decoder_scheduler, vqgan=pipe.vqgan, latent_dim_scale=TINY["latent_dim_scale"],
    )  # fmt: skip
    for reference in (prior, decoder):
        reference.set_progress_bar_config(disable=True)
    prompts, negatives = ["a red cat", "a blue dog"], ["blurry", "blurry"]
    for decoder_guidance in (0.0, 2.0):
        generator = torch.Generator().manual_seed(3)
        stage_c = prior(
            prompts, negative_prompt=negatives, num_images_per_prompt=2, generator=generator, height=32, width=32,
            num_inference_steps=3,
        ).image_embeddings  # fmt: skip
        expected = decoder(
            stage_c, prompts, negative_prompt=negatives, guidance_scale=decoder_guidance, generator=generator,
            num_inference_steps=2, output_type="pt",
        ).images  # fmt: skip
        got = generate(
            pipe, prompts, seed=3, negative_prompt="blurry", num_images_per_prompt=2,
            decoder_guidance_scale=decoder_guidance,
        )  # fmt: skip
        assert torch.equal(got, expected)


def test_per_prompt_users_in_one_batch_equal_separate_runs(pipe):
    randomize_(pipe.user_adapter)
    prompts = ["a red cat", "a blue dog"]
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2, 3)]
    batch = pipe(
        prompts, preference_pairs=USERS[:2], num_images_per_prompt=2, generator=generators, output_type="pt",
        user_scale=[1.0, 0.7], **CALL,
    ).images  # fmt: skip
    for p, (prompt, user, scale) in enumerate(zip(prompts, USERS[:2], [1.0, 0.7])):
        generators = [torch.Generator().manual_seed(s) for s in (2 * p, 2 * p + 1)]
        alone = pipe(
            prompt, preference_pairs=user, num_images_per_prompt=2, generator=generators, output_type="pt",
            user_scale=scale, **CALL,
        ).images  # fmt: skip
        torch.testing.assert_close(batch[2 * p : 2 * p + 2], alone, rtol=0, atol=1e-5)
    # and the users really differ
    assert (batch[0] - generate(pipe, prompts[0], preference_pairs=USERS[1])).abs().max() > 1e-3


def test_precomputed_and_interpolated_user_embeds(pipe):
    randomize_(pipe.user_adapter)
    users = pipe.encode_user(USERS[:2])
    assert users.shape[0] == 2
    from_pairs = generate(pipe, preference_pairs=USERS[0])
    assert torch.equal(generate(pipe, user_embeds=users[:1]), from_pairs)
    assert torch.equal(generate(pipe, user_embeds=torch.lerp(users[:1], users[1:], 0.0)), from_pairs)
    halfway = generate(pipe, user_embeds=torch.lerp(users[:1], users[1:], 0.5))
    assert (halfway - from_pairs).abs().max() > 1e-4


def test_user_guidance_scale(pipe, monkeypatch):
    import ppd_diffusers.pipeline_personalized_stable_cascade as module
    from ppd_diffusers.guidance import guidance_branches

    randomize_(pipe.user_adapter)
    u = pipe.encode_user(USERS[0])
    folded = generate(pipe, user_embeds=u, guidance_scale=4.0)
    no_cfg = generate(pipe, user_embeds=u, guidance_scale=1.0)
    # g_u = 0 removes the user's term, whatever the user: plain Stable Cascade (three predictions per step)
    torch.testing.assert_close(
        generate(pipe, user_embeds=u, guidance_scale=4.0, user_guidance_scale=0.0), generate(pipe), rtol=0, atol=1e-5
    )
    stronger = generate(pipe, user_embeds=u, guidance_scale=4.0, user_guidance_scale=8.0)
    assert (stronger - folded).abs().max() > 1e-4
    # the folded two-prediction path is the three-prediction formula at g_u = g (and at g_u = 1 without CFG)
    monkeypatch.setattr(module, "guidance_branches", lambda *args: (True, True, guidance_branches(*args)[2]))
    three = generate(pipe, user_embeds=u, guidance_scale=4.0, user_guidance_scale=4.0)
    torch.testing.assert_close(three, folded, rtol=0, atol=1e-5)
    torch.testing.assert_close(generate(pipe, user_embeds=u, guidance_scale=1.0, user_guidance_scale=1.0), no_cfg)
    assert (no_cfg - folded).abs().max() > 1e-4


def test_only_the_user_rows_pay_for_the_user_and_images_are_unchanged(pipe, monkeypatch):
    """Row slicing: the text-only and negative rows skip the user attention; images equal the every-row way."""
    from ppd_diffusers import PersonalizedStageC, UserKeyValues

    randomize_(pipe.user_adapter)
    u = pipe.encode_user(USERS[0])
    seen = []
    forward = PersonalizedStageC.forward

    def recording(self, sample, *args, user_kv=None, **kwargs):
        seen.append((sample.shape[0], user_kv.batch_size, user_kv.rows))
        return forward(self, sample, *args, user_kv=user_kv, **kwargs)

    def every_row(self, sample, *args, user_kv=None, **kwargs):
        # what the pipeline did before row slicing: every row gets user keys/values, zero values where no user
        extra = sample.shape[0] - user_kv.rows
        padded = UserKeyValues(
            keys=tuple(torch.cat([k, k[:1].expand(extra, -1, -1, -1)]) for k in user_kv.keys),
            values=tuple(torch.cat([v, torch.zeros_like(v[:1]).expand(extra, -1, -1, -1)]) for v in user_kv.values),
        )
        return forward(self, sample, *args, user_kv=padded, **kwargs)

    call = dict(user_embeds=u.expand(2, -1, -1), guidance_scale=4.0, user_guidance_scale=2.0)
    with monkeypatch.context() as patch:
        patch.setattr(PersonalizedStageC, "forward", recording)
        sliced = generate(pipe, ["a red cat", "a blue dog"], **call)
    assert set(seen) == {(6, 2, 2)}  # rows [text+user | text | negative] x 2 prompts; the user on the first 2
    monkeypatch.setattr(PersonalizedStageC, "forward", every_row)
    torch.testing.assert_close(sliced, generate(pipe, ["a red cat", "a blue dog"], **call), rtol=0, atol=1e-6)


def test_numpy_scalars_are_numbers(pipe):
    import numpy as np

    u = pipe.encode_user(USERS[0])
    expected = generate(pipe, user_embeds=u, guidance_scale=4.0, user_scale=0.5)
    got = generate(pipe, user_embeds=u, guidance_scale=np.float32(4.0), user_scale=[np.float32(0.5)])
    torch.testing.assert_close(got, expected)


def test_model_offload_unloads_the_encoders_before_stage_c(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    order = []
    for hook in pipe._all_hooks:
        name = next(n for n, m in pipe.components.items() if m is hook.model)
        original = hook.offload
        hook.offload = lambda name=name, original=original: order.append(name) or original()
    stage_c = pipe.prior._hf_hook
    pre_forward = stage_c.pre_forward
    stage_c.pre_forward = lambda module, *a, **k: order.append("prior runs") or pre_forward(module, *a, **k)
    generate(pipe, output_type="latent")  # no user: the adapter, whose hook would unload them, never runs
    first_prior = order.index("prior runs")
    assert {"text_encoder", "preference_encoder"} <= set(order[:first_prior])


def test_seeds_reproduce_and_differ(pipe):
    randomize_(pipe.user_adapter)
    a, b = generate(pipe, preference_pairs=USERS[0], seed=5), generate(pipe, preference_pairs=USERS[0], seed=5)
    assert torch.equal(a, b)
    assert (a - generate(pipe, preference_pairs=USERS[0], seed=6)).abs().max() > 1e-3


def test_save_pretrained_from_pretrained_reproduces_images(pipe, tmp_path):
    randomize_(pipe.user_adapter)
    expected = generate(pipe, preference_pairs=USERS[0])
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["user_adapter"] == ["ppd_diffusers", "UserAdapter"]
    assert index["preference_encoder"] == ["ppd_diffusers", "CLIPPreferenceEncoder"]
    assert index["vqgan"] == ["ppd_diffusers", "PaellaVQModel"]
    assert index["resolution_multiple"] == TINY["resolution_multiple"]
    loaded = PersonalizedStableCascadePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded, preference_pairs=USERS[0]), expected)
    # the pipeline that saved is unchanged (diffusers rewrites the config of components it cannot save)
    assert pipe.preference_encoder is not None and pipe.config.preference_encoder[0] == "ppd_diffusers"


def test_prior_only_pipeline_returns_stage_c_latents(stable_cascade_repos, encoder):
    pipe = build_pipe((stable_cascade_repos[0], None), encoder)
    latents = generate(pipe, preference_pairs=USERS[0], output_type="latent", num_images_per_prompt=2)
    assert latents.shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="output_type='pil'.*needs Stage B and A"):
        generate(pipe, output_type="pil")


def test_prior_only_works_without_diffusers_deprecated_pipelines(stable_cascade_repos, tmp_path):
    """Prior-only generation never imports diffusers' deprecated pipelines (where PaellaVQModel lives)."""
    script = textwrap.dedent(f"""
        import sys, torch
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(("diffusers.pipelines.deprecated", "diffusers.pipelines.stable_cascade")):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from ppd_diffusers import PersonalizedStableCascadePipeline, UserAdapter
        pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
            prior_model_name_or_path={stable_cascade_repos[0]!r}, decoder_model_name_or_path=None,
            resolution_multiple=8.0)
        pipe.load_user_adapter(UserAdapter.from_unet(pipe.prior, user_embed_dim=8))
        out = pipe("a red cat", user_embeds=torch.randn(1, 2, 8), height=32, width=32, num_inference_steps=2,
                   output_type="latent").images
        assert out.shape == (1, 4, 4, 4)
        import ppd_diffusers
        assert getattr(ppd_diffusers, "PaellaVQModel", None) is None  # unavailable, and says so without crashing
        assert not [m for m in sys.modules if m.startswith("diffusers.pipelines.deprecated")]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_model_cpu_offload_runs_and_matches(pipe, monkeypatch):
    randomize_(pipe.user_adapter)
    expected = generate(pipe, preference_pairs=USERS[0])
    pipe.enable_model_cpu_offload(device="cpu")
    onloads = []
    hook = pipe.prior._hf_hook
    original = hook.pre_forward
    monkeypatch.setattr(hook, "pre_forward", lambda module, *a, **k: onloads.append(1) or original(module, *a, **k))
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), expected)
    assert onloads, "the personalized Stage C must run the prior's offload hook"
    # an adapter loaded after enabling offload gets its hook too
    pipe.load_user_adapter(UserAdapter.from_unet(pipe.prior, pipe.preference_encoder.embed_dim, 2, 8))
    assert hasattr(pipe.user_adapter, "_hf_hook")
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), generate(pipe))


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(p, step, t, tensors):
        seen.append((step, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == CALL["num_inference_steps"] - 1 else {}

    latents = generate(pipe, preference_pairs=USERS[0], output_type="latent", callback_on_step_end=callback)
    assert [s for s, _ in seen] == [0, 1, 2] and pipe.num_timesteps == 3
    assert torch.equal(latents, torch.zeros_like(latents))


def test_load_unload_user_adapter(pipe, stable_cascade_repos, tmp_path):
    randomize_(pipe.user_adapter)
    expected = generate(pipe, preference_pairs=USERS[0])
    plain = generate(pipe)
    pipe.user_adapter.save_pretrained(tmp_path / "repo" / "adapter")
    os.replace(
        tmp_path / "repo" / "adapter" / "diffusion_pytorch_model.safetensors",
        tmp_path / "repo" / "adapter" / "ppd_user_adapter.safetensors",
    )
    pipe.unload_user_adapter()
    assert pipe.user_adapter is None and torch.equal(generate(pipe), plain)
    with pytest.raises(ValueError, match="no user adapter is loaded"):
        generate(pipe, preference_pairs=USERS[0])
    pipe.load_user_adapter(tmp_path / "repo", subfolder="adapter", weight_name="ppd_user_adapter.safetensors")
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), expected)
    with pytest.raises(ValueError, match="safetensors"):
        pipe.load_user_adapter(tmp_path / "repo", subfolder="adapter", weight_name="adapter.bin")
    other = build_pipe(stable_cascade_repos, adapter=False)
    with pytest.raises(ValueError, match="makes embeddings of width"):
        pipe.load_user_adapter(UserAdapter.from_unet(other.prior, user_embed_dim=7))
    from diffusers import StableCascadeUNet

    from ppd_diffusers.testing_utils import tiny_stage_c_config

    bigger = StableCascadeUNet(**tiny_stage_c_config(down_num_layers_per_block=(1, 2)))
    with pytest.raises(ValueError, match="attention layers"):
        pipe.load_user_adapter(UserAdapter.from_unet(bigger, user_embed_dim=pipe.preference_encoder.embed_dim))


def test_from_stable_cascade_variant_and_adapter_folder(stable_cascade_repos, encoder, tmp_path):
    source = build_pipe(stable_cascade_repos, encoder)
    randomize_(source.user_adapter).save_pretrained(tmp_path / "adapter")
    encoder.save_pretrained(tmp_path / "encoder")
    prior, decoder = stable_cascade_repos
    pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
        str(tmp_path / "adapter"), str(tmp_path / "encoder"), prior_model_name_or_path=prior,
        decoder_model_name_or_path=decoder, torch_dtype=torch.bfloat16, variant="bf16", local_files_only=True, **TINY,
    )  # fmt: skip
    # the UNets have bf16 files; the text encoder and VQGAN fall back to their default files, cast on load
    assert pipe.prior.dtype == pipe.decoder.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.user_adapter.dtype == torch.bfloat16
    assert isinstance(pipe.preference_encoder, CLIPPreferenceEncoder)
    with pytest.raises(TypeError, match="unexpected arguments"):
        PersonalizedStableCascadePipeline.from_stable_cascade(prior_model_name_or_path=prior, tokn="x")


def test_plain_diffusers_vqgan_is_saved_loadably(stable_cascade_repos, tmp_path):
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel as DiffusersPaella

    pipe = build_pipe(stable_cascade_repos, adapter=False)
    vqgan = DiffusersPaella.from_pretrained(os.path.join(stable_cascade_repos[1], "vqgan"))
    components = {**pipe.components, "vqgan": vqgan}
    rebuilt = PersonalizedStableCascadePipeline(**components, **TINY)
    rebuilt.save_pretrained(tmp_path)
    loaded = PersonalizedStableCascadePipeline.from_pretrained(tmp_path)
    assert type(loaded.vqgan).__module__ == "ppd_diffusers.paella"


BAD_INPUTS = [
    (dict(prompt=3), "`prompt` must be a string"),
    (dict(prompt=[]), "`prompt` must be a string"),
    (dict(negative_prompt=["a", "b"]), "`negative_prompt` has 2 entries for 1 prompts"),
    (dict(negative_prompt=3), "`negative_prompt` must be a string"),
    (dict(height=0), "`height` must be a positive integer"),
    (dict(width=31.5), "`width` must be a positive integer"),
    (dict(num_inference_steps=0), "`num_inference_steps` must be a positive integer"),
    (dict(num_images_per_prompt=0), "`num_images_per_prompt` must be a positive integer"),
    (dict(guidance_scale=-1.0), "`guidance_scale` must be a finite number >= 0, got -1.0"),
    (dict(guidance_scale=float("nan")), "`guidance_scale` must be a finite number >= 0, got nan"),
    (dict(guidance_scale=float("inf")), "`guidance_scale` must be a finite number"),
    (dict(decoder_guidance_scale=float("nan")), "`decoder_guidance_scale` must be a finite number"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_guidance_scale=float("inf")), "`user_guidance_scale` must be a"),
    (dict(user_embeds=torch.full((1, 4, 48), float("nan"))), "`user_embeds` holds NaN or infinite values"),
    (dict(user_embeds=torch.zeros(1, 4, 48, dtype=torch.int64)), "`user_embeds` must be a floating-point tensor"),
    (dict(user_embeds=torch.zeros(1, 4, 48, dtype=torch.bool)), "`user_embeds` must be a floating-point tensor"),
    (dict(user_embeds=torch.zeros(1, 4, 48, dtype=torch.complex64)), "`user_embeds` must be a floating-point"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_scale=float("nan")), "`user_scale` must be a finite"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_scale=[float("-inf")]), "`user_scale` must be a fin"),
    (dict(latents=torch.full((1, 4, 4, 4), float("inf"))), "`latents` holds NaN or infinite values"),
    (dict(output_type="jpeg"), "`output_type` must be one of"),
    (dict(preference_pairs=USERS[0], user_embeds=torch.zeros(1, 4, 48)), "either `preference_pairs` or `user_embeds`"),
    (dict(preference_pairs=USERS[0][:3]), "`preference_pairs` needs 4 pairs, got 3"),
    (dict(preference_pairs=USERS), "describes 3 users for 1 prompts"),
    (dict(user_embeds=torch.zeros(4, 48)), r"must be a \(users, tokens, 48\) tensor"),
    (dict(user_embeds=torch.zeros(1, 4, 47)), r"must be a \(users, tokens, 48\) tensor"),
    (dict(user_embeds=torch.zeros(2, 4, 48)), "describes 2 users for 1 prompts"),
    (dict(user_scale=1.0), "`user_scale` weights a user"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_scale=[1.0, 2.0]), "has 2 entries for 1 prompts"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_scale="high"), "`user_scale` must be a finite number"),
    (dict(user_guidance_scale=2.0), "`user_guidance_scale` guides a user"),
    (dict(images=[PIL.Image.new("RGB", (8, 8))]), "`images` needs the pipeline's `image_encoder`"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(latents=torch.zeros(1, 4, 5, 5)), r"`latents` must have shape \(1, 4, 4, 4\)"),
    (dict(generator=[torch.Generator()] * 2), "list of 2 generators for 1 images"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, message):
    kwargs = {"prompt": "a red cat", **CALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_users_without_encoder_or_adapter_raise(stable_cascade_repos):
    pipe = build_pipe(stable_cascade_repos)  # adapter, no encoder
    with pytest.raises(ValueError, match="needs a `preference_encoder`"):
        pipe("a cat", preference_pairs=USERS[0], **CALL)
    with pytest.raises(ValueError, match="no `preference_encoder`"):
        pipe.encode_user(USERS[0])
    assert generate(pipe, user_embeds=torch.zeros(1, 3, 8)).shape == (1, 3, 32, 32)


def test_image_prompts(stable_cascade_repos):
    pipe = build_pipe(stable_cascade_repos, adapter=False, load_image_encoder=True)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    with_images = generate(pipe, images=images)
    assert (with_images - generate(pipe)).abs().max() > 1e-4


def test_to_moves_and_casts_every_component(pipe):
    randomize_(pipe.user_adapter)
    pipe.to(torch.bfloat16)
    for name in ("prior", "decoder", "vqgan", "text_encoder", "user_adapter", "preference_encoder"):
        assert getattr(pipe, name).dtype == torch.bfloat16, name
    images = generate(pipe, preference_pairs=USERS[0])
    assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()
