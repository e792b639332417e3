"""The testbed's sampler: ``DDPMWuerstchenScheduler`` with the predicted clean image clipped to [-1, 1]."""

from __future__ import annotations

import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.configuration_utils import register_to_config

__all__ = ["ClippedDDPMWuerstchenScheduler"]


class ClippedDDPMWuerstchenScheduler(DDPMWuerstchenScheduler):
    r"""Stable Cascade's ancestral sampler, with the clean image it predicts at each step clipped.

    The testbed's latents are pixels in [-1, 1]. At high noise (``abar`` down to 1e-4) a small error of the
    predicted noise becomes a large error of the implied clean image ``x0 = (x_t - sqrt(1 - abar) eps) /
    sqrt(abar)``, and without clipping about half of the shipped model's pixels end outside [-1, 1] (pure
    black or white backgrounds). As ``DDPMScheduler(clip_sample=True)`` does, each step clips ``x0`` to
    ``[-clip_sample_range, clip_sample_range]`` and continues from the noise that clipped ``x0`` implies,
    so the step itself is unchanged.

    Args:
        scaler: As in ``DDPMWuerstchenScheduler``.
        s: As in ``DDPMWuerstchenScheduler``.
        clip_sample_range: Bound of the predicted clean sample.

    Examples:
        >>> import torch
        >>> scheduler = ClippedDDPMWuerstchenScheduler()
        >>> scheduler.set_timesteps(4)
        >>> x = torch.full((1, 3, 2, 2), 0.9)
        >>> out = scheduler.step(torch.full_like(x, -5.0), scheduler.timesteps[3:4], x).prev_sample
        >>> bool(out.abs().max() <= 1)
        True
    """

    @register_to_config
    def __init__(self, scaler: float = 1.0, s: float = 0.008, clip_sample_range: float = 1.0):
        super().__init__(scaler=scaler, s=s)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ):
        """``DDPMWuerstchenScheduler.step`` with the implied clean sample clipped first."""
        shape = (timestep.shape[0],) + (1,) * (sample.ndim - 1)
        alpha_cumprod = self._alpha_cumprod(timestep, sample.device).view(shape)
        bound = self.config.clip_sample_range
        x0 = (sample - (1 - alpha_cumprod).sqrt() * model_output) / alpha_cumprod.sqrt()
        noise = (sample - alpha_cumprod.sqrt() * x0.clamp(-bound, bound)) / (1 - alpha_cumprod).sqrt()
        return super().step(noise.to(model_output.dtype), timestep, sample, generator, return_dict)
