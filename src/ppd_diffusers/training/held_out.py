"""The user-level held-out split of a training run: users none of whose pairs training reads.

Two disjoint groups are held out, both among the users with a user embedding: *evaluation* users, on which
an adapter is to be measured (``examples/evaluate_ppd.py``), and *validation* users, whose images fill the
validation grids while training runs. Each group is ranked by a seeded hash of the user id, so the split
depends on neither the row order nor the number of processes, and the evaluation users are chosen first,
so changing ``num_validation_users`` never moves one of them. ``train_ppd`` writes the split to
``output_dir/held_out_users.json``, which ``load_held_out_split`` reads back (from a folder, the file or a
Hub repo of an uploaded adapter).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .pickapic import UserDraw, _read_columns, stable_seed

__all__ = ["HELD_OUT_FILE", "HeldOutSplit", "choose_held_out_users", "load_held_out_split", "make_held_out_split"]

HELD_OUT_FILE = "held_out_users.json"
FORMAT_VERSION = 1


def _plain(user_id: Any) -> Any:
    """A user id as a plain Python value: numpy scalars (``np.int64(7)``) become ``7``, so ids hash and save alike."""
    if hasattr(user_id, "item") and not isinstance(user_id, str | bytes):
        user_id = user_id.item()
    if isinstance(user_id, bool) or not isinstance(user_id, int | str):
        raise ValueError(f"User ids must be integers or strings to be held out and saved, got {user_id!r}.")
    return user_id


def _ranked(users: Iterable[Any], seed: int, purpose: str) -> list:
    # the hash of the id alone orders a user: other users, their order and the process count change nothing
    return sorted(users, key=lambda u: (stable_seed(seed, purpose, repr(u)), repr(u)))


def choose_held_out_users(
    users: Iterable[Any],
    num_validation_users: int = 4,
    eval_user_fraction: float = 0.1,
    max_eval_users: int | None = 500,
    seed: int = 0,
) -> tuple[list, list]:
    """Chooses the evaluation users, then the validation users among the others.

    Args:
        users: The candidate user ids (integers or strings; repeats are ignored).
        num_validation_users: Validation users (fewer when there are not enough users left).
        eval_user_fraction: Fraction of the users held out for evaluation, rounded down.
        max_eval_users: At most this many evaluation users (``None``: no cap).
        seed: Seed of the hash that ranks the users.

    Returns:
        ``(evaluation_users, validation_users)``, disjoint, each in the order of its ranking.

    Examples:
        >>> evaluation, validation = choose_held_out_users(range(100), num_validation_users=2)
        >>> len(evaluation), len(validation), set(evaluation) & set(validation)
        (10, 2, set())
    """
    if not 0.0 <= eval_user_fraction < 1.0:
        raise ValueError(f"`eval_user_fraction` must be in [0, 1), got {eval_user_fraction}.")
    if num_validation_users < 0 or (max_eval_users is not None and max_eval_users < 0):
        raise ValueError(
            f"`num_validation_users` and `max_eval_users` must not be negative, got {num_validation_users} and "
            f"{max_eval_users}."
        )
    candidates = {_plain(u) for u in users}
    # the epsilon keeps 0.3 x 10 = 2.9999999999999996 from rounding down to 2
    count = math.floor(eval_user_fraction * len(candidates) + 1e-9)
    if max_eval_users is not None:
        count = min(count, max_eval_users)
    evaluation = _ranked(candidates, seed, "evaluation")[:count]
    validation = _ranked(candidates.difference(evaluation), seed, "validation")[:num_validation_users]
    return evaluation, validation


@dataclass
class HeldOutSplit:
    """The users a training run held out: training read none of their pairs.

    Args:
        evaluation_users: Users to evaluate the adapter on; only these are unseen by both training and the
            validation grids.
        validation_users: Users whose images filled the validation grids during training.
        seed: Seed of the hash that chose them (``held_out_seed`` of the run).
        eval_user_fraction: The fraction of the candidate users asked for evaluation.
        max_eval_users: The cap on the evaluation users (``None``: none).
        candidate_users: Users with a user embedding, among whom both groups were chosen.
        dataset: The training data (``dataset_name`` of the run).
        dataset_split: Its split.
        user_embeddings: The user-embedding table of the run (it holds the held-out users' embeddings too).
        rows: Non-tied dataset rows of each held-out user.

    Examples:
        ```py
        from ppd_diffusers.training import load_held_out_split

        split = load_held_out_split("ppd-adapter")  # the training output folder, or the adapter's Hub repo
        split.evaluation_users[:3], split.rows[split.evaluation_users[0]]
        ```
    """

    evaluation_users: list
    validation_users: list
    seed: int = 0
    eval_user_fraction: float | None = None
    max_eval_users: int | None = None
    candidate_users: int = 0
    dataset: str | None = None
    dataset_split: str | None = None
    user_embeddings: str | None = None
    rows: dict[Any, int] = field(default_factory=dict)

    @property
    def users(self) -> list:
        """Every held-out user: the evaluation users, then the validation users."""
        return [*self.evaluation_users, *self.validation_users]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``held_out_users.json`` (ids keep their type: ints stay ints)."""

        def entries(users: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"user_id": _plain(u), "rows": self.rows.get(u, 0)} for u in users]

        return {
            "format_version": FORMAT_VERSION,
            "seed": self.seed,
            "eval_user_fraction": self.eval_user_fraction,
            "max_eval_users": self.max_eval_users,
            "candidate_users": self.candidate_users,
            "dataset": self.dataset,
            "dataset_split": self.dataset_split,
            "user_embeddings": self.user_embeddings,
            "evaluation_users": entries(self.evaluation_users),
            "validation_users": entries(self.validation_users),
        }

    def save(self, path: str | os.PathLike) -> str:
        """Writes the split to ``path`` (a folder gets ``held_out_users.json``), atomically; returns the file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, HELD_OUT_FILE)
        partial = path + ".tmp"
        with open(partial, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(partial, path)
        return path

    @classmethod
    def from_dict(cls, record: dict[str, Any], source: str = "the record") -> HeldOutSplit:
        """The split of a ``to_dict`` record; ``ValueError`` naming ``source`` when it is not one."""
        version = record.get("format_version") if isinstance(record, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source} is not a held-out split of format {FORMAT_VERSION} (its `format_version` is {version!r}): "
                "it was written by another version of ppd-diffusers, or is not a `held_out_users.json`."
            )
        try:
            groups = {name: record[name] for name in ("evaluation_users", "validation_users")}
            rows = {entry["user_id"]: entry["rows"] for users in groups.values() for entry in users}
            users = {name: [entry["user_id"] for entry in entries] for name, entries in groups.items()}
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source} is malformed: every held-out user needs `user_id` and `rows`.") from error
        keys = ("seed", "eval_user_fraction", "max_eval_users", "candidate_users", "dataset", "dataset_split")
        return cls(**users, **{k: record[k] for k in keys if k in record},
                   user_embeddings=record.get("user_embeddings"), rows=rows)  # fmt: skip


def count_rows_of_users(dataset: Any, users: Iterable[Any]) -> dict[Any, int]:
    """Non-tied rows of each of ``users`` in ``dataset`` (0 for a user without rows); images are not read."""
    wanted = set(users)
    user_ids, labels = _read_columns(dataset, ("user_id", "label_0"))
    counts = Counter(_plain(u) for u, label in zip(user_ids, labels, strict=True) if label != 0.5 and u in wanted)
    return {u: counts.get(u, 0) for u in wanted}


def make_held_out_split(
    dataset: Any,
    draws: Sequence[UserDraw],
    num_validation_users: int = 4,
    eval_user_fraction: float = 0.1,
    max_eval_users: int | None = 500,
    seed: int = 0,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    user_embeddings: str | None = None,
) -> HeldOutSplit:
    """The held-out split of a run: evaluation and validation users among the users of ``draws``.

    Args:
        dataset: The training data (Pick-a-Pic format); only ``user_id`` and ``label_0`` are read, to count
            each held-out user's rows.
        draws: The draws of the user-embedding table; their users are the candidates.
        num_validation_users: See ``choose_held_out_users``.
        eval_user_fraction: See ``choose_held_out_users``.
        max_eval_users: See ``choose_held_out_users``.
        seed: See ``choose_held_out_users``.
        dataset_name: Recorded in the split.
        dataset_split: Recorded in the split.
        user_embeddings: Recorded in the split.

    Returns:
        A ``HeldOutSplit``.
    """
    candidates = {_plain(d.user_id) for d in draws}
    evaluation, validation = choose_held_out_users(
        candidates, num_validation_users, eval_user_fraction, max_eval_users, seed
    )
    return HeldOutSplit(
        evaluation_users=evaluation,
        validation_users=validation,
        seed=seed,
        eval_user_fraction=eval_user_fraction,
        max_eval_users=max_eval_users,
        candidate_users=len(candidates),
        dataset=None if dataset_name is None else os.fspath(dataset_name),
        dataset_split=dataset_split,
        user_embeddings=None if user_embeddings is None else os.fspath(user_embeddings),
        rows=count_rows_of_users(dataset, [*evaluation, *validation]),
    )


def load_held_out_split(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> HeldOutSplit:
    """Reads the held-out split a training run wrote.

    Args:
        name_or_path: The run's output folder (the adapter folder), a ``held_out_users.json`` file, or the
            Hub repo id of an uploaded adapter (``--push_to_hub`` uploads the file with the adapter).
        revision: Revision of the Hub repo.
        token: Hub token (default: the saved login).

    Returns:
        A ``HeldOutSplit``; user ids keep their type (Pick-a-Pic's integers stay integers).

    Raises:
        ValueError: The folder has no ``held_out_users.json`` (an adapter trained before the split was
            written), the path does not exist, or the file is not a held-out split.

    Examples:
        ```py
        from ppd_diffusers.training import load_held_out_split

        users = load_held_out_split("ppd-adapter").evaluation_users  # evaluate on these only
        ```
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, HELD_OUT_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"`name_or_path` {os.fspath(name_or_path)!r} has no {HELD_OUT_FILE}: was it written by "
                "`train_ppd` (adapters trained before ppd-diffusers wrote the split have none)?"
            )
    elif not os.path.isfile(path):
        if path.endswith(".json") or path.startswith((".", os.sep)) or path.count("/") > 1:
            raise ValueError(f"`name_or_path` {path!r} is neither a folder, a file nor a Hub repo id.")
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(path, HELD_OUT_FILE, revision=revision, token=token)
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    return HeldOutSplit.from_dict(record, source=path)
