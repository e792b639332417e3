"""``PickScoreScorer``: PickScore v1 (Kirstain et al. 2023), a CLIP-H/14 fine-tuned on Pick-a-Pic preferences."""

from __future__ import annotations

import os
from typing import Any

import torch

from .scorer import CLIPSimilarityScorer

__all__ = ["PickScoreScorer"]


class PickScoreScorer(CLIPSimilarityScorer):
    r"""PickScore: ``logit_scale.exp() * cos(E_I, E_T)`` of the fine-tuned CLIP ``yuvalkirstain/PickScore_v1``.

    As in the model card's usage: the model is a transformers ``CLIPModel`` loaded from
    ``yuvalkirstain/PickScore_v1``, its inputs are prepared by the processor of the CLIP it was fine-tuned
    from, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (prompts truncated to 77 tokens), and the score is the
    learned temperature ``exp(logit_scale)`` (~100) times the cosine of the projected embeddings. A softmax
    over the scores of several images for one prompt gives the model's preference probabilities.

    Args:
        model: The PickScore ``CLIPModel``.
        tokenizer: The tokenizer of ``processor_name_or_path``.
        image_processor: The image processor of ``processor_name_or_path``.
        batch_size: Images scored per forward pass.
        show_progress: Show a progress bar when there is more than one batch.

    Example:
        ```py
        scorer = PickScoreScorer.from_pretrained(device="cuda", torch_dtype=torch.bfloat16)
        scorer(images, prompts)  # tensor([21.4, 22.0, ...])
        ```
    """

    name = "pickscore"
    default_name_or_path = "yuvalkirstain/PickScore_v1"
    default_processor_name_or_path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def _from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.float().exp() * cosine

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = default_name_or_path,
        *,
        processor_name_or_path: str | os.PathLike | None = default_processor_name_or_path,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        **model_kwargs: Any,
    ) -> PickScoreScorer:
        """Loads the PickScore model and the processor it was trained with.

        Args:
            name_or_path: Hub id or local folder of the PickScore ``CLIPModel``.
            processor_name_or_path: Where its tokenizer and image processor come from (the official usage
                loads them from the base CLIP-H repo); ``None`` takes them from ``name_or_path``.
            torch_dtype: dtype of the model (``dtype`` is accepted too); float32 by default.
            device: Where the model runs.
            revision: Hub revision of the model (not of the processor's repo).
            batch_size: Images scored per forward pass.
            show_progress: Show a progress bar when there is more than one batch.
            **model_kwargs: Passed to ``CLIPModel.from_pretrained``.
        """
        return cls._load(
            name_or_path,
            processor_name_or_path,
            torch_dtype,
            device,
            revision,
            batch_size,
            show_progress,
            model_kwargs,
        )
