"""`ppd_dpo_step` on SDXL and Flux: each backbone's forward process, and the loss of the Diffusion-DPO reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)

from ppd_diffusers import PPDLoss, UserAdapter
from ppd_diffusers.testing_utils import SDXL_SCHEDULER, tiny_flux_transformer, tiny_sdxl_unet
from ppd_diffusers.training import FluxObjective, SDXLObjective, StageCObjective, ppd_dpo_step

from .conftest import randomize_

LOG2 = torch.tensor(0.6931471805599453, dtype=torch.float32)
EMBED = 24
PAIRS = 4
MODEL_CLASSES = {"sdxl": UNet2DConditionModel, "flux": FluxTransformer2DModel}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Tiny SDXL UNet and Flux transformer, and SDXL's scheduler, saved like Hub subfolders."""
    root = tmp_path_factory.mktemp("backbones")
    tiny_sdxl_unet().save_pretrained(root / "unet")
    tiny_flux_transformer().save_pretrained(root / "transformer")
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(root / "scheduler")
    return {"sdxl": str(root / "unet"), "flux": str(root / "transformer"), "scheduler": str(root / "scheduler")}


def _load(saved: dict[str, str], backbone: str):
    return MODEL_CLASSES[backbone].from_pretrained(saved[backbone]).eval()


def _adapter(model) -> UserAdapter:
    torch.manual_seed(3)
    return UserAdapter.from_model(model, user_embed_dim=EMBED, num_user_tokens=2, user_token_dim=8)


def _objective(backbone: str, saved: dict[str, str], prediction_type: str = "epsilon"):
    if backbone == "sdxl":
        # built from the pipeline's scheduler (an Euler one for SDXL repos), as the trainer does
        return SDXLObjective(EulerDiscreteScheduler.from_pretrained(saved["scheduler"]), prediction_type)
    return FluxObjective()


def _batch(backbone: str, pairs: int = PAIRS, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = dict(
        latents_chosen=torch.randn(pairs, 4, 8, 8, generator=g),
        latents_rejected=torch.randn(pairs, 4, 8, 8, generator=g),
        user_embeds=torch.randn(pairs, 1, EMBED, generator=g),
    )
    text = torch.randn(pairs, 7, 32, generator=g)
    pooled = torch.randn(pairs, 32, generator=g)
    if backbone == "sdxl":
        time_ids = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]).repeat(pairs, 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        batch["conditioning"] = {"encoder_hidden_states": text, "added_cond_kwargs": added}
    else:
        batch["conditioning"] = {"encoder_hidden_states": text, "pooled_projections": pooled}
    return batch


def _step(model, batch, objective, seed: int = 0, **kwargs):
    return ppd_dpo_step(model, **batch, objective=objective, generator=torch.Generator().manual_seed(seed), **kwargs)


class _RecordingLoss(PPDLoss):
    """``PPDLoss`` that keeps what it was given."""

    def forward(self, model_pred, ref_pred, target, weight=None):
        self.model_pred, self.ref_pred, self.target = model_pred.detach(), ref_pred, target
        return super().forward(model_pred, ref_pred, target, weight)


CASES = [("sdxl", "epsilon"), ("sdxl", "v_prediction"), ("flux", None)]
IDS = ["sdxl-epsilon", "sdxl-v", "flux"]


@pytest.fixture(params=CASES, ids=IDS)
def case(request, saved):
    backbone, prediction_type = request.param
    model = _load(saved, backbone)
    adapter = _adapter(model)
    return backbone, adapter.attach(model).train(), _objective(backbone, saved, prediction_type)


# -------------------------------------------------------------------------------------- invariants of the step


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_fresh_adapter_gives_exactly_log_2(case, dropout):
    backbone, model, objective = case
    out = _step(model, _batch(backbone), objective, user_dropout=dropout)
    assert torch.equal(out.loss.detach(), LOG2) and out.implicit_accuracy.item() == 0.5
    assert torch.equal(out.inside, torch.zeros(PAIRS))


def test_only_the_adapter_gets_gradients(case):
    backbone, model, objective = case
    _step(model, _batch(backbone), objective).loss.backward()
    assert all(p.grad is None for p in model.model.parameters())
    # V' starts at zero, so at a fresh adapter only V' has a gradient: d(loss)/dK' is 0 through a zero V'
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.to_v_user.parameters())


def test_dropped_pairs_are_the_reference_and_teach_nothing(case):
    backbone, model, objective = case
    randomize_(model.adapter, std=0.2)
    loss_fn = _RecordingLoss()
    out = _step(model, _batch(backbone), objective, user_dropout=1.0, loss_fn=loss_fn)
    assert torch.equal(out.loss.detach(), LOG2) and torch.equal(loss_fn.model_pred, loss_fn.ref_pred)
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.adapter.parameters())
    # half the pairs dropped: exactly those rows (chosen and rejected alike) equal the reference
    loss_fn = _RecordingLoss()
    _step(model, _batch(backbone, pairs=16), objective, user_dropout=0.5, loss_fn=loss_fn)
    same = (loss_fn.model_pred == loss_fn.ref_pred).flatten(1).all(1)
    assert torch.equal(same[:16], same[16:]) and 0 < same[:16].sum() < 16


def test_steps_are_reproducible_with_a_generator(case):
    backbone, model, objective = case
    randomize_(model.adapter, std=0.2)
    batch = _batch(backbone)
    first, again = (_step(model, batch, objective, seed=3, user_dropout=0.3).loss for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(_step(model, batch, objective, seed=3).loss, _step(model, batch, objective, seed=4).loss)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(case):
    backbone, model, objective = case
    optimizer = torch.optim.AdamW(model.adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        out = _step(model, _batch(backbone), objective, loss_fn=PPDLoss(beta=50.0))  # same noise and t each step
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(LOG2.item()) and losses[-1] < losses[0] - 0.01


@pytest.mark.parametrize("backbone", ["sdxl", "flux"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(saved, backbone):
    """The user keys/values travel in `cross_attention_kwargs`/`joint_attention_kwargs`, which diffusers'
    checkpointing passes to each recomputed block as an argument: the gradients must not change."""
    objective = _objective(backbone, saved)
    adapter = randomize_(_adapter(_load(saved, backbone)), std=0.2)
    grads, losses = [], []
    for checkpointing in (False, True):
        model = _load(saved, backbone)
        calls = []
        if checkpointing:

            def counting(module, *args, calls=calls):
                calls.append(type(module).__name__)
                return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

            model.enable_gradient_checkpointing(counting)
        adapter.zero_grad(set_to_none=True)
        out = _step(adapter.attach(model), _batch(backbone), objective, loss_fn=PPDLoss(beta=50.0))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([p.grad.clone() for p in adapter.parameters()])
        if checkpointing:  # the blocks holding the user layers were recomputed
            expected = "BasicTransformerBlock" if backbone == "sdxl" else "FluxTransformerBlock"
            assert expected in calls or "Transformer2DModel" in calls, calls
    assert torch.equal(losses[0], losses[1])
    for plain, checkpointed in zip(*grads, strict=True):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------ the Diffusion-DPO reference (diffusers)


def _draws(pairs: int, shape: tuple, seed: int, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's draws from a generator seeded with ``seed``: the timesteps, then the noise."""
    g = torch.Generator().manual_seed(seed)
    t = timesteps(g)
    return t, torch.randn(shape, generator=g)


def _diffusion_dpo_reference(policy, base, scheduler, batch, t, noise, beta):
    """Diffusion-DPO as diffusers' `train_diffusion_dpo_sdxl.py` computes it, restated: one noise and timestep
    per pair for both images, DDPM noising by the scheduler, target eps or v, per-sample mean squared errors,
    chunked into the preferred and rejected halves, `-0.5 * beta` on the difference of differences."""
    x0 = torch.cat([batch["latents_chosen"], batch["latents_rejected"]])
    eps, steps = noise.repeat(2, 1, 1, 1), t.repeat(2)
    x_t = scheduler.add_noise(x0, eps, steps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, eps, steps) if v_prediction else eps
    cond = batch["conditioning"]
    text = cond["encoder_hidden_states"].repeat(2, 1, 1)
    added = {k: v.repeat(2, 1) for k, v in cond["added_cond_kwargs"].items()}

    def errors(pred):
        squared = F.mse_loss(pred.float(), target.float(), reduction="none")
        return squared.mean(dim=list(range(1, squared.ndim)))

    model_w, model_l = errors(policy(x_t, steps, text, added_cond_kwargs=added)).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = errors(base(x_t, steps, text, added_cond_kwargs=added).sample).chunk(2)
    model_diff, ref_diff = model_w - model_l, ref_w - ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    accuracy = (inside > 0).sum().float() / inside.numel() + 0.5 * (inside == 0).sum().float() / inside.numel()
    return loss, accuracy, inside, ref_diff - model_diff


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sdxl_step_matches_diffusers_diffusion_dpo(saved, prediction_type):
    unet = _load(saved, "sdxl")
    adapter = randomize_(_adapter(unet), std=0.05)  # a trained adapter: policy and reference differ
    model = adapter.attach(unet)
    batch = _batch("sdxl", pairs=6)
    # the research script loads a DDPMScheduler from the base model's scheduler folder
    scheduler = DDPMScheduler.from_pretrained(saved["scheduler"], prediction_type=prediction_type)
    objective = _objective("sdxl", saved, prediction_type)
    out = _step(model, batch, objective, seed=7)  # PPDLoss() is beta 5000: the SDXL script's default
    t, noise = _draws(6, batch["latents_chosen"].shape, 7, lambda g: torch.randint(0, 1000, (6,), generator=g))

    def policy(*args, **kwargs):
        return model(*args, **kwargs, user_embeds=batch["user_embeds"].repeat(2, 1, 1)).sample

    loss, accuracy, inside, logits = _diffusion_dpo_reference(policy, unet, scheduler, batch, t, noise, beta=5000)
    assert loss.item() > 0.05 and loss.item() != pytest.approx(LOG2.item())  # a non-trivial comparison
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.inside, inside, rtol=1e-6, atol=1e-6)
    assert out.implicit_accuracy == accuracy
    # diffusers' SD 1.5 script writes the same loss as -logsigmoid(beta' (ref_diff - model_diff)), beta' = beta / 2
    sd15 = -F.logsigmoid(2500 * logits).mean()
    torch.testing.assert_close(sd15, loss, rtol=1e-6, atol=1e-7)


def test_flux_step_is_flow_dpo_on_the_pipelines_inputs(saved):
    """Flow-DPO: the velocity `eps - x0` regressed at `x_t = (1 - sigma) x0 + sigma eps`, the transformer
    called as `FluxPipeline` calls it (packed latents, position ids, `timestep = sigma`, guidance 3.5)."""
    transformer = _load(saved, "flux")
    adapter = randomize_(_adapter(transformer), std=0.05)
    model = adapter.attach(transformer)
    batch = _batch("flux", pairs=6)
    objective = FluxObjective()
    out = _step(model, batch, objective, seed=7, loss_fn=PPDLoss(beta=500.0))
    sigmas = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).sigmas
    sigma, noise = _draws(
        6, batch["latents_chosen"].shape, 7, lambda g: sigmas[(torch.rand(6, generator=g) * 1000).long()]
    )

    x0 = torch.cat([batch["latents_chosen"], batch["latents_rejected"]])
    eps, s = noise.repeat(2, 1, 1, 1), sigma.repeat(2)
    x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    packed = FluxPipeline._pack_latents(x_t, 12, 4, 8, 8)
    ids = FluxPipeline._prepare_latent_image_ids(12, 4, 4, "cpu", torch.float32)
    cond = batch["conditioning"]
    inputs = dict(
        hidden_states=packed, timestep=s, guidance=torch.full((12,), 3.5), img_ids=ids, txt_ids=torch.zeros(7, 3),
        encoder_hidden_states=cond["encoder_hidden_states"].repeat(2, 1, 1),
        pooled_projections=cond["pooled_projections"].repeat(2, 1),
    )  # fmt: skip
    unpack = lambda out: FluxPipeline._unpack_latents(out, 16, 16, vae_scale_factor=2)  # noqa: E731
    with torch.no_grad():
        ref = unpack(transformer(**inputs).sample)
        pred = unpack(model(**inputs, user_embeds=batch["user_embeds"].repeat(2, 1, 1)).sample)
    target = eps - x0
    errors = [((p - target) ** 2).mean(dim=(1, 2, 3)) for p in (pred, ref)]
    (model_w, model_l), (ref_w, ref_l) = (e.chunk(2) for e in errors)
    inside = -0.5 * 500 * ((model_w - model_l) - (ref_w - ref_l))
    torch.testing.assert_close(out.inside, inside, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, -F.logsigmoid(inside).mean(), rtol=1e-6, atol=1e-7)
    assert out.loss.item() != pytest.approx(LOG2.item())


# ----------------------------------------------------------------------------------------- the forward processes


def test_flux_sigmas_follow_diffusers_training_scripts():
    objective = FluxObjective()
    grid = torch.arange(1000, 0, -1) / 1000  # FLUX.1-dev's training grid: the shift is dynamic, at inference only
    torch.testing.assert_close(objective.sigmas, grid.float())
    sigma = objective.sample_timesteps(4096, generator=torch.Generator().manual_seed(0))
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sigma, grid.float()[(u * 1000).long()])
    # a static shift (FLUX.1-schnell's config has none, SD3's has 3.0) is part of the training grid
    shifted = FluxObjective({"num_train_timesteps": 1000, "shift": 3.0}).sigmas
    assert torch.allclose(shifted, 3 * grid / (1 + 2 * grid))
    # logit-normal draws concentrate around sigma = 0.5, and stay on the grid even when u rounds to 1
    ln = FluxObjective(weighting_scheme="logit_normal", logit_std=20.0).sample_timesteps(4096, generator=None)
    assert set(ln.tolist()) <= set(grid.tolist())
    narrow = FluxObjective(weighting_scheme="logit_normal", logit_std=0.1).sample_timesteps(256)
    assert ((narrow > 0.4) & (narrow < 0.6)).all()


def test_flux_packing_round_trips_exactly():
    latents = torch.randn(3, 4, 6, 10)
    packed = FluxPipeline._pack_latents(latents, 3, 4, 6, 10)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6, 10, vae_scale_factor=1), latents)


def test_flux_weighting_schemes_weigh_pairs():
    sigma = torch.tensor([0.25, 0.5, 1.0])
    assert torch.equal(FluxObjective().loss_weight(sigma), torch.ones(3))
    cosmap = 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(FluxObjective(weighting_scheme="cosmap").loss_weight(sigma), cosmap)
    with pytest.raises(ValueError, match="saturates the DPO loss"):
        FluxObjective(weighting_scheme="sigma_sqrt")
    with pytest.raises(ValueError, match='takes `timestep_weighting="constant"` only'):
        FluxObjective().loss_weight(sigma, "min_snr")
    with pytest.raises(ValueError, match="`weighting_scheme` must be one of"):
        FluxObjective(weighting_scheme="uniform")


def test_sdxl_forward_process_is_ddpm_and_min_snr_is_hand_computed(saved):
    objective = _objective("sdxl", saved, "v_prediction")
    abar = objective.scheduler.alphas_cumprod
    # the scaled-linear betas of SDXL: abar(t) = prod(1 - beta_s), beta = linspace(sqrt(0.00085), sqrt(0.012))^2
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0))
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0, 999])
    a = abar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(objective.add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(objective.target(x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0)
    draws = objective.sample_timesteps(4096, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.int64 and draws.min() == 0 and draws.max() == 999
    snr = abar[t] / (1 - abar[t])
    torch.testing.assert_close(objective.loss_weight(t, "min_snr"), snr.clamp(max=5) / (snr + 1))
    eps_objective = _objective("sdxl", saved, "epsilon")
    torch.testing.assert_close(eps_objective.loss_weight(t, "min_snr"), snr.clamp(max=5) / snr)
    assert torch.equal(eps_objective.loss_weight(t), torch.ones(2))
    with pytest.raises(ValueError, match='`prediction_type` must be "epsilon" or "v_prediction"'):
        SDXLObjective(prediction_type="sample")


# ------------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(saved):
    unet = _load(saved, "sdxl")
    model = _adapter(unet).attach(unet)
    sdxl = _objective("sdxl", saved)
    batch = _batch("sdxl")
    with pytest.raises(ValueError, match="`objective` is required for a sdxl model"):
        ppd_dpo_step(model, **batch)
    with pytest.raises(ValueError, match="`objective` is for flux models, but `model` is a sdxl model"):
        ppd_dpo_step(model, **batch, objective=FluxObjective())
    rows = dict(
        batch["conditioning"], added_cond_kwargs={"text_embeds": torch.zeros(4, 32), "time_ids": torch.zeros(3, 6)}
    )
    with pytest.raises(ValueError, match=r"`added_cond_kwargs.time_ids` must have one row per pair \(4\)"):
        ppd_dpo_step(model, **dict(batch, conditioning=rows), objective=sdxl)
    with pytest.raises(ValueError, match="needs `conditioning` entries 'encoder_hidden_states'"):
        ppd_dpo_step(model, **dict(batch, conditioning={}), objective=sdxl)
    with pytest.raises(ValueError, match="`clip_text_pooled` are Stage C's conditioning"):
        ppd_dpo_step(model, batch["latents_chosen"], batch["latents_rejected"], torch.zeros(4, 1, 32),
                     batch["user_embeds"], objective=sdxl)  # fmt: skip
    with pytest.raises(ValueError, match="`user_embeds` is required"):
        ppd_dpo_step(model, batch["latents_chosen"], batch["latents_rejected"], conditioning=batch["conditioning"],
                     objective=sdxl)  # fmt: skip
    with pytest.raises(ValueError, match="must be a tensor with one row per pair"):
        ppd_dpo_step(model, **dict(batch, conditioning={"encoder_hidden_states": [1, 2]}), objective=sdxl)
    transformer = _load(saved, "flux")
    flux = _adapter(transformer).attach(transformer)
    odd = dict(_batch("flux"), latents_chosen=torch.zeros(4, 4, 7, 8), latents_rejected=torch.zeros(4, 4, 7, 8))
    with pytest.raises(ValueError, match="height and width must be even"):
        ppd_dpo_step(flux, **odd, objective=FluxObjective())
    with pytest.raises(ValueError, match="`objective` is for stable_cascade models"):
        ppd_dpo_step(flux, **_batch("flux"), objective=StageCObjective())


def test_flux_token_layout_is_the_pipelines():
    """The objective packs latents as `FluxPipeline` does (pinned against its static helpers)."""
    from diffusers import FluxPipeline

    from ppd_diffusers.training.objectives import flux_image_ids, pack_flux_latents, unpack_flux_latents

    latents = torch.randn(2, 4, 6, 8)
    packed = pack_flux_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_flux_latents(packed, 6, 8), latents)
    expected = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert torch.equal(flux_image_ids(6, 8, "cpu", torch.float32), expected)
