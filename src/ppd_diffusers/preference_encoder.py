"""``PreferenceEncoder``: a user embedding from a vision-language model reading the user's preference pairs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .encoder_base import BasePreferenceEncoder, load_processors, load_quietly, pop_hub_kwargs, resolve_model_source
from .preference_pairs import PreferencePair

__all__ = ["DEFAULT_QUESTION", "PreferenceEncoder"]

DEFAULT_QUESTION = "Based on these choices, describe what this user likes in an image."
Pooling = Literal["last", "mean_after_images", "last_k"]
_POOLINGS = ("last", "mean_after_images", "last_k")


class PreferenceEncoder(BasePreferenceEncoder):
    r"""User embeddings from LLaVA-OneVision, as in PPD.

    One multi-image conversation per user interleaves, for each pair, its prompt, the preferred image and
    the rejected image, then asks ``question``. Several images per conversation put LLaVA-OneVision in
    multi-image mode: no anyres tiling, one 384 px view per image (729 tokens + 1 newline). The hidden
    states of decoder layer ``layer`` are pooled into the user embedding; the layers above it are never
    built, so a truncated encoder costs proportionally less time and memory.

    ``layer`` indexes the full model's ``hidden_states`` (0: the merged input embeddings, ``i``: decoder
    layer ``i``, ``-1``: the last layer, after the final norm), so a truncated encoder returns exactly
    what ``output_hidden_states=True`` gives for that layer on the full model.

    Pooling (the output is always ``(users, tokens, width)``):

    - ``"last"``: the last token (``tokens = 1``);
    - ``"mean_after_images"``: the mean over the text after the last image, i.e. the question
      (``tokens = 1``);
    - ``"last_k"``: the last ``num_pooled_tokens`` tokens as a sequence.

    Works without torchvision (transformers' PIL image processor), on CPU or GPU, in any dtype.

    Examples:
        ```py
        encoder = PreferenceEncoder.from_pretrained(
            "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", layer=12, pooling="last_k", dtype=torch.bfloat16
        )
        user_embeds = encoder.encode(pairs)  # 4 (prompt, chosen, rejected) pairs
        encoder.save_pretrained("my-encoder")
        ```
    """

    config_keys: ClassVar[tuple[str, ...]] = (
        "revision",
        "subfolder",
        "layer",
        "pooling",
        "num_pooled_tokens",
        "question",
        "num_pairs",
    )

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, config: dict[str, Any]):
        super().__init__(model, tokenizer, image_processor, config)
        vision = model.config.vision_config
        # multi-image mode: every image becomes its base view plus one newline token
        patches = (vision.image_size // vision.patch_size) ** 2
        self.tokens_per_image = patches + 1 - (model.config.vision_feature_select_strategy == "default")
        self.image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        # the chat and image markers a prompt must not contain (longest first, so none hides inside another)
        markers = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab(), self.image_token}
        self._markers = sorted((m for m in markers if m), key=len, reverse=True)

    def plain_prompt(self, prompt: str) -> str:
        """``prompt`` without the model's special tokens (``<image>``, ``<|im_start|>``, ...).

        A prompt is user text: an image marker in it would ask for an image that is not there, and a chat
        marker would be read as conversation structure. They are removed (repeatedly, so that removing one
        cannot leave another behind).
        """
        previous = None
        while previous != prompt:
            previous = prompt
            for marker in self._markers:
                prompt = prompt.replace(marker, "")
        return prompt

    @classmethod
    def _from_model(
        cls,
        model_name_or_path: str,
        layer: int | None = None,
        pooling: Pooling = "last",
        num_pooled_tokens: int = 8,
        question: str = DEFAULT_QUESTION,
        num_pairs: int = 4,
        revision: str | None = None,
        subfolder: str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        **model_kwargs: Any,
    ) -> PreferenceEncoder:
        """Wraps a LLaVA-OneVision checkpoint (see ``from_pretrained``).

        Args:
            model_name_or_path: Hub id or local path of a LLaVA-OneVision checkpoint.
            layer: Hidden-state index to read (negative counts from the end); ``None``: the middle layer.
            pooling: ``"last"``, ``"mean_after_images"`` or ``"last_k"``.
            num_pooled_tokens: Tokens kept by ``"last_k"``.
            question: The text that closes each user's conversation.
            num_pairs: Pairs per user.
            revision: Model revision on the Hub; the encoder records the commit it resolves to.
            subfolder: Where the model lies inside the repo or folder.
            dtype: The model's dtype (``torch_dtype`` is accepted as an alias).
            device_map: As in transformers' ``from_pretrained``.
            **model_kwargs: Passed to the model's ``from_pretrained`` (e.g. ``attn_implementation``).
        """
        from transformers import AutoConfig, LlavaOnevisionModel

        if pooling not in _POOLINGS:
            raise ValueError(f"`pooling` must be one of {_POOLINGS}, got {pooling!r}.")
        if num_pooled_tokens < 1 or num_pairs < 1:
            raise ValueError("`num_pooled_tokens` and `num_pairs` must be positive integers.")
        if not question.strip():
            raise ValueError("`question` must be a non-empty string.")
        hub = pop_hub_kwargs(model_kwargs, revision, subfolder)
        model_name_or_path, hub = resolve_model_source(model_name_or_path, hub)
        model_config = AutoConfig.from_pretrained(model_name_or_path, **hub)
        if model_config.model_type != "llava_onevision":
            raise ValueError(
                f"`PreferenceEncoder` wraps LLaVA-OneVision models, but `{model_name_or_path}` is a "
                f"{model_config.model_type!r} model. For a CLIP model use `CLIPPreferenceEncoder`."
            )
        layer, keep = _resolve_layer(layer, model_config.text_config.num_hidden_layers)
        text_config = model_config.text_config
        text_config.num_hidden_layers = keep
        if getattr(text_config, "layer_types", None) is not None:
            text_config.layer_types = text_config.layer_types[:keep]
        model = load_quietly(
            LlavaOnevisionModel.from_pretrained,
            model_name_or_path,
            config=model_config,
            dtype=dtype if dtype is not None else torch_dtype,
            device_map=device_map,
            **hub,
            **model_kwargs,
        )
        if layer != -1:
            # hidden_states[i] of the full model is the output of layer i before the final norm
            model.language_model.norm = nn.Identity()
        model.eval().requires_grad_(False)
        # right padding keeps every user's positions: a batch equals its users one by one
        tokenizer, image_processor = load_processors(model_name_or_path, hub, padding_side="right")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = {
            "model_name_or_path": model_name_or_path,
            "revision": hub.get("revision"),
            "subfolder": subfolder,
            "layer": layer,
            "pooling": pooling,
            "num_pooled_tokens": num_pooled_tokens,
            "question": question,
            "num_pairs": num_pairs,
        }
        return cls(model, tokenizer, image_processor, config)

    @property
    def embed_dim(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def num_tokens(self) -> int:
        return self.config["num_pooled_tokens"] if self.config["pooling"] == "last_k" else 1

    def build_conversation(self, pairs: list[PreferencePair]) -> str:
        """The chat text for one user, with one image placeholder per image (before expansion)."""
        lines = [
            "<|im_start|>user",
            f"Here are {len(pairs)} choices of one user. For each prompt they preferred the first image "
            "over the second.",
        ]
        for i, pair in enumerate(pairs, start=1):
            prompt = self.plain_prompt(pair.prompt)
            lines += [f"Prompt {i}: {prompt}", f"Preferred: {self.image_token}", f"Rejected: {self.image_token}"]
        lines += [f"{self.config['question']}<|im_end|>", "<|im_start|>assistant", ""]
        return "\n".join(lines)

    def prepare_inputs(self, users: list[list[PreferencePair]]) -> dict[str, torch.Tensor]:
        """Tokenized conversations and pixel values for a batch of users (right-padded)."""
        image_block = self.image_token * self.tokens_per_image
        texts = [self.build_conversation(pairs).replace(self.image_token, image_block) for pairs in users]
        images = [[image for pair in pairs for image in (pair.chosen, pair.rejected)] for pairs in users]
        text_inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
        image_inputs = self.image_processor(images=images, return_tensors="pt")
        return {**text_inputs, **image_inputs}

    def _encode_batch(self, users: list[list[PreferencePair]]) -> torch.Tensor:
        inputs = self.prepare_inputs(users)
        embeddings = self.model.get_input_embeddings().weight
        inputs["pixel_values"] = inputs["pixel_values"].to(embeddings.dtype)
        # image_sizes and batch_num_images stay on the CPU: the model loops over them in Python
        for key in ("input_ids", "attention_mask", "pixel_values"):
            inputs[key] = inputs[key].to(embeddings.device)
        hidden = self.model(**inputs, use_cache=False).last_hidden_state
        return self._pool(hidden, inputs["input_ids"], inputs["attention_mask"])

    def _pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()  # Qwen2's activations reach the thousands: a half-precision mean overflows
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        pooling = self.config["pooling"]
        if pooling == "last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1].unsqueeze(1)
        if pooling == "last_k":
            k = self.config["num_pooled_tokens"]
            if int(lengths.min()) < k:
                raise ValueError(
                    f"`num_pooled_tokens` ({k}) exceeds the shortest conversation ({int(lengths.min())})."
                )
            index = (lengths - k).unsqueeze(1) + torch.arange(k, device=hidden.device)
            return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        image_positions = torch.where(input_ids == self.model.config.image_token_id, positions, -1)
        after_images = (positions > image_positions.amax(dim=1, keepdim=True)) & (positions < lengths.unsqueeze(1))
        weights = after_images.float().unsqueeze(-1)
        return ((hidden * weights).sum(dim=1) / weights.sum(dim=1)).unsqueeze(1)


def _resolve_layer(layer: int | None, num_layers: int) -> tuple[int, int]:
    """``(layer as stored in the config, decoder layers to build)``; -1 stands for the last layer."""
    if layer is None:
        layer = num_layers // 2
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"`layer` must be in [{-(num_layers + 1)}, {num_layers}] for this model, got {layer}.")
    index = layer + num_layers + 1 if layer < 0 else layer
    return (-1 if index == num_layers else index), index
