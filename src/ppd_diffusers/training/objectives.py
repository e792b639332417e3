"""What the Diffusion-DPO step needs to know about each backbone: its forward process and how its model is called.

The loss is the same for every backbone (``PPDLoss``: per sample the squared error of the prediction against the
regression target, preferred minus rejected, policy minus reference). What changes is the forward process that
makes ``x_t`` from the clean latents, the target the model regresses and the model's call:

- ``StageCObjective`` (Stable Cascade Stage C): the cosine schedule of ``DDPMWuerstchenScheduler`` (see
  ``ppd_diffusers.noise``), ``t ~ U[0, 1)``, target ``eps``.
- ``SDXLObjective`` (SDXL's ``UNet2DConditionModel``): DDPM with the base model's betas, integer ``t`` uniform in
  ``[0, num_train_timesteps)``, ``scheduler.add_noise``, target ``eps`` or ``v`` (``scheduler.get_velocity``) as
  the scheduler's ``prediction_type`` says: exactly Diffusion-DPO (Wallace et al. 2023) and diffusers'
  ``train_diffusion_dpo_sdxl.py``.
- ``FluxObjective`` (``FluxTransformer2DModel``): rectified flow, ``x_t = (1 - sigma) x0 + sigma eps`` with
  ``sigma`` drawn as diffusers' Flux training scripts draw it, target the velocity ``eps - x0``; the DPO loss is
  Diffusion-DPO's with the velocity error in place of the noise error, which is Flow-DPO (Liu et al. 2025,
  "Improving Video Generation with Human Feedback", arXiv 2501.13918).

Each objective receives the clean latents as ``(batch, channels, height, width)`` and returns predictions and
targets in that layout (Flux's packing into tokens happens inside ``FluxObjective.predict``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .. import noise as stage_c_noise

__all__ = ["DPOObjective", "FluxObjective", "SDXLObjective", "StageCObjective", "objective_for"]

# stabilityai/stable-diffusion-xl-base-1.0, subfolder "scheduler": the schedule SDXL base was trained with
SDXL_TRAINING_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
# black-forest-labs/FLUX.1-dev, subfolder "scheduler"
FLUX_TRAINING_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
)
FLOW_WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap")


def _rng_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    # draws happen on the generator's device, so a CPU generator seeds a GPU run reproducibly
    return generator.device if generator is not None else device


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


class DPOObjective:
    """The forward process, regression target and model call of one backbone (base class).

    Subclasses set ``backbone`` (one of ``ppd_diffusers.backbones.BACKBONES``) and implement the methods;
    ``ppd_dpo_step`` calls them in this order: ``sample_timesteps`` (one per pair), then, for the
    ``[chosen; rejected]`` batch, ``add_noise``, ``target`` and ``predict`` (reference, then policy), and
    ``loss_weight`` (per pair, it multiplies beta).
    """

    backbone: str = ""
    required_conditioning: tuple[str, ...] = ()

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws one timestep per sample, in the form ``add_noise`` and ``predict`` take."""
        raise NotImplementedError

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` of clean ``latents`` ``(batch, C, H, W)`` with ``noise`` at ``timesteps`` ``(batch,)``."""
        raise NotImplementedError

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model's output regresses, in the layout of ``latents``."""
        raise NotImplementedError

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, Any], **user: Any
    ) -> torch.Tensor:
        """The model's output for ``noisy`` latents, in their layout.

        Args:
            model: The personalized model (``adapter.attach(model)``).
            noisy: ``add_noise``'s output ``(batch, C, H, W)``.
            timesteps: ``(batch,)``, as ``sample_timesteps`` drew them.
            conditioning: The backbone's conditioning, one row per sample (see the subclass).
            **user: ``user_embeds``/``user_scale`` for ``PersonalizedModel.forward``.
        """
        raise NotImplementedError

    def loss_weight(self, timesteps: torch.Tensor, kind: str = "constant") -> torch.Tensor:
        """The per-pair factor ``w(lambda_t)`` on beta; ``kind`` is ``"constant"`` or ``"min_snr"``."""
        raise NotImplementedError

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raises ``ValueError`` for latents this backbone cannot take (the common shape check is the step's)."""

    def check_conditioning(self, conditioning: dict[str, Any]) -> None:
        """Raises ``ValueError`` when a required conditioning entry is missing."""
        missing = [name for name in self.required_conditioning if conditioning.get(name) is None]
        if missing:
            raise ValueError(
                f"The {self.backbone} objective needs `conditioning` entries {', '.join(map(repr, missing))}, got "
                f"{sorted(conditioning)}."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StageCObjective(DPOObjective):
    """Stable Cascade Stage C: ``x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps``, ``t ~ U[0, 1)``, target ``eps``.

    The cosine ``abar`` of ``DDPMWuerstchenScheduler`` (see ``ppd_diffusers.noise``); the UNet receives
    ``timestep_ratio = t``. Conditioning: ``clip_text_pooled`` (required), ``clip_text`` and ``clip_img``, as
    ``PersonalizedStageC`` takes them.

    Examples:
        >>> import torch
        >>> objective = StageCObjective()
        >>> t = objective.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
        >>> bool(((t >= 0) & (t < 1)).all())
        True
    """

    backbone = "stable_cascade"
    required_conditioning = ("clip_text_pooled",)

    def sample_timesteps(self, batch_size, device=None, generator=None):
        return stage_c_noise.sample_timesteps(batch_size, device=device, generator=generator)

    def add_noise(self, latents, noise, timesteps):
        return stage_c_noise.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return noise

    def predict(self, model, noisy, timesteps, conditioning, **user):
        return model(noisy, timesteps, **conditioning, **user).sample

    def loss_weight(self, timesteps, kind="constant"):
        return stage_c_noise.timestep_weight(timesteps, kind)


class SDXLObjective(DPOObjective):
    """SDXL: DDPM noising with the base model's schedule and an ``epsilon`` or ``v_prediction`` target.

    Exactly what Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908) and diffusers'
    ``examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py`` do: integer timesteps uniform in
    ``[0, num_train_timesteps)``, ``x_t = scheduler.add_noise(x0, eps, t)``, target ``eps`` for an
    ``epsilon`` model and ``scheduler.get_velocity(x0, eps, t)`` for a ``v_prediction`` one. The schedule is a
    ``DDPMScheduler`` built from the config of the scheduler given (SDXL repos ship an ``EulerDiscreteScheduler``
    with the same betas), as that script does.

    Conditioning: ``encoder_hidden_states`` (required) and ``added_cond_kwargs``
    (``{"text_embeds": pooled, "time_ids": ...}``), the UNet's own arguments.

    Args:
        scheduler: The base model's scheduler (``pipe.scheduler``) or its config; by default SDXL base 1.0's
            training schedule (``SDXL_TRAINING_SCHEDULE``, epsilon).
        prediction_type: Overrides the scheduler's ``prediction_type`` (``"epsilon"`` or ``"v_prediction"``).

    Examples:
        >>> import torch
        >>> objective = SDXLObjective(prediction_type="v_prediction")
        >>> x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0, 999])
        >>> v = objective.target(x0, eps, t)  # sqrt(abar) eps - sqrt(1 - abar) x0
        >>> torch.allclose(v[1], objective.scheduler.alphas_cumprod[999].sqrt() * eps[1]
        ...     - (1 - objective.scheduler.alphas_cumprod[999]).sqrt() * x0[1], atol=1e-6)
        True
    """

    backbone = "sdxl"
    required_conditioning = ("encoder_hidden_states",)

    def __init__(self, scheduler: Any = None, prediction_type: str | None = None):
        from diffusers import DDPMScheduler

        config = SDXL_TRAINING_SCHEDULE if scheduler is None else getattr(scheduler, "config", scheduler)
        self.scheduler = DDPMScheduler.from_config(config)
        self.prediction_type = prediction_type or self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f'`prediction_type` must be "epsilon" or "v_prediction", got {self.prediction_type!r} (Diffusion-DPO '
                "regresses the noise or the velocity)."
            )
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, batch_size, device=None, generator=None):
        rng_device = _rng_device(generator, device)
        draw = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=rng_device)
        return draw.to(device)

    def add_noise(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def predict(self, model, noisy, timesteps, conditioning, **user):
        return model(noisy, timesteps, **conditioning, **user).sample

    def loss_weight(self, timesteps, kind="constant", gamma: float = 5.0):
        """``"constant"``: 1. ``"min_snr"``: the Min-SNR-gamma weight (Hang et al. 2023) with
        ``SNR = abar / (1 - abar)``: ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)``
        for v-prediction (as diffusers' ``train_text_to_image.py`` weighs them)."""
        if kind == "constant":
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        if kind != "min_snr":
            raise ValueError(f'`kind` must be "constant" or "min_snr", got {kind!r}.')
        abar = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps.long()].float()
        snr = abar / (1 - abar)
        return snr.clamp(max=gamma) / (snr if self.prediction_type == "epsilon" else snr + 1)

    def __repr__(self) -> str:
        return (
            f"SDXLObjective(prediction_type={self.prediction_type!r}, num_train_timesteps={self.num_train_timesteps})"
        )


class FluxObjective(DPOObjective):
    r"""Flux: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``, target the velocity ``eps - x0``.

    ``sigma`` is drawn as diffusers' Flux training scripts (``train_dreambooth_lora_flux.py``) draw it: ``u``
    from ``diffusers.training_utils.compute_density_for_timestep_sampling(weighting_scheme, ...)`` (uniform for
    ``"none"``), then ``sigma = scheduler.sigmas[int(u * num_train_timesteps)]`` on the training grid of a fresh
    copy of the base model's ``FlowMatchEulerDiscreteScheduler`` (FLUX.1-dev's grid is ``1, 0.999, ..., 0.001``:
    its shift is dynamic, applied at inference only). The transformer receives ``timestep = sigma`` (the pipeline's
    ``t / 1000``), the guidance embedding ``guidance_scale`` when the model has one (FLUX.1-dev is
    guidance-distilled; 3.5 as diffusers' scripts), and the latents packed into 2x2 patches with their position
    ids (``txt_ids`` are zeros, as ``FluxPipeline.encode_prompt`` makes them).

    The DPO loss is ``PPDLoss`` with the velocity error ``||v_pred - (eps - x0)||^2`` in place of the noise error:
    Flow-DPO (Liu et al. 2025, "Improving Video Generation with Human Feedback", arXiv 2501.13918), which extends
    Diffusion-DPO to rectified-flow models this way. Its beta acts on velocity errors, whose scale differs from
    that of noise errors: tune it for Flux rather than reusing SDXL's 5000.

    Conditioning: ``encoder_hidden_states`` (T5) and ``pooled_projections`` (CLIP), one row per sample.

    Args:
        scheduler: The base model's scheduler (``pipe.scheduler``) or its config; by default FLUX.1-dev's.
        weighting_scheme: ``"none"`` (uniform ``sigma``), ``"logit_normal"`` or ``"mode"`` (denser sampling of
            some ``sigma``), or ``"cosmap"`` (uniform sampling, the loss weighted by
            ``compute_loss_weighting_for_sd3``: here a per-pair factor on beta, between 0.64 and 1.27). The SD3
            paper's names. ``"sigma_sqrt"`` is refused: its weight ``sigma^-2`` reaches 10^6 at FLUX.1's smallest
            ``sigma``, and multiplying beta by it saturates the log-sigmoid of DPO (no gradient, or a huge one).
        logit_mean: Mean of ``"logit_normal"``.
        logit_std: Standard deviation of ``"logit_normal"``.
        mode_scale: Scale of ``"mode"``.
        guidance_scale: The guidance-embedding value of a guidance-distilled transformer (ignored otherwise).

    Examples:
        >>> import torch
        >>> objective = FluxObjective()
        >>> sigma = objective.sample_timesteps(3, generator=torch.Generator().manual_seed(0))
        >>> x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        >>> x_t = objective.add_noise(x0, eps, sigma)
        >>> torch.allclose(x_t + (1 - sigma.view(-1, 1, 1, 1)) * objective.target(x0, eps, sigma), eps, atol=1e-6)
        True
    """

    backbone = "flux"
    required_conditioning = ("encoder_hidden_states", "pooled_projections")

    def __init__(
        self,
        scheduler: Any = None,
        weighting_scheme: Literal["none", "logit_normal", "mode", "cosmap"] = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        guidance_scale: float = 3.5,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if weighting_scheme == "sigma_sqrt":
            raise ValueError(
                "`weighting_scheme='sigma_sqrt'` weighs pairs by sigma^-2 (up to 10^6 on FLUX.1's grid), which "
                "saturates the DPO loss: use `none`, `logit_normal`, `mode` or `cosmap`."
            )
        if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            raise ValueError(f"`weighting_scheme` must be one of {FLOW_WEIGHTING_SCHEMES}, got {weighting_scheme!r}.")
        config = FLUX_TRAINING_SCHEDULE if scheduler is None else getattr(scheduler, "config", scheduler)
        # a fresh scheduler: `set_timesteps` of an inference run replaces `sigmas` with the sampling schedule
        fresh = FlowMatchEulerDiscreteScheduler.from_config(config)
        self.sigmas = fresh.sigmas.detach().clone().float().cpu()
        self.num_train_timesteps = fresh.config.num_train_timesteps
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.guidance_scale = guidance_scale

    def sample_timesteps(self, batch_size, device=None, generator=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=_rng_device(generator, device),
            generator=generator,
        )
        # a logit-normal u can round to 1.0 in float32: stay on the grid
        indices = (u.cpu() * self.num_train_timesteps).long().clamp(0, len(self.sigmas) - 1)
        return self.sigmas[indices].to(device)

    def add_noise(self, latents, noise, timesteps):
        sigma = _per_sample(timesteps, latents).to(latents.dtype)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def check_latents(self, latents):
        if latents.shape[-1] % 2 or latents.shape[-2] % 2:
            raise ValueError(
                f"Flux latents are packed into 2x2 patches: their height and width must be even, got shape "
                f"{tuple(latents.shape)}."
            )

    def predict(self, model, noisy, timesteps, conditioning, **user):
        batch, _, height, width = noisy.shape
        packed = pack_flux_latents(noisy)
        text = conditioning["encoder_hidden_states"]
        conditioning = dict(conditioning)
        conditioning.setdefault("txt_ids", text.new_zeros(text.shape[1], 3))
        conditioning.setdefault("img_ids", flux_image_ids(height, width, noisy.device, noisy.dtype))
        guidance = None
        if getattr(model, "model", model).config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=noisy.device, dtype=torch.float32)
        out = model(hidden_states=packed, timestep=timesteps, guidance=guidance, **conditioning, **user).sample
        return unpack_flux_latents(out, height, width)

    def loss_weight(self, timesteps, kind="constant"):
        """``"constant"`` only (Min-SNR is an epsilon/v weighting): 1, or the ``weighting_scheme``'s
        ``compute_loss_weighting_for_sd3`` weight for ``"cosmap"``."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if kind != "constant":
            raise ValueError(
                f'The Flux objective takes `timestep_weighting="constant"` only, got {kind!r}: weigh flow-matching '
                "timesteps with its `weighting_scheme`."
            )
        return compute_loss_weighting_for_sd3(self.weighting_scheme, timesteps.float()).float()

    def __repr__(self) -> str:
        return (
            f"FluxObjective(weighting_scheme={self.weighting_scheme!r}, guidance_scale={self.guidance_scale}, "
            f"num_train_timesteps={self.num_train_timesteps})"
        )


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(batch, C, H, W)`` latents as Flux's tokens ``(batch, H/2 * W/2, 4C)``: each 2x2 patch one token, its
    channels ordered (channel, row, column), patches in row-major order, as ``FluxPipeline`` packs them."""
    batch, channels, height, width = latents.shape
    patches = latents.unflatten(2, (height // 2, 2)).unflatten(4, (width // 2, 2))  # b, c, h, 2, w, 2
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_flux_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_flux_latents`` for latents of ``height x width``."""
    batch, _, features = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2)  # b, h, w, c, 2, 2
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, features // 4, height, width)


def flux_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The position ids ``(H/2 * W/2, 3)`` of the packed tokens of ``height x width`` latents: ``(0, row, col)``."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def objective_for(backbone: str, scheduler: Any = None, **kwargs: Any) -> DPOObjective:
    """The objective of ``backbone`` (``"stable_cascade"``, ``"sdxl"`` or ``"flux"``) built from the base model's
    ``scheduler``; ``kwargs`` go to its class.

    Examples:
        >>> objective_for("sdxl", prediction_type="v_prediction").prediction_type
        'v_prediction'
    """
    if backbone == "stable_cascade":
        return StageCObjective(**kwargs)
    if backbone == "sdxl":
        return SDXLObjective(scheduler, **kwargs)
    if backbone == "flux":
        return FluxObjective(scheduler, **kwargs)
    raise ValueError(f'`backbone` must be one of "stable_cascade", "sdxl", "flux", got {backbone!r}.')
