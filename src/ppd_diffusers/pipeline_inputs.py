"""Input checks of the PPD pipelines' ``__call__``: every bad argument is named, and nothing that would give black
or silently cast images (NaN, infinity, integer embeddings) gets through. ``check_user_inputs``, ``check_user_count``
and ``resolve_user_scale`` know nothing of the backbone, for every pipeline."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

__all__ = [
    "OUTPUT_TYPES",
    "check_number",
    "check_call_inputs",
    "check_prompt_embeds",
    "check_user_count",
    "check_user_inputs",
    "resolve_user_scale",
]

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
    prompt_embeds: torch.Tensor | None = None,
) -> int:
    """Checks the arguments that do not depend on the pipeline's components; returns the number of prompts.

    The prompts are ``prompt`` or, instead, the rows of ``prompt_embeds`` (checked by ``check_prompt_embeds``).
    """
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
    if prompt is None and isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.ndim == 3:
        batch_size = prompt_embeds.shape[0]
    elif prompt is None and prompt_embeds is not None:
        raise ValueError(
            f"`prompt_embeds` must be a (prompts, tokens, channels) tensor, got {_describe(prompt_embeds)}"
        )
    else:
        prompt = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(
                f"`prompt` must be a string or a non-empty list of strings (or pass `prompt_embeds`), got {prompt!r}."
            )
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
    check_number("guidance_scale", guidance_scale, at_least=0)
    check_number("decoder_guidance_scale", decoder_guidance_scale, at_least=0)
    if user_guidance_scale is not None:
        check_number("user_guidance_scale", user_guidance_scale)
    if latents is not None:
        _check_finite_tensor("latents", latents)
    return batch_size


def check_prompt_embeds(
    batch_size: int,
    negative_prompt: Any,
    prompt_embeds: torch.Tensor | None,
    prompt_embeds_pooled: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds_pooled: torch.Tensor | None,
    images: Any,
    image_embeds: torch.Tensor | None,
    text_channels: int,
    pooled_channels: int,
    image_channels: int,
) -> None:
    """Checks precomputed text and image embeddings, given as diffusers' ``StableCascadePriorPipeline`` takes them.

    Args:
        batch_size: Prompts of the call.
        negative_prompt: The call's ``negative_prompt`` (not with ``negative_prompt_embeds``).
        prompt_embeds: CLIP hidden states ``(batch_size, tokens, text_channels)``; needs ``prompt_embeds_pooled``.
        prompt_embeds_pooled: Pooled CLIP text embeddings ``(batch_size, 1, pooled_channels)``.
        negative_prompt_embeds: As ``prompt_embeds``, for the negative prompt (same shape).
        negative_prompt_embeds_pooled: As ``prompt_embeds_pooled``, for the negative prompt (same shape).
        images: The call's image prompts (not with ``image_embeds``).
        image_embeds: CLIP image embeddings ``(1 or batch_size, images, image_channels)``.
        text_channels: The prior's ``clip_text_in_channels``.
        pooled_channels: The prior's ``clip_text_pooled_in_channels``.
        image_channels: The prior's ``clip_image_in_channels``.
    """
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
    if images is not None and image_embeds is not None:
        raise ValueError("Pass either `images` or `image_embeds`, not both.")
    negatives = negative_prompt_embeds, negative_prompt_embeds_pooled
    for prefix, (hidden, pooled) in (("", (prompt_embeds, prompt_embeds_pooled)), ("negative_", negatives)):
        hidden_name, pooled_name = f"{prefix}prompt_embeds", f"{prefix}prompt_embeds_pooled"
        if (hidden is None) != (pooled is None):
            given, missing = (hidden_name, pooled_name) if pooled is None else (pooled_name, hidden_name)
            raise ValueError(f"`{given}` needs `{missing}` (from the same text encoder) too.")
        if hidden is None:
            continue
        _check_embeds(hidden_name, hidden, (batch_size, None, text_channels))
        _check_embeds(pooled_name, pooled, (batch_size, 1, pooled_channels))
    if (
        prompt_embeds is not None
        and negative_prompt_embeds is not None
        and negative_prompt_embeds.shape != prompt_embeds.shape
    ):
        raise ValueError(
            f"`negative_prompt_embeds` must have the shape of `prompt_embeds` {tuple(prompt_embeds.shape)}, got "
            f"{tuple(negative_prompt_embeds.shape)}."
        )
    if image_embeds is not None:
        _check_embeds("image_embeds", image_embeds, (None, None, image_channels))
        if image_embeds.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`image_embeds` has {image_embeds.shape[0]} rows for {batch_size} prompts: give one row for all "
                "prompts, or one per prompt."
            )


def check_user_inputs(
    preference_pairs: Any,
    user_embeds: torch.Tensor | None,
    user_scale: Any,
    user_guidance_scale: Any,
    batch_size: int,
    user_adapter: Any,
    preference_encoder: Any,
) -> None:
    """Checks who the user is and how strongly they count, against the pipeline's adapter and encoder.

    Args:
        preference_pairs: The call's ``preference_pairs`` (or ``None``).
        user_embeds: The call's ``user_embeds`` (or ``None``).
        user_scale: The call's ``user_scale``: ``None``, a number, or one number per prompt.
        user_guidance_scale: The call's ``user_guidance_scale`` (or ``None``).
        batch_size: Prompts of the call.
        user_adapter: The pipeline's ``UserAdapter`` (or ``None``).
        preference_encoder: The pipeline's preference encoder (or ``None``).
    """
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
    if user_scale is not None:
        if not has_user:
            raise ValueError("`user_scale` weights a user, but no `preference_pairs`/`user_embeds` came.")
        scales = user_scale if isinstance(user_scale, list | tuple) else [user_scale]
        if not all(_is_real(s) for s in scales):
            raise ValueError(f"`user_scale` must be a finite number or one per prompt, got {user_scale!r}.")
        if len(scales) not in (1, batch_size):
            raise ValueError(f"`user_scale` has {len(scales)} entries for {batch_size} prompts.")
    if user_guidance_scale is not None and not has_user:
        raise ValueError("`user_guidance_scale` guides a user, but no `preference_pairs`/`user_embeds` came.")


def resolve_user_scale(user_scale: Any, preference_scale: Any) -> Any:
    """The call's ``user_scale``, given as such or by its deprecated name ``preference_scale`` (``FutureWarning``).

    Raises:
        ValueError: Both names are given.
    """
    if preference_scale is None:
        return user_scale
    if user_scale is not None:
        raise ValueError("Pass `user_scale` only: `preference_scale` is its deprecated name.")
    warnings.warn("`preference_scale` is deprecated: pass `user_scale` instead.", FutureWarning, stacklevel=3)
    return preference_scale


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


def check_number(name: str, value: Any, at_least: float | None = None) -> None:
    """A real, finite number (not a bool), at least ``at_least`` if given."""
    if not _is_real(value) or (at_least is not None and value < at_least):
        bound = "" if at_least is None else f" >= {at_least:g}"
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}.")


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_embeds(name: str, value: Any, shape: tuple[int | None, ...]) -> None:
    """A finite float tensor of ``shape`` (``None``: any size)."""
    fits = isinstance(value, torch.Tensor) and value.ndim == len(shape)
    if not fits or any(want is not None and got != want for got, want in zip(value.shape, shape, strict=True)):
        wanted = ", ".join("any" if want is None else str(want) for want in shape)
        raise ValueError(f"`{name}` must be a tensor of shape ({wanted}), got {_describe(value)}.")
    _check_finite_tensor(name, value)


def _check_finite_tensor(name: str, tensor: torch.Tensor) -> None:
    """A floating-point tensor without NaN or infinity (others would be cast silently or give black images)."""
    if not tensor.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {tensor.dtype}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` holds NaN or infinite values.")
