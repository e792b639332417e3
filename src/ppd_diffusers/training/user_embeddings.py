"""A table of user embeddings with its index: which user, which draw, which dataset rows built each one."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..embedding_cache import UserEmbeddingCache
from ..preference_pairs import PreferencePair, load_rgb_image
from .pickapic import UserDraw, pair_from_row, undecoded_images

__all__ = [
    "EncodedDraws",
    "encode_user_draws",
    "load_user_embeddings",
    "merge_user_embedding_shards",
    "save_user_embeddings",
]

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.json"


@dataclass
class EncodedDraws:
    """What ``encode_user_draws`` returns.

    Args:
        embeddings: ``(len(draws), tokens, width)``, row ``i`` the embedding of ``draws[i]``.
        draws: The draws that were encoded, in their given order.
        unreadable: One record per draw left out because an image of it could not be read: ``user_id``,
            ``draw``, the dataset ``row`` of the first bad pair and the ``error``.
    """

    embeddings: torch.Tensor
    draws: list[UserDraw]
    unreadable: list[dict[str, Any]] = field(default_factory=list)


def encode_user_draws(
    cache: UserEmbeddingCache, dataset: Any, draws: Sequence[UserDraw], batch_size: int = 8, chunk_size: int = 256
) -> EncodedDraws:
    """Embeds each draw (one user's pairs), reading cached users and encoding the rest.

    Images are decoded chunk by chunk (``chunk_size`` users), so memory stays flat over many users. A draw
    with an unreadable image is left out, logged and recorded with its dataset row rather than aborting the
    run (a re-run would fail at the same row again).
    """
    from tqdm.auto import tqdm

    if hasattr(dataset, "features"):  # decode here, so that a corrupt file is ours to catch and name
        dataset, _ = undecoded_images(dataset, ["jpg_0", "jpg_1"])
    chunks, kept, unreadable = [], [], []
    for start in tqdm(range(0, len(draws), chunk_size), desc="User embeddings", disable=len(draws) <= chunk_size):
        users = []
        for draw in draws[start : start + chunk_size]:
            pairs = _readable_pairs(dataset, draw, unreadable, cache.encoder.max_image_side)
            if pairs is not None:
                users.append(pairs)
                kept.append(draw)
        if users:
            chunks.append(cache.encode(users, batch_size=batch_size, show_progress=False))
    for record in unreadable:
        logger.warning("Left out user %r, draw %d: dataset row %d: %s", *record.values())
    empty = torch.empty(0, cache.encoder.num_tokens, cache.encoder.embed_dim)
    return EncodedDraws(torch.cat(chunks) if chunks else empty, kept, unreadable)


def _readable_pairs(
    dataset: Any, draw: UserDraw, unreadable: list[dict[str, Any]], max_side: int | None
) -> list[PreferencePair] | None:
    """The draw's pairs with decoded RGB images, or ``None`` (recorded in ``unreadable``) if one cannot be read."""
    pairs = []
    for row in draw.rows:
        try:
            pair = pair_from_row(dataset[row])
            name = f"dataset row {row}"
            images = tuple(load_rgb_image(image, f"{name} {which}", max_side) for which, image in
                           (("chosen", pair.chosen), ("rejected", pair.rejected)))  # fmt: skip
        except (ValueError, OSError, SyntaxError) as error:
            unreadable.append({"user_id": draw.user_id, "draw": draw.draw, "row": row, "error": str(error)})
            return None
        pairs.append(PreferencePair(pair.prompt, *images))
    return pairs


def save_user_embeddings(
    path: str | os.PathLike, embeddings: torch.Tensor, draws: Sequence[UserDraw], metadata: dict[str, Any]
) -> None:
    """Writes ``path`` (safetensors, ``embeddings``) and ``path + ".index.json"`` (row of each draw)."""
    if embeddings.shape[0] != len(draws):
        raise ValueError(f"`embeddings` has {embeddings.shape[0]} rows for {len(draws)} draws.")
    save_file({"embeddings": embeddings.contiguous()}, os.fspath(path))
    index = {
        **metadata,
        "draws": [{"user_id": d.user_id, "draw": d.draw, "rows": list(d.rows)} for d in draws],
    }
    with open(os.fspath(path) + INDEX_SUFFIX, "w") as f:
        json.dump(index, f)


def load_user_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, list[UserDraw], dict[str, Any]]:
    """Reads what ``save_user_embeddings`` wrote: embeddings, draws (row ``i`` = draw ``i``), metadata."""
    with open(os.fspath(path) + INDEX_SUFFIX) as f:
        index = json.load(f)
    draws = [UserDraw(d["user_id"], d["draw"], tuple(d["rows"])) for d in index.pop("draws")]
    return load_file(os.fspath(path))["embeddings"], draws, index


def merge_user_embedding_shards(shards: Sequence[str | os.PathLike], path: str | os.PathLike) -> dict[str, Any]:
    """Concatenates shard files (in the given order) into one table at ``path``; returns its metadata.

    The metadata is the first shard's, with the ``unreadable`` records of every shard.
    """
    parts = [load_user_embeddings(shard) for shard in shards]
    embeddings = torch.cat([p[0] for p in parts])
    draws = [d for p in parts for d in p[1]]
    metadata = dict(parts[0][2]) if parts else {}
    if any("unreadable" in p[2] for p in parts):
        metadata["unreadable"] = [record for p in parts for record in p[2].get("unreadable", [])]
    save_user_embeddings(path, embeddings, draws, metadata)
    return metadata
