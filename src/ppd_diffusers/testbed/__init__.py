"""The synthetic-user testbed: PPD end to end on a miniature Stage C, on a CPU, in minutes.

Run it with ``ppd-diffusers testbed --quick``; see ``docs/guides/testbed.md``.
"""

from .base_model import load_base_pipeline, train_base_model
from .encoder import describe, train_testbed_encoder
from .experiments import MultiRewardModels, interpolation, mixture_experiment, multi_reward_experiment
from .loop import TestbedConfig
from .oracles import ORACLES, mixture_oracles, oracle_embeddings, oracles_markdown
from .rewards import REWARDS, RewardScaler, SyntheticUser, random_users, single_reward_users
from .run import run_testbed
from .scheduler import ClippedDDPMWuerstchenScheduler
from .seeds import run_testbed_seeds, seeds_markdown, summarize_seeds
from .training import StratifiedStageCObjective, TrainingJob, train_adapters

__all__ = [
    "ORACLES",
    "REWARDS",
    "ClippedDDPMWuerstchenScheduler",
    "MultiRewardModels",
    "RewardScaler",
    "StratifiedStageCObjective",
    "SyntheticUser",
    "TestbedConfig",
    "TrainingJob",
    "describe",
    "interpolation",
    "load_base_pipeline",
    "mixture_experiment",
    "mixture_oracles",
    "multi_reward_experiment",
    "oracle_embeddings",
    "oracles_markdown",
    "random_users",
    "run_testbed",
    "run_testbed_seeds",
    "seeds_markdown",
    "single_reward_users",
    "summarize_seeds",
    "train_adapters",
    "train_base_model",
    "train_testbed_encoder",
]
