"""One user-conditioned Diffusion-DPO step, shared by every trainer so that scripts stay thin."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..loss import PPDLoss, PPDLossOutput
from ..noise import add_noise, sample_timesteps, timestep_weight

__all__ = ["ppd_dpo_step"]


def _check_pairs(latents_chosen: torch.Tensor, latents_rejected: torch.Tensor, **per_pair: torch.Tensor | None):
    if latents_chosen.shape != latents_rejected.shape or latents_chosen.ndim != 4:
        raise ValueError(
            "`latents_chosen` and `latents_rejected` must both be (pairs, channels, height, width), got "
            f"{tuple(latents_chosen.shape)} and {tuple(latents_rejected.shape)}."
        )
    pairs = latents_chosen.shape[0]
    for name, tensor in per_pair.items():
        if tensor is not None and tensor.shape[0] != pairs:
            raise ValueError(f"`{name}` must have one row per pair ({pairs}), got shape {tuple(tensor.shape)}.")


def _twice(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else torch.cat([tensor, tensor])


def ppd_dpo_step(
    model: nn.Module,
    latents_chosen: torch.Tensor,
    latents_rejected: torch.Tensor,
    clip_text_pooled: torch.Tensor,
    user_embeds: torch.Tensor,
    *,
    clip_text: torch.Tensor | None = None,
    clip_img: torch.Tensor | None = None,
    loss_fn: PPDLoss | None = None,
    user_dropout: float = 0.0,
    timestep_weighting: Literal["constant", "min_snr"] = "constant",
    generator: torch.Generator | None = None,
) -> PPDLossOutput:
    """Computes the PPD loss of a batch of preference pairs; call ``.loss.backward()`` on the result.

    For each pair one timestep ``t`` and one noise ``eps`` are drawn and shared by its preferred and
    rejected latents. The reference prediction is the same UNet with the adapter off, under
    ``torch.no_grad()`` (no second copy of the model); the policy prediction conditions each pair on
    its user.

    **The null user is the adapter switched off**, here as everywhere in the library: a pair dropped by
    ``user_dropout`` runs with user scale 0, exactly as the pipeline's text-only and unconditional
    branches, ``user_embeds=None`` and ``preference_scale=0`` do. Its policy then equals the reference,
    so a dropped pair contributes ``log 2`` to the loss and nothing to the gradient: dropout only thins
    the batch, and the default is 0. (The paper instead zeroes the embedding, which makes the null user a
    learned, pooled-DPO-like model that the user-less branches would have to run through the adapter;
    the testbed measured no difference between the two, see docs/guides/testbed.md.)

    Args:
        model: A ``PersonalizedStageC`` (``adapter.attach(unet)``), possibly wrapped by ``accelerate``.
            Keep its UNet frozen and in ``eval()``.
        latents_chosen: Stage C latents of the preferred images, ``(pairs, C, H, W)``.
        latents_rejected: Latents of the rejected images, same shape.
        clip_text_pooled: Pooled prompt embeddings, one row per pair.
        user_embeds: The user embedding of each pair's user, ``(pairs, tokens, width)``.
        clip_text: Optional prompt hidden states, one row per pair.
        clip_img: Optional CLIP image embeddings, one row per pair.
        loss_fn: The loss; defaults to ``PPDLoss()`` (beta 5000).
        user_dropout: Probability of training a pair with the null user (the adapter off for that pair).
        timestep_weighting: The ``w(lambda_t)`` factor on beta (see ``timestep_weight``).
        generator: Random generator for timesteps, noise and dropout (reproducible steps).

    Returns:
        The ``PPDLossOutput`` of the batch.

    Examples:
        ```py
        from ppd_diffusers.training import ppd_dpo_step
        out = ppd_dpo_step(model, lat_w, lat_l, pooled, users)
        accelerator.backward(out.loss)
        ```
    """
    _check_pairs(
        latents_chosen,
        latents_rejected,
        clip_text_pooled=clip_text_pooled,
        user_embeds=user_embeds,
        clip_text=clip_text,
        clip_img=clip_img,
    )
    if not 0.0 <= user_dropout <= 1.0:
        raise ValueError(f"`user_dropout` must be a probability in [0, 1], got {user_dropout}.")
    loss_fn = PPDLoss() if loss_fn is None else loss_fn
    pairs, device = latents_chosen.shape[0], latents_chosen.device
    rng_device = generator.device if generator is not None else device

    t = sample_timesteps(pairs, device=device, generator=generator)
    noise = randn_tensor(latents_chosen.shape, generator=generator, device=device, dtype=latents_chosen.dtype)
    user_scale = 1.0
    if user_dropout > 0:
        keep = torch.rand(pairs, generator=generator, device=rng_device).to(device) >= user_dropout
        user_scale = _twice(keep.float())  # 0: the null user, the same as the pipeline's user-less branches

    noise, t2 = _twice(noise), _twice(t)
    noisy = add_noise(torch.cat([latents_chosen, latents_rejected]), noise, t2)
    conditioning = {"clip_text_pooled": _twice(clip_text_pooled), "clip_text": _twice(clip_text)}
    conditioning["clip_img"] = _twice(clip_img)

    with torch.no_grad():
        ref_pred = model(noisy, t2, **conditioning, user_embeds=None).sample
    model_pred = model(noisy, t2, **conditioning, user_embeds=_twice(user_embeds), user_scale=user_scale).sample
    return loss_fn(model_pred, ref_pred, noise, weight=timestep_weight(t, timestep_weighting))
