"""Every setting of a PPD training run, parsed from the command line by ``transformers.HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["PPDTrainingArguments"]

# the base model each backbone trains on unless `pretrained_model_name_or_path` says otherwise
DEFAULT_BASE_MODELS = {
    "stable_cascade": "stabilityai/stable-cascade-prior",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux": "black-forest-labs/FLUX.1-dev",
}

DEFAULT_VALIDATION_PROMPTS = [
    "a lighthouse on a cliff at dusk",
    "a bowl of fruit on a wooden table",
    "portrait of an old sailor",
]


def _help(text: str, required: bool = False) -> dict:
    # argparse %-formats help strings: a bare "%" would print its parameter dict
    return {"help": text.replace("%", "%%"), **({"required": True} if required else {})}


@dataclass
class PPDTrainingArguments:
    """Settings of ``train_ppd`` (``examples/train_ppd.py --help`` lists them with these descriptions).

    Defaults follow the paper where it says (AdamW, learning rate 1e-5, one epoch; the paper's effective batch
    of 768 pairs is ``train_batch_size x gradient_accumulation_steps x processes``) and Diffusion-DPO
    (beta 5000) elsewhere. ``backbone`` picks the base model: Stable Cascade (the paper's), SDXL or Flux; the
    settings marked "Stable Cascade only" or "Flux only" are ignored by the other backbones.

    Examples:
        ```py
        from transformers import HfArgumentParser
        from ppd_diffusers.training import PPDTrainingArguments, train_ppd

        (args,) = HfArgumentParser(PPDTrainingArguments).parse_args_into_dataclasses()
        train_ppd(args)
        ```
    """

    # --- data
    dataset_name: str = field(
        default=None,
        metadata=_help(
            "Pick-a-Pic-format data: a Hub id, a data file or folder of files, or a folder written by "
            "`save_to_disk` (e.g. by `examples/precompute_latents.py`, then latents are not recomputed).",
            required=True,
        ),
    )
    user_embeddings: str = field(
        default=None,
        metadata=_help(
            "The `user_embeddings.safetensors` written by `examples/compute_user_embeddings.py`.", required=True
        ),
    )
    dataset_split: str = field(default="train", metadata=_help("Split of `dataset_name`."))
    max_train_samples: int | None = field(
        default=None, metadata=_help("Train on this many pairs only (a seeded random subset), for quick runs.")
    )
    num_validation_users: int = field(
        default=4, metadata=_help("Users held out of training whose validation images are generated.")
    )
    eval_user_fraction: float = field(
        default=0.1,
        metadata=_help(
            "Fraction of the users with an embedding held out for evaluation (rounded down; none below 10 users "
            "at 0.1): training never reads their pairs; they are listed in `held_out_users.json`."
        ),
    )
    max_eval_users: int | None = field(default=500, metadata=_help("At most this many evaluation users."))
    held_out_seed: int = field(
        default=0,
        metadata=_help(
            "Seed of the held-out users (evaluation and validation); apart from `seed`, so runs of different "
            "seeds hold out the same users."
        ),
    )
    dataloader_num_workers: int = field(default=0, metadata=_help("Processes decoding images (0: the main one)."))
    # --- models
    backbone: Literal["stable_cascade", "sdxl", "flux"] = field(
        default="stable_cascade",
        metadata=_help(
            "The base model: `stable_cascade` (Stage C, Diffusion-DPO on eps), `sdxl` (Diffusion-DPO on eps or v "
            "as its scheduler says) or `flux` (Flow-DPO on the velocity)."
        ),
    )
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "The base model's diffusers repo: the Stage C repo (prior, text encoder...), an SDXL or a Flux pipeline "
            "repo. Unset: stabilityai/stable-cascade-prior, stabilityai/stable-diffusion-xl-base-1.0 or "
            "black-forest-labs/FLUX.1-dev."
        ),
    )
    prior_subfolder: str = field(
        default="prior", metadata=_help("Stable Cascade only: `prior` (3.6B) or `prior_lite` (1B).")
    )
    revision: str | None = field(default=None, metadata=_help("Revision of the base model's repo."))
    variant: str | None = field(default=None, metadata=_help("Weight variant of the base models, e.g. `bf16`."))
    decoder_model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "Stable Cascade only: Stage B/A repo (e.g. `stabilityai/stable-cascade`) for validation images; none "
            "without it (SDXL and Flux draw them with their own VAE)."
        ),
    )
    image_encoder: str | None = field(
        default=None,
        metadata=_help(
            "Stable Cascade only: a saved `StageCImageEncoder` (Hub id or folder), when the data has no precomputed "
            "latents (SDXL and Flux encode the images with their VAE)."
        ),
    )
    effnet_checkpoint: str | None = field(
        default=None,
        metadata=_help(
            "Stable Cascade only: or Stability's `effnet_encoder.safetensors` (file, folder or Hub repo) as the image "
            "encoder."
        ),
    )
    resolution: int = field(
        default=1024,
        metadata=_help(
            "Training image size in pixels (Stage C: 1024 gives 24x24 latents; SDXL and Flux: images are resized to "
            "cover it and center-cropped, 1024 gives 128x128 VAE latents)."
        ),
    )
    adapter_name_or_path: str | None = field(
        default=None, metadata=_help("Start from this trained `UserAdapter` instead of a fresh one.")
    )
    num_user_tokens: int = field(default=4, metadata=_help("User tokens per user-embedding token (new adapter)."))
    user_token_dim: int = field(default=768, metadata=_help("Width of a user token (new adapter)."))
    resolution_multiple: float = field(
        default=42.67, metadata=_help("Stable Cascade only: image pixels per Stage C latent pixel (other priors).")
    )
    latent_dim_scale: float = field(
        default=10.67,
        metadata=_help("Stable Cascade only: Stage B latent pixels per Stage C latent pixel (other priors)."),
    )
    max_sequence_length: int = field(default=512, metadata=_help("Flux only: T5 tokens per prompt."))
    # --- optimisation
    output_dir: str = field(default="ppd-adapter", metadata=_help("Adapter, checkpoints, logs and validation images."))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help("Delete an earlier run's outputs in `output_dir` first (without it such a folder is refused)."),
    )
    seed: int = field(default=0, metadata=_help("Seed of the data order, noise, timesteps and dropout."))
    train_batch_size: int = field(default=4, metadata=_help("Pairs per process per forward pass."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Forward passes per optimizer step."))
    num_train_epochs: int = field(default=1, metadata=_help("Passes over the training pairs (paper: 1)."))
    max_train_steps: int | None = field(default=None, metadata=_help("Optimizer steps; overrides the epochs."))
    learning_rate: float = field(default=1e-5, metadata=_help("AdamW learning rate (paper: 1e-5)."))
    lr_scheduler: str = field(
        default="constant_with_warmup",
        metadata=_help("A `diffusers.optimization.get_scheduler` name: constant, linear, cosine, ..."),
    )
    lr_warmup_steps: int = field(default=100, metadata=_help("Optimizer steps of linear learning-rate warmup."))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping (0 turns it off)."))
    beta_dpo: float = field(
        default=5000.0,
        metadata=_help(
            "Diffusion-DPO's beta (see `PPDLoss`; the same convention as diffusers' SDXL DPO script). Flux's velocity "
            "errors have another scale: tune it there."
        ),
    )
    timestep_weighting: Literal["constant", "min_snr"] = field(
        default="constant",
        metadata=_help(
            "Weight of each timestep in the loss (the objective's `loss_weight`; `min_snr`: Stable Cascade and SDXL)."
        ),
    )
    weighting_scheme: Literal["none", "logit_normal", "mode", "cosmap"] = field(
        default="none",
        metadata=_help(
            "Flux only: how sigma is drawn (`none`: uniform, `logit_normal`, `mode`) or weighted (`cosmap`), as "
            "diffusers' Flux training scripts (see `FluxObjective`; their `sigma_sqrt` would saturate the DPO loss)."
        ),
    )
    logit_mean: float = field(default=0.0, metadata=_help("Flux only: mean of the `logit_normal` scheme."))
    logit_std: float = field(default=1.0, metadata=_help("Flux only: standard deviation of `logit_normal`."))
    mode_scale: float = field(default=1.29, metadata=_help("Flux only: scale of the `mode` scheme."))
    flux_guidance_scale: float = field(
        default=3.5,
        metadata=_help("Flux only: the guidance-embedding value in training (guidance-distilled FLUX.1-dev)."),
    )
    user_dropout: float = field(
        default=0.0,
        metadata=_help(
            "Probability of training a pair with the null user (the adapter off): such a pair teaches nothing, "
            "user guidance works without it (paper: 0.1, with a zeroed embedding instead)."
        ),
    )
    prompt_dropout: float = field(default=0.05, metadata=_help("Probability of training a pair on the empty prompt."))
    mixed_precision: Literal["no", "bf16"] | None = field(
        default=None,
        metadata=_help(
            "`bf16` (frozen models stored in bf16, adapter fp32 under autocast) or `no`; unset: accelerate's config"
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help("Recompute the base model's blocks in the backward pass: far less memory, ~25% slower."),
    )
    torch_compile: bool = field(
        default=False,
        metadata=_help(
            "Stable Cascade only: compile Stage C's blocks and the personalized attention (regional torch.compile): "
            "the first steps compile, later ones run faster."
        ),
    )
    allow_tf32: bool = field(default=False, metadata=_help("Allow TF32 matmuls on Ampere and newer GPUs."))
    # --- checkpoints, logging, validation, hub
    checkpointing_steps: int = field(default=500, metadata=_help("Save a resumable checkpoint every N steps."))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help("Keep at most this many checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("A `checkpoint-N` folder, or `latest` (the newest in `output_dir`, if any).")
    )
    report_to: str = field(default="tensorboard", metadata=_help("`tensorboard`, `wandb`, `all` or `none`."))
    tracker_project_name: str = field(default="ppd", metadata=_help("Project name of the trackers."))
    validation_steps: int = field(default=500, metadata=_help("Generate validation images every N steps."))
    validation_prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS), metadata=_help("Prompts of the validation grid.")
    )
    validation_inference_steps: int = field(
        default=20, metadata=_help("Denoising steps of validation images (Stage C's for Stable Cascade).")
    )
    validation_guidance_scale: float = field(default=4.0, metadata=_help("Guidance of validation images."))
    push_to_hub: bool = field(default=False, metadata=_help("Upload the adapter and its model card at the end."))
    hub_model_id: str | None = field(default=None, metadata=_help("Hub repo (unset: the output folder's name)."))
    hub_token: str | None = field(default=None, metadata=_help("Hub token (unset: the saved login)."))

    @classmethod
    def argument_parser(cls, description: str | None = None) -> Any:
        """A ``transformers.HfArgumentParser`` for these settings whose ``--help`` keeps ``description``'s layout.

        Leaving out ``--dataset_name`` or ``--user_embeddings`` gives a usage message, not a traceback.
        """
        import argparse

        from transformers import HfArgumentParser

        class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
            def _get_help_string(self, action: argparse.Action) -> str | None:
                # a required argument has no default to show
                return action.help if action.required else super()._get_help_string(action)

        return HfArgumentParser(cls, description=description, formatter_class=Formatter)

    def __post_init__(self):
        for name in ("dataset_name", "user_embeddings"):
            if getattr(self, name) is None:
                raise ValueError(f"`{name}` is required.")
        if self.backbone not in DEFAULT_BASE_MODELS:
            raise ValueError(f"`backbone` must be one of {', '.join(DEFAULT_BASE_MODELS)}, got {self.backbone!r}.")
        if self.pretrained_model_name_or_path is None:
            self.pretrained_model_name_or_path = DEFAULT_BASE_MODELS[self.backbone]
        for name in ("user_dropout", "prompt_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1], got {getattr(self, name)}.")
        positive = ["train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps"]
        positive += ["validation_steps", "validation_inference_steps", "resolution", "max_sequence_length"]
        optional_positive = ["max_train_steps", "max_train_samples", "checkpoints_total_limit"]
        for name in positive + [n for n in optional_positive if getattr(self, n) is not None]:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if not 0.0 <= self.eval_user_fraction < 1.0:
            raise ValueError(f"`eval_user_fraction` must be in [0, 1), got {self.eval_user_fraction}.")
        for name in ("num_validation_users", "max_eval_users"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"`{name}` must not be negative, got {getattr(self, name)}.")
        if self.mixed_precision == "fp16":
            raise ValueError(
                "`mixed_precision='fp16'` is not supported (it gives black Stable Cascade images): use `bf16` or `no`."
            )
        if self.image_encoder is not None and self.effnet_checkpoint is not None:
            raise ValueError("Pass one of `image_encoder` and `effnet_checkpoint`, not both.")
        if self.backbone != "stable_cascade":
            stage_c_only = ["image_encoder", "effnet_checkpoint", "decoder_model_name_or_path"]
            given = [name for name in stage_c_only if getattr(self, name) is not None]
            given += ["torch_compile"] if self.torch_compile else []
            if given:
                names = ", ".join(f"`{name}`" for name in given)
                raise ValueError(
                    f"{names}: for `backbone='stable_cascade'` only; {self.backbone} encodes images and draws "
                    "validation images with its own VAE (and `torch_compile` is not implemented for it yet)."
                )
        if self.backbone == "flux" and self.timestep_weighting != "constant":
            raise ValueError(
                "`timestep_weighting='min_snr'` weighs eps/v-prediction timesteps: for Flux leave it `constant` and "
                "choose a `weighting_scheme`."
            )
