"""A table of user embeddings with its index: which user, which draw, which dataset rows built each one."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..embedding_cache import UserEmbeddingCache
from .pickapic import UserDraw, pair_from_row

__all__ = ["encode_user_draws", "load_user_embeddings", "merge_user_embedding_shards", "save_user_embeddings"]

INDEX_SUFFIX = ".index.json"


def encode_user_draws(
    cache: UserEmbeddingCache, dataset: Any, draws: Sequence[UserDraw], batch_size: int = 8, chunk_size: int = 256
) -> torch.Tensor:
    """Embeddings ``(len(draws), tokens, width)`` of the draws, reading cached users, encoding the rest.

    Images are decoded chunk by chunk (``chunk_size`` users), so memory stays flat over many users.
    """
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(draws), chunk_size), desc="User embeddings", disable=len(draws) <= chunk_size):
        users = [[pair_from_row(dataset[row]) for row in draw.rows] for draw in draws[start : start + chunk_size]]
        chunks.append(cache.encode(users, batch_size=batch_size, show_progress=False))
    if not chunks:
        return torch.empty(0, cache.encoder.num_tokens, cache.encoder.embed_dim)
    return torch.cat(chunks)


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


def merge_user_embedding_shards(shards: Sequence[str | os.PathLike], path: str | os.PathLike) -> None:
    """Concatenates shard files (in the given order) into one table at ``path``."""
    parts = [load_user_embeddings(shard) for shard in shards]
    embeddings = torch.cat([p[0] for p in parts])
    draws = [d for p in parts for d in p[1]]
    save_user_embeddings(path, embeddings, draws, parts[0][2] if parts else {})
