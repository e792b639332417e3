"""PersonalizedFluxPipeline end to end on a tiny Flux folder laid out like the Hub's (`save_tiny_flux`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from ppd_diffusers import CLIPPreferenceEncoder, UserAdapter
from ppd_diffusers.pipeline_personalized_flux import PersonalizedFluxPipeline, PersonalizedFluxPipelineOutput
from ppd_diffusers.testing_utils import save_tiny_flux, t5_text_tokenizer
from ppd_diffusers.user_attention_processor import USER_KV_KWARG, FluxUserAttnProcessor

from .conftest import random_users, randomize_

# 16 px: a 8x8 VAE latent, 4x4 packed tokens; 16 T5 tokens (one a character)
CALL = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16)
USERS = random_users(2)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("FLUX.1-dev")
    save_tiny_flux(path)
    return str(path)


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir) -> CLIPPreferenceEncoder:
    return CLIPPreferenceEncoder.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def base(flux_dir) -> FluxPipeline:
    base = FluxPipeline.from_pretrained(flux_dir)
    base.set_progress_bar_config(disable=True)
    return base


def fresh_adapter(pipe, width: int) -> UserAdapter:
    torch.manual_seed(0)
    return UserAdapter.from_model(pipe.transformer, user_embed_dim=width, num_user_tokens=2, user_token_dim=8)


@pytest.fixture
def pipe(flux_dir, encoder) -> PersonalizedFluxPipeline:
    pipe = PersonalizedFluxPipeline.from_pretrained(flux_dir, preference_encoder=encoder)
    pipe.load_user_adapter(fresh_adapter(pipe, encoder.embed_dim))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def user(encoder) -> torch.Tensor:
    return encoder.encode(USERS)  # two users


def generate(pipe, prompt="a red cat", seed=0, output_type="latent", **kwargs):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(_rows(prompt, kwargs))]
    return pipe(prompt, generator=generators, output_type=output_type, **{**CALL, **kwargs}).images


def _rows(prompt, kwargs) -> int:
    return (1 if isinstance(prompt, str) else len(prompt)) * kwargs.get("num_images_per_prompt", 1)


def test_tiny_flux_folder_and_t5_tokenizer(flux_dir, base, tmp_path):
    with open(f"{flux_dir}/model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == "FluxPipeline" and index["tokenizer_2"][0] == "transformers"
    assert base.vae_scale_factor == 2 and base.transformer.config.in_channels == 4 * 2 * 2
    tokenizer = t5_text_tokenizer()
    ids = tokenizer("a red cat!").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red cat!"
    tokenizer.save_pretrained(tmp_path)
    assert type(base.tokenizer_2).from_pretrained(tmp_path)("a red cat!").input_ids == ids


def test_without_user_equals_flux_pipeline(base, pipe, flux_dir):
    """No user: FluxPipeline's images bit for bit, with the adapter's processors installed or not."""
    bare = PersonalizedFluxPipeline.from_pretrained(flux_dir)
    bare.set_progress_bar_config(disable=True)
    assert bare.user_adapter is None and bare.preference_encoder is None
    assert any(isinstance(p, FluxUserAttnProcessor) for p in pipe.transformer.attn_processors.values())
    randomize_(pipe.user_adapter)
    calls = [
        dict(prompt="a red cat"),
        dict(prompt=["a red cat", "a blue dog"], num_images_per_prompt=2, guidance_scale=5.0),
        dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=3.0),
    ]
    for call in calls:
        for output_type in ("latent", "np"):
            expected = generate(base, output_type=output_type, **call)
            for candidate in (bare, pipe):
                assert type(got := generate(candidate, output_type=output_type, **call)) is type(expected)
                assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected))


def test_fresh_adapter_and_user_scale_zero_equal_base(pipe, base, user):
    plain = generate(base, ["a red cat", "a blue dog"])
    prompts = ["a red cat", "a blue dog"]
    assert torch.equal(generate(pipe, prompts, user_embeds=user), plain)  # V' starts at zero
    randomize_(pipe.user_adapter)
    personalized = generate(pipe, prompts, user_embeds=user)
    assert (personalized - plain).abs().amax(dim=(1, 2)).min() > 1e-3  # every row moves
    images = generate(pipe, prompts, user_embeds=user, output_type="np")
    assert np.abs(images - generate(base, prompts, output_type="np")).max() > 1e-3
    assert torch.equal(generate(pipe, prompts, user_embeds=user, user_scale=0.0), plain)
    mixed = generate(pipe, prompts, user_embeds=user, user_scale=[0.0, 1.0])  # one scale per prompt
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], personalized[1])
    pipe.set_user_adapter_scale(0)
    assert torch.equal(generate(pipe, prompts, user_embeds=user), plain)
    assert torch.equal(generate(pipe, prompts, user_embeds=user, user_scale=1.0), personalized)


def test_user_per_prompt_equals_one_by_one(pipe, user):
    randomize_(pipe.user_adapter)
    prompts = ["a red cat", "a blue dog"]
    batched = generate(pipe, prompts, user_embeds=user, num_images_per_prompt=2)
    for i, prompt in enumerate(prompts):
        alone = generate(pipe, prompt, seed=2 * i, user_embeds=user[i : i + 1], num_images_per_prompt=2)
        torch.testing.assert_close(batched[2 * i : 2 * i + 2], alone, rtol=1e-5, atol=1e-5)
    # one user for every prompt is that user repeated
    shared = generate(pipe, prompts, user_embeds=user[:1])
    torch.testing.assert_close(shared, generate(pipe, prompts, user_embeds=user[:1].expand(2, -1, -1)))


def _transformer_calls(pipe) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Records, for each transformer call, whether it has a user and its text embeddings."""
    calls = []

    def record(module, args, kwargs):
        attention_kwargs = kwargs.get("joint_attention_kwargs") or {}
        calls.append((USER_KV_KWARG in attention_kwargs, kwargs["encoder_hidden_states"]))

    # a forward hook sees the arguments after every pre-hook, the pipeline's included
    return calls, pipe.transformer.register_forward_hook(lambda m, a, kw, out: record(m, a, kw), with_kwargs=True)


def test_true_cfg_has_the_null_user_in_the_negative_call(pipe, user):
    randomize_(pipe.user_adapter)
    calls, handle = _transformer_calls(pipe)
    call = dict(negative_prompt="blurry", true_cfg_scale=3.0, user_embeds=user[:1])
    generate(pipe, **call)
    handle.remove()
    negative, _, _ = pipe.encode_prompt("blurry", max_sequence_length=16)
    positive, _, _ = pipe.encode_prompt("a red cat", max_sequence_length=16)
    # FluxPipeline's order, which the pipeline relies on: positive then negative, each step
    assert [has_user for has_user, _ in calls] == [True, False] * CALL["num_inference_steps"]
    for i, (_, text) in enumerate(calls):
        torch.testing.assert_close(text, positive if i % 2 == 0 else negative)

    # one step: latents are affine in the noise prediction, so the guidance formula shows in them
    one = dict(call, num_inference_steps=1)
    default = generate(pipe, **one)  # e_0 + g (e_user - e_0)
    text = generate(pipe, **one, user_guidance_scale=0.0)  # e_0 + g (e_text - e_0): no user at all
    user_once = generate(pipe, **one, user_guidance_scale=1.0)  # ... + 1 (e_user - e_text)
    torch.testing.assert_close(default, text + 3.0 * (user_once - text), rtol=1e-5, atol=1e-5)
    del one["user_embeds"]
    assert torch.equal(text, generate(pipe, **one))


def test_user_guidance_without_true_cfg(pipe, user):
    randomize_(pipe.user_adapter)
    calls, handle = _transformer_calls(pipe)
    one = dict(num_inference_steps=1, user_embeds=user[:1])
    twice = generate(pipe, **one, user_guidance_scale=2.0)
    handle.remove()
    assert [has_user for has_user, _ in calls] == [True]  # the text-only call runs inside, without a user
    personalized, text = generate(pipe, **one), generate(pipe, num_inference_steps=1)
    assert torch.equal(generate(pipe, **one, user_guidance_scale=0.0), text)
    assert torch.equal(generate(pipe, **one, user_guidance_scale=1.0), personalized)  # g_u = 1: no extra call
    torch.testing.assert_close(twice, text + 2.0 * (personalized - text), rtol=1e-5, atol=1e-5)


def test_preference_pairs_output_and_tuple(pipe, user):
    randomize_(pipe.user_adapter)
    adapter_calls = []
    pipe.user_adapter.register_forward_hook(lambda *args: adapter_calls.append(1))
    out = pipe(["a red cat", "a blue dog"], preference_pairs=USERS, generator=torch.Generator().manual_seed(0), **CALL)
    assert isinstance(out, PersonalizedFluxPipelineOutput) and len(adapter_calls) == 1  # once per call, not per step
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    torch.testing.assert_close(out.user_embeds, user, rtol=0, atol=0)
    images, embeds = pipe("a red cat", user_embeds=user[:1], return_dict=False, output_type="latent", **CALL)
    assert embeds is not None and torch.equal(embeds, user[:1]) and images.shape == (1, 16, 16)
    assert pipe("a red cat", return_dict=False, output_type="latent", **CALL)[1] is None


def test_callbacks_with_a_user(pipe, user):
    randomize_(pipe.user_adapter)
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 1 else {}

    out = generate(
        pipe, user_embeds=user[:1], callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )  # fmt: skip
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
    assert torch.equal(out, torch.zeros_like(out))


def test_save_load_and_one_call_constructors(pipe, user, encoder, flux_dir, tmp_path):
    randomize_(pipe.user_adapter)
    expected = generate(pipe, user_embeds=user[:1])
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["user_adapter"] == ["ppd_diffusers", "UserAdapter"]
    assert index["preference_encoder"][0] == "ppd_diffusers"
    loaded = PersonalizedFluxPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded, user_embeds=user[:1]), expected)
    assert torch.equal(generate(loaded, preference_pairs=USERS[0]), generate(pipe, preference_pairs=USERS[0]))

    pipe.user_adapter.save_pretrained(tmp_path / "adapter")
    encoder.save_pretrained(tmp_path / "encoder")
    # components as objects: diffusers' own from_pretrained
    direct = PersonalizedFluxPipeline.from_pretrained(
        flux_dir, user_adapter=UserAdapter.from_pretrained(tmp_path / "adapter"), preference_encoder=encoder
    )
    # ids or folders: from_base_model
    built = PersonalizedFluxPipeline.from_base_model(
        flux_dir, user_adapter=str(tmp_path / "adapter"), preference_encoder=str(tmp_path / "encoder")
    )
    for other in (direct, built):
        other.set_progress_bar_config(disable=True)
        assert torch.equal(generate(other, user_embeds=user[:1]), expected)
    with pytest.raises(ValueError, match="from_base_model"):
        PersonalizedFluxPipeline.from_pretrained(flux_dir, user_adapter=str(tmp_path / "adapter"))


def test_lora_keeps_working_with_a_user(pipe, user, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ppd_diffusers.testing_utils import tiny_flux_transformer

    donor = tiny_flux_transformer()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor))
    randomize_(pipe.user_adapter)
    without_lora = generate(pipe, user_embeds=user[:1])
    pipe.load_lora_weights(tmp_path)
    assert all(isinstance(pipe.transformer.get_submodule(n).processor, FluxUserAttnProcessor)
               for n in pipe.user_adapter.config.layer_names)  # fmt: skip
    with_lora = generate(pipe, user_embeds=user[:1])
    assert (with_lora - without_lora).abs().max() > 1e-3  # the LoRA acts on the personalized calls
    assert (with_lora - generate(pipe)).abs().max() > 1e-3  # and the user on the LoRA model
    zero = generate(pipe, user_embeds=user[:1], joint_attention_kwargs={"scale": 0.0})
    assert torch.equal(zero, without_lora)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, user_embeds=user[:1]), without_lora)


def _ip_adapter_state(pipe, image_dim: int = 12) -> dict:
    """Random IP-Adapter weights in the layout `FluxPipeline.load_ip_adapter` reads."""
    g = torch.Generator().manual_seed(5)
    width, tokens = pipe.transformer.config.joint_attention_dim, 4
    image_proj = {
        "proj.weight": torch.randn(tokens * width, image_dim, generator=g) * 0.1,
        "proj.bias": torch.zeros(tokens * width),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    inner = pipe.transformer.inner_dim
    ip_adapter = {}
    for i in range(pipe.transformer.config.num_layers):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{i}.{name}.weight"] = torch.randn(inner, width, generator=g) * 0.3
            ip_adapter[f"{i}.{name}.bias"] = torch.zeros(inner)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_ip_adapter_load_scale_unload_keep_the_user(pipe, user):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    randomize_(pipe.user_adapter)
    before = generate(pipe, user_embeds=user[:1])
    pipe.load_ip_adapter(
        _ip_adapter_state(pipe), weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None
    )
    layers = [pipe.transformer.get_submodule(n) for n in pipe.user_adapter.config.layer_names]
    assert all(isinstance(layer.processor, FluxUserAttnProcessor) for layer in layers)
    assert all(isinstance(layer.processor.base, FluxIPAdapterAttnProcessor) for layer in layers)
    image = dict(
        ip_adapter_image_embeds=[torch.randn(1, 1, 12, generator=torch.Generator().manual_seed(1))],
        negative_ip_adapter_image_embeds=[torch.zeros(1, 1, 12)],
    )
    with_image = generate(pipe, user_embeds=user[:1], **image)
    assert (with_image - before).abs().max() > 1e-3
    assert (with_image - generate(pipe, **image)).abs().max() > 1e-3  # the user still acts
    pipe.set_ip_adapter_scale(0.0)
    assert all(layer.processor.base.scale == [0.0] for layer in layers)
    torch.testing.assert_close(generate(pipe, user_embeds=user[:1], **image), before, rtol=1e-5, atol=1e-5)
    pipe.unload_ip_adapter()
    assert all(type(layer.processor.base) is FluxAttnProcessor for layer in layers)
    assert torch.equal(generate(pipe, user_embeds=user[:1]), before)


def test_fused_or_replaced_processors_keep_the_user(pipe, user):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    randomize_(pipe.user_adapter)
    expected = generate(pipe, user_embeds=user[:1])
    pipe.transformer.set_attn_processor(FluxAttnProcessor())  # drops the user processors: wrapped again at the call
    assert torch.equal(generate(pipe, user_embeds=user[:1]), expected)
    pipe.transformer.fuse_qkv_projections()
    torch.testing.assert_close(generate(pipe, user_embeds=user[:1]), expected, rtol=1e-5, atol=1e-5)


def test_model_cpu_offload_with_a_user(pipe, user):
    randomize_(pipe.user_adapter)
    calls = [
        dict(user_embeds=user[:1]),
        dict(user_embeds=user[:1], negative_prompt="blurry", true_cfg_scale=2.0, user_guidance_scale=3.0),
        dict(user_embeds=user[:1], user_guidance_scale=2.0),
    ]
    expected = [generate(pipe, **call) for call in calls]
    # the CPU as the execution device: accelerate's offload hooks run all the same
    pipe.enable_model_cpu_offload(device="cpu")
    assert {hook.model for hook in pipe._all_hooks} >= {pipe.user_adapter, pipe.transformer}
    for call, images in zip(calls, expected):
        # not bit for bit: offloading changes CPU matmul rounding (~1e-7), FluxPipeline's without a user too
        torch.testing.assert_close(generate(pipe, **call), images, rtol=0, atol=1e-5)


def test_components_offload_order_and_unload(pipe, base, user):
    assert pipe.model_cpu_offload_seq.index("user_adapter") < pipe.model_cpu_offload_seq.index("transformer")
    assert {"user_adapter", "preference_encoder"} <= set(pipe._optional_components)
    randomize_(pipe.user_adapter)
    pipe.unload_user_adapter()
    assert pipe.user_adapter is None
    assert not any(isinstance(p, FluxUserAttnProcessor) for p in pipe.transformer.attn_processors.values())
    assert torch.equal(generate(pipe), generate(base))
    with pytest.raises(ValueError, match="no user adapter"):
        generate(pipe, user_embeds=user[:1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(user_embeds=torch.randn(1, 4, 5)), "`user_embeds` must be"),
        (dict(user_embeds=torch.randn(3, 4, 48)), "3 users for 2 prompts"),
        (dict(user_embeds=torch.full((1, 4, 48), float("nan"))), "NaN"),
        (dict(user_embeds="u"), "`user_embeds` must be"),
        (dict(user_embeds=torch.randn(1, 4, 48), preference_pairs=USERS), "not both"),
        (dict(user_scale=0.5), "no `preference_pairs`/`user_embeds`"),
        (dict(user_guidance_scale=2.0), "no `preference_pairs`/`user_embeds`"),
        (dict(user_embeds=torch.randn(1, 4, 48), user_scale=[1.0, 2.0, 3.0]), "3 entries for 2 prompts"),
        (dict(user_embeds=torch.randn(1, 4, 48), user_guidance_scale=float("inf")), "`user_guidance_scale`"),
        (dict(joint_attention_kwargs={USER_KV_KWARG: None}), "must not hold"),
    ],
)
def test_bad_user_inputs(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(["a red cat", "a blue dog"], output_type="latent", **CALL, **kwargs)


def test_bad_inputs_without_adapter_or_encoder(flux_dir, user):
    bare = PersonalizedFluxPipeline.from_pretrained(flux_dir)
    with pytest.raises(ValueError, match="no user adapter"):
        bare("a red cat", user_embeds=user[:1], **CALL)
    bare.load_user_adapter(fresh_adapter(bare, user.shape[-1]))
    with pytest.raises(ValueError, match="`preference_encoder`"):
        bare("a red cat", preference_pairs=USERS[0], **CALL)
    with pytest.raises(ValueError, match="`prompt` must be"):
        bare(user_embeds=user[:1], **CALL)


def test_the_deprecated_scale_name_still_works_with_a_warning(pipe):
    def latents(**kwargs):
        call = dict(CALL, output_type="latent", generator=torch.Generator().manual_seed(0))
        users = torch.ones(1, 4, pipe.user_adapter.config.user_embed_dim)
        return pipe("a red cat", user_embeds=users, **call, **kwargs)

    with pytest.warns(FutureWarning, match="`preference_scale` is deprecated"):
        old_name = latents(preference_scale=0.5).images
    assert torch.equal(old_name, latents(user_scale=0.5).images)
    with pytest.raises(ValueError, match="Pass `user_scale` only"):
        latents(user_scale=1.0, preference_scale=0.5)
