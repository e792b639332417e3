"""``VLMJudge``: a vision-language model, shown a user's preference pairs, guesses which of two new images the
user would prefer."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..encoder_base import load_processors, load_quietly, pop_hub_kwargs, resolve_model_source
from ..preference_pairs import ImageLike, PreferencePair, as_user_pairs, load_rgb_image
from .heldout_judge import check_comparisons

__all__ = ["DEFAULT_VLM_JUDGE", "VLMJudge", "combine_orders"]

DEFAULT_VLM_JUDGE = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # where processors keep their chat template


class VLMJudge:
    r"""A personalized judge from an open vision-language model (LLaVA-OneVision): P(user prefers image a).

    The model reads one conversation per comparison: an introduction, then one message per profile pair of the
    user (its two images, the prompt, and which of the two the user preferred), then a message with the two
    candidates for a new prompt and the question "which image would this user prefer? Answer with A or B".
    The answer is read from the logits of the next token, not generated: ``P(A) = softmax(l_A, l_B)[0]``, where
    ``l_A`` and ``l_B`` are the logits of the first token of ``"A"`` and of ``"B"``.

    Every comparison is asked in both orders, ``(a, b)`` and ``(b, a)``; with ``p1 = P(first)`` of the first and
    ``p2`` of the second, ``P(a) = (p1 + (1 - p2)) / 2``. A preference for whichever image comes first thus
    cancels, and ``judge(p, a, b) == 1 - judge(p, b, a)`` by construction. The bias itself is kept:
    ``position_bias`` is the mean ``P(first)`` over every conversation asked so far (0.5: none). In the profile
    the preferred image comes first in odd pairs and second in even ones, so that the examples do not teach "the
    first image wins".

    Prompt format: when the checkpoint has a processor chat template (``chat_template.jinja`` or
    ``chat_template.json``, as the llava-hf repos do) the messages go through it, with ``{"type": "image"}``
    content items. Otherwise the messages are laid out in the ChatML format LLaVA-OneVision's Qwen2 is trained
    on, each message's images first::

        <|im_start|>user
        <image><image>
        Example 1. Prompt: a cat in the snow
        The user preferred the first image.<|im_end|>
        ...
        <|im_start|>assistant

    Each ``<image>`` is then expanded to the model's tokens per image (multi-image mode: one base view of
    ``(image_size / patch_size)^2`` tokens plus a newline, no anyres tiles). The model's special tokens are
    removed from prompts, so a prompt cannot add images or turns. Works without torchvision (transformers'
    PIL image processor).

    Known biases: position bias (cancelled by the two orders, reported by ``position_bias``); the VLM's own
    aesthetic priors, which leak into every verdict whatever the profile says (verbosity and self-preference
    biases of LLM judges do not apply: the judge reads one token and judges images it did not make); a small
    profile (4 pairs) shows only a little of a taste. A judge built on a random or tiny model gives meaningless
    numbers: the tests check the mechanics only.

    Args:
        model: A ``LlavaOnevisionForConditionalGeneration`` (eval mode).
        tokenizer: Its tokenizer (right padding).
        image_processor: Its image processor.
        chat_template: The processor's chat template, or ``None`` for the ChatML layout above.
        max_side: Images are shrunk so that neither side exceeds this before the image processor sees them,
            which bounds decoding memory (the vision tower sees 384 px anyway).
        batch_size: Conversations per forward pass (each comparison is two conversations).

    Examples:
        ```py
        judge = VLMJudge.from_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-hf", torch_dtype=torch.bfloat16)
        p_a = judge(profile_pairs, prompts, ppd_images, base_images)  # P(user prefers the PPD image), (N,)
        win_rate(p_a), judge.position_bias
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        chat_template: str | None = None,
        max_side: int | None = 768,
        batch_size: int = 2,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.max_side = max_side
        self.batch_size = batch_size
        config = model.config
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        self.tokens_per_image = patches + 1 - (config.vision_feature_select_strategy == "default")
        answer_ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in ("A", "B")]
        if not all(answer_ids) or answer_ids[0][0] == answer_ids[1][0]:
            raise ValueError("The tokenizer must encode 'A' and 'B' with different first tokens.")
        self.answer_token_ids = (answer_ids[0][0], answer_ids[1][0])
        markers = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab(), self.image_token} - {""}
        # longest first, so that no marker is cut short by another it contains
        self._markers = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))
        self._sum_p_first = 0.0
        self._num_asked = 0

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_VLM_JUDGE,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        max_side: int | None = 768,
        batch_size: int = 2,
        use_chat_template: bool = True,
        revision: str | None = None,
        subfolder: str | None = None,
        **model_kwargs: Any,
    ) -> VLMJudge:
        """Loads a LLaVA-OneVision checkpoint (Hub id or local folder) as a judge.

        Args:
            name_or_path: Hub id or local path of a LLaVA-OneVision checkpoint.
            torch_dtype: The model's dtype (e.g. ``torch.bfloat16`` on a GPU; ``None``: transformers' default).
            device: Where the model runs (``None``: CUDA when available, else CPU; ignored with a ``device_map``).
            max_side: See the class.
            batch_size: See the class.
            use_chat_template: Use the checkpoint's processor chat template when it has one.
            revision: Model revision on the Hub (model, tokenizer, image processor and template share it).
            subfolder: Where the model lies inside the repo or folder.
            **model_kwargs: Passed to the model's ``from_pretrained`` (e.g. ``attn_implementation``, ``token``).
        """
        from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

        hub = pop_hub_kwargs(model_kwargs, revision, subfolder)
        name_or_path, hub = resolve_model_source(name_or_path, hub)
        model_type = AutoConfig.from_pretrained(name_or_path, **hub).model_type
        if model_type != "llava_onevision":
            raise ValueError(
                f"`VLMJudge` wraps LLaVA-OneVision models, but `{name_or_path}` is a {model_type!r} model."
            )
        model = load_quietly(
            LlavaOnevisionForConditionalGeneration.from_pretrained,
            name_or_path,
            dtype=torch_dtype,
            **hub,
            **model_kwargs,
        )
        if "device_map" not in model_kwargs:  # a device map has placed the model already
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.eval().requires_grad_(False)
        # right padding: every conversation keeps its positions, so a batch equals its conversations one by one
        tokenizer, image_processor = load_processors(name_or_path, hub, padding_side="right")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        template = _read_chat_template(name_or_path, hub) if use_chat_template else None
        return cls(model, tokenizer, image_processor, template, max_side, batch_size)

    # ----------------------------------------------------------------------------------------------------
    # the conversation

    def plain_text(self, text: str) -> str:
        """``text`` without the model's special tokens, removed until none is left (removing one marker could
        join the pieces of another)."""
        stripped = self._markers.sub("", text)
        return text if stripped == text else self.plain_text(stripped)

    def build_messages(self, profile: list[PreferencePair], prompt: str) -> list[dict[str, Any]]:
        """The chat messages for one comparison (content items ``{"type": "image"}`` and ``{"type": "text"}``),
        in the order the images are passed: each profile pair's two images, then candidate A, then B."""
        image = {"type": "image"}
        intro = (
            f"Here are {len(profile)} choices of one user. For each prompt the user was shown two images and "
            "picked the one they preferred."
        )
        messages = [{"role": "user", "content": [{"type": "text", "text": intro}]}]
        for i in range(len(profile)):
            which = "first" if i % 2 == 0 else "second"
            text = (
                f"Example {i + 1}. Prompt: {self.plain_text(profile[i].prompt)}\nThe user preferred the {which} image."
            )
            messages.append({"role": "user", "content": [image, image, {"type": "text", "text": text}]})
        question = (
            f"New prompt: {self.plain_text(prompt)}\nImage A is the first image and image B is the second. "
            "Which image would this user prefer? Answer with the letter A or B."
        )
        messages.append({"role": "user", "content": [image, image, {"type": "text", "text": question}]})
        return messages

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The conversation text, one image token per image (before expansion), ending where the answer starts."""
        if self.chat_template is not None:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        turns = []
        for message in messages:
            images = "".join(self.image_token for item in message["content"] if item["type"] == "image")
            texts = "\n".join(item["text"] for item in message["content"] if item["type"] == "text")
            body = f"{images}\n{texts}" if images else texts
            turns.append(f"<|im_start|>{message['role']}\n{body}<|im_end|>\n")
        return "".join(turns) + "<|im_start|>assistant\n"

    def _conversation(self, profile: list[PreferencePair], prompt: str, first: Any, second: Any):
        text = self.render(self.build_messages(profile, prompt))
        images = [image for i, p in enumerate(profile) for image in _shown_order(p, i)] + [first, second]
        if text.count(self.image_token) != len(images):
            raise ValueError(
                f"The chat template placed {text.count(self.image_token)} `{self.image_token}` tokens for "
                f"{len(images)} images; load the judge with `use_chat_template=False`."
            )
        return text.replace(self.image_token, self.image_token * self.tokens_per_image), images

    def prepare_inputs(self, conversations: list[tuple[str, list[Any]]]) -> dict[str, torch.Tensor]:
        """Tokenized conversations (right-padded) and pixel values, as the model takes them."""
        text_inputs = self.tokenizer([text for text, _ in conversations], padding=True, return_tensors="pt")
        image_inputs = self.image_processor(images=[images for _, images in conversations], return_tensors="pt")
        return {**text_inputs, **image_inputs}

    # ----------------------------------------------------------------------------------------------------
    # the verdicts

    @torch.no_grad()
    def _p_first(self, conversations: list[tuple[str, list[Any]]]) -> torch.Tensor:
        inputs = self.prepare_inputs(conversations)
        weight = self.model.get_input_embeddings().weight
        inputs["pixel_values"] = inputs["pixel_values"].to(weight.dtype)
        # image_sizes and batch_num_images stay on the CPU: the model loops over them in Python
        for key in ("input_ids", "attention_mask", "pixel_values"):
            inputs[key] = inputs[key].to(weight.device)
        last = inputs["attention_mask"].sum(dim=1) - 1
        # only the answer positions reach the LM head: (batch, batch, vocab), of which the diagonal is wanted
        logits = self.model(**inputs, logits_to_keep=last, use_cache=False).logits
        rows = torch.arange(len(conversations), device=logits.device)
        answer = logits[rows, rows][:, list(self.answer_token_ids)].float()
        return answer.softmax(dim=-1)[:, 0].cpu()

    def first_choice_probability(
        self,
        profile_pairs: Sequence[Any],
        prompts: str | Sequence[str],
        images_a: Sequence[ImageLike],
        images_b: Sequence[ImageLike],
        show_progress: bool | None = None,
    ) -> torch.Tensor:
        """P(the model answers "A") with ``images_a[i]`` shown first (as A) and ``images_b[i]`` second: one order
        only, position bias included. ``judge`` combines both orders.

        Args:
            profile_pairs: The user's preference pairs, at least one.
            prompts: One prompt per comparison, or one prompt for all.
            images_a: The candidates shown first.
            images_b: The candidates shown second, as many.
            show_progress: Show a progress bar; by default only when there is more than one batch.

        Returns:
            A float32 CPU tensor ``(N,)`` in ``[0, 1]``.
        """
        profile, prompts, a, b = self._inputs(profile_pairs, prompts, images_a, images_b)
        return self._ask(profile, prompts, a, b, show_progress)

    def judge(
        self,
        profile_pairs: Sequence[Any],
        prompts: str | Sequence[str],
        images_a: Sequence[ImageLike],
        images_b: Sequence[ImageLike],
        show_progress: bool | None = None,
    ) -> torch.Tensor:
        """P(the user whose profile is ``profile_pairs`` prefers ``images_a[i]`` over ``images_b[i]``).

        Args:
            profile_pairs: The user's preference pairs (``PreferencePair``s, tuples or dicts), at least one.
            prompts: One prompt per comparison, or one prompt for all.
            images_a: The first candidates (any form ``load_rgb_image`` takes).
            images_b: The second candidates, as many.
            show_progress: Show a progress bar; by default only when there is more than one batch.

        Returns:
            A float32 CPU tensor ``(N,)`` in ``[0, 1]``, the mean of both orders (see the class);
            ``judge(u, p, a, b) == 1 - judge(u, p, b, a)``.
        """
        return combine_orders(*self.both_orders(profile_pairs, prompts, images_a, images_b, show_progress))

    __call__ = judge

    def both_orders(
        self,
        profile_pairs: Sequence[Any],
        prompts: str | Sequence[str],
        images_a: Sequence[ImageLike],
        images_b: Sequence[ImageLike],
        show_progress: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P(the model answers the first image) with ``a`` shown first, and with ``b`` shown first: what ``judge``
        combines (``combine_orders``), kept apart to report each comparison's position bias.

        Returns:
            Two float32 CPU tensors ``(N,)``: P(first) for the order (a, b) and for the order (b, a).
        """
        profile, prompts, a, b = self._inputs(profile_pairs, prompts, images_a, images_b)
        # both orders of a comparison side by side, so that they share a batch
        p = self._ask(
            profile, [q for q in prompts for _ in (0, 1)], _interleave(a, b), _interleave(b, a), show_progress
        )
        return p[0::2], p[1::2]

    def _ask(self, profile, prompts, first, second, show_progress) -> torch.Tensor:
        conversations = [self._conversation(profile, *c) for c in zip(prompts, first, second, strict=True)]
        starts = range(0, len(conversations), self.batch_size)
        show = len(starts) > 1 if show_progress is None else show_progress
        parts = [
            self._p_first(conversations[start : start + self.batch_size])
            for start in tqdm(starts, desc="Judging", disable=not show)
        ]
        p_first = torch.cat(parts)
        self._sum_p_first += float(p_first.double().sum())
        self._num_asked += len(p_first)
        return p_first

    def _inputs(self, profile_pairs: Sequence[Any], prompts: Any, images_a: Any, images_b: Any) -> tuple:
        """The user's pairs and the comparisons, checked, with every image loaded as an RGB ``PIL`` image."""
        if isinstance(profile_pairs, Sequence) and not isinstance(profile_pairs, str | bytes) and not profile_pairs:
            raise ValueError("`profile_pairs` is empty: the judge needs at least one of the user's preference pairs.")
        users = as_user_pairs(profile_pairs, name="profile_pairs", max_side=self.max_side)
        if len(users) != 1:
            raise ValueError(f"`profile_pairs` must hold one user's pairs, got {len(users)} users' pair lists.")
        prompts, images_a, images_b = check_comparisons(prompts, images_a, images_b)
        a = [load_rgb_image(image, f"images_a[{i}]", self.max_side) for i, image in enumerate(images_a)]
        b = [load_rgb_image(image, f"images_b[{i}]", self.max_side) for i, image in enumerate(images_b)]
        return users[0], prompts, a, b

    @property
    def position_bias(self) -> float | None:
        """Mean P(first image) over every conversation asked since creation or ``reset_position_bias``: 0.5
        means no position bias, above 0.5 a preference for image A. ``None`` before any question."""
        return self._sum_p_first / self._num_asked if self._num_asked else None

    def reset_position_bias(self) -> None:
        """Forgets the conversations counted by ``position_bias``."""
        self._sum_p_first, self._num_asked = 0.0, 0

    @property
    def device(self) -> torch.device:
        """The device of the model."""
        return self.model.get_input_embeddings().weight.device


def _shown_order(pair: PreferencePair, index: int) -> tuple[Any, Any]:
    """The preferred image first in odd examples (index 0, 2, ...), second in even ones (see ``build_messages``)."""
    return (pair.chosen, pair.rejected) if index % 2 == 0 else (pair.rejected, pair.chosen)


def _interleave(first: list[Any], second: list[Any]) -> list[Any]:
    return [x for pair in zip(first, second, strict=True) for x in pair]


def _read_chat_template(name_or_path: str, hub: dict[str, Any]) -> str | None:
    """The processor chat template of a checkpoint (a local folder or a Hub repo), or ``None`` if it has none."""
    for filename in _TEMPLATE_FILES:
        if os.path.isdir(name_or_path):
            path = os.path.join(name_or_path, hub.get("subfolder") or "", filename)
            if not os.path.isfile(path):
                continue
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            allowed = ("revision", "subfolder", "token", "cache_dir", "local_files_only")
            try:
                path = hf_hub_download(name_or_path, filename, **{k: v for k, v in hub.items() if k in allowed})
            except EntryNotFoundError:
                continue
        with open(path) as f:
            text = f.read()
        return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    return None


def combine_orders(p_first_ab: torch.Tensor, p_first_ba: torch.Tensor) -> torch.Tensor:
    """P(a preferred) from both orders, ``(P(first | a, b) + 1 - P(first | b, a)) / 2``: a preference for
    whichever image comes first adds to one term what it takes from the other, so it cancels."""
    return ((p_first_ab.double() + (1 - p_first_ba.double())) / 2).float()
