"""`UserAdapter` and `PersonalizedStageC`: invariants, save/load, per-sample users, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import StableCascadeUNet

from ppd_diffusers import PersonalizedStageC, UserAdapter, __version__

from .conftest import USER_DIM, build_unet, gradients_with_and_without_checkpointing, randomize_, unet_inputs


def _users(batch: int, tokens: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, tokens, USER_DIM, generator=torch.Generator().manual_seed(seed))


def test_from_unet_matches_every_attention_block(unet, adapter):
    assert adapter.config.block_channels == [32, 48, 48, 48, 48, 32]
    assert adapter.config.block_heads == [2, 4, 4, 4, 4, 2]
    per_block = sum(2 * 8 * c for c in adapter.config.block_channels)
    projection = USER_DIM * 3 * 8 + 3 * 8 + 2 * 8
    assert sum(p.numel() for p in adapter.parameters()) == per_block + projection


def test_fresh_adapter_with_users_equals_base_bit_for_bit(unet, adapter):
    inputs = unet_inputs(unet)
    model = adapter.attach(unet)
    with torch.no_grad():
        assert torch.equal(model(**inputs, user_embeds=_users(3)).sample, unet(**inputs).sample)


def test_no_user_and_scale_zero_equal_base_for_a_trained_adapter(unet, adapter):
    randomize_(adapter)
    inputs = unet_inputs(unet)
    model = adapter.attach(unet)
    with torch.no_grad():
        base = unet(**inputs).sample
        assert torch.equal(model(**inputs).sample, base)
        assert torch.equal(model(**inputs, user_embeds=_users(3), user_scale=0.0).sample, base)
        personalized = model(**inputs, user_embeds=_users(3)).sample
    assert (personalized - base).abs().max() > 1e-3


def test_per_sample_users_in_one_batch_equal_one_by_one(unet, adapter):
    randomize_(adapter)
    inputs, users = unet_inputs(unet), _users(3)
    model = adapter.attach(unet)
    with torch.no_grad():
        batched = model(**inputs, user_embeds=users).sample
        for i in range(3):
            single = model(**{k: v[i : i + 1] for k, v in inputs.items()}, user_embeds=users[i : i + 1]).sample
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)


def test_one_user_serves_the_whole_batch(unet, adapter):
    randomize_(adapter)
    inputs, user = unet_inputs(unet), _users(1)
    model = adapter.attach(unet)
    with torch.no_grad():
        broadcast = model(**inputs, user_embeds=user).sample
        repeated = model(**inputs, user_embeds=user.repeat(3, 1, 1)).sample
    torch.testing.assert_close(broadcast, repeated, rtol=1e-6, atol=1e-6)


def test_per_sample_scale_switches_single_samples_off(unet, adapter):
    randomize_(adapter)
    inputs, users = unet_inputs(unet), _users(3)
    model = adapter.attach(unet)
    with torch.no_grad():
        mixed = model(**inputs, user_embeds=users, user_scale=torch.tensor([1.0, 0.0, 1.0])).sample
        on = model(**inputs, user_embeds=users).sample
        base = unet(**inputs).sample
        # one user, a per-sample scale: the user is broadcast to the scale's batch
        one_user = model(**inputs, user_embeds=users[:1], user_scale=torch.tensor([0.0, 1.0, 0.0])).sample
        expected = model(**inputs, user_embeds=users[:1]).sample
    assert torch.equal(mixed[1], base[1])
    assert torch.equal(mixed[[0, 2]], on[[0, 2]])
    assert torch.equal(one_user[[0, 2]], base[[0, 2]])
    torch.testing.assert_close(one_user[1], expected[1])


def test_scale_is_folded_into_the_values(unet, adapter):
    randomize_(adapter)
    users = _users(3)
    with torch.no_grad():
        plain, half = adapter(users), adapter(users, user_scale=0.5)
    assert all(torch.equal(k, k2) for k, k2 in zip(plain.keys, half.keys))
    assert all(torch.equal(0.5 * v, v2) for v, v2 in zip(plain.values, half.values))
    assert half.user_scale == 0.5
    with pytest.warns(FutureWarning, match="`scale` is deprecated"):
        old_name = adapter(users, scale=0.5)
    assert all(torch.equal(v, v2) for v, v2 in zip(half.values, old_name.values))
    with pytest.warns(FutureWarning, match="`UserKeyValues.scale` is deprecated"):
        assert old_name.scale == 0.5


def test_precomputed_user_kv_equals_user_embeds(unet, adapter):
    randomize_(adapter)
    inputs, users = unet_inputs(unet), _users(3)
    model = adapter.attach(unet)
    with torch.no_grad():
        user_kv = adapter(users, user_scale=0.5)
        assert torch.equal(
            model(**inputs, user_kv=user_kv).sample, model(**inputs, user_embeds=users, user_scale=0.5).sample
        )


def test_two_dimensional_user_embeds_are_one_token(unet, adapter):
    users = _users(3, tokens=1)
    with torch.no_grad():
        assert torch.equal(adapter.project(users[:, 0]), adapter.project(users))
    assert adapter.project(_users(3, tokens=5)).shape == (3, 5 * 3, 8)


def test_save_load_roundtrip_gives_identical_outputs(unet, adapter, tmp_path):
    randomize_(adapter)
    adapter.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UserAdapter"
    assert config["ppd_diffusers_version"] == __version__
    loaded = UserAdapter.from_pretrained(tmp_path)
    inputs, users = unet_inputs(unet), _users(3)
    with torch.no_grad():
        expected = adapter.attach(unet)(**inputs, user_embeds=users).sample
        assert torch.equal(loaded.attach(unet)(**inputs, user_embeds=users).sample, expected)


def test_config_records_the_release_that_saved_the_weights(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config_path.write_text(config_path.read_text().replace(__version__, "0.0.1"))
    loaded = UserAdapter.from_pretrained(tmp_path / "old")
    assert loaded.config.ppd_diffusers_version == "0.0.1"
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["ppd_diffusers_version"] == __version__


def test_attach_and_training_leave_the_base_weights_untouched(unet, adapter):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.train()
    model = adapter.attach(unet)
    assert model.detach() is unet
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    model.train()
    assert model.training and adapter.training and not unet.training
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)
    model(**unet_inputs(unet), user_embeds=_users(3)).sample.square().mean().backward()
    optimizer.step()
    assert unet.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_only_adapter_parameters_receive_gradients(saved_unet_dir):
    unet = StableCascadeUNet.from_pretrained(saved_unet_dir)  # trainable and in train mode as loaded
    assert all(p.requires_grad for p in unet.parameters())
    adapter = UserAdapter.from_unet(unet, user_embed_dim=USER_DIM, num_user_tokens=3, user_token_dim=8)
    model = adapter.attach(unet)
    model(**unet_inputs(unet), user_embeds=_users(3)).sample.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    # V' is zero at init, so on the first step only V' gets a gradient ...
    grads = {name: p.grad for name, p in adapter.named_parameters()}
    assert all(grads[name].abs().sum() > 0 for name in grads if name.startswith("to_v_user"))
    assert all(grads[name] is None or grads[name].abs().sum() == 0 for name in grads if "to_v_user" not in name)
    # ... and once V' is non-zero every adapter parameter does
    randomize_(adapter)
    adapter.zero_grad(set_to_none=True)
    model(**unet_inputs(unet), user_embeds=_users(3)).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(adapter, saved_unet_dir):
    randomize_(adapter)

    def loss_of(model):
        return model(**unet_inputs(model.unet), user_embeds=_users(3)).sample.square().mean()

    plain, checkpointed = gradients_with_and_without_checkpointing(saved_unet_dir, adapter, loss_of)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bf16_unet_fresh_adapter_equals_base_bit_for_bit(saved_unet_dir, adapter_dtype):
    unet = StableCascadeUNet.from_pretrained(saved_unet_dir, torch_dtype=torch.bfloat16).eval()
    adapter = UserAdapter.from_unet(unet, user_embed_dim=USER_DIM, torch_dtype=adapter_dtype)
    assert adapter.dtype == adapter_dtype
    model = adapter.attach(unet)
    inputs = {k: v.to(torch.bfloat16) for k, v in unet_inputs(unet).items()}
    with torch.no_grad():
        out = model(**inputs, user_embeds=_users(3)).sample
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, unet(**inputs).sample)
        randomize_(adapter)
        user_kv = adapter(_users(3)).to(torch.bfloat16)  # cast once per generation, not per step
        personalized = model(**inputs, user_kv=user_kv).sample
        assert torch.isfinite(personalized).all() and not torch.equal(personalized, out)


def test_personalized_forward_compiles_without_graph_breaks(unet, adapter):
    randomize_(adapter)
    model = adapter.attach(unet)
    inputs, users = unet_inputs(unet), _users(3)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        user_kv = adapter(users)
        torch.testing.assert_close(compiled(**inputs, user_kv=user_kv).sample, model(**inputs, user_kv=user_kv).sample)
    unet.enable_gradient_checkpointing()
    compiled(**inputs, user_embeds=users).sample.mean().backward()
    assert all(p.grad is not None for p in adapter.parameters())


def test_user_rows_skip_the_user_term_and_leave_user_rows_unchanged(unet, adapter):
    """Row slicing: rows past `user_rows` get the base model; the others what every-row users give them."""
    randomize_(adapter)
    model, inputs, users = adapter.attach(unet), unet_inputs(unet, batch=4), _users(4)
    with torch.no_grad():
        base = unet(**inputs).sample
        every_row = model(**inputs, user_embeds=users).sample
        sliced = model(**inputs, user_kv=adapter(users[:2]), user_rows=2).sample
        # the same rows computed the old way: a user on every row, scale 0 (exact zeros) where there is none
        zero_scaled = model(**inputs, user_kv=adapter(users, user_scale=torch.tensor([1.0, 1.0, 0.0, 0.0]))).sample
        one_for_all = model(**inputs, user_kv=adapter(users[:1]), user_rows=3).sample
        none = model(**inputs, user_kv=adapter(users[:1]), user_rows=0).sample
    torch.testing.assert_close(sliced, zero_scaled, rtol=0, atol=0)
    torch.testing.assert_close(sliced[:2], every_row[:2], rtol=0, atol=0)
    torch.testing.assert_close(sliced[2:], base[2:], rtol=0, atol=0)
    assert not torch.allclose(sliced[:2], base[:2])
    torch.testing.assert_close(one_for_all[3:], base[3:], rtol=0, atol=0)
    torch.testing.assert_close(one_for_all[:3], model(**inputs, user_embeds=users[:1]).sample[:3], rtol=0, atol=0)
    torch.testing.assert_close(none, base, rtol=0, atol=0)


def test_user_rows_train_the_adapter_through_the_user_rows_only(unet, adapter):
    randomize_(adapter)
    model, inputs = adapter.attach(unet), unet_inputs(unet, batch=4)
    model(**inputs, user_embeds=_users(2), user_rows=2).sample[2:].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in adapter.parameters())  # rows 2-3 never saw the user
    model(**inputs, user_embeds=_users(2), user_rows=2).sample[:2].sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in adapter.parameters())


def test_mismatched_unet_raises_naming_both_shapes(adapter):
    other = build_unet(block_out_channels=(32, 64), num_attention_heads=(2, 4))
    expected = r"4 x \(48 channels, 4 heads\).*given model is a Stage C UNet with 6 attention.*4 x \(64 channels"
    with pytest.raises(ValueError, match=expected):
        adapter.attach(other)
    fewer = build_unet(down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1))
    with pytest.raises(ValueError, match=r"built for a Stage C UNet with 6 attention.*Stage C UNet with 4 attention"):
        PersonalizedStageC(fewer, adapter)


def test_bad_inputs_raise_clear_errors(unet, adapter):
    model, inputs = adapter.attach(unet), unet_inputs(unet)
    with pytest.raises(ValueError, match=r"`user_embeds` must have shape \(batch, tokens, 24\).*got \(3, 2, 7\)"):
        model(**inputs, user_embeds=torch.randn(3, 2, 7))
    with pytest.raises(ValueError, match="2 users for 3 samples with a user"):
        model(**inputs, user_embeds=_users(2))
    with pytest.raises(ValueError, match="3 users for 2 samples with a user"):
        model(**inputs, user_embeds=_users(3), user_rows=2)
    with pytest.raises(ValueError, match="`user_rows` must be None, a number of leading rows.*batch size 3.*got 4"):
        model(**inputs, user_embeds=_users(3), user_rows=4)
    with pytest.raises(ValueError, match="either `user_embeds` or `user_kv`"):
        model(**inputs, user_embeds=_users(3), user_kv=adapter(_users(3)))
    with pytest.raises(ValueError, match=r"`user_scale` must be a float or a \(batch,\) tensor matching the 3 users"):
        model(**inputs, user_embeds=_users(3), user_scale=torch.ones(2))
    with pytest.raises(ValueError, match="`user_kv` already carries its scale"):
        model(**inputs, user_kv=adapter(_users(3)), user_scale=0.5)
    with pytest.raises(TypeError, match="`adapter` must be a `UserAdapter`"):
        PersonalizedStageC(unet, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="`block_channels` and `block_heads`"):
        UserAdapter(user_embed_dim=4, block_channels=[8, 8], block_heads=[2])
    with pytest.raises(ValueError, match="`user_token_dim` must be a positive integer"):
        UserAdapter(user_embed_dim=4, block_channels=[8], block_heads=[2], user_token_dim=0)
    with pytest.raises(ValueError, match="not divisible"):
        UserAdapter(user_embed_dim=4, block_channels=[9], block_heads=[2])


def test_pickled_weights_are_refused_unless_asked_for(adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    torch.save(adapter.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no file named diffusion_pytorch_model\.safetensors"):
        UserAdapter.from_pretrained(tmp_path)
    loaded = UserAdapter.from_pretrained(tmp_path, use_safetensors=False)  # a pickle the caller trusts
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), adapter.state_dict().values()))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(user_embed_dim="8"), "`user_embed_dim` must be a positive integer, got '8'"),
        (dict(user_embed_dim=8.5), "`user_embed_dim` must be a positive integer, got 8.5"),
        (dict(num_user_tokens=True), "`num_user_tokens` must be a positive integer, got True"),
        (dict(block_heads=[0]), r"`block_heads` must be a non-empty list of positive integers, got \[0\]"),
        (dict(block_channels=8), "`block_channels` must be a non-empty list of positive integers, got 8"),
        (dict(block_channels=[8.0]), r"`block_channels` must be .* got \[8.0\]"),
        (dict(block_channels=[], block_heads=[]), r"`block_channels` must be a non-empty list"),
    ],
)
def test_bad_adapter_configs_are_named(config, message, tmp_path):
    good = dict(user_embed_dim=8, block_channels=[8], block_heads=[2], user_token_dim=4)
    with pytest.raises(ValueError, match=message):
        UserAdapter(**{**good, **config})
    # the same from a saved config file, as a Hub download would give it
    UserAdapter(**good).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, **config}))
    with pytest.raises(ValueError, match=message):
        UserAdapter.from_pretrained(tmp_path)


def test_a_missing_local_folder_is_not_reported_as_a_hub_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        UserAdapter.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        UserAdapter.from_pretrained("./missing-adapter")
