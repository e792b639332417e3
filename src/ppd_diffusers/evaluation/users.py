"""Which held-out users an evaluation serves, and what it shows and asks of each.

For each user: ``num_profile_pairs`` of their non-tied pairs build the user embedding (the same seeded draw as
``sample_user_draws``, so with the seed of ``compute_user_embeddings.py`` it is the draw whose embedding the
trainer stored); their other non-tied pairs that do not leak from the profile (``LeakageIndex``: no profile row,
caption or image uid, since Pick-a-Pic repeats a prompt and its winner over consecutive rows) are their *held-out
choices*, what a judge may learn the user from; and the distinct captions of those pairs are the prompts generated
for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..training.held_out import _plain
from ..training.pickapic import LeakageIndex, UserDraw, _read_columns, normalize_caption, sample_user_draws

__all__ = ["EvaluationUser", "plan_evaluation_users"]


@dataclass(frozen=True)
class EvaluationUser:
    """One held-out user of an evaluation.

    Args:
        user_id: The user.
        profile_rows: Dataset rows of the pairs that build the user's embedding.
        held_out_rows: The user's other non-tied rows that share no caption or image with the profile (their later
            choices).
        prompts: Distinct captions of ``held_out_rows`` in row order, at most ``max_prompts``; generated for them.
        judge_rows: The first of ``held_out_rows`` for each distinct caption: the choices a judge learns the
            user from (consecutive Pick-a-Pic rows of one caption repeat a choice, and are not independent).
    """

    user_id: Any
    profile_rows: tuple[int, ...]
    held_out_rows: tuple[int, ...]
    prompts: tuple[str, ...]
    judge_rows: tuple[int, ...] = ()


def plan_evaluation_users(
    dataset: Any,
    users: Sequence[Any] | None = None,
    num_profile_pairs: int = 4,
    max_prompts: int | None = None,
    max_users: int | None = None,
    seed: int = 0,
    profiles: Mapping[Any, Sequence[int]] | None = None,
) -> list[EvaluationUser]:
    """Plans an evaluation over held-out users of a Pick-a-Pic-format dataset (reads captions, labels and
    users only; no image is decoded).

    Args:
        dataset: A ``datasets.Dataset`` (or a mapping of column name to list) in Pick-a-Pic format.
        users: The users to evaluate, e.g. ``load_held_out_split(adapter).evaluation_users``; ``None`` takes every
            user with enough pairs (only right for a dataset training never read).
        num_profile_pairs: Pairs that build each embedding (the encoder's ``num_pairs``).
        max_prompts: Prompts per user (``None``: all their held-out captions).
        max_users: Evaluate the first this many users with a prompt only (in the order of ``users``).
        seed: Seed of the profile draw; the seed of ``compute_user_embeddings.py`` reproduces its draw.
        profiles: The profile rows of each user, instead of drawing them (e.g. the rows of the draw whose
            embedding ``load_user_embeddings`` gives).

    Returns:
        The users with at least one prompt left, in the order of ``users`` (sorted ids when ``None``).

    Raises:
        ValueError: A requested user has no pairs in the dataset, or too few for a profile; a profile row does
            not exist or belongs to another user (the embeddings were computed on other data).
    """
    if num_profile_pairs < 1:
        raise ValueError(f"`num_profile_pairs` must be positive, got {num_profile_pairs}.")
    for name, value in (("max_prompts", max_prompts), ("max_users", max_users)):
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be a positive integer or None, got {value}.")
    captions, user_ids, labels = _read_columns(dataset, ("caption", "user_id", "label_0"))
    user_ids = [_plain(user) for user in user_ids]  # numpy ids: the same keys and seeds as after a JSON round trip
    draws, stats = sample_user_draws(
        {"user_id": user_ids, "label_0": labels}, num_pairs=num_profile_pairs, draws=1, seed=seed
    )
    profile_of = {draw.user_id: draw.rows for draw in draws}
    if profiles is not None:
        for user, rows in profiles.items():
            for row in rows:
                if not 0 <= row < len(user_ids) or user_ids[row] != _plain(user):
                    owner = "does not exist" if not 0 <= row < len(user_ids) else f"belongs to user {user_ids[row]!r}"
                    raise ValueError(
                        f"The profile of user {user!r} lists dataset row {row}, which {owner}: the embeddings were "
                        "computed on another dataset or split."
                    )
            profile_of[_plain(user)] = tuple(rows)
    if users is None:
        users = [draw.user_id for draw in draws]
    else:
        users = [_plain(user) for user in users]
        for user in users:
            if user not in profile_of:
                pairs = stats.per_user_pairs.get(user, 0)
                raise ValueError(
                    f"User {user!r} has {pairs} non-tied pairs in the dataset, fewer than the "
                    f"{num_profile_pairs} a profile takes"
                    + ("" if pairs else " (is it the split the adapter was trained on, and are ids of the same type?)")
                    + "."
                )
    rows_of: dict[Any, list[int]] = {}
    for row, (user, label) in enumerate(zip(user_ids, labels, strict=True)):
        if label != 0.5:
            rows_of.setdefault(user, []).append(row)
    leakage, planned = LeakageIndex(dataset), []
    for user in users:
        if max_users is not None and len(planned) == max_users:
            break
        profile = profile_of[user]
        held_out = tuple(row for row in rows_of[user] if not leakage.leaks(row, UserDraw(user, 0, profile)))
        first_of_caption: dict[str, int] = {}
        for row in held_out:
            first_of_caption.setdefault(normalize_caption(captions[row]), row)
        rows = list(first_of_caption.values())
        prompts = tuple(str(captions[row]).strip() for row in rows[:max_prompts])
        if prompts:
            planned.append(EvaluationUser(user, tuple(profile), held_out, prompts, tuple(rows)))
    return planned
