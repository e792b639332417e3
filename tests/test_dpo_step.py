"""`ppd_dpo_step`: the whole user-conditioned DPO step on tiny Stage C models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableCascadeUNet

from ppd_diffusers import PPDLoss, UserAdapter
from ppd_diffusers.noise import add_noise, sample_timesteps
from ppd_diffusers.training import ppd_dpo_step

from .conftest import USER_DIM, gradients_with_and_without_checkpointing, randomize_

LOG2 = torch.tensor(0.6931471805599453, dtype=torch.float32)


def _pairs(pairs: int = 4, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents_chosen=torch.randn(pairs, 4, 8, 8, generator=g),
        latents_rejected=torch.randn(pairs, 4, 8, 8, generator=g),
        clip_text_pooled=torch.randn(pairs, 1, 16, generator=g),
        clip_text=torch.randn(pairs, 5, 16, generator=g),
        user_embeds=torch.randn(pairs, 2, USER_DIM, generator=g),
    )


def _step(model, batch, seed=0, **kwargs):
    return ppd_dpo_step(model, **batch, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture
def model(unet, adapter):
    return adapter.attach(unet).train()  # train() must not turn on the frozen UNet's dropout


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_first_loss_is_exactly_log_2(model, dropout):
    assert model.unet.config.dropout == [0.1, 0.1] and not model.unet.training
    out = _step(model, _pairs(), user_dropout=dropout, loss_fn=PPDLoss(beta=5000))
    assert torch.equal(out.loss.detach(), LOG2)
    assert out.implicit_accuracy.item() == 0.5


def test_pairs_share_noise_and_timestep(model):
    # identical preferred and rejected latents see identical noise and t, so even a trained adapter
    # cannot tell them apart: every pair's diffs are exactly zero
    randomize_(model.adapter)
    batch = _pairs()
    batch["latents_rejected"] = batch["latents_chosen"].clone()
    out = _step(model, batch, timestep_weighting="min_snr")
    assert torch.equal(out.model_diff, torch.zeros(4)) and torch.equal(out.ref_diff, torch.zeros(4))
    assert torch.equal(out.loss.detach(), LOG2)


def test_only_adapter_parameters_receive_gradients(model):
    _step(model, _pairs()).loss.backward()
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(p.grad is not None for p in model.adapter.to_v_user.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.adapter.to_v_user.parameters())


def test_optimizer_steps_on_a_fixed_batch_lower_the_loss(model):
    optimizer = torch.optim.AdamW(model.adapter.parameters(), lr=1e-3)
    batch, losses = _pairs(), []
    for _ in range(8):
        out = _step(model, batch, seed=0, loss_fn=PPDLoss(beta=50.0))  # same noise and t every step
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(LOG2.item())
    assert losses[-1] < losses[0] - 0.01
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))


def test_gradient_checkpointing_gives_the_same_gradients(adapter, saved_unet_dir):
    # the reference pass runs under no_grad, so only the policy pass goes through checkpointing
    randomize_(adapter, std=0.2)
    losses = []

    def loss_of(model):
        losses.append(_step(model, _pairs(), loss_fn=PPDLoss(beta=50.0)).loss)
        return losses[-1]

    plain, checkpointed = gradients_with_and_without_checkpointing(saved_unet_dir, adapter, loss_of)
    assert torch.equal(losses[0].detach(), losses[1].detach())
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


class _RecordingLoss(PPDLoss):
    """``PPDLoss`` that keeps the predictions it was given."""

    def forward(self, model_pred, ref_pred, target, weight=None):
        self.model_pred, self.ref_pred = model_pred.detach(), ref_pred
        return super().forward(model_pred, ref_pred, target, weight)


def test_dropped_pairs_run_the_pipelines_null_user(model, unet):
    """Training's null user is the pipeline's: a dropped pair is predicted exactly as the pipeline's
    text-only and negative rows (``user_rows`` leaves them out), as ``user_embeds=None`` and as scale 0."""
    randomize_(model.adapter)
    batch = _pairs()
    loss_fn = _RecordingLoss(beta=5000)
    out = _step(model, batch, user_dropout=1.0, loss_fn=loss_fn)
    assert torch.equal(out.loss.detach(), LOG2)
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.adapter.parameters())  # nothing to learn
    # the same noisy inputs the step drew (same generator order: timesteps, then noise)
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4, generator=g)
    noise = torch.randn(batch["latents_chosen"].shape, generator=g)
    latents = torch.cat([batch["latents_chosen"], batch["latents_rejected"]])
    noisy = add_noise(latents, torch.cat([noise] * 2), t.repeat(2))
    cond = {name: batch[name].repeat(2, 1, 1) for name in ("clip_text_pooled", "clip_text")}
    user_kv = model.adapter(batch["user_embeds"].repeat(2, 1, 1))
    one_user = model.adapter(batch["user_embeds"][:1])
    with torch.no_grad():
        null_rows = model(noisy, t.repeat(2), **cond, user_kv=one_user, user_rows=0).sample  # the pipeline's null rows
        plain = unet(noisy, t.repeat(2), **cond, clip_img=torch.zeros(8, 1, unet.config.clip_image_in_channels)).sample
        with_user = model(noisy, t.repeat(2), **cond, user_kv=user_kv).sample
    assert torch.equal(loss_fn.model_pred, null_rows) and torch.equal(loss_fn.model_pred, plain)
    assert torch.equal(loss_fn.ref_pred, null_rows)
    assert not torch.equal(with_user, null_rows)  # the adapter is not a no-op: the equality above means something


def test_partial_dropout_nulls_exactly_the_dropped_pairs(model):
    randomize_(model.adapter)
    batch = _pairs(pairs=16)
    loss_fn = _RecordingLoss(beta=5000)
    _step(model, batch, user_dropout=0.5, loss_fn=loss_fn)
    same = (loss_fn.model_pred == loss_fn.ref_pred).flatten(1).all(1)
    dropped = same[:16]
    assert torch.equal(dropped, same[16:])  # a pair's preferred and rejected halves share the null user
    assert 0 < dropped.sum() < 16


def test_steps_are_reproducible_with_a_generator(model):
    randomize_(model.adapter)
    batch = _pairs()
    first, again = (_step(model, batch, seed=3, user_dropout=0.3).loss for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(_step(model, batch, seed=3).loss, _step(model, batch, seed=4).loss)


def test_bad_inputs_raise_clear_errors(model):
    batch = _pairs()
    with pytest.raises(ValueError, match="`latents_chosen` and `latents_rejected` must both be"):
        _step(model, dict(batch, latents_rejected=batch["latents_rejected"][:3]))
    with pytest.raises(ValueError, match=r"`user_embeds` must have one row per pair \(4\)"):
        _step(model, dict(batch, user_embeds=batch["user_embeds"][:2]))
    with pytest.raises(ValueError, match=r"`clip_text_pooled` must have one row per pair"):
        _step(model, dict(batch, clip_text_pooled=batch["clip_text_pooled"][:1]))
    with pytest.raises(ValueError, match=r"`user_dropout` must be a probability"):
        _step(model, batch, user_dropout=1.5)
    nan_batch = dict(batch, latents_chosen=batch["latents_chosen"].clone())
    nan_batch["latents_chosen"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`model_pred` contains NaN"):
        _step(model, nan_batch)


def test_bf16_step_runs_and_starts_at_log_2(saved_unet_dir):
    unet = StableCascadeUNet.from_pretrained(saved_unet_dir, torch_dtype=torch.bfloat16).eval().requires_grad_(False)
    adapter = UserAdapter.from_unet(unet, user_embed_dim=USER_DIM)
    unet.enable_gradient_checkpointing()
    batch = {k: v.to(torch.bfloat16) for k, v in _pairs().items()}
    out = _step(adapter.attach(unet), batch, user_dropout=0.2)
    assert torch.equal(out.loss.detach(), LOG2)
    out.loss.backward()
    assert adapter.dtype == torch.float32  # trainable weights stay float32 beside a bf16 UNet
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in adapter.to_v_user.parameters())


DDP_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from diffusers import StableCascadeUNet
from torch.nn.parallel import DistributedDataParallel
from ppd_diffusers import PersonalizedStageC, UserAdapter
from tests.test_dpo_step import LOG2, _pairs, _step
from tests.conftest import USER_DIM

unet = StableCascadeUNet.from_pretrained(sys.argv[1])
adapter = UserAdapter.from_unet(unet, user_embed_dim=USER_DIM, num_user_tokens=3, user_token_dim=8)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
wrapped = DistributedDataParallel(adapter)
model = PersonalizedStageC(unet, wrapped)
out = _step(model, _pairs())
out.loss.backward()
print("loss_is_log2", torch.equal(out.loss.detach(), LOG2))
print("v_grads", all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.to_v_user.parameters()))
print("unet_grads", any(p.grad is not None for p in unet.parameters()))
print("state_dict_is_the_adapter", set(wrapped.state_dict()) == {f"module.{k}" for k in adapter.state_dict()})
sys.stdout.flush()
# gloo's process group can hang in its destructors at interpreter exit on this kind of machine: skip them
os._exit(0)
"""


def test_step_through_a_ddp_wrapped_adapter(saved_unet_dir):
    # What `accelerator.prepare(adapter)` gives: only the adapter is distributed and checkpointed. Runs in a
    # child process, so a process group cannot leak into (or hang) the test session.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # no hostname lookup on a machine without network
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", DDP_SCRIPT, saved_unet_dir], capture_output=True, text=True, env=env, cwd=root,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    facts = dict(line.split() for line in result.stdout.strip().splitlines()[-4:])
    assert facts == {
        "loss_is_log2": "True",
        "v_grads": "True",
        "unet_grads": "False",
        "state_dict_is_the_adapter": "True",
    }
