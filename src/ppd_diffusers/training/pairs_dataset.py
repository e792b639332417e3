"""Training pairs of a Pick-a-Pic-format dataset, each joined with the embedding of its user.

Which rows train: a row is a training pair of its user when it is not a tie, its user is not held out and
has a user embedding (users with fewer non-tied pairs than the encoder takes have none, see
``sample_user_draws``), and it does not leak from the embedding it is joined with: it is not one of the
pairs that built it and shares neither a caption nor an image with them (see ``LeakageIndex``; that would
let the adapter read the answer off its input). With several draws per user, a row is joined with one of
the draws it does not leak from, chosen from the row and the seed only, so the join is the same in every
process and epoch; a row that leaks from every draw of its user is dropped and counted.

Unreadable images never stop a run: the example falls through to the next readable row (so batches keep
their size, which DDP needs; that row is then seen twice in the epoch) and reports in ``skipped`` how many
unreadable rows it read on the way; the collate sums them, so the count survives ``DataLoader`` workers and
the trainer can reduce it over processes. The count is of reads: an unreadable row counts once per epoch,
and again when the row before it is also unreadable.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from ..preference_pairs import load_rgb_image
from .pickapic import LeakageIndex, UserDraw, _read_columns, stable_seed, undecoded_images

__all__ = ["PairStats", "PreferencePairsDataset", "collate_preference_pairs"]

logger = logging.getLogger(__name__)

LATENT_COLUMNS = ("latents_0", "latents_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")


@dataclass
class PairStats:
    """How ``PreferencePairsDataset`` sorted the rows of the dataset.

    Args:
        rows: Rows in the dataset.
        ties: Tied rows (``label_0 == 0.5``), dropped.
        rows_without_user_embedding: Non-tied rows of users with no embedding (too few pairs), dropped.
        held_out_rows: Non-tied rows of held-out users (``exclude_users``), dropped.
        profile_rows: Rows that built one of their user's embeddings and leak from each of the others (with
            one draw per user: the rows of the draw), dropped.
        leaking_rows: Rows that built no embedding but share a caption or an image with every draw of their
            user (Pick-a-Pic repeats a winner over the rows of a prompt), dropped.
        pairs: Training pairs kept.
        users: Users with at least one training pair.
        compared_image_uids: Whether rows were compared by image uid too; False when the dataset has no
            ``image_0_uid`` / ``image_1_uid`` columns (then by row and caption only).

    Examples:
        ```py
        PreferencePairsDataset(dataset, embeddings, draws, exclude_users=["user1", "user6"]).stats
        # PairStats(rows=88, ties=8, rows_without_user_embedding=0, held_out_rows=20, profile_rows=24,
        #           leaking_rows=0, pairs=36, users=6, compared_image_uids=True)
        ```
    """

    rows: int = 0
    ties: int = 0
    rows_without_user_embedding: int = 0
    held_out_rows: int = 0
    profile_rows: int = 0
    leaking_rows: int = 0
    pairs: int = 0
    users: int = 0
    compared_image_uids: bool = False


class PreferencePairsDataset(Dataset):
    """Map-style dataset of training pairs: preferred image first, with the user's embedding.

    Each example is a dict with ``caption``, ``user_embeds`` ``(tokens, width)``, ``user_id``, ``row`` (the
    dataset row) and ``skipped`` (unreadable rows read to reach it), plus either ``latents_chosen`` /
    ``latents_rejected`` (when the dataset has the ``latents_0``/``latents_1`` columns written by
    ``add_stage_c_latents``) or ``pixels_chosen`` / ``pixels_rejected`` (``image_transform`` of the
    decoded images).

    Args:
        dataset: A ``datasets.Dataset`` (or anything indexable by row and by column name) in Pick-a-Pic format.
        user_embeddings: ``(draws, tokens, width)`` table from ``load_user_embeddings``.
        draws: The draw of each row of ``user_embeddings`` (which user, which dataset rows built it).
        image_transform: Turns a decoded RGB ``PIL.Image`` into the tensor the image encoder takes; needed
            unless the dataset has precomputed latents.
        exclude_users: Users left out of training (held out for evaluation and validation).
        seed: Chooses, for users with several draws, which embedding each row is joined with.

    Raises:
        ValueError: The table and the draws disagree, a draw points outside the dataset or at another
            user's row, or images must be decoded and ``image_transform`` is missing.

    Examples:
        ```py
        from ppd_diffusers.stage_c_image_encoder import preprocess_images
        from ppd_diffusers.training import PreferencePairsDataset, collate_preference_pairs, load_user_embeddings

        embeddings, draws, _ = load_user_embeddings("user_embeddings/user_embeddings.safetensors")
        to_pixels = lambda image: preprocess_images([image], height=1024, width=1024)[0]  # noqa: E731
        pairs = PreferencePairsDataset(dataset, embeddings, draws, image_transform=to_pixels)
        loader = torch.utils.data.DataLoader(pairs, batch_size=4, shuffle=True, collate_fn=collate_preference_pairs)
        ```
    """

    def __init__(
        self,
        dataset: Any,
        user_embeddings: torch.Tensor,
        draws: Sequence[UserDraw],
        image_transform: Callable[[PIL.Image.Image], torch.Tensor] | None = None,
        exclude_users: Sequence[Any] = (),
        seed: int = 0,
    ):
        if user_embeddings.ndim != 3 or user_embeddings.shape[0] != len(draws):
            raise ValueError(
                f"`user_embeddings` must be (draws, tokens, width) with one row per draw ({len(draws)}), got "
                f"shape {tuple(user_embeddings.shape)}."
            )
        columns = getattr(dataset, "column_names", None) or list(dataset.keys())
        self.precomputed_latents = all(c in columns for c in LATENT_COLUMNS)
        dataset = _without_decoding(dataset, self.precomputed_latents)
        if not self.precomputed_latents and image_transform is None:
            raise ValueError(
                "The dataset has no precomputed `latents_0`/`latents_1` columns, so images are decoded: pass an "
                "`image_transform` (e.g. one image through `preprocess_images`), or precompute the latents with "
                "`add_stage_c_latents`."
            )
        needed = ["caption", "label_0", "user_id", *(LATENT_COLUMNS if self.precomputed_latents else IMAGE_COLUMNS)]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"The dataset has no {', '.join(f'`{c}`' for c in missing)} column: training pairs need "
                f"{', '.join(needed)} (or `latents_0`/`latents_1` instead of the images); it has {sorted(columns)}."
            )
        self.dataset = dataset
        self.user_embeddings = user_embeddings
        self.draws = list(draws)
        self.image_transform = image_transform
        self.rows, self.embedding_of_row, self.stats = self._plan(dataset, set(exclude_users), seed)

    def _plan(self, dataset: Any, exclude: set, seed: int) -> tuple[np.ndarray, np.ndarray, PairStats]:
        user_ids, labels = _read_columns(dataset, ("user_id", "label_0"))
        draws_of_user: dict[Any, list[int]] = defaultdict(list)
        for index, draw in enumerate(self.draws):
            for row in draw.rows:
                if not 0 <= row < len(labels) or user_ids[row] != draw.user_id:
                    raise ValueError(
                        f"`draws[{index}]` (user {draw.user_id!r}) lists dataset row {row}, which "
                        + ("does not exist" if not 0 <= row < len(labels) else f"belongs to user {user_ids[row]!r}")
                        + ": the embeddings were computed on another dataset or split."
                    )
            draws_of_user[draw.user_id].append(index)
        leakage = LeakageIndex(dataset)
        stats = PairStats(rows=len(labels), compared_image_uids=leakage.uses_image_uids)
        if not leakage.uses_image_uids:
            logger.info("The dataset has no `image_0_uid`/`image_1_uid` columns: leaking rows are found by caption.")
        rows, embedding_of_row, users, self._user_of_pair = [], [], set(), []
        for row, (user_id, label) in enumerate(zip(user_ids, labels, strict=True)):
            if label == 0.5:
                stats.ties += 1
                continue
            if user_id in exclude:
                stats.held_out_rows += 1
                continue
            own = draws_of_user.get(user_id)
            if not own:
                stats.rows_without_user_embedding += 1
                continue
            allowed = [i for i in own if not leakage.leaks(row, self.draws[i])]
            if not allowed:
                if any(row in self.draws[i].rows for i in own):
                    stats.profile_rows += 1
                else:
                    stats.leaking_rows += 1
                continue
            rows.append(row)
            self._user_of_pair.append(user_id)
            embedding_of_row.append(allowed[stable_seed(seed, row) % len(allowed)])
            users.add(user_id)
        stats.pairs, stats.users = len(rows), len(users)
        return np.asarray(rows, dtype=np.int64), np.asarray(embedding_of_row, dtype=np.int64), stats

    def __len__(self) -> int:
        return len(self.rows)

    def users_of(self, indices: Sequence[int]) -> list:
        """The user of each of the given training pairs."""
        return [self._user_of_pair[i] for i in indices]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Training pair {index} out of range: the dataset has {len(self)}.")
        index %= len(self)
        for skipped in range(len(self)):
            position = (index + skipped) % len(self)
            example = self._example(position)
            if example is not None:
                example["skipped"] = skipped
                return example
        raise RuntimeError("No row of the dataset has readable images.")

    def _example(self, position: int) -> dict[str, Any] | None:
        row_index = int(self.rows[position])
        row = self.dataset[row_index]
        # label_0 == 1: image 0 is preferred
        first, second = ("0", "1") if row["label_0"] == 1 else ("1", "0")
        example = {
            "caption": row["caption"],
            "user_embeds": self.user_embeddings[self.embedding_of_row[position]],
            "user_id": row["user_id"],
            "row": row_index,
        }
        if self.precomputed_latents:
            if not row.get("latents_ok", True):
                logger.warning("Skipping dataset row %d: its images could not be encoded.", row_index)
                return None
            example["latents_chosen"] = torch.as_tensor(np.asarray(row[f"latents_{first}"]))
            example["latents_rejected"] = torch.as_tensor(np.asarray(row[f"latents_{second}"]))
            return example
        try:
            chosen = load_rgb_image(row[f"jpg_{first}"], f"row {row_index} jpg_{first}")
            rejected = load_rgb_image(row[f"jpg_{second}"], f"row {row_index} jpg_{second}")
        except Exception as error:  # PIL's decoders raise assorted types on malformed files: none may stop a run
            logger.warning("Skipping dataset row %d: %s", row_index, error)
            return None
        example["pixels_chosen"] = self.image_transform(chosen)
        example["pixels_rejected"] = self.image_transform(rejected)
        return example


def _without_decoding(dataset: Any, precomputed_latents: bool) -> Any:
    """The columns training reads, images as raw bytes (so a corrupt file is caught here, not in ``datasets``)."""
    if not hasattr(dataset, "cast_column"):
        return dataset
    images = [c for c in IMAGE_COLUMNS if c in dataset.column_names]
    if precomputed_latents:
        # numpy arrays of the stored dtype, not nested Python lists; the images are not needed
        return dataset.remove_columns(images).with_format(
            "numpy", columns=list(LATENT_COLUMNS), output_all_columns=True
        )
    return undecoded_images(dataset, images)[0]


def collate_preference_pairs(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks ``PreferencePairsDataset`` examples into a batch; ``skipped`` becomes the batch's total.

    Tensors are stacked along a new first dimension; ``caption``, ``user_id`` and ``row`` stay lists.

    Examples:
        >>> import torch
        >>> examples = [{"caption": c, "user_embeds": torch.ones(1, 8), "skipped": n} for c, n in zip("ab", (0, 2))]
        >>> batch = collate_preference_pairs(examples)
        >>> batch["caption"], tuple(batch["user_embeds"].shape), batch["skipped"]
        (['a', 'b'], (2, 1, 8), 2)
    """
    batch: dict[str, Any] = {"skipped": sum(e["skipped"] for e in examples)}
    for key in examples[0]:
        if key == "skipped":
            continue
        values = [e[key] for e in examples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
