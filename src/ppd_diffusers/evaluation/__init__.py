"""Evaluation of personalized diffusion: reward scorers, personalized judges and win-rate statistics.

Install with ``pip install ppd-diffusers[eval]``. ``import ppd_diffusers`` never imports this package, and
this package imports each scorer's dependencies (open_clip for HPS) only when that scorer is built. See
``docs/guides/evaluation.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it (imported on first use)
_LAZY_NAMES = {
    "RewardScorer": "scorer",
    "SCORERS": "scorer",
    "load_scorer": "scorer",
    "load_reward_scorers": "scorer",
    "parse_reward_model_paths": "scorer",
    "CLIPScorer": "clip_score",
    "PickScoreScorer": "pickscore",
    "AestheticScorer": "aesthetic",
    "HPSv2Scorer": "hps",
    "HeldOutPairsJudge": "heldout_judge",
    "VLMJudge": "vlm_judge",
    "build_judges": "judges",
    "held_out_pairs_judge": "judges",
    "vlm_judge": "judges",
    "EvaluationUser": "users",
    "plan_evaluation_users": "users",
    "JudgeContext": "personalization",
    "evaluate_personalization": "personalization",
    "summarize_records": "report",
    "write_evaluation_report": "report",
    "MultiRewardConfig": "multi_reward_config",
    "reproduce_multi_reward": "multi_reward",
    "ScorerAgreement": "heldout_judge",
    "scorer_agreement": "heldout_judge",
    "mean_of_user_means": "statistics",
    "bootstrap_ci": "statistics",
    "win_rate": "statistics",
    "user_bootstrap_ci": "statistics",
}

__all__ = [
    "AestheticScorer",
    "CLIPScorer",
    "EvaluationUser",
    "HPSv2Scorer",
    "HeldOutPairsJudge",
    "JudgeContext",
    "MultiRewardConfig",
    "PickScoreScorer",
    "RewardScorer",
    "SCORERS",
    "ScorerAgreement",
    "VLMJudge",
    "bootstrap_ci",
    "build_judges",
    "evaluate_personalization",
    "held_out_pairs_judge",
    "load_reward_scorers",
    "load_scorer",
    "mean_of_user_means",
    "parse_reward_model_paths",
    "plan_evaluation_users",
    "reproduce_multi_reward",
    "scorer_agreement",
    "summarize_records",
    "user_bootstrap_ci",
    "vlm_judge",
    "win_rate",
    "write_evaluation_report",
]

if TYPE_CHECKING:
    from .aesthetic import AestheticScorer
    from .clip_score import CLIPScorer
    from .heldout_judge import HeldOutPairsJudge, ScorerAgreement, scorer_agreement
    from .hps import HPSv2Scorer
    from .judges import build_judges, held_out_pairs_judge, vlm_judge
    from .multi_reward import reproduce_multi_reward
    from .multi_reward_config import MultiRewardConfig
    from .personalization import JudgeContext, evaluate_personalization
    from .pickscore import PickScoreScorer
    from .report import summarize_records, write_evaluation_report
    from .scorer import SCORERS, RewardScorer, load_reward_scorers, load_scorer, parse_reward_model_paths
    from .statistics import bootstrap_ci, mean_of_user_means, user_bootstrap_ci, win_rate
    from .users import EvaluationUser, plan_evaluation_users
    from .vlm_judge import VLMJudge


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
