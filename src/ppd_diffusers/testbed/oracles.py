"""What holds the held-out users back: the mixture experiment with embeddings that know more than the encoder.

The held-out users are served from 4 pairs through the testbed's encoder. Two oracles take the encoder's place
(the guide's diagnosis, step 15):

- ``"reward_differences"``: the mean standardized reward difference (preferred minus rejected) of the user's own
  profile pairs, what a perfect perception of the same pairs could give;
- ``"true_weights"``: the user's weights, a perfect knowledge of the user.

Everything else (pool, users, pairs, training, evaluation) is the same as the encoder's run on that seed, so
the gaps between the three say what the encoder costs, what the 4 pairs cost, and what is left to the adapter.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

from ..clip_preference_encoder import CLIPPreferenceEncoder
from .base_model import load_base_pipeline
from .encoder import ENCODER_DIR
from .evaluate import encode_profiles
from .experiments import mixture_experiment
from .loop import PairPool, TestbedConfig, UserPairs, make_pool
from .report import _ci

__all__ = ["ORACLES", "mixture_oracles", "oracle_embeddings", "oracles_markdown"]

ORACLES = ("reward_differences", "true_weights")


def oracle_embeddings(
    pool: PairPool,
    profiles: list[UserPairs],
    kind: Literal["reward_differences", "true_weights"],
    like: torch.Tensor,
) -> torch.Tensor:
    """One oracle embedding per user, shaped like the encoder's so the same adapter class takes it.

    Args:
        pool: The base samples the profile pairs index (their standardized rewards).
        profiles: Each user's profile pairs.
        kind: ``"reward_differences"`` (the mean over the user's pairs of the preferred image's standardized
            rewards minus the rejected one's) or ``"true_weights"`` (the user's reward weights).
        like: The encoder's embeddings of the same users, ``(users, tokens, width)`` with ``width`` at least the
            number of rewards.

    Returns:
        Zeros shaped like ``like`` with each user's vector, scaled to the mean norm of ``like``'s rows, in the
        first entries of its first token.
    """
    if kind == "reward_differences":
        rewards = pool.standardized
        vectors = torch.stack([(rewards[p.chosen] - rewards[p.rejected]).mean(0) for p in profiles])
    elif kind == "true_weights":
        vectors = torch.tensor(np.array([p.user.weights for p in profiles]), dtype=torch.float32)
    else:
        raise ValueError(f"`kind` must be one of {ORACLES}, got {kind!r}.")
    if like.ndim != 3 or like.shape[0] != len(profiles) or like.shape[-1] < vectors.shape[1]:
        raise ValueError(
            f"`like` must be (users={len(profiles)}, tokens, width >= {vectors.shape[1]}), got {tuple(like.shape)}."
        )
    # the adapter's LayerNorm takes away the scale, but its projection's bias does not: match the encoder's norm
    norm = like.flatten(1).norm(dim=1).mean()
    out = torch.zeros_like(like)
    out[:, 0, : vectors.shape[1]] = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
    return out


def mixture_oracles(
    config: TestbedConfig,
    kinds: tuple[str, ...] = ("encoder", *ORACLES),
    base_model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
) -> dict[str, dict]:
    """The mixture experiment once per kind of user embedding, on the same pool, users and pairs.

    Args:
        config: The testbed configuration (``TestbedConfig.quick(seed)`` or ``.full(seed)``).
        kinds: ``"encoder"`` (the testbed's own embeddings) and any of ``ORACLES``. Every kind draws its users
            and pairs from a generator seeded afresh, so they differ from those of ``run_testbed``'s report on
            the same seed (which draws the multi-reward experiment's first).
        base_model: As ``run_testbed``'s.
        encoder: As ``run_testbed``'s.

    Returns:
        ``mixture_experiment``'s report section by kind.
    """
    unknown = set(kinds) - {"encoder", *ORACLES}
    if unknown or not kinds:
        raise ValueError(f"`kinds` must be among {('encoder', *ORACLES)}, got {kinds!r}.")
    torch.manual_seed(config.seed)
    pipe = load_base_pipeline(base_model)
    pool = make_pool(pipe, config)
    preference_encoder = CLIPPreferenceEncoder.from_pretrained(str(encoder or ENCODER_DIR), pooling="mean")
    results = {}
    for kind in kinds:

        def embed(profiles: list[UserPairs], kind: str = kind) -> torch.Tensor:
            encoded = encode_profiles(preference_encoder, pool, profiles, config)
            return encoded if kind == "encoder" else oracle_embeddings(pool, profiles, kind, like=encoded)

        # the same generator state for every kind: the same users and pairs
        rng = np.random.default_rng(config.seed)
        results[kind] = mixture_experiment(pipe, pool, preference_encoder, config, rng, embed=embed)
    return results


def oracles_markdown(results: dict[str, dict]) -> str:
    """``mixture_oracles``' results as a markdown table, a row per kind of embedding: the win rates (95 %
    intervals) of held-out users and of those not dominated by one reward, and each single-reward user's."""
    lines = [
        "| embedding | held-out users | not dominated by one reward | single-reward users: "
        + " / ".join(next(iter(results.values()))["single_reward_users"])
        + " |",
        "|---|---|---|---|",
    ]
    for kind, section in results.items():
        singles = " / ".join(f"{100 * w:.0f}" for w in section["single_reward_users"].values())
        lines.append(
            f"| {kind} | {_ci(section['heldout_users'])} | {_ci(section['heldout_mixed_users'])} | {singles} % |"
        )
    return "\n".join(lines) + "\n"
