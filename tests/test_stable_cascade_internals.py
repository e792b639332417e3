"""Pins the diffusers internals `ppd_diffusers._stable_cascade` relies on.

If a diffusers release changes how `StableCascadeUNet` runs its blocks, these tests fail first.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ppd_diffusers import UserAdapter, decoupled_attention
from ppd_diffusers._stable_cascade import attention_block_shapes, attention_blocks, stage_c_forward

from .conftest import build_unet, randomize_, unet_inputs

CONFIGS = {
    "stage_c": {},
    "no_self_attn": {"self_attn": False},
    "repeat_mappers": {"down_blocks_repeat_mappers": (2, 1), "up_blocks_repeat_mappers": (1, 2)},
    "stage_b_like": {
        "patch_size": 2,
        "switch_level": None,
        "effnet_in_channels": 6,
        "pixel_mapper_in_channels": 3,
        "clip_text_in_channels": None,
        "clip_image_in_channels": None,
        "timestep_conditioning_type": ("sca",),
    },
    "three_levels_switch": {
        "block_out_channels": (16, 32, 32),
        "num_attention_heads": (2, 2, 4),
        "down_num_layers_per_block": (1, 1, 1),
        "up_num_layers_per_block": (1, 1, 1),
        "down_blocks_repeat_mappers": (1, 1, 1),
        "up_blocks_repeat_mappers": (1, 1, 1),
        "block_types_per_layer": (("SDCascadeResBlock", "SDCascadeTimestepBlock"),)
        + (("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
        "switch_level": (True, False),
        "dropout": 0.0,
    },
}


def _inputs(unet, name):
    if name == "stage_b_like":
        return dict(unet_inputs(unet, size=16), effnet=torch.randn(3, 6, 4, 4))
    return unet_inputs(unet)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_without_user_equals_diffusers_bit_for_bit(name):
    unet = build_unet(**CONFIGS[name])
    inputs = _inputs(unet, name)
    with torch.no_grad():
        expected = unet(**inputs).sample
        assert torch.equal(stage_c_forward(unet, **inputs).sample, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_value_adapter_equals_diffusers_bit_for_bit(name):
    unet = build_unet(**CONFIGS[name])
    inputs = _inputs(unet, name)
    adapter = randomize_(UserAdapter.from_unet(unet, user_embed_dim=8, num_user_tokens=2, user_token_dim=4))
    for layer in adapter.to_v_user:
        torch.nn.init.zeros_(layer.weight)
    with torch.no_grad():
        kv = adapter(torch.randn(3, 2, 8))
        got = stage_c_forward(unet, **inputs, user_keys=kv.keys, user_values=kv.values).sample
        assert torch.equal(got, unet(**inputs).sample)


def test_attention_blocks_are_visited_in_module_order_and_each_repeat_uses_its_own_user():
    unet = build_unet(**CONFIGS["repeat_mappers"])
    blocks = attention_blocks(unet)
    assert len(blocks) == 6  # 1 + 2 down, 2 + 1 up
    assert attention_block_shapes(unet) == [(32, 2), (48, 4), (48, 4), (48, 4), (48, 4), (32, 2)]
    seen = []
    hooks = [
        b.attention.to_q.register_forward_hook(lambda m, i, o, idx=idx: seen.append(idx))
        for idx, b in enumerate(blocks)
    ]
    adapter = randomize_(UserAdapter.from_unet(unet, user_embed_dim=8, num_user_tokens=2, user_token_dim=4))
    with torch.no_grad():
        kv = adapter(torch.randn(3, 1, 8))
        stage_c_forward(unet, **unet_inputs(unet), user_keys=kv.keys, user_values=kv.values)
    for hook in hooks:
        hook.remove()
    # the level-0 down block runs twice (2 repeat mappers), the level-0 up block too
    assert seen == [0, 0, 1, 2, 3, 4, 5, 5]


def test_attention_modules_use_the_configuration_decoupled_attention_reproduces():
    unet = build_unet()
    for block in attention_blocks(unet):
        attn = block.attention
        assert isinstance(attn.processor, AttnProcessor2_0)
        assert attn.spatial_norm is None and attn.group_norm is None
        assert attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        x, ctx = torch.randn(2, attn.query_dim, 3, 3), torch.randn(2, 7, attn.query_dim)
        with torch.no_grad():
            assert torch.equal(decoupled_attention(attn, x, ctx), attn(x, encoder_hidden_states=ctx))


def test_gradient_checkpointing_hook_is_the_one_diffusers_sets():
    unet = build_unet()
    assert not unet.gradient_checkpointing
    unet.enable_gradient_checkpointing()
    assert unet.gradient_checkpointing and callable(unet._gradient_checkpointing_func)


def test_diffusers_quirks_that_stage_c_forward_works_around_are_still_there():
    # If diffusers fixes these, the workarounds in `_conditioning_embedding`/`_clip_embedding` can go.
    unet = build_unet()
    inputs = unet_inputs(unet)
    with torch.no_grad():
        with_text = unet(**{k: v for k, v in inputs.items() if k != "clip_img"}).sample
        without_text = unet(**{k: v for k, v in inputs.items() if k not in ("clip_img", "clip_text")}).sample
        assert torch.equal(with_text, without_text)  # clip_text silently ignored without clip_img
        with pytest.raises(RuntimeError):
            unet(**inputs, sca=torch.rand(3))  # `cond or zeros` on a batch tensor


def test_stage_c_forward_accepts_what_diffusers_rejects():
    unet = build_unet()
    inputs = unet_inputs(unet)
    with torch.no_grad():
        reference = stage_c_forward(unet, **inputs).sample
        flat_pooled = dict(inputs, clip_text_pooled=inputs["clip_text_pooled"][:, 0])
        assert torch.equal(stage_c_forward(unet, **flat_pooled).sample, reference)
        zeros_img = dict(inputs, clip_img=torch.zeros(3, 1, 12))
        no_img = {k: v for k, v in inputs.items() if k != "clip_img"}
        assert torch.equal(stage_c_forward(unet, **no_img).sample, stage_c_forward(unet, **zeros_img).sample)
        same_t = dict(inputs, timestep_ratio=torch.full((3,), 0.25))
        assert torch.equal(
            stage_c_forward(unet, **dict(inputs, timestep_ratio=0.25)).sample, stage_c_forward(unet, **same_t).sample
        )
        sca = torch.tensor([0.0, 0.5, 1.0])
        per_sample = stage_c_forward(unet, **inputs, sca=sca).sample
        for i in range(3):
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(per_sample[i : i + 1], stage_c_forward(unet, **one, sca=sca[i]).sample)


@pytest.mark.parametrize(
    ("installed", "warns"), [("0.42.1", False), ("0.42.3", False), ("0.43.0.dev0", True), ("1.0.0", True)]
)
def test_a_diffusers_newer_than_the_tested_releases_warns_once(monkeypatch, installed, warns):
    import warnings

    from ppd_diffusers import _stable_cascade

    monkeypatch.setattr(_stable_cascade, "version", lambda name: installed)
    _stable_cascade.check_diffusers_version.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            unet = build_unet()
            UserAdapter.from_model(unet, user_embed_dim=8).attach(unet)  # reads the layout twice, warns once
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert len([m for m in messages if "ppd-diffusers[stable-cascade]" in m]) == (1 if warns else 0)
        if warns:
            assert f"diffusers {installed} is newer than {_stable_cascade.NEWEST_TESTED_DIFFUSERS}" in messages[0]
    finally:
        _stable_cascade.check_diffusers_version.cache_clear()
