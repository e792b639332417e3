"""The PPD loop of the testbed with the library's own classes.

Base samples -> pairs labelled by each synthetic user's judge -> a ``CLIPPreferenceEncoder`` embedding
from 4 of a user's pairs -> one ``UserAdapter`` trained for all training users with ``ppd_dpo_step`` ->
generation with ``PersonalizedStableCascadePipeline``. Baselines use the same adapter class and step:
"pooled DPO" trains it with one constant embedding on every training user's pairs (Diffusion-DPO without
a user), a "single-reward DPO" bound trains it on one single-reward user's pairs only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import PIL.Image
import torch

from .base_model import IMAGE_SIZE
from .rewards import RewardScaler, SyntheticUser, reward_matrix
from .shapes import prompts, to_pixels

__all__ = ["PairPool", "TestbedConfig", "UserPairs", "generate", "make_pool", "user_pairs"]

logger = logging.getLogger(__name__)


@dataclass
class TestbedConfig:
    """Sizes and hyperparameters of one testbed run.

    ``quick()`` is the README's configuration (about 6 minutes on 2 CPU cores); ``full()`` has more pairs,
    steps and evaluation images (about 19 minutes). Every field can be changed with ``dataclasses.replace``;
    the comments beside the fields say why the defaults are what they are, and where they differ from the
    Pick-a-Pic trainer's defaults (see also docs/guides/testbed.md).

    Examples:
        >>> from dataclasses import replace
        >>> replace(TestbedConfig.quick(seed=3), dpo_steps=400).dpo_steps
        400
    """

    __test__ = False  # not a pytest test class, whatever its name

    seed: int = 0
    pool_per_prompt: int = 16
    sample_steps: int = 6
    guidance_scale: float = 3.0
    # pipeline default None (= the prompt's scale, 3): the user term amplified 3x drew noise that games the
    # rewards on an untuned seed (the guide's diagnosis, step 12); at 1 the images keep their object
    user_guidance_scale: float | None = 1.0
    profile_pairs: int = 4
    # pairs the judge scores within this many of its within-prompt standard deviations are ties, dropped as
    # Diffusion-DPO drops Pick-a-Pic's ties (0 keeps every pair; the guide's diagnosis compares both)
    tie_margin: float = 1.0
    pairs_per_step: int = 16
    # trainer: 1e-5 for a 768-wide adapter on a 3.6B model over thousands of steps; here a 32-wide adapter
    # has tens of steps (the guide's diagnosis: 1e-3 left the saturation reward-user below the base, 6e-3 drew
    # noise)
    learning_rate: float = 3e-3
    beta: float = 500.0  # trainer: 5000; the guide's diagnosis compares both at this budget
    user_dropout: float = 0.0  # as the trainer: the null user is the adapter off, a dropped pair teaches nothing
    # trainer: constant. Min-SNR damps the low-noise steps, where pairs differ only in noise-like detail
    timestep_weighting: Literal["constant", "min_snr"] = "min_snr"
    # one timestep per stratum of [0, 1) across a step's pairs instead of independent draws: less gradient noise
    stratified_timesteps: bool = True
    # evaluate an exponential moving average of the adapter's weights (0: the last step's weights)
    ema_decay: float = 0.9
    # adapters trained side by side, each single-threaded (see testbed/training.py; results do not depend on it)
    workers: int = 2
    num_user_tokens: int = 2  # trainer: 4 tokens of 768; a 64-channel UNet needs far less
    user_token_dim: int = 32
    # the multi-reward experiment: each reward one user; PPD, pooled DPO and each bound get `reward_steps`
    reward_user_pairs: int = 64
    reward_steps: int = 40
    reward_eval_samples: int = 24  # per reward-user, spread over the prompts
    # the mixture experiment: many users, few pairs each (the adapter must generalize across embeddings)
    num_train_users: int = 192
    num_heldout_users: int = 48
    train_pairs_per_user: int = 8
    dpo_steps: int = 100  # PPD and pooled DPO alike
    eval_samples_per_user: int = 8  # spread evenly over the prompts; many users, few images: the CI is over users
    eval_train_users: int = 12  # random training users evaluated besides the single-reward ones
    probe_users: int = 48
    probe_draws: int = 4
    interpolation_weights: int = 5
    prompts: list[str] = field(default_factory=prompts)

    def __post_init__(self) -> None:
        # a wrong value would otherwise run for minutes and fail far away, or not at all (a negative tie margin
        # keeps every pair, a decay of 1 evaluates the initial adapter)
        problems = [
            f"`{name}` must be an integer >= {low}, got {getattr(self, name)!r}"
            for name, low in _AT_LEAST.items()
            if not _int_at_least(getattr(self, name), low)
        ]
        ranges = {
            "tie_margin": self.tie_margin >= 0,
            "learning_rate": self.learning_rate > 0,
            "beta": self.beta > 0,
            "guidance_scale": self.guidance_scale >= 0,
            "user_guidance_scale": self.user_guidance_scale is None or self.user_guidance_scale >= 0,
            "user_dropout": 0 <= self.user_dropout < 1,
            "ema_decay": 0 <= self.ema_decay < 1,
            "timestep_weighting": self.timestep_weighting in ("constant", "min_snr"),
            "prompts": len(self.prompts) > 0,
        }
        problems += [f"`{name}` is out of range: {getattr(self, name)!r}" for name, ok in ranges.items() if not ok]
        if problems:
            raise ValueError(
                "TestbedConfig: " + "; ".join(problems) + " (tie_margin >= 0, learning_rate and beta > 0, "
                "guidance scales >= 0, 0 <= user_dropout < 1, 0 <= ema_decay < 1, timestep_weighting 'constant' "
                "or 'min_snr', at least one prompt)."
            )

    @classmethod
    def quick(cls, seed: int = 0) -> TestbedConfig:
        return cls(seed=seed)

    @classmethod
    def full(cls, seed: int = 0) -> TestbedConfig:
        return cls(
            seed=seed, pool_per_prompt=32, sample_steps=12, reward_user_pairs=192, reward_steps=100,
            reward_eval_samples=48, num_train_users=384, num_heldout_users=48, train_pairs_per_user=16,
            dpo_steps=300, eval_samples_per_user=12, eval_train_users=28, probe_users=96, interpolation_weights=7,
        )  # fmt: skip


# the integer fields and their least values: counts of at least 1, except those that may be switched off
_AT_LEAST = dict(
    seed=0, pool_per_prompt=2, sample_steps=1, profile_pairs=1, pairs_per_step=1, workers=1, num_user_tokens=1,
    user_token_dim=1, reward_user_pairs=1, reward_steps=1, reward_eval_samples=1, num_train_users=1,
    num_heldout_users=1, train_pairs_per_user=1, dpo_steps=1, eval_samples_per_user=1, eval_train_users=0,
    probe_users=2, probe_draws=2, interpolation_weights=2,
)  # fmt: skip


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# candidate batches `user_pairs` draws before it gives up on finding enough pairs that are not ties
_MAX_DRAWS = 50


def generate(
    pipe, prompt_list: list[str], seeds: list[int], config: TestbedConfig, user_embeds: torch.Tensor | None = None,
    batch_size: int = 96,
) -> torch.Tensor:  # fmt: skip
    """Latents of one sample per prompt (seeded per sample, so a sample does not depend on its batch)."""
    out = []
    for start in range(0, len(prompt_list), batch_size):
        chunk = slice(start, start + batch_size)
        users = {}
        if user_embeds is not None:
            users = {"user_embeds": user_embeds[chunk], "user_guidance_scale": config.user_guidance_scale}
        out.append(
            pipe(
                prompt_list[chunk],
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                num_inference_steps=config.sample_steps,
                guidance_scale=config.guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds[chunk]],
                output_type="latent",
                **users,
            ).images
        )
    return torch.cat(out)


@dataclass
class PairPool:
    """Base samples grouped by prompt, with their standardized rewards."""

    latents: torch.Tensor  # (prompts * per_prompt, 3, 16, 16)
    prompt_index: np.ndarray  # prompt of each sample
    standardized: torch.Tensor  # (samples, rewards)
    scaler: RewardScaler

    def images(self, index) -> list[PIL.Image.Image]:
        pixels = to_pixels(self.latents[index]).permute(0, 2, 3, 1).numpy()
        return [PIL.Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def make_pool(pipe, config: TestbedConfig) -> PairPool:
    """Samples ``pool_per_prompt`` base images per prompt and fits the reward scaler on them."""
    prompt_index = np.repeat(np.arange(len(config.prompts)), config.pool_per_prompt)
    seeds = [config.seed * 1_000_003 + i for i in range(len(prompt_index))]
    latents = generate(pipe, [config.prompts[i] for i in prompt_index], seeds, config)
    raw = reward_matrix(to_pixels(latents))
    scaler = RewardScaler.fit(raw)
    return PairPool(latents, prompt_index, scaler(raw), scaler)


@dataclass
class UserPairs:
    """A user's labelled pairs: indices into the pool, preferred first."""

    user: SyntheticUser
    chosen: np.ndarray
    rejected: np.ndarray

    def split(self, profile: int) -> tuple[UserPairs, UserPairs]:
        """The first ``profile`` pairs (shown to the encoder) and the rest (training)."""
        head, tail = slice(0, profile), slice(profile, None)
        return (
            UserPairs(self.user, self.chosen[head], self.rejected[head]),
            UserPairs(self.user, self.chosen[tail], self.rejected[tail]),
        )


def user_pairs(
    pool: PairPool, user: SyntheticUser, count: int, rng: np.random.Generator, tie_margin: float = 0.0
) -> UserPairs:
    """``count`` random same-prompt pairs from the pool, labelled by the user's judge.

    Pairs whose two images the user scores within ``tie_margin`` standard deviations of each other are ties
    and are not kept (Pick-a-Pic records ties, and Diffusion-DPO drops them): they tell the encoder and the DPO
    step almost nothing about the taste. The deviation is the spread of the user's score within a prompt,
    which is what a same-prompt pair can differ by (a margin of 1 leaves about half of the pairs, whatever
    the taste). Candidates are drawn until ``count`` pairs are not ties.
    """
    per_prompt = np.bincount(pool.prompt_index)
    starts_of = np.concatenate([[0], np.cumsum(per_prompt)[:-1]])
    scores = user.score(pool.standardized)
    prompt_means = torch.from_numpy(np.bincount(pool.prompt_index, scores.numpy()) / per_prompt).to(scores.dtype)
    threshold = tie_margin * (scores - prompt_means[pool.prompt_index]).std().item()
    kept_a, kept_b, kept = [], [], 0
    for _ in range(_MAX_DRAWS):
        prompt = rng.integers(0, len(per_prompt), count)
        starts = starts_of[prompt]
        a = starts + rng.integers(0, per_prompt[prompt])
        b = starts + (a - starts + rng.integers(1, per_prompt[prompt])) % per_prompt[prompt]
        clear = ((scores[a] - scores[b]).abs() > threshold).numpy() if tie_margin > 0 else np.ones(count, bool)
        kept_a.append(a[clear])
        kept_b.append(b[clear])
        kept += int(clear.sum())
        if kept >= count:
            break
    else:
        raise ValueError(
            f"user {user.name!r}: fewer than {count} of {_MAX_DRAWS * count} random pairs are not ties (a score "
            f"difference above {threshold:.3g}); lower tie_margin or grow the pool"
        )
    a, b = np.concatenate(kept_a)[:count], np.concatenate(kept_b)[:count]
    first = user.prefers_first(pool.standardized[a], pool.standardized[b]).numpy()
    return UserPairs(user, np.where(first, a, b), np.where(first, b, a))
