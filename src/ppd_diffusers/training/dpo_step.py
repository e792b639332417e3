"""One user-conditioned Diffusion-DPO step, shared by every trainer and backbone so that scripts stay thin."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..loss import PPDLoss, PPDLossOutput
from .objectives import DPOObjective, StageCObjective

__all__ = ["ppd_dpo_step"]

_STAGE_C_ARGUMENTS = ("clip_text_pooled", "clip_text", "clip_img")


def _check_pairs(latents_chosen: torch.Tensor, latents_rejected: torch.Tensor, conditioning: Mapping, **per_pair):
    if latents_chosen.shape != latents_rejected.shape or latents_chosen.ndim != 4:
        raise ValueError(
            "`latents_chosen` and `latents_rejected` must both be (pairs, channels, height, width), got "
            f"{tuple(latents_chosen.shape)} and {tuple(latents_rejected.shape)}."
        )
    pairs = latents_chosen.shape[0]
    for name, tensor in per_pair.items():
        if tensor is not None and tensor.shape[0] != pairs:
            raise ValueError(f"`{name}` must have one row per pair ({pairs}), got shape {tuple(tensor.shape)}.")
    _check_conditioning_rows(conditioning, pairs, prefix="")


def _check_conditioning_rows(conditioning: Mapping, pairs: int, prefix: str) -> None:
    for key, value in conditioning.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _check_conditioning_rows(value, pairs, prefix=f"{name}.")
        elif isinstance(value, torch.Tensor):
            if value.ndim == 0 or value.shape[0] != pairs:
                raise ValueError(f"`{name}` must have one row per pair ({pairs}), got shape {tuple(value.shape)}.")
        elif value is not None:
            raise ValueError(
                f"`{name}` must be a tensor with one row per pair, or a dict of such tensors, got "
                f"{type(value).__name__}."
            )


def _twice(value: Any) -> Any:
    """The ``[chosen; rejected]`` batch of a per-pair tensor, or of every tensor of a (nested) dict."""
    if isinstance(value, Mapping):
        return {key: _twice(item) for key, item in value.items() if item is not None}
    return None if value is None else torch.cat([value, value])


def _resolve_objective(model: nn.Module, objective: DPOObjective | None) -> DPOObjective:
    backbone = getattr(model, "backbone", None)
    if objective is None:
        if backbone not in (None, "stable_cascade"):
            raise ValueError(
                f"`objective` is required for a {backbone} model: pass `SDXLObjective(pipe.scheduler)` or "
                "`FluxObjective(pipe.scheduler)` (see `ppd_diffusers.training.objectives`)."
            )
        return StageCObjective()
    if backbone is not None and objective.backbone != backbone:
        raise ValueError(f"`objective` is for {objective.backbone} models, but `model` is a {backbone} model.")
    return objective


def ppd_dpo_step(
    model: nn.Module,
    latents_chosen: torch.Tensor,
    latents_rejected: torch.Tensor,
    clip_text_pooled: torch.Tensor | None = None,
    user_embeds: torch.Tensor | None = None,
    *,
    clip_text: torch.Tensor | None = None,
    clip_img: torch.Tensor | None = None,
    conditioning: dict[str, Any] | None = None,
    objective: DPOObjective | None = None,
    loss_fn: PPDLoss | None = None,
    user_dropout: float = 0.0,
    timestep_weighting: Literal["constant", "min_snr"] = "constant",
    generator: torch.Generator | None = None,
) -> PPDLossOutput:
    """Computes the PPD loss of a batch of preference pairs; call ``.loss.backward()`` on the result.

    For each pair one timestep ``t`` and one noise ``eps`` are drawn and shared by its preferred and
    rejected latents; the ``objective`` says how (the backbone's forward process), what the model regresses
    (noise, ``v`` or velocity) and how the model is called. The reference prediction is the same model with the
    adapter off, under ``torch.no_grad()`` (no second copy of the model); the policy prediction conditions each
    pair on its user. ``PPDLoss`` then compares them, the same loss for every backbone. Random draws, in this
    order: the timesteps, the noise, then (with ``user_dropout``) which pairs drop their user.

    **The null user is the adapter switched off**, here as everywhere in the library: a pair dropped by
    ``user_dropout`` runs with user scale 0, exactly as the pipelines' text-only and unconditional
    branches, ``user_embeds=None`` and a user scale of 0 do. Its policy then equals the reference,
    so a dropped pair contributes ``log 2`` to the loss and nothing to the gradient: dropout only thins
    the batch, and the default is 0. (The paper instead zeroes the embedding, which makes the null user a
    learned, pooled-DPO-like model that the user-less branches would have to run through the adapter;
    the testbed measured no difference between the two, see docs/guides/testbed.md.)

    Args:
        model: A personalized model, ``adapter.attach(model)`` (a ``PersonalizedStageC`` for Stage C, a
            ``PersonalizedModel`` for SDXL and Flux), whose adapter may be wrapped by ``accelerate``. Keep the
            base model frozen and in ``eval()``.
        latents_chosen: Latents of the preferred images, ``(pairs, C, H, W)``: Stage C latents, SDXL VAE latents
            times ``scaling_factor``, or Flux VAE latents ``(z - shift_factor) * scaling_factor`` (not packed).
        latents_rejected: Latents of the rejected images, same shape.
        clip_text_pooled: Stage C only: pooled prompt embeddings, one row per pair (or pass ``conditioning``).
        user_embeds: The user embedding of each pair's user, ``(pairs, tokens, width)``. Required.
        clip_text: Stage C only: optional prompt hidden states, one row per pair.
        clip_img: Stage C only: optional CLIP image embeddings, one row per pair.
        conditioning: The model's conditioning, a dict of tensors with one row per pair (nested dicts such as
            SDXL's ``added_cond_kwargs`` too): Stage C ``clip_text_pooled``/``clip_text``/``clip_img``; SDXL
            ``encoder_hidden_states`` and ``added_cond_kwargs={"text_embeds", "time_ids"}``; Flux
            ``encoder_hidden_states`` and ``pooled_projections``. Each is repeated for the rejected half.
        objective: The backbone's ``DPOObjective``; defaults to ``StageCObjective()`` for a Stage C model and
            must be given for the others (``SDXLObjective(pipe.scheduler)``, ``FluxObjective(pipe.scheduler)``).
        loss_fn: The loss; defaults to ``PPDLoss()`` (beta 5000).
        user_dropout: Probability of training a pair with the null user (the adapter off for that pair).
        timestep_weighting: The ``w(lambda_t)`` factor on beta (see the objective's ``loss_weight``).
        generator: Random generator for timesteps, noise and dropout (reproducible steps).

    Returns:
        The ``PPDLossOutput`` of the batch.

    Examples:
        ```py
        from ppd_diffusers.training import SDXLObjective, ppd_dpo_step

        out = ppd_dpo_step(model, lat_w, lat_l, pooled, users)  # Stage C
        out = ppd_dpo_step(
            sdxl_model, lat_w, lat_l, user_embeds=users, objective=SDXLObjective(pipe.scheduler),
            conditioning={"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": pooled,
                                                                             "time_ids": time_ids}},
        )
        accelerator.backward(out.loss)
        ```
    """
    objective = _resolve_objective(model, objective)
    stage_c = dict(zip(_STAGE_C_ARGUMENTS, (clip_text_pooled, clip_text, clip_img), strict=True))
    given = [name for name, value in stage_c.items() if value is not None]
    if given and conditioning is not None:
        raise ValueError(f"Pass the conditioning either as `conditioning` or as {', '.join(given)}, not both.")
    if given and objective.backbone != "stable_cascade":
        raise ValueError(
            f"{', '.join(f'`{name}`' for name in given)} are Stage C's conditioning: pass the {objective.backbone} "
            "model's as `conditioning`."
        )
    conditioning = dict(conditioning if conditioning is not None else stage_c)
    if user_embeds is None:
        raise ValueError("`user_embeds` is required: one user embedding per pair.")
    _check_pairs(latents_chosen, latents_rejected, conditioning, user_embeds=user_embeds)
    objective.check_conditioning(conditioning)
    objective.check_latents(latents_chosen)
    if not 0.0 <= user_dropout <= 1.0:
        raise ValueError(f"`user_dropout` must be a probability in [0, 1], got {user_dropout}.")
    loss_fn = PPDLoss() if loss_fn is None else loss_fn
    pairs, device = latents_chosen.shape[0], latents_chosen.device
    rng_device = generator.device if generator is not None else device

    t = objective.sample_timesteps(pairs, device=device, generator=generator)
    noise = randn_tensor(latents_chosen.shape, generator=generator, device=device, dtype=latents_chosen.dtype)
    user_scale = 1.0
    if user_dropout > 0:
        keep = torch.rand(pairs, generator=generator, device=rng_device).to(device) >= user_dropout
        user_scale = _twice(keep.float())  # 0: the null user, the same as the pipeline's user-less branches

    noise, t2 = _twice(noise), _twice(t)
    latents = torch.cat([latents_chosen, latents_rejected])
    noisy = objective.add_noise(latents, noise, t2)
    target = objective.target(latents, noise, t2)
    conditioning = _twice(conditioning)

    with torch.no_grad():
        ref_pred = objective.predict(model, noisy, t2, conditioning, user_embeds=None)
    model_pred = objective.predict(
        model, noisy, t2, conditioning, user_embeds=_twice(user_embeds), user_scale=user_scale
    )
    return loss_fn(model_pred, ref_pred, target, weight=objective.loss_weight(t, timestep_weighting))
