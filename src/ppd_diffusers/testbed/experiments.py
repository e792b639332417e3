"""The testbed's two experiments: reward-users (the paper's multi-reward table) and random-mixture users.

*Multi-reward*: each reward is one user with an equal share of the preference data; one PPD adapter is
trained on all of them, pooled Diffusion-DPO on the union of their pairs, and one single-reward DPO bound
per reward on that reward's pairs alone, all with the same steps and pairs per step.

*Mixtures*: many users with random signed mixtures of the rewards (and the single-reward users), a few
pairs each; one PPD adapter and pooled DPO with the same steps; held-out users served from 4 pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..adapter import UserAdapter
from .evaluate import (
    bootstrap_ci,
    encode_profiles,
    prompt_colour_hits,
    sample_prompts,
    sample_users,
    standardized_rewards,
    win_rates,
)
from .loop import PairPool, TestbedConfig, UserPairs, user_pairs
from .rewards import REWARDS, SyntheticUser, random_users, single_reward_users
from .shapes import to_pixels
from .training import TrainingJob, train_adapters

if TYPE_CHECKING:
    from ..clip_preference_encoder import CLIPPreferenceEncoder
    from ..pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

__all__ = ["DOMINANT_WEIGHT", "MultiRewardModels", "interpolation", "mixture_experiment", "multi_reward_experiment"]

# a user is "dominated" by one reward when that reward carries more than half of the taste: w_k^2 > 0.5
DOMINANT_WEIGHT = 0.5**0.5


def _no_user(embeds: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """The constant embedding pooled DPO and the bounds are trained with (Diffusion-DPO without a user)."""
    return torch.zeros(rows, *embeds.shape[1:])


def _draw(pool: PairPool, users: list[SyntheticUser], count: int, config: TestbedConfig, rng: np.random.Generator):
    drawn = [user_pairs(pool, u, config.profile_pairs + count, rng, config.tie_margin) for u in users]
    return [d.split(config.profile_pairs)[0] for d in drawn], [d.split(config.profile_pairs)[1] for d in drawn]


def _ppd_and_pooled_jobs(training: list, embeds: torch.Tensor, constant: torch.Tensor, name: str) -> list[TrainingJob]:
    """PPD on the users' own embeddings and pooled DPO (``constant``, ``_no_user``'s row, for all) on the same
    pairs."""
    everyone = constant.expand(len(training), -1, -1)
    return [TrainingJob(training, embeds, f"{name} PPD"), TrainingJob(training, everyone, "pooled DPO")]


def _win_summary(rates: np.ndarray, seed: int) -> dict:
    return {
        "win_rate_mean": float(rates.mean()) if len(rates) else None,
        "win_rate_ci95": bootstrap_ci(rates, np.random.default_rng(seed)) if len(rates) else None,
        "users": len(rates),
    }


@dataclass
class MultiRewardModels:
    """What the multi-reward experiment leaves besides its table.

    Args:
        adapter: The PPD adapter trained for the reward-users.
        embeds: The reward-users' embeddings, in ``REWARDS`` order.
        samples: Per reward-user ``((base latents, reward), (PPD latents, reward))`` of the same seeds.
    """

    adapter: UserAdapter
    embeds: torch.Tensor
    samples: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]


def multi_reward_experiment(
    pipe: PersonalizedStableCascadePipeline,
    pool: PairPool,
    encoder: CLIPPreferenceEncoder,
    config: TestbedConfig,
    rng: np.random.Generator,
) -> tuple[dict, MultiRewardModels]:
    """The paper's multi-reward table in miniature (see the module docstring).

    Args:
        pipe: The testbed's base pipeline (``load_base_pipeline``).
        pool: Base samples with their standardized rewards (``make_pool``).
        encoder: The ``CLIPPreferenceEncoder`` that embeds each reward-user's 4 profile pairs.
        config: ``reward_user_pairs``, ``reward_steps``, ``pairs_per_step`` and ``reward_eval_samples`` size it.
        rng: Draws the pairs.

    Returns:
        The report section: ``per_reward`` (``base``, ``pooled_dpo``, ``ppd``, ``single_reward_dpo`` and
        ``share_of_bound`` per reward), ``ppd_rewards`` (every reward of each reward-user's PPD images),
        ``win_rates`` (PPD against the base per reward-user), ``prompt_colour`` (how often the object still has
        the prompt's colour, in base images and in each reward-user's PPD images) and the budget; and a
        ``MultiRewardModels`` with what the interpolation and the sample grids need (not written to the report).
    """
    users = single_reward_users()
    profiles, training = _draw(pool, users, config.reward_user_pairs, config, rng)
    embeds = encode_profiles(encoder, pool, profiles, config)
    steps = config.reward_steps
    constant = _no_user(embeds)
    jobs = _ppd_and_pooled_jobs(training, embeds, constant, "multi-reward")
    jobs += [TrainingJob([training[k]], constant, f"{u.name} DPO") for k, u in enumerate(users)]
    ppd, pooled, *bounds = train_adapters(pipe, pool, jobs, encoder.embed_dim, config, steps)

    samples = config.reward_eval_samples
    base_latents = sample_users(pipe, config, None, samples=samples)
    base = standardized_rewards(pool, base_latents)
    pipe.load_user_adapter(pooled)
    pooled_rewards = standardized_rewards(pool, sample_users(pipe, config, constant, samples=samples))
    pipe.load_user_adapter(ppd)
    ppd_latents = sample_users(pipe, config, embeds, samples=samples)
    ppd_rewards = standardized_rewards(pool, ppd_latents)
    bound_rewards = []
    for k, adapter in enumerate(bounds):
        pipe.load_user_adapter(adapter)
        latents = sample_users(pipe, config, constant, samples=samples)
        bound_rewards.append(standardized_rewards(pool, latents)[0, :, k])
    pipe.unload_user_adapter()

    per_reward = {}
    for k, name in enumerate(REWARDS):
        row = {
            "base": base[0, :, k].mean().item(),
            "pooled_dpo": pooled_rewards[0, :, k].mean().item(),
            "ppd": ppd_rewards[k, :, k].mean().item(),
            "single_reward_dpo": bound_rewards[k].mean().item(),
        }
        bound_gain = row["single_reward_dpo"] - row["base"]
        row["share_of_bound"] = (row["ppd"] - row["base"]) / bound_gain if bound_gain > 0 else None
        per_reward[name] = row
    wins = win_rates(users, ppd_rewards, base)
    texts = sample_prompts(config, samples)
    fidelity = {"base": prompt_colour_hits(to_pixels(base_latents[0]), texts)}
    fidelity |= {u.name: prompt_colour_hits(to_pixels(ppd_latents[k]), texts) for k, u in enumerate(users)}
    return {
        "steps": steps,
        "pairs_per_step": config.pairs_per_step,
        "pairs_per_user": config.reward_user_pairs,
        "eval_samples": samples,
        "per_reward": per_reward,
        "ppd_rewards": {u.name: ppd_rewards[k].mean(0).tolist() for k, u in enumerate(users)},
        "win_rates": {u.name: float(w) for u, w in zip(users, wins, strict=True)},
        "prompt_colour": fidelity,
    }, MultiRewardModels(
        adapter=ppd,
        embeds=embeds,
        samples={
            u.name: ((base_latents[0], base[0, :, k]), (ppd_latents[k], ppd_rewards[k, :, k]))
            for k, u in enumerate(users)
        },
    )


def mixture_experiment(
    pipe: PersonalizedStableCascadePipeline,
    pool: PairPool,
    encoder: CLIPPreferenceEncoder,
    config: TestbedConfig,
    rng: np.random.Generator,
    embed: Callable[[list[UserPairs]], torch.Tensor] | None = None,
) -> dict:
    """Random-mixture users: PPD and pooled DPO with the same steps, win rates per user group and per axis.

    Args:
        pipe: The testbed's base pipeline.
        pool: Base samples with their standardized rewards.
        encoder: The preference encoder.
        config: ``num_train_users``, ``train_pairs_per_user``, ``num_heldout_users``, ``dpo_steps`` and the
            evaluation sizes.
        rng: Draws the users' weights and pairs.
        embed: Embeds users from their profile pairs, the ``encoder`` by default (``oracles.oracle_embeddings``
            gives embeddings that know more).

    Returns:
        The report section: win-rate summaries (mean, 95 % bootstrap interval, user count) of held-out users,
        held-out users not dominated by one reward (every ``|w_k| <= DOMINANT_WEIGHT``), pooled DPO on the
        same held-out users and training users, plus each single-reward user's win rate and own-reward gain.
    """
    singles = single_reward_users()
    train_users = singles + random_users(config.num_train_users, rng, "train")
    heldout_users = random_users(config.num_heldout_users, np.random.default_rng(config.seed + 1), "heldout")
    profiles, training = _draw(pool, train_users, config.train_pairs_per_user, config, rng)
    heldout_profiles = [user_pairs(pool, u, config.profile_pairs, rng, config.tie_margin) for u in heldout_users]
    if embed is None:

        def embed(users: list[UserPairs]) -> torch.Tensor:
            return encode_profiles(encoder, pool, users, config)

    train_embeds, heldout_embeds = embed(profiles), embed(heldout_profiles)

    steps = config.dpo_steps
    constant = _no_user(train_embeds)
    jobs = _ppd_and_pooled_jobs(training, train_embeds, constant, "mixture")
    ppd, pooled = train_adapters(pipe, pool, jobs, encoder.embed_dim, config, steps)

    evaluated = len(singles) + config.eval_train_users
    base = standardized_rewards(pool, sample_users(pipe, config, None))
    pipe.load_user_adapter(pooled)
    pooled_rewards = standardized_rewards(pool, sample_users(pipe, config, constant))
    pipe.load_user_adapter(ppd)
    ppd_train = standardized_rewards(pool, sample_users(pipe, config, train_embeds[:evaluated]))
    ppd_heldout = standardized_rewards(pool, sample_users(pipe, config, heldout_embeds))
    pipe.unload_user_adapter()

    heldout_wins = win_rates(heldout_users, ppd_heldout, base)
    pooled_wins = win_rates(heldout_users, pooled_rewards.expand(len(heldout_users), -1, -1), base)
    train_wins = win_rates(train_users[:evaluated], ppd_train, base)  # the single-reward users come first
    weights = np.array([u.weights for u in heldout_users])
    mixed = np.abs(weights).max(1) <= DOMINANT_WEIGHT
    evaluated_users = train_users[:evaluated]
    gains = [
        (u.score(mine) - u.score(base[0])).mean().item() for u, mine in zip(evaluated_users, ppd_train, strict=True)
    ]
    return {
        "steps": steps,
        "train_users": {
            **_win_summary(train_wins, config.seed),
            "own_reward_gain_mean": float(np.mean(gains)),
            "win_rates": train_wins.tolist(),
        },
        "heldout_users": {**_win_summary(heldout_wins, config.seed), "win_rates": heldout_wins.tolist()},
        "heldout_mixed_users": _win_summary(heldout_wins[mixed], config.seed),
        "heldout_pooled_dpo": _win_summary(pooled_wins, config.seed),
        "single_reward_users": {u.name: float(w) for u, w in zip(singles, train_wins[: len(singles)], strict=True)},
        "single_reward_gains": {
            u.name: (ppd_train[k, :, k] - base[0, :, k]).mean().item() for k, u in enumerate(singles)
        },
    }


def interpolation(
    pipe: PersonalizedStableCascadePipeline,
    pool: PairPool,
    config: TestbedConfig,
    adapter: UserAdapter,
    embeds: torch.Tensor,
    a: int,
    b: int,
) -> dict:
    """Mean standardized rewards as the embedding moves in a straight line from reward-user ``a`` to ``b``.

    Args:
        pipe: The testbed's base pipeline.
        pool: Base samples (for the reward scaler).
        config: ``interpolation_weights`` points, ``reward_eval_samples`` images each.
        adapter: The multi-reward PPD adapter.
        embeds: The reward-users' embeddings, in ``REWARDS`` order.
        a: Index of the first reward-user.
        b: Index of the second.

    Returns:
        ``users``, ``weights``, each reward's mean per weight, and whether reward ``a`` falls and reward ``b``
        rises monotonically (``monotone``).
    """
    names = list(REWARDS)
    weights = np.linspace(0, 1, config.interpolation_weights).tolist()
    mixed = torch.cat([torch.lerp(embeds[a : a + 1], embeds[b : b + 1], w) for w in weights])
    pipe.load_user_adapter(adapter)
    rewards = standardized_rewards(pool, sample_users(pipe, config, mixed, salt=7, samples=config.reward_eval_samples))
    pipe.unload_user_adapter()
    means = {name: rewards[:, :, k].mean(1).tolist() for k, name in enumerate(names)}
    return {
        "users": [names[a], names[b]],
        "weights": weights,
        "rewards": means,
        "monotone": {
            names[a]: bool(np.all(np.diff(means[names[a]]) <= 0)),
            names[b]: bool(np.all(np.diff(means[names[b]]) >= 0)),
        },
    }
