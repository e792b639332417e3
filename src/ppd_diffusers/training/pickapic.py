"""Pick-a-Pic-format preference data: users, their non-tied pairs, and reproducible draws of N pairs.

Rows have ``caption``, ``jpg_0``, ``jpg_1`` (image bytes), ``label_0`` (1: image 0 preferred, 0: image 1
preferred, 0.5: a tie) and ``user_id``; Pick-a-Pic also has ``image_0_uid`` / ``image_1_uid``, which
``LeakageIndex`` uses when present. Only the ``user_id`` and ``label_0`` columns are read to plan the draws
(and ``caption`` and the uids to find leaking rows); images are decoded only for the rows a draw uses.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..preference_pairs import PreferencePair

__all__ = [
    "DrawStats",
    "LeakageIndex",
    "UserDraw",
    "check_labels",
    "load_pickapic_dataset",
    "normalize_caption",
    "pair_from_row",
    "sample_user_draws",
]

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "user_id")
IMAGE_UID_COLUMNS = ("image_0_uid", "image_1_uid")


@dataclass(frozen=True)
class UserDraw:
    """``num_pairs`` dataset rows of one user, used together to build one user embedding.

    Args:
        user_id: The user.
        draw: Which draw of this user (0 .. draws-1).
        rows: Dataset row indices of the pairs, in the order they are shown to the encoder.
    """

    user_id: Any
    draw: int
    rows: tuple[int, ...]


@dataclass
class DrawStats:
    """What ``sample_user_draws`` kept and dropped."""

    rows: int = 0
    ties: int = 0
    users: int = 0
    users_with_too_few_pairs: int = 0
    draws: int = 0
    per_user_pairs: dict[Any, int] = field(default_factory=dict, repr=False)


def _read_columns(dataset: Any, names: Sequence[str]) -> list[list]:
    """The given columns as Python lists, read in one go (not row by row) from a ``datasets.Dataset``.

    Raises ``ValueError`` naming a missing column, and one naming the first row whose ``label_0`` is not a
    Pick-a-Pic label (0, 0.5 or 1) when that column is read.
    """
    present = getattr(dataset, "column_names", None)
    if present is not None:
        missing = [name for name in names if name not in present]
        if missing:
            raise ValueError(
                f"The dataset has no {', '.join(f'`{m}`' for m in missing)} column: Pick-a-Pic rows need "
                f"{', '.join(PICKAPIC_COLUMNS)}; it has {sorted(present)}."
            )
    columns = _columns(dataset, names)
    if "label_0" in names:
        check_labels(columns[list(names).index("label_0")])
    return columns


def check_labels(labels: Sequence[Any]) -> None:
    """Raises ``ValueError`` naming the first row whose ``label_0`` is not 0, 0.5 (a tie) or 1."""
    for row, label in enumerate(labels):
        _check_label(label, f"of dataset row {row} ")


def _check_label(label: Any, where: str = "") -> None:
    if isinstance(label, bool) or label not in (0, 0.5, 1):  # NaN is in no tuple
        raise ValueError(
            f"`label_0` {where}is {label!r}: Pick-a-Pic labels are 1 (image 0 preferred), 0 (image 1 preferred) "
            "or 0.5 (a tie)."
        )


def _columns(dataset: Any, names: Sequence[str]) -> list[list]:
    if hasattr(dataset, "select_columns"):
        table = dataset.select_columns(list(names))[:]
        return [table[name] for name in names]
    return [list(dataset[name]) for name in names]


def undecoded_images(dataset: Any, columns: Sequence[str]) -> tuple[Any, list[str]]:
    """``dataset`` with its ``datasets.Image`` columns among ``columns`` read as raw bytes, and those columns.

    ``datasets`` decodes such columns when a row is read and raises on a corrupt file; raw bytes let the
    caller decode, catch and count instead. Cast the returned columns back with ``datasets.Image()``.
    """
    import datasets

    decoded = [c for c in columns if isinstance(dataset.features[c], datasets.Image) and dataset.features[c].decode]
    for column in decoded:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset, decoded


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from ``parts`` (through ``str``), the same in every process and Python run (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _user_seed(seed: int, user_id: Any) -> np.random.Generator:
    # depends on the user only: adding, removing or reordering other users changes nothing
    return np.random.default_rng(stable_seed(seed, repr(user_id)))


def sample_user_draws(
    dataset: Any, num_pairs: int = 4, draws: int = 1, seed: int = 0
) -> tuple[list[UserDraw], DrawStats]:
    """Plans, for every user, ``draws`` sets of ``num_pairs`` distinct non-tied pairs.

    Ties (``label_0 == 0.5``) are dropped and counted. A user with fewer than ``num_pairs`` non-tied
    pairs gets no draw (counted in ``users_with_too_few_pairs``); the pairs within a draw are distinct,
    different draws of a user may share pairs. The same ``seed`` gives the same draws whatever the row
    order or the number of processes.

    Args:
        dataset: A ``datasets.Dataset`` (or any mapping of column name to list) in Pick-a-Pic format.
        num_pairs: Pairs per draw (the encoder's ``num_pairs``).
        draws: Draws per user.
        seed: Seed of the sampling.

    Returns:
        The draws, ordered by user id (by ``repr`` when ids are not comparable) then draw, and the statistics.
    """
    if num_pairs < 1 or draws < 1:
        raise ValueError(f"`num_pairs` and `draws` must be positive integers, got {num_pairs} and {draws}.")
    user_ids, labels = _read_columns(dataset, ("user_id", "label_0"))
    stats = DrawStats(rows=len(labels))
    rows_of_user: dict[Any, list[int]] = defaultdict(list)
    for row, (user_id, label) in enumerate(zip(user_ids, labels, strict=True)):
        if label == 0.5:
            stats.ties += 1
        else:
            rows_of_user[user_id].append(row)
    result = []
    try:
        users = sorted(rows_of_user)
    except TypeError:  # ids of mixed types
        users = sorted(rows_of_user, key=repr)
    for user_id in users:
        rows = rows_of_user[user_id]
        stats.per_user_pairs[user_id] = len(rows)
        if len(rows) < num_pairs:
            stats.users_with_too_few_pairs += 1
            continue
        stats.users += 1
        rng = _user_seed(seed, user_id)
        for draw in range(draws):
            chosen = rng.choice(len(rows), size=num_pairs, replace=False)
            result.append(UserDraw(user_id, draw, tuple(rows[i] for i in chosen)))
    stats.draws = len(result)
    return result, stats


def column_names(dataset: Any) -> list[str]:
    """The column names of a ``datasets.Dataset`` or of a mapping of column name to list."""
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else list(dataset.keys())


def normalize_caption(caption: Any) -> str:
    """A caption as ``LeakageIndex`` compares it: runs of whitespace made one space, ends stripped, case folded.

    Examples:
        >>> normalize_caption("  A red  Fox ") == normalize_caption("a red fox")
        True
    """
    return " ".join(str(caption if caption is not None else "").split()).casefold()


class LeakageIndex:
    """Tells whether a row leaks from a draw (the rows of a user embedding): it shares a pair, caption or image.

    Pick-a-Pic repeats a winner over consecutive rows of the same prompt (a user who picked one of several
    images gives one row per losing image), so leaving out only a draw's own rows would still train on
    its prompts and its preferred images, which the embedding shows the adapter. A row leaks from a draw when
    it is one of the draw's rows, its caption equals one of theirs (compared by ``normalize_caption``), or
    one of its images has the uid of one of theirs (the ``image_0_uid`` / ``image_1_uid`` columns; without
    them rows are compared by row and caption only, ``uses_image_uids`` is False). Image bytes are never
    read: hashing them would mean reading every image of the dataset.

    Args:
        dataset: A ``datasets.Dataset`` (or a mapping of column name to list) in Pick-a-Pic format; its
            ``caption`` column (and the uid columns when present) is read once, in one go.

    Examples:
        >>> rows = {"caption": ["a fox", "A fox ", "a cat"], "image_0_uid": ["w", "w", "x"],
        ...         "image_1_uid": ["l1", "l2", "l3"]}
        >>> index = LeakageIndex(rows)
        >>> draw = UserDraw("u", 0, (0,))
        >>> [index.leaks(row, draw) for row in range(3)]
        [True, True, False]
    """

    def __init__(self, dataset: Any):
        present = column_names(dataset)
        self.uid_columns = tuple(c for c in IMAGE_UID_COLUMNS if c in present)
        captions, *uids = _read_columns(dataset, ("caption", *self.uid_columns))
        self._captions = captions
        self._uids = list(zip(*uids, strict=True)) if uids else None
        self._draw_keys: dict[UserDraw, tuple[frozenset, frozenset]] = {}

    @property
    def uses_image_uids(self) -> bool:
        """Whether rows are also compared by image uid (the dataset has ``image_0_uid`` / ``image_1_uid``)."""
        return self._uids is not None

    def __len__(self) -> int:
        return len(self._captions)

    def row_keys(self, row: int) -> tuple[str, frozenset]:
        """The normalised caption of a row and the uids of its images (missing uids left out)."""
        uids = frozenset(u for u in self._uids[row] if u not in (None, "")) if self._uids is not None else frozenset()
        return normalize_caption(self._captions[row]), uids

    def draw_keys(self, draw: UserDraw) -> tuple[frozenset, frozenset]:
        """The normalised captions and the image uids of a draw's rows."""
        keys = self._draw_keys.get(draw)
        if keys is None:
            captions, uids = zip(*(self.row_keys(row) for row in draw.rows), strict=True)
            keys = self._draw_keys[draw] = frozenset(captions), frozenset().union(*uids)
        return keys

    def leaks(self, row: int, draw: UserDraw) -> bool:
        """Whether ``row`` is one of ``draw``'s rows or shares a caption or an image uid with one of them."""
        if row in draw.rows:
            return True
        caption, uids = self.row_keys(row)
        draw_captions, draw_uids = self.draw_keys(draw)
        return caption in draw_captions or not uids.isdisjoint(draw_uids)


def pair_from_row(row: dict[str, Any]) -> PreferencePair:
    """A Pick-a-Pic row as a ``PreferencePair`` with the preferred image first.

    Raises:
        ValueError: For a tie (``label_0 == 0.5``), which has no preferred image.
    """
    label = row["label_0"]
    _check_label(label)
    if label == 0.5:
        raise ValueError("A tied pair (`label_0 == 0.5`) has no preferred image.")
    first, second = (row["jpg_0"], row["jpg_1"]) if label == 1 else (row["jpg_1"], row["jpg_0"])
    return PreferencePair(prompt=row["caption"], chosen=first, rejected=second)


def load_pickapic_dataset(name_or_path: str | os.PathLike, split: str = "train", streaming: bool = False) -> Any:
    """Loads Pick-a-Pic-format data with ``datasets``, wherever it lies.

    Args:
        name_or_path: A Hub id (``yuvalkirstain/pickapic_v2``), a data file (``.parquet``, ``.jsonl``,
            ``.csv``...), a folder of data files, or a folder written by ``save_to_disk`` (one split, or a
            ``DatasetDict`` from which ``split`` is taken; a folder of one split is that split, whatever
            ``split`` says).
        split: The split.
        streaming: Return an ``IterableDataset`` that reads rows as they are iterated (nothing is
            downloaded up front); row order, and so row indices, are those of the files.

    Returns:
        A ``datasets.Dataset``, or a ``datasets.IterableDataset`` when ``streaming``.

    Examples:
        ```py
        from ppd_diffusers.training import load_pickapic_dataset
        pairs = load_pickapic_dataset("yuvalkirstain/pickapic_v2", split="validation_unique")
        ```
    """
    import datasets

    path = os.fspath(name_or_path)
    empty = ValueError(f"`{path}` (split {split!r}) holds no rows: Pick-a-Pic-format data needs at least one pair.")
    try:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
            dataset = datasets.load_from_disk(path)[split]
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
            dataset = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            if os.path.getsize(path) == 0:
                raise empty
            extension = path.removesuffix(".gz").rsplit(".", 1)[-1]
            builder = {"jsonl": "json"}.get(extension, extension)
            dataset = datasets.load_dataset(builder, data_files=path, split=split, streaming=streaming)
        else:
            dataset = datasets.load_dataset(path, split=split, streaming=streaming)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' words for a split without rows
            raise empty from error
        raise
    except IndexError as error:  # what `load_from_disk` raises for a saved dataset of no rows
        raise empty from error
    if isinstance(dataset, datasets.IterableDataset):
        return dataset
    if len(dataset) == 0:
        raise empty
    return dataset.to_iterable_dataset() if streaming else dataset
