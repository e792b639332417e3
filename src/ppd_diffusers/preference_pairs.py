"""``PreferencePair`` and the checks that turn user input into validated pairs of RGB images."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import PIL.Image

__all__ = ["ImageLike", "PreferencePair", "as_user_pairs", "load_preference_pairs", "load_rgb_image"]

ImageLike = Union[PIL.Image.Image, np.ndarray, "torch.Tensor", bytes, str, os.PathLike, Mapping[str, Any]]  # noqa: F821


@dataclass(frozen=True)
class PreferencePair:
    """One preference of a user: for ``prompt`` they preferred ``chosen`` over ``rejected``.

    Images may be PIL images (any mode), ``numpy`` arrays (``HWC`` as PIL lays them out, or ``CHW``),
    tensors (``CHW`` or ``1CHW`` as torch lays them out), ``uint8`` or floats in ``[0, 1]``, encoded
    file bytes, file paths, or ``{"bytes": ..., "path": ...}`` dicts as ``datasets`` stores them.
    Plain ``(prompt, chosen, rejected)`` tuples and ``{"prompt", "chosen", "rejected"}`` dicts are
    accepted wherever pairs are.

    Examples:
        >>> import PIL.Image
        >>> from ppd_diffusers.preference_pairs import as_user_pairs
        >>> red, blue = PIL.Image.new("RGB", (8, 8), "red"), PIL.Image.new("RGB", (8, 8), "blue")
        >>> pair = PreferencePair("a red square", chosen=red, rejected=blue)
        >>> (user,) = as_user_pairs([pair, ("a blue square", blue, red)])  # one user, two pairs
        >>> [p.prompt for p in user]
        ['a red square', 'a blue square']
    """

    prompt: str
    chosen: ImageLike
    rejected: ImageLike


def load_rgb_image(image: ImageLike, name: str = "image", max_side: int | None = None) -> PIL.Image.Image:
    """Converts any supported image input to an RGB ``PIL.Image``.

    Args:
        image: The image (see ``PreferencePair`` for the accepted types).
        name: How the argument is named in error messages, e.g. ``preference_pairs[2].rejected``.
        max_side: Shrink larger images (keeping their aspect ratio) so that neither side exceeds this; JPEG
            files are then decoded at a reduced scale directly (``PIL`` draft mode), which keeps huge
            images from costing gigabytes. ``None`` keeps the size.

    Raises:
        ValueError: The input is not an image or cannot be decoded; the message names ``name``.
    """
    if isinstance(image, PIL.Image.Image):
        return _shrink(_pil_to_rgb(image, name), max_side)
    if isinstance(image, Mapping):  # a `datasets` Image feature with decode=False
        data = image.get("bytes") or image.get("path")
        if data is None:
            raise ValueError(f"`{name}` is a dict without `bytes` or `path`: {sorted(image)}.")
        return load_rgb_image(data, name, max_side)
    if isinstance(image, bytes | bytearray | str | os.PathLike):
        source = io.BytesIO(image) if isinstance(image, bytes | bytearray) else image
        try:
            with PIL.Image.open(source) as opened:
                if max_side is not None and max(opened.size) > max_side:
                    opened.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
                opened.load()
                return _shrink(_pil_to_rgb(opened, name), max_side)
        except (OSError, PIL.Image.DecompressionBombError, SyntaxError) as error:
            what = "bytes" if isinstance(image, bytes | bytearray) else f"file {os.fspath(image)!r}"
            raise ValueError(f"`{name}` is not a readable image ({what}): {error}") from error
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu()
        if image.ndim == 4 and image.shape[0] == 1:  # a batch of one
            image = image[0]
        if image.ndim == 3:  # torch's channels-first layout
            image = image.permute(1, 2, 0)
        # numpy has no bfloat16: every float tensor goes through float32
        image = (image if str(image.dtype) == "torch.uint8" else image.float()).numpy()
    if isinstance(image, np.ndarray):
        return _shrink(_array_to_image(image, name), max_side)
    raise ValueError(
        f"`{name}` must be a PIL image, a numpy array, a tensor, image bytes or a file path, "
        f"got {type(image).__name__}."
    )


def _shrink(image: PIL.Image.Image, max_side: int | None) -> PIL.Image.Image:
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, PIL.Image.Resampling.LANCZOS)  # a new image: the caller's is not changed


def _pil_to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """RGB with the image's brightness kept: PIL's own ``convert("RGB")`` clips 16-bit values to 255 (white)
    and truncates float pixels in [0, 1] to 0 (black)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # unsigned 16-bit greyscale, e.g. a 16-bit PNG
        return _array_to_image(np.asarray(image).astype(np.float32) / 65535.0, name)
    if image.mode == "F":  # float pixels: the same rules as float arrays (values in [0, 1])
        return _array_to_image(np.asarray(image), name)
    if image.mode == "I":
        raise ValueError(
            f"`{name}` is a 32-bit integer ('I' mode) image, whose range is ambiguous: convert it to 8-bit first, "
            "e.g. `PIL.Image.fromarray((np.asarray(image) / 65535 * 255).astype('uint8'))` for 16-bit data."
        )
    return image.convert("RGB")


def _array_to_image(array: np.ndarray, name: str) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"`{name}` must be an (H, W), (H, W, C) or (C, H, W) image array, got shape {array.shape}.")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"`{name}` must hold uint8 values or floats in [0, 1], got dtype {array.dtype}.")
        if not np.isfinite(array).all():
            raise ValueError(f"`{name}` contains NaN or Inf values.")
        low, high = float(array.min()), float(array.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"`{name}` holds floats in [{low:.3g}, {high:.3g}]; float images must lie in [0, 1] "
                "(for images in [-1, 1] pass `(image + 1) / 2`)."
            )
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array).convert("RGB")


def _as_pair(item: Any, name: str, max_side: int | None = None) -> PreferencePair:
    if isinstance(item, PreferencePair):
        prompt, chosen, rejected = item.prompt, item.chosen, item.rejected
    elif isinstance(item, Mapping):
        missing = {"prompt", "chosen", "rejected"} - set(item)
        if missing:
            raise ValueError(f"`{name}` is a dict without the keys {sorted(missing)}.")
        prompt, chosen, rejected = item["prompt"], item["chosen"], item["rejected"]
    elif isinstance(item, Sequence) and not isinstance(item, str | bytes) and len(item) == 3:
        prompt, chosen, rejected = item
    else:
        raise ValueError(
            f"`{name}` must be a `PreferencePair`, a (prompt, chosen, rejected) tuple or a dict with those keys, "
            f"got {type(item).__name__}."
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"`{name}.prompt` must be a non-empty string, got {prompt!r}.")
    return PreferencePair(
        prompt=prompt,
        chosen=load_rgb_image(chosen, f"{name}.chosen", max_side),
        rejected=load_rgb_image(rejected, f"{name}.rejected", max_side),
    )


def _is_single_user(items: Sequence[Any]) -> bool:
    first = items[0]
    if isinstance(first, PreferencePair | Mapping):
        return True
    # a (prompt, chosen, rejected) tuple starts with a string; a user's list of pairs does not
    return isinstance(first, Sequence) and len(first) > 0 and isinstance(first[0], str)


def as_user_pairs(
    pairs: Sequence[Any], num_pairs: int | None = None, name: str = "preference_pairs", max_side: int | None = None
) -> list[list[PreferencePair]]:
    """Validates one user's pairs, or a list of users' pair lists, into ``[[PreferencePair, ...], ...]``.

    Every image is converted to an RGB ``PIL.Image``.

    Args:
        pairs: One user's pairs, or one list of pairs per user.
        num_pairs: The number of pairs each user must have (``None``: any positive number).
        name: The argument name used in error messages.
        max_side: Shrink images whose longer side exceeds this (see ``load_rgb_image``).

    Raises:
        ValueError: Naming the argument and the index of the offending user/pair.
    """
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of preference pairs (or of users' pair lists).")
    users = [pairs] if _is_single_user(pairs) else list(pairs)
    result = []
    for u, user in enumerate(users):
        user_name = name if len(users) == 1 and users[0] is pairs else f"{name}[{u}]"
        if isinstance(user, str | bytes) or not isinstance(user, Sequence) or len(user) == 0:
            raise ValueError(f"`{user_name}` must be a non-empty list of preference pairs.")
        if num_pairs is not None and len(user) != num_pairs:
            raise ValueError(f"`{user_name}` needs {num_pairs} pairs, got {len(user)}.")
        result.append([_as_pair(item, f"{user_name}[{i}]", max_side) for i, item in enumerate(user)])
    return result


PAIRS_FILE = "pairs.json"


def load_preference_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Reads one user's preference pairs from a JSON file, or from a folder holding ``pairs.json``.

    The file is a list of ``{"prompt": ..., "chosen": ..., "rejected": ...}`` objects whose image paths are
    relative to the file (absolute paths work too). Images are opened and converted to RGB here, so a
    missing or unreadable file is reported with the pair it belongs to.

    Args:
        path: A ``.json`` file, or a folder with a ``pairs.json``.

    Returns:
        The pairs, in file order, with ``PIL.Image`` images.

    Examples:
        ```json
        [
          {"prompt": "a cat in the snow", "chosen": "cat_a.png", "rejected": "cat_b.png"},
          {"prompt": "a city at night", "chosen": "city_b.png", "rejected": "city_a.png"}
        ]
        ```
    """
    file = os.path.join(path, PAIRS_FILE) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"`path` must be a JSON file of pairs or a folder with {PAIRS_FILE}, got {path!r}.")
    with open(file) as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{file}` is not valid JSON: {err}") from err
    if not isinstance(items, list):
        kind = type(items).__name__
        raise ValueError(f"`{file}` must hold a list of {{prompt, chosen, rejected}} objects, not a {kind}.")
    root = os.path.dirname(os.path.abspath(file))
    pairs = []
    for i, item in enumerate(items):
        name = f"{os.path.basename(file)}[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"`{name}` must be an object with `prompt`, `chosen` and `rejected`.")
        images = {}
        for key in ("chosen", "rejected"):
            if not isinstance(item.get(key), str):
                raise ValueError(f"`{name}.{key}` must be an image path, got {item.get(key)!r}.")
            images[key] = os.path.join(root, item[key])
        pairs.append(_as_pair({**item, **images}, name))
    return pairs
