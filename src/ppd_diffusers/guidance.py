"""Classifier-free guidance with a separate scale for the user condition."""

from __future__ import annotations

import torch

__all__ = ["guidance_branches", "guided_prediction"]


def guidance_branches(
    has_user: bool, guidance_scale: float, user_guidance_scale: float | None
) -> tuple[bool, bool, bool]:
    """Which predictions a denoising step needs: ``(personalized, text_only, unconditional)``.

    Text guidance is on when ``guidance_scale > 1`` (as in diffusers). Without ``user_guidance_scale`` the
    user term is guided exactly like the text (``g_u = g``, or ``g_u = 1`` when text guidance is off: the
    plain personalized prediction), which needs no extra prediction; a text-only prediction is added only
    when the user needs its own scale.
    """
    uncond = guidance_scale > 1
    if not has_user:
        return False, True, uncond
    follows_text = user_guidance_scale is None or user_guidance_scale == (guidance_scale if uncond else 1.0)
    return True, not follows_text, uncond


def guided_prediction(
    personalized: torch.Tensor | None,
    text: torch.Tensor | None,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    user_guidance_scale: float | None = None,
) -> torch.Tensor:
    r"""Combines the predictions of one step into the guided noise prediction.

    With ``e_u`` (text and user), ``e_t`` (text only) and ``e_0`` (negative prompt, no user), ``g`` the
    guidance scale and ``g_u`` the user guidance scale:

    ``e = e_0 + g (e_t - e_0) + g_u (e_u - e_t)``

    so ``g`` sets how strongly the prompt is followed and ``g_u`` how strongly the user's taste moves the
    image away from what the prompt alone gives. Without text guidance ``e_0`` drops out
    (``e = e_t + g_u (e_u - e_t)``). When ``g_u`` equals ``g`` the formula needs no ``e_t``:
    ``e = e_0 + g (e_u - e_0)``, classifier-free guidance with the user inside the condition, which is
    what ``user_guidance_scale=None`` does. A missing prediction (``None``) marks such a folded branch.

    Args:
        personalized: ``e_u``; ``None`` without a user.
        text: ``e_t``; ``None`` when the user guidance follows the text guidance.
        uncond: ``e_0``; ``None`` without text guidance.
        guidance_scale: ``g``.
        user_guidance_scale: ``g_u``; needed only when ``text`` and ``personalized`` are both given.

    Examples:
        >>> import torch
        >>> e_u, e_t, e_0 = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0])
        >>> guided_prediction(e_u, e_t, e_0, guidance_scale=4.0, user_guidance_scale=2.0)  # 1 + 4 * 1 + 2 * 1
        tensor([7.])
        >>> guided_prediction(e_u, None, e_0, guidance_scale=4.0)  # user guided like the text: 1 + 4 * 2
        tensor([9.])
    """
    if personalized is None or text is None:
        cond = text if personalized is None else personalized
        if cond is None:
            raise ValueError("`guided_prediction` needs `personalized` or `text`.")
        # `lerp` is what diffusers' Stable Cascade pipelines use: without a user this is bit for bit theirs
        return cond if uncond is None else torch.lerp(uncond, cond, guidance_scale)
    if user_guidance_scale is None:
        raise ValueError("`user_guidance_scale` is needed when both `personalized` and `text` are given.")
    base = text if uncond is None else torch.lerp(uncond, text, guidance_scale)
    return base + user_guidance_scale * (personalized - text)
