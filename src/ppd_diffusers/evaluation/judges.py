"""Personalized judges in the form the win-rate protocol calls them: ``judge(context, prompts, images_a,
images_b) -> P(the user prefers a)``, built from ``HeldOutPairsJudge`` and ``VLMJudge``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .personalization import Judge, JudgeContext

__all__ = ["build_judges", "held_out_pairs_judge", "vlm_judge"]


def held_out_pairs_judge(scorers: Mapping[str, Any], **judge_kwargs: Any) -> Judge:
    """A protocol judge that fits one ``HeldOutPairsJudge`` per user on their held-out pairs (once, reused for
    all their prompts) and judges with the scorer that agrees with them best.

    Each verdict comes with the chosen ``scorer``, its ``accuracy`` on the user's held-out pairs and their number
    (``pairs``), so that users for whom no scorer beats chance can be left out of the report.

    Args:
        scorers: Reward scorers by name.
        **judge_kwargs: Passed to ``HeldOutPairsJudge`` (``batch_size``, ``max_side``...).
    """
    from .heldout_judge import HeldOutPairsJudge

    fitted: dict[str, Any] = {}  # the last user only: the protocol finishes one user before the next

    def judge(context: JudgeContext, prompts: Sequence[str], images_a, images_b):
        key = repr(context.user_id)
        if key not in fitted:
            fitted.clear()
            fitted[key] = HeldOutPairsJudge(scorers, context.held_out_pairs, **judge_kwargs)
        best = fitted[key].best
        detail = {"scorer": best.name, "accuracy": best.accuracy, "pairs": best.num_pairs}
        return fitted[key](prompts, images_a, images_b), [detail] * len(prompts)

    return judge


def vlm_judge(judge: Any) -> Judge:
    """A protocol judge that shows a ``VLMJudge`` the user's profile pairs and the two candidates.

    Each verdict comes with P(the first image) in both orders (``p_first_ab``, ``p_first_ba``), whose mean over
    comparisons is the judge's position bias (0.5: none).
    """
    from .vlm_judge import combine_orders

    def ask(context: JudgeContext, prompts: Sequence[str], images_a, images_b):
        p_ab, p_ba = judge.both_orders(context.profile_pairs, prompts, images_a, images_b)
        details = [{"p_first_ab": float(x), "p_first_ba": float(y)} for x, y in zip(p_ab, p_ba, strict=True)]
        return combine_orders(p_ab, p_ba), details

    return ask


def build_judges(
    scorers: Mapping[str, Any] | None = None,
    vlm_name_or_path: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Judge]:
    """The judges an evaluation asks, by name: ``held_out_pairs`` when ``scorers`` are given, ``vlm`` when a
    LLaVA-OneVision id or folder is."""
    judges = {}
    if scorers:
        judges["held_out_pairs"] = held_out_pairs_judge(scorers)
    if vlm_name_or_path:
        from .vlm_judge import VLMJudge

        judges["vlm"] = vlm_judge(VLMJudge.from_pretrained(vlm_name_or_path, torch_dtype=dtype, device=device))
    return judges
