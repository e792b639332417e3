"""``RewardScorer``: the one interface of every reward model, the registry of scorers and ``load_scorer``.

A scorer maps ``(images, prompts)`` to one float32 CPU score per pair, batched, under
``torch.inference_mode()``, whatever device and dtype its model runs in. Subclasses implement
``_score_batch`` on RGB ``PIL`` images and ``from_pretrained``; naming a class (``name = "..."``)
registers it in ``SCORERS``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..preference_pairs import load_rgb_image

__all__ = [
    "SCORERS",
    "CLIPSimilarityScorer",
    "RewardScorer",
    "image_pixel_values",
    "load_reward_scorers",
    "load_scorer",
    "parse_reward_model_paths",
    "load_tensors",
    "projected",
    "resolve_weights_file",
]

# short name -> scorer class; filled by `RewardScorer.__init_subclass__` when the modules below are imported
SCORERS: dict[str, type[RewardScorer]] = {}
_SCORER_MODULES = ("clip_score", "pickscore", "aesthetic", "hps")


class RewardScorer:
    """Base class of the reward scorers: ``scorer(images, prompts)`` returns one score per image.

    Args:
        batch_size: Images scored per forward pass.
        show_progress: Show a tqdm progress bar when there is more than one batch.

    Subclasses set ``name`` (the key in ``SCORERS``), ``default_name_or_path`` (the published
    checkpoint ``from_pretrained`` loads by default) and ``needs_prompts``, and implement
    ``_score_batch``, ``modules`` and ``from_pretrained``.

    Example:
        ```py
        from ppd_diffusers.evaluation import load_scorer

        scorer = load_scorer("clip_score", device="cuda", torch_dtype=torch.float16)
        scorer([image_a, image_b], ["a red cat", "a blue dog"])  # tensor([31.2, 28.7])
        ```
    """

    name: ClassVar[str]
    default_name_or_path: ClassVar[str]
    needs_prompts: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # abstract bases (no name of their own) are not scorers
            SCORERS[cls.name] = cls

    def __init__(self, batch_size: int = 32, show_progress: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.show_progress = show_progress

    # ------------------------------------------------------------------ for subclasses
    def modules(self) -> list[torch.nn.Module]:
        """The torch modules the scorer runs; ``to`` moves them and ``device``/``dtype`` read the first."""
        raise NotImplementedError

    def _score_batch(self, images: list[PIL.Image.Image], prompts: list[str] | None) -> torch.Tensor:
        """Scores of one batch of RGB images (shape ``(len(images),)``, any dtype and device)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, **kwargs: Any) -> RewardScorer:
        """Loads the published checkpoint (a Hub id) or a local copy in the same layout."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the interface
    @property
    def device(self) -> torch.device:
        return next(self.modules()[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.modules()[0].parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> RewardScorer:
        """Moves the models to ``device`` and/or casts them to ``dtype``; returns ``self``."""
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    def __call__(self, images: Sequence[Any], prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Scores each ``(images[i], prompts[i])``.

        Args:
            images: Anything ``ppd_diffusers.preference_pairs.load_rgb_image`` reads (PIL images, arrays,
                tensors, encoded bytes, file paths).
            prompts: One prompt per image; ignored (and may be ``None``) for prompt-free scorers.

        Returns:
            A float32 CPU tensor of shape ``(len(images),)``.

        Raises:
            ValueError: ``images`` or ``prompts`` is not a sequence, their lengths differ, a prompt is not a
                ``str``, or an image cannot be read.
        """
        images, prompts = self._check_inputs(images, prompts)
        if not images:
            return torch.zeros(0, dtype=torch.float32)
        starts = range(0, len(images), self.batch_size)
        show = self.show_progress and len(starts) > 1
        scores = []
        with torch.inference_mode():
            for start in tqdm(starts, desc=f"Scoring ({self.name})", disable=not show):
                stop = start + self.batch_size
                batch = [load_rgb_image(image, f"images[{start + i}]") for i, image in enumerate(images[start:stop])]
                batch_prompts = None if prompts is None else prompts[start:stop]
                scores.append(self._score_batch(batch, batch_prompts).float().cpu().reshape(-1))
        return torch.cat(scores)

    def _check_inputs(self, images: Any, prompts: Any) -> tuple[list[Any], list[str] | None]:
        if isinstance(images, str | bytes | PIL.Image.Image) or not isinstance(
            images, Sequence | torch.Tensor | np.ndarray
        ):
            raise ValueError(f"`images` must be a sequence of images, got {type(images).__name__}.")
        if isinstance(images, torch.Tensor | np.ndarray) and images.ndim != 4:
            raise ValueError(f"`images` as one array must be a batch (4 dimensions), got shape {tuple(images.shape)}.")
        images = list(images)
        if prompts is None:
            if self.needs_prompts:
                raise ValueError(f"`prompts` is required by the {self.name!r} scorer (one prompt per image).")
            return images, None
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"`prompts` must be a sequence of str (one per image), got {type(prompts).__name__}.")
        if len(prompts) != len(images):
            raise ValueError(f"`prompts` has {len(prompts)} entries but `images` has {len(images)}; pass one each.")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"`prompts[{i}]` must be a str, got {type(prompt).__name__}.")
        return images, list(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


class CLIPSimilarityScorer(RewardScorer):
    """Base of the scorers built on a transformers ``CLIPModel``: the cosine between the unit image and text
    embeddings, turned into a score by ``_from_cosine``.

    Args:
        model: The ``CLIPModel`` (in eval mode).
        tokenizer: Its tokenizer (prompts are truncated to its ``model_max_length``, 77 for CLIP).
        image_processor: Its image processor.
        batch_size: Images scored per forward pass.
        show_progress: Show a progress bar when there is more than one batch.
    """

    def __init__(
        self, model: Any, tokenizer: Any, image_processor: Any, batch_size: int = 32, show_progress: bool = True
    ):
        super().__init__(batch_size=batch_size, show_progress=show_progress)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _score_batch(self, images: list[PIL.Image.Image], prompts: list[str] | None) -> torch.Tensor:
        device, dtype = self.device, self.dtype
        pixel_values = image_pixel_values(self.image_processor, images, device, dtype)
        image_embeds = projected(self.model.get_image_features(pixel_values=pixel_values))
        text = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        text_embeds = projected(self.model.get_text_features(**text))
        # the cosine in float32: bf16 unit vectors alone would cost ~1e-2 in a score of ~30
        cosine = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
        return self._from_cosine(cosine)

    @classmethod
    def _load(
        cls,
        name_or_path: str | os.PathLike,
        processor_name_or_path: str | os.PathLike | None,
        torch_dtype: torch.dtype | None,
        device: str | torch.device | None,
        revision: str | None,
        batch_size: int,
        show_progress: bool,
        model_kwargs: dict[str, Any],
    ) -> CLIPSimilarityScorer:
        from transformers import CLIPModel

        from ..encoder_base import load_processors, load_quietly, pop_hub_kwargs

        hub = pop_hub_kwargs(model_kwargs, revision, None)
        dtype = model_kwargs.pop("dtype", None) or torch_dtype
        model = load_quietly(CLIPModel.from_pretrained, os.fspath(name_or_path), dtype=dtype, **hub, **model_kwargs)
        if processor_name_or_path is None:
            tokenizer, image_processor = load_processors(os.fspath(name_or_path), hub)
        else:  # another repo: the model's revision does not apply to it
            shared = {k: v for k, v in hub.items() if k != "revision"}
            tokenizer, image_processor = load_processors(os.fspath(processor_name_or_path), shared)
        scorer = cls(model, tokenizer, image_processor, batch_size=batch_size, show_progress=show_progress)
        return scorer.to(device=device)


def projected(output: Any) -> torch.Tensor:
    """The projected embedding of ``get_image_features``/``get_text_features`` (an output object in transformers 5,
    whose ``pooler_output`` holds it; a tensor before)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_pixel_values(
    image_processor: Any, images: list[PIL.Image.Image], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``pixel_values`` of a transformers image processor, on ``device`` in ``dtype``.

    A torchvision-backend processor (transformers' default when torchvision is installed) resizes and
    normalises on ``device``: on a GPU that is many times faster than on the CPU, where preprocessing would
    otherwise dominate the scoring of a thousand 512 px images.
    """
    on_device = {"device": device} if getattr(image_processor, "backend", None) == "torchvision" else {}
    pixel_values = image_processor(images=images, return_tensors="pt", **on_device)["pixel_values"]
    return pixel_values.to(device, dtype)


def resolve_weights_file(
    name_or_path: str | os.PathLike, filename: str, revision: str | None = None, **hub_kwargs: Any
) -> str:
    """A local path to a weights file: ``name_or_path`` itself when it is a file, ``filename`` inside it when
    it is a folder, else ``filename`` downloaded from the Hub repo ``name_or_path``."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            raise ValueError(f"`name_or_path` {path!r} is a folder without {filename!r}; pass `filename` or the file.")
        return file
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename, revision=revision, **hub_kwargs)


def load_tensors(path: str, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, never arbitrary
    pickled objects; a file that needs more is refused with the reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError depending on the version
        raise ValueError(
            f"{what} {path!r} cannot be read with `torch.load(weights_only=True)`: it holds more than tensors, and "
            f"unpickling it could run arbitrary code, so it is not loaded. ({type(error).__name__}: {error})"
        ) from error


def load_scorer(name: str, name_or_path: str | os.PathLike | None = None, **kwargs: Any) -> RewardScorer:
    """Builds a registered scorer by its short name.

    Args:
        name: A key of ``SCORERS``: ``"clip_score"``, ``"pickscore"``, ``"aesthetic"`` or ``"hps"``.
        name_or_path: Hub id or local path of the checkpoint; ``None`` loads the scorer's published default.
        **kwargs: Passed to the scorer's ``from_pretrained`` (``torch_dtype``, ``device``, ``batch_size``, ...).

    Raises:
        ValueError: ``name`` is not a registered scorer.

    Example:
        ```py
        scorer = load_scorer("aesthetic", device="cuda")
        scorer(images).mean()
        ```
    """
    if name not in SCORERS:
        raise ValueError(f"`name` must be one of {sorted(SCORERS)}, got {name!r}.")
    cls = SCORERS[name]
    if name_or_path is None:
        return cls.from_pretrained(**kwargs)
    return cls.from_pretrained(name_or_path, **kwargs)


# every built-in scorer registers itself on import; each module imports only this one, so any order works
for _module in _SCORER_MODULES:
    importlib.import_module(f"{__package__}.{_module}")


def parse_reward_model_paths(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``name=path`` items (a reward's checkpoint) and ``name.option=value`` items (another argument of its
    ``from_pretrained``, e.g. the CLIP the aesthetic head reads) as ``load_scorer`` arguments per reward.

    Raises:
        ValueError: An item without ``=``, or a setting given twice.

    Examples:
        >>> parse_reward_model_paths(["aesthetic=./head", "aesthetic.clip_name_or_path=./clip", "hps=./hps"])
        {'aesthetic': {'name_or_path': './head', 'clip_name_or_path': './clip'}, 'hps': {'name_or_path': './hps'}}
    """
    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not name or not value or (dot and not option):
            raise ValueError(f"`reward_model_paths` items are `name=path` or `name.option=value`, got {item!r}.")
        option = option or "name_or_path"
        if option in options.get(name, {}):
            raise ValueError(f"`reward_model_paths` sets {name}'s {option!r} twice.")
        options.setdefault(name, {})[option] = value
    return options


def load_reward_scorers(
    names: Sequence[str], options: Mapping[str, Mapping[str, str]] | None = None, **kwargs: Any
) -> dict[str, RewardScorer]:
    """Builds each named reward scorer with ``load_scorer`` (its published checkpoint unless ``options`` names one).

    Args:
        names: Scorer names (``"clip_score"``, ``"pickscore"``, ``"aesthetic"``, ``"hps"``).
        options: Reward name -> ``load_scorer`` arguments (``name_or_path`` and others), as
            ``parse_reward_model_paths`` returns them.
        **kwargs: Passed to every ``load_scorer`` call (``device``, ``torch_dtype``, ``batch_size``...).

    Returns:
        Name -> scorer, in the order of ``names``.

    Raises:
        ValueError: ``options`` names a reward that is not in ``names``.
    """
    options = {name: dict(value) for name, value in (options or {}).items()}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"`reward_model_paths` names {unknown}, which are not among the rewards {list(names)}.")
    scorers = {}
    for name in names:
        own = options.get(name, {})
        scorers[name] = load_scorer(name, own.pop("name_or_path", None), **own, **kwargs)
    return scorers
