"""PersonalizedStableCascadePipeline's diffusers conventions and the backbone-generic ``PPDLoaderMixin``.

The adapter is attached once, at load; one scale name (``user_scale``); precomputed prompt/image embeddings as
diffusers' Stable Cascade prior takes them; step callbacks beyond ``latents`` (diffusers' stock
``SDCFGCutoffCallback`` included); ``guidance_scale``/``do_classifier_free_guidance``/``interrupt``; ``dtype``.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

from ppd_diffusers import PersonalizedStableCascadePipeline, PersonalizedStageC, UserAdapter
from ppd_diffusers.stage_c_image_encoder import stage_c_latent_size

from .conftest import randomize_
from .test_pipeline import CALL, TINY, USERS, build_pipe, encoder, generate, pipe, stable_cascade_repos  # noqa: F401

STEPS = 4


def latents_of(pipe, prompt="a red cat", **kwargs):  # noqa: F811
    return generate(pipe, prompt, output_type="latent", **{"num_inference_steps": STEPS, **kwargs})


# ----------------------------------------------------------------------------------------------------------
# the adapter is attached once, when it is loaded


def test_adapter_is_attached_at_load_and_never_in_a_call(pipe, monkeypatch):  # noqa: F811
    model = pipe.personalized_model
    assert isinstance(model, PersonalizedStageC)
    assert model.adapter is pipe.user_adapter and model.unet is pipe.prior and pipe.user_model is pipe.prior
    assert not pipe.prior.training and not any(p.requires_grad for p in pipe.prior.parameters())  # frozen at load
    randomize_(pipe.user_adapter)
    expected = generate(pipe, preference_pairs=USERS[0])

    def no_attach(*args, **kwargs):
        raise AssertionError("attached during a call")

    monkeypatch.setattr(UserAdapter, "attach", no_attach)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), expected)
    assert pipe.personalized_model is model


def test_load_and_unload_attach_and_detach(pipe):  # noqa: F811
    first = pipe.personalized_model
    pipe.unload_user_adapter()
    assert pipe.personalized_model is None and pipe.user_adapter is None
    adapter = UserAdapter.from_model(pipe.prior, pipe.preference_encoder.embed_dim, 2, 8)
    pipe.load_user_adapter(adapter, adapter_name="default")
    assert pipe.personalized_model is not first and pipe.personalized_model.adapter is adapter
    with pytest.raises(ValueError, match="adapter_name='style'.*one user adapter at a time"):
        pipe.load_user_adapter(adapter, adapter_name="style")
    assert pipe.personalized_model.adapter is adapter  # the refused call changed nothing


def test_user_scale_is_the_one_name(pipe):  # noqa: F811
    randomize_(pipe.user_adapter)
    half = generate(pipe, preference_pairs=USERS[0], user_scale=0.5)
    with pytest.warns(FutureWarning, match="`preference_scale` is deprecated"):
        assert torch.equal(generate(pipe, preference_pairs=USERS[0], preference_scale=0.5), half)
    with pytest.raises(ValueError, match="`user_scale` only"):
        generate(pipe, preference_pairs=USERS[0], user_scale=0.5, preference_scale=0.5)
    pipe.set_user_adapter_scale(0.5)
    assert pipe.user_scale == 0.5 and torch.equal(generate(pipe, preference_pairs=USERS[0]), half)
    with pytest.warns(FutureWarning, match="now `user_scale`"):
        assert pipe.user_adapter_scale == 0.5
    with pytest.raises(ValueError, match="`user_scale` must be a number"):
        pipe.set_user_adapter_scale("high")
    pipe.unload_user_adapter()
    assert pipe.user_scale == 1.0


def test_prepare_user_kv_expands_users_and_scales_per_prompt(pipe):  # noqa: F811
    randomize_(pipe.user_adapter)
    user = torch.randn(1, 3, pipe.user_adapter.config.user_embed_dim)
    kv = pipe.prepare_user_kv(user, [0.0, 2.0], 2, 3, torch.device("cpu"), torch.float64, rows=6)
    alone = pipe.user_adapter(user)
    assert kv.batch_size == 6 and kv.rows == 6 and kv.keys[0].dtype == torch.float64
    for key, value, key_1, value_1 in zip(kv.keys, kv.values, alone.keys, alone.values, strict=True):
        torch.testing.assert_close(key, key_1.double().expand_as(key), rtol=1e-6, atol=1e-6)  # one user for all
        assert torch.equal(value[:3], torch.zeros_like(value[:3]))  # prompt 0 at scale 0
        torch.testing.assert_close(value[3:], 2 * value_1.double().expand_as(value[3:]), rtol=1e-5, atol=1e-6)
    pipe.set_user_adapter_scale(0.0)  # `None` takes the pipeline's scale; the dtype defaults to the prior's
    kv = pipe.prepare_user_kv(user.expand(2, -1, -1), None, 2, 1, torch.device("cpu"))
    assert kv.rows is None and kv.keys[0].dtype == pipe.prior.dtype and not kv.values[0].any()


# ----------------------------------------------------------------------------------------------------------
# construction: from_base_model, dtype


def test_from_base_model_loads_adapter_and_encoder_into_a_base_repo(pipe, encoder, tmp_path):  # noqa: F811
    base = tmp_path / "base"
    pipe.save_pretrained(base)
    index = json.loads((base / "model_index.json").read_text())
    for name in ("user_adapter", "preference_encoder"):  # a base model's repo knows nothing of PPD
        del index[name]
    (base / "model_index.json").write_text(json.dumps(index))
    adapter = randomize_(UserAdapter.from_model(pipe.prior, encoder.embed_dim, 2, 8), seed=3)
    adapter.save_pretrained(tmp_path / "adapter")
    encoder.save_pretrained(tmp_path / "encoder")

    loaded = PersonalizedStableCascadePipeline.from_base_model(
        base, str(tmp_path / "adapter"), str(tmp_path / "encoder"), dtype=torch.bfloat16, local_files_only=True
    )
    assert loaded.prior.dtype == loaded.user_adapter.dtype == loaded.preference_encoder.dtype == torch.bfloat16
    assert loaded.personalized_model.adapter is loaded.user_adapter
    for (name, param), expected in zip(loaded.user_adapter.named_parameters(), adapter.parameters(), strict=True):
        assert torch.equal(param, expected.to(torch.bfloat16)), name
    plain = PersonalizedStableCascadePipeline.from_base_model(base)
    assert plain.user_adapter is None and plain.preference_encoder is None and plain.personalized_model is None
    with pytest.raises(ValueError, match="either `dtype` or `torch_dtype`"):
        PersonalizedStableCascadePipeline.from_base_model(base, dtype=torch.float32, torch_dtype=torch.float32)


def test_dtype_is_taken_next_to_torch_dtype(stable_cascade_repos, pipe):  # noqa: F811
    prior, _ = stable_cascade_repos
    built = PersonalizedStableCascadePipeline.from_stable_cascade(
        prior_model_name_or_path=prior, decoder_model_name_or_path=None, dtype=torch.bfloat16, **TINY
    )
    assert built.prior.dtype == built.text_encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="either `dtype` or `torch_dtype`"):
        PersonalizedStableCascadePipeline.from_stable_cascade(
            prior_model_name_or_path=prior, dtype=torch.bfloat16, torch_dtype=torch.bfloat16
        )
    adapter = UserAdapter.from_model(pipe.prior, pipe.preference_encoder.embed_dim, 2, 8)
    pipe.load_user_adapter(adapter, dtype=torch.float64)
    assert pipe.user_adapter.dtype == torch.float64
    with pytest.raises(ValueError, match="either `dtype` or `torch_dtype`"):
        pipe.load_user_adapter(adapter, dtype=torch.float32, torch_dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# one latent-size rule


def test_latents_are_sized_by_stage_c_latent_size(pipe):  # noqa: F811
    latents = generate(pipe, output_type="latent", height=40, width=17)
    assert latents.shape[-2:] == stage_c_latent_size(40, 17, TINY["resolution_multiple"]) == (5, 3)
    with pytest.raises(ValueError, match="`resolution_multiple` must be a positive finite number"):
        stage_c_latent_size(32, 32, resolution_multiple=0.0)


# ----------------------------------------------------------------------------------------------------------
# precomputed embeddings


def test_prompt_embeds_give_the_prompts_images(pipe):  # noqa: F811
    randomize_(pipe.user_adapter)
    prompts = ["a red cat", "a blue dog"]
    hidden, pooled = pipe.encode_prompt(prompts, torch.device("cpu"))
    negative, negative_pooled = pipe.encode_prompt(["blurry", "blurry"], torch.device("cpu"))
    call = dict(preference_pairs=USERS[0], num_images_per_prompt=2, decoder_guidance_scale=2.0)
    expected = generate(pipe, prompts, negative_prompt="blurry", **call)
    embeds = dict(prompt_embeds=hidden, prompt_embeds_pooled=pooled)
    negatives = dict(negative_prompt_embeds=negative, negative_prompt_embeds_pooled=negative_pooled)
    assert torch.equal(generate(pipe, None, **embeds, **negatives, **call), expected)
    assert torch.equal(generate(pipe, None, **embeds, negative_prompt="blurry", **call), expected)
    assert torch.equal(generate(pipe, prompts, **negatives, **call), expected)


def test_prompt_embeds_match_diffusers_stable_cascade_prior(pipe):  # noqa: F811
    from diffusers import StableCascadePriorPipeline

    prior = StableCascadePriorPipeline(
        prior=pipe.prior, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
        resolution_multiple=TINY["resolution_multiple"],
    )  # fmt: skip
    prior.set_progress_bar_config(disable=True)
    hidden, pooled = pipe.encode_prompt(["a red cat", "a blue dog"], torch.device("cpu"))
    negative, negative_pooled = pipe.encode_prompt(["blurry", "ugly"], torch.device("cpu"))
    embeds = dict(
        prompt_embeds=hidden, prompt_embeds_pooled=pooled, negative_prompt_embeds=negative,
        negative_prompt_embeds_pooled=negative_pooled, num_images_per_prompt=2, height=32, width=32,
        num_inference_steps=3,
    )  # fmt: skip
    expected = prior(**embeds, generator=torch.Generator().manual_seed(0)).image_embeddings
    got = pipe(**embeds, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(got, expected)


def test_image_embeds_give_the_images_result(stable_cascade_repos):  # noqa: F811
    pipe = build_pipe(stable_cascade_repos, adapter=False, load_image_encoder=True)  # noqa: F811
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    expected = generate(pipe, ["a red cat", "a blue dog"], images=images)
    image_embeds = pipe.encode_image(images, torch.device("cpu"), 1)  # (1, images, C): shared by every prompt
    assert torch.equal(generate(pipe, ["a red cat", "a blue dog"], image_embeds=image_embeds), expected)
    assert (expected - generate(pipe, ["a red cat", "a blue dog"])).abs().max() > 1e-4


HIDDEN, POOLED = torch.zeros(1, 77, 16), torch.zeros(1, 1, 16)  # the tiny prior: 16 channels each
BAD_EMBEDS = [
    (dict(prompt="a cat", prompt_embeds=HIDDEN, prompt_embeds_pooled=POOLED), "either `prompt` or `prompt_embeds`"),
    (dict(prompt=None), r"`prompt` must be a string .*\(or pass `prompt_embeds`\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), r"`prompt_embeds` must be a \(prompts, tokens"),
    (dict(prompt=None, prompt_embeds=HIDDEN), "`prompt_embeds` needs `prompt_embeds_pooled`"),
    (dict(negative_prompt_embeds_pooled=POOLED), "`negative_prompt_embeds_pooled` needs `negative_prompt_embeds`"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 15), prompt_embeds_pooled=POOLED), r"shape \(1, any, 16\)"),
    (dict(prompt=None, prompt_embeds=HIDDEN, prompt_embeds_pooled=torch.zeros(1, 16)), r"shape \(1, 1, 16\)"),
    (
        dict(prompt=None, prompt_embeds=torch.full((1, 77, 16), float("nan")), prompt_embeds_pooled=POOLED),
        "`prompt_embeds` holds NaN",
    ),
    (
        dict(negative_prompt="x", negative_prompt_embeds=HIDDEN, negative_prompt_embeds_pooled=POOLED),
        "either `negative_prompt` or `negative_prompt_embeds`",
    ),
    (
        dict(
            prompt=None,
            prompt_embeds=HIDDEN,
            prompt_embeds_pooled=POOLED,
            negative_prompt_embeds=torch.zeros(1, 70, 16),
            negative_prompt_embeds_pooled=POOLED,
        ),
        "`negative_prompt_embeds` must have the shape of `prompt_embeds`",
    ),  # fmt: skip
    (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 70, 16), prompt_embeds_pooled=POOLED, guidance_scale=4.0),
        r"shapes \(1, 70, 16\) and \(1, 77, 16\)",
    ),
    (dict(image_embeds=torch.zeros(2, 1, 16), prompt=["a", "b", "c"]), "`image_embeds` has 2 rows for 3 prompts"),
    (dict(image_embeds=torch.zeros(1, 1, 15)), r"`image_embeds` must be a tensor of shape \(any, any, 16\)"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_EMBEDS)
def test_bad_embeds_raise_clear_errors(pipe, kwargs, message):  # noqa: F811
    assert pipe.prior.config.clip_text_in_channels == pipe.prior.config.clip_image_in_channels == 16
    kwargs = {"prompt": "a red cat", **CALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# callbacks, guidance properties, interrupt


class Record(PipelineCallback):
    """Records the latents after every step and whether guidance was on then."""

    tensor_inputs = ["latents"]

    def __init__(self):
        super().__init__()
        self.latents, self.guided = [], []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.latents.append(callback_kwargs["latents"].clone())
        self.guided.append(pipeline.do_classifier_free_guidance)
        return callback_kwargs


def inject(step: int, latents: torch.Tensor):
    """A callback that replaces the latents after ``step``."""
    return lambda p, i, t, tensors: {"latents": latents} if i == step else {}


def prior_batch_sizes(monkeypatch) -> list[int]:
    """Records the batch size of every Stage C run, personalized (its own forward) or plain."""
    from diffusers import StableCascadeUNet

    sizes = []
    for cls in (PersonalizedStageC, StableCascadeUNet):

        def recording(self, sample, *args, forward=cls.forward, **kwargs):
            sizes.append(len(sample))
            return forward(self, sample, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", recording)
    return sizes


TWO = ["a red cat", "a blue dog"]


@pytest.mark.parametrize(
    ("prompts", "user"),
    [
        ("a red cat", None),
        (TWO, None),
        (TWO, dict(user_guidance_scale=None)),
        ("a red cat", dict(user_guidance_scale=2.0)),
    ],
)
def test_sd_cfg_cutoff_callback_turns_guidance_off_from_the_cutoff_on(pipe, monkeypatch, prompts, user):  # noqa: F811
    """After diffusers' stock cutoff callback, every step equals an unguided step from the same latents."""
    randomize_(pipe.user_adapter)
    user = {} if user is None else dict(user_embeds=pipe.encode_user(USERS[0]), **user)
    cutoff, rows = 1, 1 if isinstance(prompts, str) else 2
    sizes = prior_batch_sizes(monkeypatch)
    record = Record()
    cut = latents_of(
        pipe, prompts, guidance_scale=4.0, callback_on_step_end=MultiPipelineCallbacks(
            [SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff), record]),
        **user,
    )  # fmt: skip
    assert pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance
    assert record.guided == [True] * cutoff + [False] * (STEPS - cutoff)
    groups_before = 3 if user.get("user_guidance_scale") else 2  # [text+user | text | negative] or two of them
    groups_after = 2 if user.get("user_guidance_scale") else 1  # no negative rows any more
    assert sizes == [groups_before * rows] * (cutoff + 1) + [groups_after * rows] * (STEPS - cutoff - 1)
    guided = Record()
    latents_of(pipe, prompts, guidance_scale=4.0, callback_on_step_end=guided, **user)
    assert torch.equal(guided.latents[cutoff], record.latents[cutoff])  # guided up to the cutoff step
    # the same generator state, the cutoff step's latents, then no text guidance: the same steps
    restart = inject(cutoff, guided.latents[cutoff])
    unguided = latents_of(pipe, prompts, guidance_scale=1.0, callback_on_step_end=restart, **user)
    assert torch.equal(cut, unguided)
    assert (cut - guided.latents[-1]).abs().max() > 1e-4  # and the cutoff changed the result


def test_callback_sees_diffusers_layout_and_its_prompt_embeds_are_used(pipe):  # noqa: F811
    prompts = ["a red cat", "a blue dog"]
    names = pipe._callback_tensor_inputs
    assert names == [
        "latents", "prompt_embeds", "prompt_embeds_pooled", "negative_prompt_embeds", "negative_prompt_embeds_pooled",
        "image_embeds",
    ]  # fmt: skip
    hidden, pooled = pipe.encode_prompt(prompts, torch.device("cpu"), num_images_per_prompt=2)
    negative, negative_pooled = pipe.encode_prompt(["", ""], torch.device("cpu"), num_images_per_prompt=2)
    seen = []

    def look(p, i, t, tensors):
        seen.append(tensors)
        return tensors

    latents_of(pipe, prompts, num_images_per_prompt=2, callback_on_step_end=look,
               callback_on_step_end_tensor_inputs=names)  # fmt: skip
    tensors = seen[0]
    assert torch.equal(tensors["prompt_embeds"], torch.cat([negative, hidden]))  # diffusers' [negative, positive]
    assert torch.equal(tensors["prompt_embeds_pooled"], torch.cat([negative_pooled, pooled]))
    assert torch.equal(tensors["negative_prompt_embeds"], negative)
    assert tensors["image_embeds"].shape == (4, 1, pipe.prior.config.clip_image_in_channels)

    # other prompts' embeddings from step 1 on, as `rows` positive rows or in the [negative, positive] layout
    other, other_pooled = pipe.encode_prompt(["a green frog"] * 2, torch.device("cpu"), num_images_per_prompt=2)
    record = Record()
    latents_of(pipe, prompts, num_images_per_prompt=2, callback_on_step_end=record)
    expected = latents_of(pipe, ["a green frog"] * 2, num_images_per_prompt=2,
                          callback_on_step_end=inject(0, record.latents[0]))  # fmt: skip
    both = dict(
        prompt_embeds=torch.cat([negative, other]), prompt_embeds_pooled=torch.cat([negative_pooled, other_pooled])
    )
    for replacement in (dict(prompt_embeds=other, prompt_embeds_pooled=other_pooled), both):

        def switch(p, i, t, tensors, replacement=replacement):
            return {**tensors, **replacement} if i == 0 else tensors

        got = latents_of(pipe, prompts, num_images_per_prompt=2, callback_on_step_end=switch,
                         callback_on_step_end_tensor_inputs=["prompt_embeds", "prompt_embeds_pooled"])  # fmt: skip
        assert torch.equal(got, expected)


def test_interrupt_skips_the_remaining_stage_c_steps(pipe, monkeypatch):  # noqa: F811
    record = Record()
    latents_of(pipe, callback_on_step_end=record)
    sizes = prior_batch_sizes(monkeypatch)

    def stop(p, i, t, tensors):
        p._interrupt = i == 1 or p.interrupt
        return {}

    assert torch.equal(latents_of(pipe, callback_on_step_end=stop), record.latents[1])
    assert len(sizes) == 2 and pipe.interrupt  # two steps ran
    latents_of(pipe)
    assert not pipe.interrupt and len(sizes) == 2 + STEPS  # the next call starts afresh


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda tensors: {"prompt_embeds": tensors["prompt_embeds"][:3]}, r"`prompt_embeds` must have shape \(2, 77"),
        (lambda tensors: {"noise_pred": tensors["latents"]}, r"returned \['noise_pred'\]"),
        (lambda tensors: {"image_embeds": None}, "`image_embeds` must have shape"),
    ],
)
def test_bad_callback_outputs_raise(pipe, returned, message):  # noqa: F811
    call = dict(callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "image_embeds"])
    with pytest.raises(ValueError, match=message):
        latents_of(pipe, ["a red cat", "a blue dog"], callback_on_step_end=lambda p, i, t, x: returned(x), **call)


def test_guidance_switched_on_mid_call_is_refused(pipe):  # noqa: F811
    def switch_on(p, i, t, tensors):
        p._guidance_scale = 4.0
        return {}

    with pytest.raises(ValueError, match="switched classifier-free guidance on"):
        latents_of(pipe, guidance_scale=1.0, callback_on_step_end=switch_on)
