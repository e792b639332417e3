"""The Stage C forward (noising) process used for training, matching ``DDPMWuerstchenScheduler``.

With ``s = 0.008``::

    abar(t) = clamp(cos^2((t + s) / (1 + s) * pi / 2) / cos^2(s / (1 + s) * pi / 2), 1e-4, 0.9999)
    x_t     = sqrt(abar(t)) * x_0 + sqrt(1 - abar(t)) * eps

The UNet receives ``timestep_ratio = t`` and predicts ``eps``. SDXL's and Flux's forward processes come from
their diffusers schedulers (see ``ppd_diffusers.training.objectives``, where ``StageCObjective`` uses this module).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["add_noise", "alphas_cumprod", "sample_timesteps", "timestep_weight"]

COSINE_S = 0.008


def alphas_cumprod(t: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """``abar(t)``: the signal fraction of ``x_t`` for ``t`` in [0, 1], in float32.

    The float32 operations are those of ``DDPMWuerstchenScheduler``, so both agree bit for bit.

    Examples:
        >>> import torch
        >>> alphas_cumprod(torch.tensor([0.0, 1.0])).tolist() == [0.9998999834060669, 9.999999747378752e-05]
        True
    """
    t = t.float()
    s_ = torch.tensor([s], device=t.device)
    start = torch.cos(s_ / (1 + s_) * torch.pi * 0.5) ** 2
    return (torch.cos((t + s_) / (1 + s_) * torch.pi * 0.5) ** 2 / start).clamp(1e-4, 0.9999)


def sample_timesteps(
    batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draws ``t ~ U[0, 1)`` for each of ``batch_size`` samples (how Stability trained Stage C).

    The draw happens on ``generator``'s device (so a CPU generator seeds a GPU run reproducibly), then
    moves to ``device``.
    """
    rng_device = generator.device if generator is not None else device
    return torch.rand(batch_size, device=rng_device, generator=generator).to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """``x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) noise`` per sample, in ``x0``'s dtype.

    Args:
        x0: Clean latents ``(batch, ...)``.
        noise: Gaussian noise, same shape as ``x0`` (the eps target).
        t: ``(batch,)`` timesteps in [0, 1].
        s: Cosine schedule offset.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"`noise` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(noise.shape)}.")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"`t` must have shape ({x0.shape[0]},), one timestep per sample, got {tuple(t.shape)}.")
    abar = alphas_cumprod(t, s).view(-1, *([1] * (x0.ndim - 1)))
    return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)


def timestep_weight(
    t: torch.Tensor, kind: Literal["constant", "min_snr"] = "constant", gamma: float = 5.0, s: float = COSINE_S
) -> torch.Tensor:
    """The per-pair weight ``w(lambda_t)`` of the DPO objective (it multiplies ``beta``).

    Args:
        t: ``(batch,)`` timesteps.
        kind: ``"constant"`` (1 everywhere, as Diffusion-DPO trains) or ``"min_snr"``
            (``min(SNR, gamma) / SNR`` with ``SNR = abar / (1 - abar)``, the Min-SNR weight for
            eps-prediction, which damps the easy, low-noise timesteps).
        gamma: The Min-SNR clip value.
        s: Cosine schedule offset.
    """
    if kind == "constant":
        return torch.ones_like(t, dtype=torch.float32)
    if kind == "min_snr":
        abar = alphas_cumprod(t, s)
        snr = abar / (1 - abar)
        return snr.clamp(max=gamma) / snr
    raise ValueError(f'`kind` must be "constant" or "min_snr", got {kind!r}.')
