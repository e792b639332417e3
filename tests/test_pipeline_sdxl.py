"""PersonalizedStableDiffusionXLPipeline end to end on a tiny SDXL repo laid out like the Hub's."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from ppd_diffusers import CLIPPreferenceEncoder, UserAdapter
from ppd_diffusers.attention import user_row_slice
from ppd_diffusers.pipeline_personalized_stable_diffusion_xl import (
    PersonalizedStableDiffusionXLPipeline,
    PersonalizedStableDiffusionXLPipelineOutput,
)
from ppd_diffusers.testing_utils import save_tiny_sdxl
from ppd_diffusers.user_attention_processor import USER_KV_KWARG, user_processor_layers

from .conftest import random_users, randomize_

# 32 px images: 16x16 latents; two steps keep every call well under a second
CALL = dict(num_inference_steps=2)
USERS = random_users(3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread than on two, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stable-diffusion-xl-base")
    save_tiny_sdxl(path)
    return str(path)


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir) -> CLIPPreferenceEncoder:
    return CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def base(sdxl_dir) -> StableDiffusionXLPipeline:
    """diffusers' own pipeline, loaded separately: its UNet never sees a user processor."""
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def new_adapter(unet, embed_dim: int, seed: int = 0) -> UserAdapter:
    torch.manual_seed(seed)
    return UserAdapter.from_model(unet, embed_dim, num_user_tokens=2, user_token_dim=8)


def build_pipe(sdxl_dir, encoder=None, adapter=True) -> PersonalizedStableDiffusionXLPipeline:
    pipe = PersonalizedStableDiffusionXLPipeline.from_pretrained(sdxl_dir, preference_encoder=encoder)
    if adapter:
        pipe.load_user_adapter(new_adapter(pipe.unet, encoder.embed_dim if encoder is not None else 8))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(sdxl_dir, encoder) -> PersonalizedStableDiffusionXLPipeline:
    return build_pipe(sdxl_dir, encoder)


def generate(pipe, prompt="a red cat", seed=0, output_type="latent", **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type=output_type, **{**CALL, **kwargs}).images


def record_unet_calls(pipe) -> list[tuple[int, slice | None]]:
    """Records, for every UNet call, its batch size and which rows get the user."""
    calls = []

    def record(module, args, kwargs):
        batch = args[0].shape[0]
        user_kv = (kwargs.get("cross_attention_kwargs") or {}).get(USER_KV_KWARG)
        calls.append((batch, None if user_kv is None else user_row_slice(user_kv.rows, batch)))

    pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    return calls


def test_without_a_user_equals_stable_diffusion_xl_bit_for_bit(sdxl_dir, encoder, base):
    without_adapter = build_pipe(sdxl_dir, adapter=False)
    with_adapter = build_pipe(sdxl_dir, encoder)
    randomize_(with_adapter.user_adapter)  # a trained adapter changes nothing without a user
    assert len(user_processor_layers(with_adapter.unet)) == len(with_adapter.user_adapter.config.layer_names)
    calls = [
        dict(guidance_scale=5.0, output_type="latent"),
        dict(guidance_scale=1.0, output_type="np"),
        dict(prompt=["a red cat", "a blue dog"], negative_prompt="blurry", num_images_per_prompt=2, output_type="pt"),
    ]
    for call in calls:
        expected = generate(base, **call)
        for pipe in (without_adapter, with_adapter):
            got = generate(pipe, **call)
            assert type(got) is type(expected) and (got == expected).all()


def test_fresh_adapter_and_user_scale_zero_equal_the_base_model(pipe, base):
    plain = generate(base)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), plain)  # V' starts at zero
    randomize_(pipe.user_adapter)
    personalized = generate(pipe, preference_pairs=USERS[0])
    assert (personalized - plain).abs().max() > 1e-3
    assert torch.equal(generate(pipe, preference_pairs=USERS[0], user_scale=0.0), plain)
    pipe.set_user_adapter_scale(0.0)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), plain)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0], user_scale=1.0), personalized)


def test_per_prompt_users_and_scales_in_one_batch_equal_separate_runs(pipe):
    randomize_(pipe.user_adapter)
    prompts, scales = ["a red cat", "a blue dog"], [1.0, 0.7]
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    batch = pipe(
        prompts, preference_pairs=USERS[:2], user_scale=scales, num_images_per_prompt=2, generator=generators,
        output_type="latent", **CALL,
    ).images  # fmt: skip
    for p in range(2):
        generators = [torch.Generator().manual_seed(s) for s in (2 * p, 2 * p + 1)]
        alone = pipe(
            prompts[p], preference_pairs=USERS[p], user_scale=scales[p], num_images_per_prompt=2,
            generator=generators, output_type="latent", **CALL,
        ).images  # fmt: skip
        torch.testing.assert_close(batch[2 * p : 2 * p + 2], alone, rtol=1e-5, atol=1e-5)
    assert (batch[0] - generate(pipe, preference_pairs=USERS[1])).abs().max() > 1e-3  # the users differ


def test_the_user_joins_the_conditional_rows_only(pipe):
    """Guidance is ``e_0 + g (e_user - e_0)``: the negative rows run without the user."""
    randomize_(pipe.user_adapter)
    calls = record_unet_calls(pipe)
    captured = {}

    def capture(module, args, kwargs, output):
        captured.setdefault("first", (args, kwargs, output[0]))

    pipe.unet.register_forward_hook(capture, with_kwargs=True)
    generate(pipe, ["a red cat", "a blue dog"], preference_pairs=USERS[0])
    assert calls == [(4, slice(2, 4))] * 2
    (sample, t), kwargs, output = captured["first"]
    user_kv = kwargs["cross_attention_kwargs"][USER_KV_KWARG]

    def rows(part, user=None):
        cond = {k: v[part] for k, v in kwargs["added_cond_kwargs"].items()}
        attention = None if user is None else {USER_KV_KWARG: user}
        return pipe.unet(
            sample[part], t, encoder_hidden_states=kwargs["encoder_hidden_states"][part], added_cond_kwargs=cond,
            cross_attention_kwargs=attention,
        ).sample  # fmt: skip

    torch.testing.assert_close(output[:2], rows(slice(0, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output[2:], rows(slice(2, 4), user_kv.for_rows(None)), rtol=1e-5, atol=1e-5)
    assert (output[2:] - rows(slice(2, 4))).abs().max() > 1e-3
    # without guidance every row has the user
    calls.clear()
    generate(pipe, ["a red cat", "a blue dog"], preference_pairs=USERS[0], guidance_scale=1.0)
    assert calls == [(2, slice(0, 2))] * 2


def test_user_guidance_scale_is_the_three_prediction_formula(pipe, base):
    from ppd_diffusers.guidance import guided_prediction
    from ppd_diffusers.pipeline_personalized_stable_diffusion_xl import _UserGuidance

    randomize_(pipe.user_adapter)
    u = pipe.encode_user(USERS[0])
    folded = generate(pipe, user_embeds=u, guidance_scale=5.0)
    # g_u = g needs no text-only prediction: the same computation
    assert torch.equal(generate(pipe, user_embeds=u, guidance_scale=5.0, user_guidance_scale=5.0), folded)
    no_cfg = generate(pipe, user_embeds=u, guidance_scale=1.0)
    assert torch.equal(generate(pipe, user_embeds=u, guidance_scale=1.0, user_guidance_scale=1.0), no_cfg)
    # g_u = 0 removes the user's term: plain SDXL
    torch.testing.assert_close(
        generate(pipe, user_embeds=u, user_guidance_scale=0.0), generate(base), rtol=0, atol=1e-5
    )
    calls = record_unet_calls(pipe)
    stronger = generate(pipe, user_embeds=u, guidance_scale=5.0, user_guidance_scale=8.0)
    assert calls == [(3, slice(2, 3))] * 2  # [negative, text, text + user]
    assert (stronger - folded).abs().max() > 1e-4

    # one UNet call under the hooks gives exactly what the parent's guidance needs
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 16, 32, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    user_kv = pipe.user_adapter(u).for_rows(slice(-1, None))
    t = torch.tensor(500)

    def unet(part, user_kv=None):
        return pipe.unet(
            sample[part], t, encoder_hidden_states=text[part], added_cond_kwargs={k: v[part] for k, v in cond.items()},
            cross_attention_kwargs=None if user_kv is None else {USER_KV_KWARG: user_kv},
        ).sample  # fmt: skip

    e_0, e_t, e_u = unet(slice(0, 1)), unet(slice(1, 2)), unet(slice(1, 2), user_kv.for_rows(None))
    pipe._guidance_scale = 5.0  # what the parent's `__call__` sets
    hooks = (len(pipe.unet._forward_pre_hooks), len(pipe.unet._forward_hooks))
    with _UserGuidance(pipe, rows=1, user_guidance_scale=2.0).hooked():
        uncond, cond_out = unet(slice(0, 2), user_kv).chunk(2)
        alone = unet(slice(1, 2), user_kv)  # guidance turned off mid-way (one row): e_t + g_u (e_u - e_t)
    expected = guided_prediction(e_u, e_t, e_0, 5.0, 2.0)
    torch.testing.assert_close(uncond + 5.0 * (cond_out - uncond), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, guided_prediction(e_u, e_t, None, 5.0, 2.0), rtol=1e-5, atol=1e-5)
    assert (len(pipe.unet._forward_pre_hooks), len(pipe.unet._forward_hooks)) == hooks  # removed after the call


def test_preference_pairs_give_the_user_embeds_they_return(pipe):
    randomize_(pipe.user_adapter)
    out = pipe(
        "a red cat", preference_pairs=USERS[0], output_type="np", generator=torch.Generator().manual_seed(0), **CALL
    )
    assert isinstance(out, PersonalizedStableDiffusionXLPipelineOutput)
    assert out.images.shape == (1, 32, 32, 3)
    assert torch.equal(out.user_embeds, pipe.encode_user(USERS[0]))
    images, user_embeds = pipe(
        "a red cat", user_embeds=out.user_embeds, output_type="np", return_dict=False,
        generator=torch.Generator().manual_seed(0), **CALL,
    )  # fmt: skip
    assert user_embeds is out.user_embeds and (images == out.images).all()
    pil = pipe("a red cat", preference_pairs=USERS[0], **CALL).images
    assert len(pil) == 1 and pil[0].size == (32, 32)
    images, user_embeds = pipe("a red cat", output_type="np", return_dict=False, **CALL)
    assert user_embeds is None


def test_save_pretrained_from_pretrained_reproduces_images(pipe, tmp_path):
    randomize_(pipe.user_adapter)
    expected = generate(pipe, preference_pairs=USERS[0])
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "PersonalizedStableDiffusionXLPipeline"
    assert index["user_adapter"] == ["ppd_diffusers", "UserAdapter"]
    assert index["preference_encoder"] == ["ppd_diffusers", "CLIPPreferenceEncoder"]
    loaded = PersonalizedStableDiffusionXLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded, preference_pairs=USERS[0]), expected)


def test_from_base_model_and_from_pretrained_with_user_components(sdxl_dir, encoder, tmp_path):
    source = build_pipe(sdxl_dir, encoder)
    randomize_(source.user_adapter).save_pretrained(tmp_path / "adapter")
    encoder.save_pretrained(tmp_path / "encoder")
    expected = generate(source, preference_pairs=USERS[0])
    from_folders = PersonalizedStableDiffusionXLPipeline.from_base_model(
        sdxl_dir, user_adapter=str(tmp_path / "adapter"), preference_encoder=str(tmp_path / "encoder")
    )
    from_folders.set_progress_bar_config(disable=True)
    assert torch.equal(generate(from_folders, preference_pairs=USERS[0]), expected)
    objects = PersonalizedStableDiffusionXLPipeline.from_pretrained(
        sdxl_dir, user_adapter=source.user_adapter, preference_encoder=encoder
    )
    objects.set_progress_bar_config(disable=True)
    assert objects.personalized_model is not None
    assert torch.equal(generate(objects, preference_pairs=USERS[0]), expected)


def test_lora_on_the_unet_and_a_user_both_act(sdxl_dir, encoder):
    from peft import LoraConfig

    pipe = build_pipe(sdxl_dir, encoder)
    randomize_(pipe.user_adapter)
    plain, user_only = generate(pipe), generate(pipe, preference_pairs=USERS[0])
    pipe.unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    lora_only, both = generate(pipe), generate(pipe, preference_pairs=USERS[0])
    assert (lora_only - plain).abs().max() > 1e-3
    assert (both - lora_only).abs().max() > 1e-3 and (both - user_only).abs().max() > 1e-3
    assert torch.equal(generate(pipe, preference_pairs=USERS[0], user_scale=0.0), lora_only)
    # the LoRA scale of `cross_attention_kwargs` still reaches peft beside the user
    assert torch.equal(generate(pipe, cross_attention_kwargs={"scale": 0.0}), plain)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0], cross_attention_kwargs={"scale": 0.0}), user_only)


def ip_adapter_state_dict(unet, clip_dim: int = 8, seed: int = 0) -> dict:
    """A random IP-Adapter in the layout of the published SDXL ones (4 image tokens per image)."""
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * width, clip_dim, generator=g),
        "proj.bias": torch.randn(4 * width, generator=g),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    ip_adapter = {}
    cross = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for index, name in enumerate(cross):
        channels = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for key in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * index + 1}.{key}.weight"] = torch.randn(channels, width, generator=g) * 0.5
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_ip_adapter_and_a_user_both_act(sdxl_dir, encoder):
    pipe = build_pipe(sdxl_dir, encoder)
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    reference.set_progress_bar_config(disable=True)
    randomize_(pipe.user_adapter)
    plain, user_only = generate(pipe), generate(pipe, preference_pairs=USERS[0])
    state_dict = ip_adapter_state_dict(pipe.unet)
    for p in (pipe, reference):
        p.load_ip_adapter(state_dict, subfolder=None, weight_name="ip.safetensors", image_encoder_folder=None)
    image = dict(ip_adapter_image_embeds=[torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(1))])
    ip_only = generate(reference, **image)
    assert torch.equal(generate(pipe, **image), ip_only) and (ip_only - plain).abs().max() > 1e-3
    both = generate(pipe, preference_pairs=USERS[0], **image)
    assert (both - ip_only).abs().max() > 1e-3 and (both - user_only).abs().max() > 1e-3
    assert torch.equal(generate(pipe, preference_pairs=USERS[0], user_scale=0.0, **image), ip_only)
    # the parent's IP-Adapter methods still find their processors behind the user processors
    with_user_guidance = generate(pipe, preference_pairs=USERS[0], user_guidance_scale=2.0, **image)
    assert (with_user_guidance - both).abs().max() > 1e-4  # the image embeddings follow the extra text-only rows
    pipe.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(generate(pipe, preference_pairs=USERS[0], **image), user_only, rtol=1e-5, atol=1e-5)
    pipe.unload_ip_adapter()
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), user_only)
    assert torch.equal(generate(pipe), plain)


def test_processor_swapping_features_keep_the_user(pipe):
    randomize_(pipe.user_adapter)
    plain, user_only = generate(pipe), generate(pipe, preference_pairs=USERS[0])
    pipe.fuse_qkv_projections()
    torch.testing.assert_close(generate(pipe, preference_pairs=USERS[0]), user_only, rtol=0, atol=1e-4)
    pipe.unfuse_qkv_projections()
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), user_only)
    pipe.enable_attention_slicing(1)
    torch.testing.assert_close(generate(pipe, preference_pairs=USERS[0]), user_only, rtol=0, atol=1e-4)
    pipe.disable_attention_slicing()
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), user_only)
    # processors replaced behind the pipeline's back are wrapped again at the next call with a user
    from diffusers.models.attention_processor import AttnProcessor

    pipe.unet.set_attn_processor(AttnProcessor())
    torch.testing.assert_close(generate(pipe, preference_pairs=USERS[0]), user_only, rtol=0, atol=1e-4)
    torch.testing.assert_close(generate(pipe), plain, rtol=0, atol=1e-4)


def test_stock_cfg_cutoff_callback_keeps_the_user_on_the_prompt_rows(pipe, base):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    def cutoff():
        return SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)

    # a fresh adapter: the parent's result with the same callback, bit for bit
    assert torch.equal(
        generate(pipe, preference_pairs=USERS[0], callback_on_step_end=cutoff(), num_inference_steps=3),
        generate(base, callback_on_step_end=cutoff(), num_inference_steps=3),
    )
    randomize_(pipe.user_adapter)
    calls = record_unet_calls(pipe)
    with_cutoff = generate(pipe, preference_pairs=USERS[0], callback_on_step_end=cutoff(), num_inference_steps=3)
    # guidance on at step 0, then off: the single remaining row keeps its user
    assert calls == [(2, slice(1, 2)), (1, slice(0, 1)), (1, slice(0, 1))]
    assert (with_cutoff - generate(pipe, preference_pairs=USERS[0], num_inference_steps=3)).abs().max() > 1e-4
    calls.clear()
    generate(pipe, preference_pairs=USERS[0], callback_on_step_end=cutoff(), num_inference_steps=3,
             user_guidance_scale=2.0)  # fmt: skip
    assert calls == [(3, slice(2, 3)), (2, slice(1, 2)), (2, slice(1, 2))]


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(p, step, t, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 1 else {}

    latents = generate(pipe, preference_pairs=USERS[0], callback_on_step_end=callback)
    assert seen == [(0, (1, 4, 16, 16)), (1, (1, 4, 16, 16))]
    assert torch.equal(latents, torch.zeros_like(latents))


def test_model_cpu_offload_matches_and_chains_the_user_models_before_the_text_encoders(pipe):
    randomize_(pipe.user_adapter)
    expected = generate(pipe, preference_pairs=USERS[0])
    pipe.enable_model_cpu_offload(device="cpu")
    # accelerate unloads a model when the next one of the chain runs: the order of a call
    names = [next(n for n, m in pipe.components.items() if m is hook.model) for hook in pipe._all_hooks]
    assert names == ["preference_encoder", "user_adapter", "text_encoder", "text_encoder_2", "unet", "vae"]
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), expected)
    assert torch.equal(generate(pipe, user_embeds=pipe.encode_user(USERS[0])), expected)


def test_load_unload_user_adapter(pipe, base):
    randomize_(pipe.user_adapter)
    personalized = generate(pipe, preference_pairs=USERS[0])
    adapter = pipe.user_adapter
    pipe.unload_user_adapter()
    assert pipe.user_adapter is None and pipe.personalized_model is None
    assert not user_processor_layers(pipe.unet)
    assert torch.equal(generate(pipe), generate(base))
    with pytest.raises(ValueError, match="no user adapter is loaded"):
        generate(pipe, preference_pairs=USERS[0])
    pipe.load_user_adapter(adapter)
    assert torch.equal(generate(pipe, preference_pairs=USERS[0]), personalized)


BAD_INPUTS = [
    (dict(preference_pairs=USERS[0], user_embeds=torch.zeros(1, 4, 48)), "either `preference_pairs` or `user_embeds`"),
    (dict(preference_pairs=USERS), "describes 3 users for 1 prompts"),
    (dict(user_embeds=torch.zeros(4, 48)), r"must be a \(users, tokens, 48\) tensor"),
    (dict(user_embeds=torch.zeros(2, 4, 48)), "describes 2 users for 1 prompts"),
    (dict(user_embeds=torch.full((1, 4, 48), float("nan"))), "`user_embeds` holds NaN or infinite values"),
    (dict(user_scale=1.0), "`user_scale` weights a user"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_scale=[1.0, 2.0]), "has 2 entries for 1 prompts"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_scale=float("nan")), "`user_scale` must be a finite"),
    (dict(user_guidance_scale=2.0), "`user_guidance_scale` guides a user"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_guidance_scale=float("inf")), "`user_guidance_scale` must be a fin"),
    (dict(user_embeds=torch.zeros(1, 4, 48), user_guidance_scale=True), "`user_guidance_scale` must be a finite"),
    (dict(num_images_per_prompt=0), "`num_images_per_prompt` must be a positive integer"),
    (dict(cross_attention_kwargs=[1]), "`cross_attention_kwargs` must be a dict"),
    (
        dict(user_embeds=torch.zeros(1, 4, 48), cross_attention_kwargs={USER_KV_KWARG: None}),
        f"`cross_attention_kwargs` holds `{USER_KV_KWARG}`",
    ),
    (dict(prompt=None), "`prompt` must be a string or a non-empty list of strings \\(or pass `prompt_embeds`\\)"),
]


def test_unknown_arguments_are_refused_not_ignored(pipe):
    def latent() -> dict:
        return dict(CALL, output_type="latent", generator=torch.Generator().manual_seed(0))

    with pytest.warns(FutureWarning, match="`preference_scale` is deprecated"):
        old_name = pipe("a red cat", user_embeds=torch.ones(1, 4, 48), preference_scale=0.5, **latent()).images
    new_name = pipe("a red cat", user_embeds=torch.ones(1, 4, 48), user_scale=0.5, **latent()).images
    assert torch.equal(old_name, new_name)
    assert pipe.cross_attention_kwargs is None  # the call's user keys/values are not kept after it
    with pytest.raises(ValueError, match="Pass `user_scale` only"):
        pipe("a red cat", user_embeds=torch.zeros(1, 4, 48), user_scale=1.0, preference_scale=0.5, **CALL)
    with pytest.raises(TypeError, match=r"unexpected arguments \['num_inference_step'\]"):
        pipe("a red cat", num_inference_step=3)


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, message):
    kwargs = {"prompt": "a red cat", **CALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_users_without_encoder_or_adapter_raise(sdxl_dir):
    pipe = build_pipe(sdxl_dir, adapter=False)
    with pytest.raises(ValueError, match="no user adapter is loaded"):
        pipe("a cat", user_embeds=torch.zeros(1, 4, 8), **CALL)
    pipe.load_user_adapter(new_adapter(pipe.unet, 8))
    with pytest.raises(ValueError, match="needs a `preference_encoder`"):
        pipe("a cat", preference_pairs=USERS[0], **CALL)
    assert generate(pipe, user_embeds=torch.zeros(1, 3, 8)).shape == (1, 4, 16, 16)


def test_prompt_embeds_and_positional_arguments(pipe):
    randomize_(pipe.user_adapter)
    expected = generate(pipe, preference_pairs=USERS[0])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a red cat", device=torch.device("cpu"))
    from_embeds = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled, preference_pairs=USERS[0], output_type="latent",
        generator=torch.Generator().manual_seed(0), **CALL,
    ).images  # fmt: skip
    assert torch.equal(from_embeds, expected)
    # the parent's positional order: prompt, prompt_2, height, width, num_inference_steps
    positional = pipe(
        "a red cat", None, 32, 32, 2, preference_pairs=USERS[0], output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert torch.equal(positional, expected)


def test_guidance_distilled_unet_puts_the_user_on_every_row(sdxl_dir, encoder):
    """A UNet with ``time_cond_proj_dim`` (LCM-style) runs no negative rows: every row gets the user."""
    from ppd_diffusers.testing_utils import tiny_sdxl_components, tiny_sdxl_unet

    components = {**tiny_sdxl_components(), "unet": tiny_sdxl_unet(time_cond_proj_dim=8)}
    pipe = PersonalizedStableDiffusionXLPipeline(**components, preference_encoder=encoder)
    pipe.load_user_adapter(randomize_(new_adapter(pipe.unet, encoder.embed_dim)))
    pipe.set_progress_bar_config(disable=True)
    calls = record_unet_calls(pipe)
    folded = generate(pipe, preference_pairs=USERS[0], guidance_scale=5.0)
    assert calls == [(1, slice(0, 1))] * 2
    calls.clear()
    guided = generate(pipe, preference_pairs=USERS[0], guidance_scale=5.0, user_guidance_scale=3.0)
    assert calls == [(2, slice(1, 2))] * 2 and (guided - folded).abs().max() > 1e-4
