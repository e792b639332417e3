"""Training helpers. Imported on demand only: ``import ppd_diffusers`` never loads this package."""

from .dpo_step import ppd_dpo_step
from .pickapic import DrawStats, UserDraw, pair_from_row, sample_user_draws
from .user_embeddings import (
    encode_user_draws,
    load_user_embeddings,
    merge_user_embedding_shards,
    save_user_embeddings,
)

__all__ = [
    "DrawStats",
    "UserDraw",
    "encode_user_draws",
    "load_user_embeddings",
    "merge_user_embedding_shards",
    "pair_from_row",
    "ppd_dpo_step",
    "sample_user_draws",
    "save_user_embeddings",
]
