"""Measurements of the testbed: rewards of generated images, win rates, the user probe, interpolation."""

from __future__ import annotations

import colorsys

import numpy as np
import torch

from .loop import PairPool, TestbedConfig, UserPairs, generate
from .rewards import SyntheticUser, object_mask, reward_matrix
from .shapes import COLORS, prompts, to_pixels

__all__ = [
    "bootstrap_ci",
    "color_accuracy",
    "encode_profiles",
    "identification_probe",
    "object_hue",
    "prompt_colour_hits",
    "sample_prompts",
    "sample_users",
    "standardized_rewards",
    "win_rates",
]


def encode_profiles(encoder, pool: PairPool, profiles: list[UserPairs], config: TestbedConfig) -> torch.Tensor:
    """Each user's embedding from their profile pairs (prompt, preferred image, rejected image)."""
    users = []
    for pairs in profiles:
        chosen, rejected = pool.images(pairs.chosen), pool.images(pairs.rejected)
        texts = [config.prompts[pool.prompt_index[i]] for i in pairs.chosen]
        users.append(list(zip(texts, chosen, rejected, strict=True)))
    return encoder.encode(users, batch_size=64)


def sample_users(
    pipe, config: TestbedConfig, user_embeds: torch.Tensor | None, salt: int = 0, samples: int | None = None
) -> torch.Tensor:
    """Latents ``(users or 1, samples, 3, H, W)`` generated for each user (or by the plain pipeline when
    ``user_embeds`` is None), with the same prompts and seeds for every user; ``samples`` defaults to
    ``config.eval_samples_per_user`` and is spread evenly over the prompts."""
    samples = config.eval_samples_per_user if samples is None else samples
    per_user = sample_prompts(config, samples)
    seeds = [10_000_019 * (config.seed + 1) + salt + i for i in range(samples)]
    count = 1 if user_embeds is None else user_embeds.shape[0]
    prompt_list, seed_list = per_user * count, seeds * count
    rows = None if user_embeds is None else user_embeds.repeat_interleave(len(per_user), dim=0)
    latents = generate(pipe, prompt_list, seed_list, config, user_embeds=rows)
    return latents.view(count, len(per_user), *latents.shape[1:])


def sample_prompts(config: TestbedConfig, samples: int) -> list[str]:
    """The prompts of ``sample_users``' ``samples`` images per user, spread evenly over the prompts."""
    return [config.prompts[i * len(config.prompts) // samples] for i in range(samples)]


def standardized_rewards(pool: PairPool, latents: torch.Tensor) -> torch.Tensor:
    """Rewards of ``sample_users`` latents, standardized like the pool's: ``(users, samples, rewards)``."""
    flat = reward_matrix(to_pixels(latents.flatten(0, 1)))
    return pool.scaler(flat).view(*latents.shape[:2], -1)


def win_rates(users: list[SyntheticUser], personalized: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """Per user, the fraction of seeds where the user's judge prefers the personalized image to the base one
    (ties count one half)."""
    rates = []
    for user, mine in zip(users, personalized, strict=True):
        a, b = user.score(mine), user.score(base[0])
        rates.append(((a > b).float() + 0.5 * (a == b).float()).mean().item())
    return np.array(rates)


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, reps: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of the mean (resampling users)."""
    means = rng.choice(values, size=(reps, len(values)), replace=True).mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def identification_probe(
    features: torch.Tensor, draws: int, top_k: int = 5, steps: int = 300, seed: int = 0
) -> dict[str, float]:
    """Top-1/top-k accuracy of a linear classifier that names the user from a frozen embedding.

    ``features`` is ``(users * draws, dim)`` ordered user by user; the last draw of every user is held out,
    the others train a softmax regression on standardized features.
    """
    users = features.shape[0] // draws
    features = features.float().view(users, draws, -1)
    train, test = features[:, :-1].reshape(-1, features.shape[-1]), features[:, -1]
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    labels = torch.arange(users).repeat_interleave(draws - 1)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(train.shape[1], users)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(layer(train), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        ranks = layer(test).argsort(dim=1, descending=True)
    target = torch.arange(users)[:, None]
    return {
        "top1": (ranks[:, :1] == target).any(1).float().mean().item(),
        f"top{top_k}": (ranks[:, :top_k] == target).any(1).float().mean().item(),
        "chance_top1": 1 / users,
        f"chance_top{top_k}": top_k / users,
        "users": users,
    }


def object_hue(image: torch.Tensor, threshold: float = 0.3) -> float | None:
    """Hue of the object's pixels (``object_mask``), or None when fewer than 3 pixels stand out."""
    mask = object_mask(image[None], threshold)[0]
    if mask.sum() < 3:
        return None
    return colorsys.rgb_to_hls(*image[:, mask].mean(1).tolist())[0]


def prompt_colour_hits(images: torch.Tensor, texts: list[str]) -> float:
    """Fraction of images ``(batch, 3, H, W)`` in [0, 1] whose object's hue is nearest to the colour their
    prompt names (an image without a visible object is a miss)."""
    names, hues = list(COLORS), np.array(list(COLORS.values()))
    hits = 0
    for text, image in zip(texts, images, strict=True):
        hue = object_hue(image)
        if hue is not None:
            hits += names[int(np.abs((hues - hue + 0.5) % 1 - 0.5).argmin())] == text.split()[1]
    return hits / len(texts)


def color_accuracy(pipe, samples_per_prompt: int = 8, steps: int = 16, guidance_scale: float = 3.0) -> float:
    """How often the base model draws the prompt's colour: the object's hue is nearest to the named one."""
    texts = [p for p in prompts() for _ in range(samples_per_prompt)]
    config = TestbedConfig(sample_steps=steps, guidance_scale=guidance_scale)
    return prompt_colour_hits(to_pixels(generate(pipe, texts, list(range(len(texts))), config)), texts)
