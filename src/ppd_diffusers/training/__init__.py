"""Training helpers. Imported on demand only: ``import ppd_diffusers`` never loads this package."""

from .arguments import PPDTrainingArguments
from .dpo_step import ppd_dpo_step
from .held_out import HeldOutSplit, load_held_out_split, make_held_out_split
from .latents import add_stage_c_latents, count_unreadable_rows
from .model_card import adapter_model_card
from .objectives import DPOObjective, FluxObjective, SDXLObjective, StageCObjective, objective_for
from .pairs_dataset import PairStats, PreferencePairsDataset, collate_preference_pairs
from .pickapic import (
    DrawStats,
    LeakageIndex,
    UserDraw,
    load_pickapic_dataset,
    pair_from_row,
    sample_user_draws,
)
from .trainer import TrainingResult, train_ppd
from .user_embeddings import (
    EncodedDraws,
    encode_user_draws,
    load_user_embeddings,
    merge_user_embedding_shards,
    save_user_embeddings,
)
from .validation import validation_grid

__all__ = [
    "DPOObjective",
    "DrawStats",
    "FluxObjective",
    "HeldOutSplit",
    "LeakageIndex",
    "PPDTrainingArguments",
    "PairStats",
    "SDXLObjective",
    "StageCObjective",
    "PreferencePairsDataset",
    "TrainingResult",
    "UserDraw",
    "adapter_model_card",
    "add_stage_c_latents",
    "collate_preference_pairs",
    "count_unreadable_rows",
    "EncodedDraws",
    "encode_user_draws",
    "load_held_out_split",
    "load_pickapic_dataset",
    "load_user_embeddings",
    "make_held_out_split",
    "merge_user_embedding_shards",
    "objective_for",
    "pair_from_row",
    "ppd_dpo_step",
    "sample_user_draws",
    "save_user_embeddings",
    "train_ppd",
    "validation_grid",
]
