"""``run_testbed``: the whole synthetic-user experiment, from base samples to the report."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..clip_preference_encoder import CLIPPreferenceEncoder
from .base_model import load_base_pipeline
from .encoder import ENCODER_DIR
from .evaluate import (
    bootstrap_ci,
    encode_profiles,
    identification_probe,
    sample_users,
    standardized_rewards,
    win_rates,
)
from .loop import TestbedConfig, make_pool, train_adapter, user_pairs
from .report import write_report
from .rewards import REWARDS, random_users, single_reward_users

__all__ = ["run_testbed"]

logger = logging.getLogger(__name__)


def run_testbed(
    config: TestbedConfig,
    out_dir: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
) -> dict:
    """Runs the experiment and writes ``report.json``, ``report.md`` and PNG figures to ``out_dir``.

    Args:
        config: Sizes and seed (``TestbedConfig.quick()`` or ``.full()``).
        out_dir: Output folder.
        base_model: A base-model pipeline folder; the shipped one by default.
        encoder: A CLIP checkpoint folder for the ``CLIPPreferenceEncoder``; the shipped tiny one by default.

    Returns:
        The report as a dict (what ``report.json`` holds).
    """
    start = time.perf_counter()
    phases = {}

    def phase_done(name: str) -> None:
        phases[name] = time.perf_counter() - start - sum(phases.values())

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    pipe = load_base_pipeline(base_model)
    phase_done("load")
    logger.info("Sampling the base pool (%d images)", config.pool_per_prompt * len(config.prompts))
    pool = make_pool(pipe, config)
    phase_done("pool")

    # users: the single-reward users train too, so PPD can be read per reward; held-out users never train
    singles = single_reward_users()
    train_users = singles + random_users(config.num_train_users, rng, "train")
    heldout_users = random_users(config.num_heldout_users, np.random.default_rng(config.seed + 1), "heldout")
    drawn = [user_pairs(pool, u, config.profile_pairs + config.train_pairs_per_user, rng) for u in train_users]
    train_profiles = [pairs.split(config.profile_pairs)[0] for pairs in drawn]
    train_pairs = [pairs.split(config.profile_pairs)[1] for pairs in drawn]
    heldout_profiles = [user_pairs(pool, u, config.profile_pairs, rng) for u in heldout_users]

    # "mean": one token averaging [prompt ‖ preferred - rejected] over the 4 pairs
    preference_encoder = CLIPPreferenceEncoder.from_pretrained(str(encoder or ENCODER_DIR), pooling="mean")
    train_embeds = encode_profiles(preference_encoder, pool, train_profiles, config)
    heldout_embeds = encode_profiles(preference_encoder, pool, heldout_profiles, config)
    probe = _probe(preference_encoder, pool, config)
    phase_done("encode")

    constant = torch.zeros(1, *train_embeds.shape[1:])
    embed_dim = preference_encoder.embed_dim
    ppd = train_adapter(pipe, pool, train_pairs, train_embeds, embed_dim, config, "PPD adapter")
    phase_done("train_ppd")
    pooled = train_adapter(pipe, pool, train_pairs, constant.expand(len(train_pairs), -1, -1),
                           embed_dim, config, "pooled DPO", config.pooled_steps)  # fmt: skip
    bounds = [  # skipped when `bound_steps` is 0 (the quick mode)
        train_adapter(pipe, pool, [train_pairs[k]], constant, embed_dim, config, f"{u.name} DPO", config.bound_steps)
        for k, u in enumerate(singles if config.bound_steps > 0 else [])
    ]
    phase_done("train_baselines")

    logger.info("Evaluating")
    base_samples = sample_users(pipe, config, None)
    base = standardized_rewards(pool, base_samples)
    pipe.load_user_adapter(pooled)
    pooled_rewards = standardized_rewards(pool, sample_users(pipe, config, constant))
    pipe.load_user_adapter(ppd)
    evaluated = len(singles) + config.eval_train_users
    ppd_train_samples = sample_users(pipe, config, train_embeds[:evaluated])
    ppd_train = standardized_rewards(pool, ppd_train_samples)
    ppd_heldout = standardized_rewards(pool, sample_users(pipe, config, heldout_embeds))
    interpolation = _interpolation(pipe, pool, config, train_embeds[0:1], train_embeds[2:3])
    bound_rewards = []
    for k, adapter in enumerate(bounds):
        pipe.load_user_adapter(adapter)
        bound_rewards.append(standardized_rewards(pool, sample_users(pipe, config, constant))[0, :, k].mean().item())
    pipe.unload_user_adapter()
    phase_done("evaluate")

    names = list(REWARDS)
    heldout_wins = win_rates(heldout_users, ppd_heldout, base)
    train_wins = win_rates(train_users[:evaluated], ppd_train, base)
    train_gains = [
        (u.score(mine) - u.score(base[0])).mean().item()
        for u, mine in zip(train_users[:evaluated], ppd_train, strict=True)
    ]
    report = {
        "config": {k: v for k, v in vars(config).items() if k != "prompts"},
        "per_reward": {
            name: {
                "base": base[0, :, k].mean().item(),
                "pooled_dpo": pooled_rewards[0, :, k].mean().item(),
                "ppd_single_reward_user": ppd_train[k, :, k].mean().item(),
                "single_reward_dpo": bound_rewards[k] if bound_rewards else None,
            }
            for k, name in enumerate(names)
        },
        "train_users": {
            "win_rate_mean": float(train_wins.mean()),
            "win_rate_ci95": bootstrap_ci(train_wins, np.random.default_rng(config.seed)),
            "own_reward_gain_mean": float(np.mean(train_gains)),
            "win_rates": train_wins.tolist(),
        },
        "heldout_users": {
            "win_rate_mean": float(heldout_wins.mean()),
            "win_rate_ci95": bootstrap_ci(heldout_wins, np.random.default_rng(config.seed)),
            "win_rates": heldout_wins.tolist(),
        },
        "identification_probe": probe,
        "interpolation": interpolation,
        "seconds": time.perf_counter() - start,
        "phase_seconds": phases,
    }
    # each single-reward user's evaluation images, under the base model's images of the same seeds
    grids = {u.name: (base_samples[0], ppd_train_samples[k]) for k, u in enumerate(singles)}
    write_report(report, out, grids)
    return report


def _probe(encoder, pool, config: TestbedConfig) -> dict:
    """User identification from frozen embeddings (and from the true reward differences, an oracle)."""
    rng = np.random.default_rng(config.seed + 2)
    users = random_users(config.probe_users, rng, "probe")
    draws = [user_pairs(pool, u, config.profile_pairs, rng) for u in users for _ in range(config.probe_draws)]
    embeds = encode_profiles(encoder, pool, draws, config).flatten(1)
    oracle = torch.stack([(pool.standardized[d.chosen] - pool.standardized[d.rejected]).flatten() for d in draws])
    return {
        "encoder": identification_probe(embeds, config.probe_draws),
        "oracle_reward_differences": identification_probe(oracle, config.probe_draws),
    }


def _interpolation(pipe, pool, config: TestbedConfig, user_a: torch.Tensor, user_b: torch.Tensor) -> dict:
    """Mean standardized rewards as the embedding moves from user A to user B."""
    weights = np.linspace(0, 1, config.interpolation_weights).tolist()
    mixed = torch.cat([torch.lerp(user_a, user_b, w) for w in weights])
    rewards = standardized_rewards(pool, sample_users(pipe, config, mixed, salt=7))
    return {
        "users": ["brightness", "warmth"],
        "weights": weights,
        "rewards": {name: rewards[:, :, k].mean(1).tolist() for k, name in enumerate(REWARDS)},
    }
