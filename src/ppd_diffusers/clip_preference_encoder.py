"""``CLIPPreferenceEncoder``: a light user embedding from CLIP, for machines without a GPU for the VLM."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from .encoder_base import BasePreferenceEncoder, load_processors, load_quietly, pop_hub_kwargs, resolve_model_source
from .preference_pairs import PreferencePair

__all__ = ["CLIPPreferenceEncoder"]

_POOLINGS = ("pairs", "mean")


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPPreferenceEncoder(BasePreferenceEncoder):
    r"""User embeddings from a CLIP model: what each pair's prompt asked for and how the choice went.

    Each pair becomes one token ``[t ‖ (c - r)]``: ``t`` the unit text embedding of the prompt, ``c`` and
    ``r`` the unit image embeddings of the preferred and rejected image, so the direction a user moves
    images in, and for which prompt, is what the embedding carries. ``pooling="pairs"`` keeps one token
    per pair (``(users, num_pairs, 2 * projection_dim)``); ``"mean"`` averages them into one token.

    Same interface as ``PreferenceEncoder``: ``from_pretrained``, ``encode``, ``save_pretrained``.

    Examples:
        ```py
        encoder = CLIPPreferenceEncoder.from_pretrained("openai/clip-vit-base-patch32")
        encoder.encode(pairs).shape  # torch.Size([1, 4, 1024])
        ```
    """

    config_keys: ClassVar[tuple[str, ...]] = ("revision", "subfolder", "pooling", "num_pairs")

    @classmethod
    def _from_model(
        cls,
        model_name_or_path: str,
        pooling: Literal["pairs", "mean"] = "pairs",
        num_pairs: int = 4,
        revision: str | None = None,
        subfolder: str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        **model_kwargs: Any,
    ) -> CLIPPreferenceEncoder:
        """Wraps a CLIP checkpoint (see ``from_pretrained``).

        Args:
            model_name_or_path: Hub id or local path of a CLIP checkpoint.
            pooling: ``"pairs"`` (one token per pair) or ``"mean"`` (one token).
            num_pairs: Pairs per user.
            revision: Model revision on the Hub; the encoder records the commit it resolves to.
            subfolder: Where the model lies inside the repo or folder.
            dtype: The model's dtype (``torch_dtype`` is accepted as an alias).
            device_map: As in transformers' ``from_pretrained``.
            **model_kwargs: Passed to ``CLIPModel.from_pretrained``.
        """
        from transformers import CLIPModel

        if pooling not in _POOLINGS:
            raise ValueError(f"`pooling` must be one of {_POOLINGS}, got {pooling!r}.")
        if num_pairs < 1:
            raise ValueError(f"`num_pairs` must be a positive integer, got {num_pairs}.")
        hub = pop_hub_kwargs(model_kwargs, revision, subfolder)
        model_name_or_path, hub = resolve_model_source(model_name_or_path, hub)
        dtype = dtype if dtype is not None else torch_dtype
        model = load_quietly(
            CLIPModel.from_pretrained, model_name_or_path, dtype=dtype, device_map=device_map, **hub, **model_kwargs
        )
        model.eval().requires_grad_(False)
        tokenizer, image_processor = load_processors(model_name_or_path, hub)
        config = {"model_name_or_path": model_name_or_path, "revision": hub.get("revision"), "subfolder": subfolder}
        return cls(model, tokenizer, image_processor, {**config, "pooling": pooling, "num_pairs": num_pairs})

    @property
    def embed_dim(self) -> int:
        return 2 * self.model.config.projection_dim

    @property
    def num_tokens(self) -> int:
        return self.num_pairs if self.config["pooling"] == "pairs" else 1

    def _encode_batch(self, users: list[list[PreferencePair]]) -> torch.Tensor:
        pairs = [pair for user in users for pair in user]
        device = self.device
        text = self.tokenizer([p.prompt for p in pairs], padding=True, truncation=True, return_tensors="pt")
        images = self.image_processor(
            images=[image for p in pairs for image in (p.chosen, p.rejected)], return_tensors="pt"
        )
        text_embeds = F.normalize(_features(self.model.get_text_features(**text.to(device))).float(), dim=-1)
        pixel_values = images["pixel_values"].to(device, self.model.dtype)
        image_embeds = F.normalize(_features(self.model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)
        chosen, rejected = image_embeds[0::2], image_embeds[1::2]
        tokens = torch.cat([text_embeds, chosen - rejected], dim=-1).view(len(users), self.num_pairs, -1)
        return tokens.mean(dim=1, keepdim=True) if self.config["pooling"] == "mean" else tokens
