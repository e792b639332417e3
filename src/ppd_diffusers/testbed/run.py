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
from .evaluate import encode_profiles, identification_probe
from .experiments import interpolation, mixture_experiment, multi_reward_experiment
from .loop import TestbedConfig, make_pool, user_pairs
from .report import write_report
from .rewards import REWARDS, random_users

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
    # "mean": one token averaging [prompt ‖ preferred - rejected] over the 4 pairs
    preference_encoder = CLIPPreferenceEncoder.from_pretrained(str(encoder or ENCODER_DIR), pooling="mean")
    probe = _probe(preference_encoder, pool, config)
    phase_done("pool")

    logger.info("Multi-reward experiment: each reward one user")
    multi, models = multi_reward_experiment(pipe, pool, preference_encoder, config, rng)
    names = list(REWARDS)
    path = interpolation(
        pipe, pool, config, models.adapter, models.embeds, names.index("brightness"), names.index("warmth")
    )
    phase_done("multi_reward")
    logger.info("Mixture experiment: %d training users", config.num_train_users + len(names))
    mixture = mixture_experiment(pipe, pool, preference_encoder, config, rng)
    phase_done("mixtures")

    report = {
        "config": report_config(config),
        "multi_reward": multi,
        "mixtures": mixture,
        "identification_probe": probe,
        "interpolation": path,
        "seconds": time.perf_counter() - start,
        "phase_seconds": phases,
    }
    write_report(report, out, models.samples)
    return report


def report_config(config: TestbedConfig) -> dict:
    """The configuration as a report records it: every field but ``prompts`` (fixed by the domain) and
    ``workers``, which changes how long a run takes, not what it finds."""
    return {k: v for k, v in vars(config).items() if k not in ("prompts", "workers")}


def _probe(encoder, pool, config: TestbedConfig) -> dict:
    """User identification from frozen embeddings (and from the true reward differences, an oracle)."""
    rng = np.random.default_rng(config.seed + 2)
    users = random_users(config.probe_users, rng, "probe")
    draws = [
        user_pairs(pool, u, config.profile_pairs, rng, config.tie_margin)
        for u in users
        for _ in range(config.probe_draws)
    ]
    embeds = encode_profiles(encoder, pool, draws, config).flatten(1)
    oracle = torch.stack([(pool.standardized[d.chosen] - pool.standardized[d.rejected]).flatten() for d in draws])
    return {
        "encoder": identification_probe(embeds, config.probe_draws),
        "oracle_reward_differences": identification_probe(oracle, config.probe_draws),
    }
