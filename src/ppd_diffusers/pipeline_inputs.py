"""Input checks of ``PersonalizedStableCascadePipeline.__call__``: every bad argument is named, and nothing
that would give black or silently cast images (NaN, infinity, integer embeddings) gets through."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["OUTPUT_TYPES", "check_call_inputs", "check_user_count", "check_user_inputs"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_call_inputs(
    prompt: Any,
    negative_prompt: Any,
    height: Any,
    width: Any,
    num_inference_steps: Any,
    decoder_num_inference_steps: Any,
    num_images_per_prompt: Any,
    guidance_scale: Any,
    decoder_guidance_scale: Any,
    user_guidance_scale: Any,
    latents: torch.Tensor | None,
) -> int:
    """Checks the arguments that do not depend on the pipeline's components; returns the number of prompts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
    batch_size = len(prompt)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negatives = negative_prompt
        if not isinstance(negatives, list) or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}.")
        if len(negatives) != batch_size:
            raise ValueError(f"`negative_prompt` has {len(negatives)} entries for {batch_size} prompts.")
    for name, value in (
        ("height", height),
        ("width", width),
        ("num_inference_steps", num_inference_steps),
        ("decoder_num_inference_steps", decoder_num_inference_steps),
        ("num_images_per_prompt", num_images_per_prompt),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    _check_real("guidance_scale", guidance_scale, at_least=0)
    _check_real("decoder_guidance_scale", decoder_guidance_scale, at_least=0)
    if user_guidance_scale is not None:
        _check_real("user_guidance_scale", user_guidance_scale)
    if latents is not None:
        _check_finite_tensor("latents", latents)
    return batch_size


def check_user_inputs(
    preference_pairs: Any,
    user_embeds: torch.Tensor | None,
    preference_scale: Any,
    user_guidance_scale: Any,
    batch_size: int,
    user_adapter: Any,
    preference_encoder: Any,
) -> None:
    """Checks who the user is and how strongly they count, against the pipeline's adapter and encoder."""
    if preference_pairs is not None and user_embeds is not None:
        raise ValueError("Pass either `preference_pairs` or `user_embeds`, not both.")
    has_user = preference_pairs is not None or user_embeds is not None
    if has_user and user_adapter is None:
        raise ValueError("A user was given, but no user adapter is loaded: call `pipe.load_user_adapter(...)`.")
    if preference_pairs is not None and preference_encoder is None:
        raise ValueError(
            "`preference_pairs` needs a `preference_encoder` in the pipeline; without one pass `user_embeds`."
        )
    if user_embeds is not None:
        width = user_adapter.config.user_embed_dim
        if not isinstance(user_embeds, torch.Tensor) or user_embeds.ndim != 3 or user_embeds.shape[-1] != width:
            shape = tuple(user_embeds.shape) if isinstance(user_embeds, torch.Tensor) else type(user_embeds)
            raise ValueError(
                f"`user_embeds` must be a (users, tokens, {width}) tensor as `encode_user` returns, got {shape}."
            )
        _check_finite_tensor("user_embeds", user_embeds)
        check_user_count("user_embeds", user_embeds.shape[0], batch_size)
    if preference_scale is not None:
        if not has_user:
            raise ValueError("`preference_scale` weights a user, but no `preference_pairs`/`user_embeds` came.")
        scales = preference_scale if isinstance(preference_scale, list | tuple) else [preference_scale]
        if not all(_is_real(s) for s in scales):
            raise ValueError(
                f"`preference_scale` must be a finite number or one per prompt, got {preference_scale!r}."
            )
        if len(scales) not in (1, batch_size):
            raise ValueError(f"`preference_scale` has {len(scales)} entries for {batch_size} prompts.")
    if user_guidance_scale is not None and not has_user:
        raise ValueError("`user_guidance_scale` guides a user, but no `preference_pairs`/`user_embeds` came.")


def check_user_count(name: str, users: int, batch_size: int) -> None:
    """One user for every prompt, or one per prompt."""
    if users not in (1, batch_size):
        raise ValueError(
            f"`{name}` describes {users} users for {batch_size} prompts: give one user for all prompts, or one per "
            "prompt."
        )


def _is_real(value: Any) -> bool:
    """A finite real number, not a bool; numpy scalars count (``np.float32`` is no ``float``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_real(name: str, value: Any, at_least: float | None = None) -> None:
    """A real, finite number (not a bool), at least ``at_least`` if given."""
    if not _is_real(value) or (at_least is not None and value < at_least):
        bound = "" if at_least is None else f" >= {at_least:g}"
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}.")


def _check_finite_tensor(name: str, tensor: torch.Tensor) -> None:
    """A floating-point tensor without NaN or infinity (others would be cast silently or give black images)."""
    if not tensor.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {tensor.dtype}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` holds NaN or infinite values.")
