"""``CLIPScorer``: CLIP score (Hessel et al. 2021) as torchmetrics computes it, on a transformers ``CLIPModel``."""

from __future__ import annotations

import os
from typing import Any

import torch

from .scorer import CLIPSimilarityScorer

__all__ = ["CLIPScorer"]


class CLIPScorer(CLIPSimilarityScorer):
    r"""CLIP score: how well an image matches its prompt, ``100 * max(cos(E_I, E_T), 0)``.

    ``E_I`` and ``E_T`` are CLIP's projected image and text embeddings (``get_image_features`` and
    ``get_text_features``), the image preprocessed by the checkpoint's own image processor and the prompt
    truncated to 77 tokens. This is the score ``torchmetrics.multimodal.CLIPScore`` reports with its default
    ``openai/clip-vit-large-patch14`` (the PPD paper's "CLIP" column, ~32 for Stable Cascade), with two
    differences that only matter at the edges: torchmetrics clamps the *batch mean* at 0 where this clamps
    each score, and it cuts prompts longer than 77 tokens without keeping their end token, where the
    tokenizer's truncation here keeps it.

    Args:
        model: A transformers ``CLIPModel``.
        tokenizer: Its tokenizer.
        image_processor: Its image processor.
        batch_size: Images scored per forward pass.
        show_progress: Show a progress bar when there is more than one batch.

    Example:
        ```py
        scorer = CLIPScorer.from_pretrained(device="cuda", torch_dtype=torch.float16)
        scorer(images, prompts)  # tensor([31.9, 27.4, ...])
        ```
    """

    name = "clip_score"
    default_name_or_path = "openai/clip-vit-large-patch14"

    def _from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        return 100 * cosine.clamp(min=0)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = default_name_or_path,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        **model_kwargs: Any,
    ) -> CLIPScorer:
        """Loads a CLIP checkpoint with its tokenizer and image processor.

        Args:
            name_or_path: Hub id or local folder of a transformers CLIP checkpoint.
            torch_dtype: dtype of the model (``dtype`` is accepted too); float32 by default.
            device: Where the model runs.
            revision: Hub revision of the checkpoint.
            batch_size: Images scored per forward pass.
            show_progress: Show a progress bar when there is more than one batch.
            **model_kwargs: Passed to ``CLIPModel.from_pretrained`` (``token``, ``cache_dir`` and
                ``local_files_only`` are passed to the tokenizer and image processor too).
        """
        return cls._load(name_or_path, None, torch_dtype, device, revision, batch_size, show_progress, model_kwargs)
