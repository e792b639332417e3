"""The base model of a training run, one class per backbone: what ``train_ppd`` loads, encodes and calls.

Each class loads the backbone's PPD pipeline (text encoders, image encoder or VAE, the denoiser, the scheduler),
turns a batch of ``PreferencePairsDataset`` examples into latents and captions into the denoiser's conditioning,
and names the ``DPOObjective`` of the step. Everything else of a run (data, held-out users, accelerate,
checkpoints, validation, model card) is the same for every backbone and lives in ``trainer``.

- Stable Cascade: Stage C latents, precomputed (``add_stage_c_latents``) or from the EfficientNet image encoder;
  CLIP text hidden states and pooled embedding, a zero CLIP image embedding.
- SDXL: VAE latents computed on the fly, ``latent_dist.sample() * scaling_factor`` as diffusers' Diffusion-DPO
  script does; both CLIP text encoders; ``time_ids`` the pipeline's default micro-conditioning at
  ``resolution`` (original size = target size = ``resolution``, crop ``(0, 0)``), so the adapter trains under
  the conditioning it generates with.
- Flux: VAE latents ``(sample - shift_factor) * scaling_factor`` (as diffusers' Flux scripts), packed by the
  objective; T5 hidden states and the CLIP pooled embedding.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch

from .objectives import DPOObjective, FluxObjective, SDXLObjective, StageCObjective

__all__ = ["BackboneTraining", "FluxTraining", "SDXLTraining", "StageCTraining", "backbone_training"]

logger = logging.getLogger(__name__)

# what `add_stage_c_latents` writes: Stage C latents, of no use to the other backbones
STAGE_C_LATENT_COLUMNS = ("latents_0", "latents_1", "latents_ok")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")


def vae_pixels(image: Any, resolution: int) -> torch.Tensor:
    """One RGB image as the VAE takes it: resized to cover ``resolution`` x ``resolution``, center-cropped,
    ``(3, resolution, resolution)`` in ``[-1, 1]`` (diffusers' ``VaeImageProcessor``)."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=1)
    return processor.preprocess(image, height=resolution, width=resolution, resize_mode="crop")[0]


class BackboneTraining:
    """The base model of a PPD training run (base class; see the subclasses and ``backbone_training``).

    Args:
        args: The run's ``PPDTrainingArguments``.
        weight_dtype: The dtype of the frozen models (bf16 under ``mixed_precision="bf16"``).
    """

    backbone: str = ""
    pipe: Any = None
    objective: DPOObjective

    def __init__(self, args: Any, weight_dtype: torch.dtype):
        self.args = args
        self.weight_dtype = weight_dtype

    def load(self, load_decoder: bool) -> BackboneTraining:
        """Loads the pipeline (on the CPU), frozen and in ``eval()``; ``load_decoder``: whether this process draws
        validation grids (Stable Cascade then loads Stage B and A)."""
        self.pipe = self._load_pipeline(load_decoder)
        self.pipe.set_progress_bar_config(disable=True)
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.objective = self._objective()
        return self

    def _load_pipeline(self, load_decoder: bool) -> Any:
        raise NotImplementedError

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model the adapter personalizes (Stage C's prior, SDXL's UNet, Flux's transformer)."""
        return self.pipe.user_model

    def _objective(self) -> DPOObjective:
        """The forward process and model call of the DPO step (``objective`` once loaded)."""
        raise NotImplementedError

    @property
    def draws_grids(self) -> bool:
        """Whether this run's pipeline can draw validation images."""
        return True

    def to(self, device: torch.device) -> BackboneTraining:
        self.pipe.to(device)
        return self

    def training_dataset(self, dataset: Any) -> Any:
        """The dataset as training reads it (SDXL and Flux leave Stage C latent columns aside)."""
        return dataset

    def image_transform(self, dataset: Any) -> Any:
        """What ``PreferencePairsDataset`` applies to each decoded image, or ``None`` to read stored latents."""
        raise NotImplementedError

    def check_latent_size(self, pairs: Any) -> None:
        """Warns when the trained latents differ from those the pipeline generates at ``resolution``."""

    def prepare_image_encoder(self, device: torch.device) -> None:
        """Loads what turns pixels into latents, when the data holds images."""

    def latents(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents of the preferred and the rejected images of ``batch``, in the frozen models' dtype."""
        raise NotImplementedError

    def conditioning(self, captions: list[str], device: torch.device) -> dict[str, Any]:
        """The denoiser's conditioning for ``captions``, one row each (run under ``torch.no_grad()``)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()

    def compile(self) -> None:
        raise ValueError(f"`torch_compile` is implemented for Stable Cascade only, not for {self.backbone}.")

    def _vae_latents(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = torch.cat([batch["pixels_chosen"], batch["pixels_rejected"]]).to(generator.device, vae.dtype)
        return vae.encode(pixels).latent_dist.sample(generator)


class StageCTraining(BackboneTraining):
    """Stable Cascade: Stage C (``PersonalizedStableCascadePipeline``), its latents stored or from EfficientNet."""

    backbone = "stable_cascade"
    image_encoder: torch.nn.Module | None = None

    def _load_pipeline(self, load_decoder: bool) -> Any:
        from ..pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

        args = self.args
        return PersonalizedStableCascadePipeline.from_stable_cascade(
            prior_model_name_or_path=args.pretrained_model_name_or_path,
            decoder_model_name_or_path=args.decoder_model_name_or_path if load_decoder else None,
            prior_subfolder=args.prior_subfolder,
            torch_dtype=self.weight_dtype,
            variant=args.variant,
            revision=args.revision,
            resolution_multiple=args.resolution_multiple,
            latent_dim_scale=args.latent_dim_scale,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.prior

    def _objective(self) -> DPOObjective:
        return StageCObjective()

    @property
    def draws_grids(self) -> bool:
        return self.pipe.decoder is not None

    def image_transform(self, dataset: Any) -> Any:
        if {"latents_0", "latents_1"} <= set(dataset.column_names):
            return None
        return partial(_effnet_pixels, height=self.args.resolution, width=self.args.resolution)

    def check_latent_size(self, pairs: Any) -> None:
        from ..stage_c_image_encoder import stage_c_latent_size

        args = self.args
        generated = stage_c_latent_size(args.resolution, args.resolution, args.resolution_multiple)
        if pairs.precomputed_latents:
            trained = tuple(pairs[0]["latents_chosen"].shape[-2:])
        else:  # the effnet encoder's own size rule (its default multiple)
            trained = stage_c_latent_size(args.resolution, args.resolution)
        if trained != generated:
            logger.warning(
                "Training latents are %s but the pipeline generates %s at `resolution` %d with `resolution_multiple` "
                "%s: validation images (and later generation) run at another size than training.",
                "x".join(map(str, trained)), "x".join(map(str, generated)), args.resolution, args.resolution_multiple,
            )  # fmt: skip

    def prepare_image_encoder(self, device: torch.device) -> None:
        from ..stage_c_image_encoder import StageCImageEncoder

        args = self.args
        if args.image_encoder is not None:
            encoder = StageCImageEncoder.from_pretrained(args.image_encoder)
        elif args.effnet_checkpoint is not None:
            encoder = StageCImageEncoder.from_stability_checkpoint(args.effnet_checkpoint)
        else:
            raise ValueError(
                "The dataset has no precomputed latents: pass `image_encoder` or `effnet_checkpoint`, or precompute "
                "the latents with `examples/precompute_latents.py`."
            )
        self.image_encoder = encoder.requires_grad_(False).eval().to(device, self.weight_dtype)

    def latents(self, batch, generator):
        if self.image_encoder is None:
            return batch["latents_chosen"], batch["latents_rejected"]
        pixels = torch.cat([batch["pixels_chosen"], batch["pixels_rejected"]]).to(generator.device, self.weight_dtype)
        return self.image_encoder(pixels).chunk(2)

    def conditioning(self, captions, device):
        clip_text, clip_text_pooled = self.pipe.encode_prompt(captions, device, warn_truncation=False)
        clip_img = clip_text.new_zeros(len(captions), 1, self.pipe.prior.config.clip_image_in_channels)
        return {"clip_text_pooled": clip_text_pooled, "clip_text": clip_text, "clip_img": clip_img}

    def compile(self) -> None:
        from .._stable_cascade import compile_blocks

        blocks = compile_blocks(self.pipe.prior)
        logger.info("torch.compile: %d Stage C blocks and the personalized attention (regional)", blocks)


def _effnet_pixels(image: Any, height: int, width: int) -> torch.Tensor:
    from ..stage_c_image_encoder import preprocess_images

    return preprocess_images([image], height=height, width=width)[0]


class _VAETraining(BackboneTraining):
    """SDXL and Flux: latents from the pipeline's VAE, computed from the images at every step."""

    latent_multiple: int = 1

    def _pipeline_class(self) -> Any:
        raise NotImplementedError

    def _load_pipeline(self, load_decoder: bool) -> Any:
        args = self.args
        from ..loaders import diffusers_dtype_kwargs

        pipe = self._pipeline_class().from_pretrained(
            args.pretrained_model_name_or_path, **diffusers_dtype_kwargs(self.weight_dtype), variant=args.variant,
            revision=args.revision,
        )  # fmt: skip
        multiple = pipe.vae_scale_factor * self.latent_multiple
        if args.resolution % multiple:
            patches = " and 2x2 patches" if self.latent_multiple == 2 else ""
            raise ValueError(
                f"`resolution` must be a multiple of {multiple} for {self.backbone} (the VAE's downsampling "
                f"{pipe.vae_scale_factor}{patches}), got {args.resolution}."
            )
        return pipe

    def training_dataset(self, dataset: Any) -> Any:
        columns = set(dataset.column_names)
        if not set(IMAGE_COLUMNS) <= columns:
            raise ValueError(
                f"{self.backbone} training encodes the images with its VAE, but the dataset has no "
                f"{', '.join(f'`{c}`' for c in IMAGE_COLUMNS if c not in columns)} column (stored latents are "
                "Stage C's): train on the Pick-a-Pic images."
            )
        stale = [c for c in STAGE_C_LATENT_COLUMNS if c in columns]
        if stale:
            logger.info("Ignoring the dataset's Stage C latent columns %s: %s encodes images itself.", stale,
                        self.backbone)  # fmt: skip
            dataset = dataset.remove_columns(stale)
        return dataset

    def image_transform(self, dataset: Any) -> Any:
        return partial(vae_pixels, resolution=self.args.resolution)


class SDXLTraining(_VAETraining):
    """SDXL (``PersonalizedStableDiffusionXLPipeline``): DDPM epsilon or v, as the base model's scheduler says."""

    backbone = "sdxl"

    def _pipeline_class(self) -> Any:
        from ..pipeline_personalized_stable_diffusion_xl import PersonalizedStableDiffusionXLPipeline

        return PersonalizedStableDiffusionXLPipeline

    def _objective(self) -> DPOObjective:
        return SDXLObjective(self.pipe.scheduler)

    def latents(self, batch, generator):
        latents = self._vae_latents(batch, generator) * self.pipe.vae.config.scaling_factor
        return latents.to(self.weight_dtype).chunk(2)

    def conditioning(self, captions, device):
        text, _, pooled, _ = self.pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        size = (self.args.resolution, self.args.resolution)
        # original size, crop top-left, target size: the pipeline's defaults when generating at `resolution`
        time_ids = torch.tensor([[*size, 0, 0, *size]], device=device, dtype=text.dtype).repeat(len(captions), 1)
        return {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


class FluxTraining(_VAETraining):
    """Flux (``PersonalizedFluxPipeline``): rectified flow with the velocity target (Flow-DPO)."""

    backbone = "flux"
    latent_multiple = 2

    def _pipeline_class(self) -> Any:
        from ..pipeline_personalized_flux import PersonalizedFluxPipeline

        return PersonalizedFluxPipeline

    def _objective(self) -> DPOObjective:
        args = self.args
        return FluxObjective(
            self.pipe.scheduler, weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean,
            logit_std=args.logit_std, mode_scale=args.mode_scale, guidance_scale=args.flux_guidance_scale,
        )  # fmt: skip

    def latents(self, batch, generator):
        config = self.pipe.vae.config
        latents = (self._vae_latents(batch, generator) - config.shift_factor) * config.scaling_factor
        return latents.to(self.weight_dtype).chunk(2)

    def conditioning(self, captions, device):
        text, pooled, _ = self.pipe.encode_prompt(
            captions, prompt_2=None, device=device, max_sequence_length=self.args.max_sequence_length
        )
        return {"encoder_hidden_states": text, "pooled_projections": pooled}


_CLASSES = {"stable_cascade": StageCTraining, "sdxl": SDXLTraining, "flux": FluxTraining}


def backbone_training(args: Any, weight_dtype: torch.dtype) -> BackboneTraining:
    """The ``BackboneTraining`` of ``args.backbone`` (``load`` loads its pipeline)."""
    return _CLASSES[args.backbone](args, weight_dtype)
