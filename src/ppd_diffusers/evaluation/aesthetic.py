"""``AestheticScorer``: the LAION aesthetic predictor v2, an MLP on CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

import os
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .scorer import RewardScorer, image_pixel_values, load_tensors, projected, resolve_weights_file

__all__ = ["AestheticMLP", "AestheticScorer"]

WEIGHTS_NAME = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The predictor head of christophschuhmann/improved-aesthetic-predictor, with its state-dict key names.

    ``layers`` is ``Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear``
    (keys ``layers.{0,2,4,6,7}.weight/bias``) with no activation between the linear layers: the published
    "linearMSE" model is an affine map of the embedding trained with an MSE loss on mean ratings (1-10).

    Args:
        sizes: Widths from the input to the output, ``(768, 1024, 128, 64, 16, 1)`` for the published model.
    """

    def __init__(self, sizes: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        if len(sizes) != 6:
            raise ValueError(f"`sizes` must hold 6 widths (input, 4 hidden, output), got {sizes}.")
        dropouts = (0.2, 0.2, 0.1, None, None)
        layers: list[nn.Module] = []
        for width_in, width_out, dropout in zip(sizes[:-1], sizes[1:], dropouts, strict=True):
            layers.append(nn.Linear(width_in, width_out))
            if dropout is not None:
                layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> AestheticMLP:
        """The head whose widths the state dict's weights have, with those weights loaded (strictly)."""
        try:
            weights = [state_dict[f"layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
        except KeyError as error:
            keys = sorted(state_dict)
            raise ValueError(f"Not an aesthetic predictor state dict: no {error.args[0]!r} in {keys}.") from None
        mlp = cls((weights[0].shape[1], *(w.shape[0] for w in weights)))
        mlp.load_state_dict(state_dict)
        return mlp

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class AestheticScorer(RewardScorer):
    r"""LAION aesthetic predictor v2 ("improved aesthetic predictor", ``sac+logos+ava1-l14-linearMSE``).

    The score is ``MLP(E_I / ||E_I||)``: ``E_I`` the projected image embedding of OpenAI's CLIP ViT-L/14
    (``openai/clip-vit-large-patch14``, 768 wide), L2-normalised, then the head (``AestheticMLP``) trained on
    SAC, LAION-Logos and AVA ratings, ~1-10 (the PPD paper reports ~5.3 for Stable Cascade). Prompts are
    ignored (``prompts=None`` is allowed). The head always runs in float32 (it is 1M parameters) on the
    CLIP's device, whatever dtype the CLIP runs in.

    The original code embeds with the ``clip`` package; here transformers' ``CLIPModel`` and the checkpoint's
    image processor compute the same embedding (resize the short side to 224, bicubic, centre crop).

    Args:
        clip_model: A transformers ``CLIPModel`` (ViT-L/14 for the published head).
        image_processor: Its image processor.
        mlp: The predictor head.
        batch_size: Images scored per forward pass.
        show_progress: Show a progress bar when there is more than one batch.

    Example:
        ```py
        scorer = AestheticScorer.from_pretrained(device="cuda", torch_dtype=torch.float16)
        scorer(images)  # tensor([5.41, 6.02, ...])
        ```
    """

    name = "aesthetic"
    default_name_or_path = "camenduru/improved-aesthetic-predictor"
    default_clip_name_or_path = "openai/clip-vit-large-patch14"
    needs_prompts = False

    def __init__(
        self,
        clip_model: Any,
        image_processor: Any,
        mlp: AestheticMLP,
        batch_size: int = 32,
        show_progress: bool = True,
    ):
        super().__init__(batch_size=batch_size, show_progress=show_progress)
        width = clip_model.config.projection_dim
        if mlp.layers[0].in_features != width:
            raise ValueError(
                f"`mlp` takes {mlp.layers[0].in_features}-wide embeddings but `clip_model` makes {width}-wide ones."
            )
        self.clip_model = clip_model.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.mlp = mlp.float().eval().requires_grad_(False)

    def modules(self) -> list[nn.Module]:
        return [self.clip_model, self.mlp]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> AestheticScorer:
        """Moves both models to ``device``; ``dtype`` applies to the CLIP only (the head stays float32)."""
        self.clip_model.to(device=device, dtype=dtype)
        self.mlp.to(device=device)
        return self

    def _score_batch(self, images: list[PIL.Image.Image], prompts: list[str] | None) -> torch.Tensor:
        pixel_values = image_pixel_values(self.image_processor, images, self.device, self.dtype)
        embeds = projected(self.clip_model.get_image_features(pixel_values=pixel_values))
        return self.mlp(F.normalize(embeds.float(), dim=-1)).squeeze(-1)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = default_name_or_path,
        *,
        clip_name_or_path: str | os.PathLike = default_clip_name_or_path,
        filename: str = WEIGHTS_NAME,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        **model_kwargs: Any,
    ) -> AestheticScorer:
        """Loads the predictor head and the CLIP it reads.

        The head's file is a plain state dict of tensors, read with ``torch.load(weights_only=True)`` (no
        arbitrary unpickling); a file that needs more is refused.

        Args:
            name_or_path: Hub repo holding ``filename`` (``camenduru/improved-aesthetic-predictor`` mirrors the
                original GitHub release), a local folder holding it, or the file itself.
            clip_name_or_path: Hub id or local folder of the transformers CLIP checkpoint.
            filename: The head's file name inside ``name_or_path``.
            torch_dtype: dtype of the CLIP (``dtype`` is accepted too); float32 by default.
            device: Where both models run.
            revision: Hub revision of ``name_or_path`` (not of the CLIP).
            batch_size: Images scored per forward pass.
            show_progress: Show a progress bar when there is more than one batch.
            **model_kwargs: Passed to ``CLIPModel.from_pretrained``.
        """
        from transformers import AutoImageProcessor, CLIPModel

        from ..encoder_base import load_quietly, pop_hub_kwargs

        hub = pop_hub_kwargs(model_kwargs, None, None)
        dtype = model_kwargs.pop("dtype", None) or torch_dtype
        weights = resolve_weights_file(name_or_path, filename, revision, **hub)
        mlp = AestheticMLP.from_state_dict(load_tensors(weights, "The aesthetic predictor file"))
        clip_path = os.fspath(clip_name_or_path)
        clip_model = load_quietly(CLIPModel.from_pretrained, clip_path, dtype=dtype, **hub, **model_kwargs)
        image_processor = AutoImageProcessor.from_pretrained(clip_path, **hub)
        scorer = cls(clip_model, image_processor, mlp, batch_size=batch_size, show_progress=show_progress)
        return scorer.to(device=device)
