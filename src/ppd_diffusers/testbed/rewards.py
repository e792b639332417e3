"""Image rewards and synthetic users for the testbed.

Each reward maps a batch of images ``(batch, 3, height, width)`` in [0, 1] to one score per image. A
synthetic user is a weighted mixture of standardized rewards, ``r_u(x) = sum_k w_k z_k(x)`` with
``z_k = (r_k - mean_k) / std_k`` measured on base-model samples, so that no axis dominates by scale; its
judge prefers the image with the higher ``r_u``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "REWARDS",
    "RewardScaler",
    "SyntheticUser",
    "object_mask",
    "random_users",
    "reward_matrix",
    "single_reward_users",
]


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean luminance (Rec. 601 weights)."""
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1).mean((1, 2))


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean chroma, ``max - min`` of the channels per pixel.

    Not HSV's ``(max - min) / max``: that ratio blows up on near-black pixels, so it rewarded dark, noisy
    backgrounds and was not monotonic in how colourful an image looks.
    """
    return (images.max(1).values - images.min(1).values).mean((1, 2))


def warmth(images: torch.Tensor) -> torch.Tensor:
    """Mean red minus mean blue: warm images score high, cool ones low."""
    return (images[:, 0] - images[:, 2]).mean((1, 2))


def object_mask(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(batch, height, width)`` booleans: pixels whose colour differs from the background (the median of
    the border pixels) by more than ``threshold``, summed over channels."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(-1).values.view(images.shape[0], 3, 1, 1)
    return (images - background).abs().sum(1) > threshold


def centring(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """1 for an object at the centre, falling linearly to 0 at distance 0.5 (image units); 0 without an object.

    The object is ``object_mask(images, threshold)``; its centre is the mask's centroid. A hard mask, so
    faint background gradients do not move the centre.
    """
    batch, _, height, width = images.shape
    mask = object_mask(images, threshold).to(images.dtype)
    area = mask.sum((1, 2))
    weight = mask / area.view(batch, 1, 1).clamp_min(1)
    ys = (torch.arange(height, dtype=images.dtype, device=images.device) + 0.5) / height
    xs = (torch.arange(width, dtype=images.dtype, device=images.device) + 0.5) / width
    cy, cx = (weight.sum(2) * ys).sum(1), (weight.sum(1) * xs).sum(1)
    distance = torch.sqrt((cx - 0.5) ** 2 + (cy - 0.5) ** 2)
    return torch.where(area > 0, (1 - distance / 0.5).clamp_min(0), torch.zeros_like(distance))


REWARDS = {"brightness": brightness, "saturation": saturation, "warmth": warmth, "centring": centring}


def reward_matrix(images: torch.Tensor) -> torch.Tensor:
    """Every reward of every image, ``(batch, len(REWARDS))`` in ``REWARDS`` order."""
    return torch.stack([fn(images.float()) for fn in REWARDS.values()], dim=1)


@dataclass
class RewardScaler:
    """Standardizes raw rewards with the mean and spread of base-model samples."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, rewards: torch.Tensor) -> RewardScaler:
        return cls(rewards.mean(0), rewards.std(0).clamp_min(1e-6))

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - self.mean) / self.std


@dataclass(frozen=True)
class SyntheticUser:
    """A user whose taste is ``weights`` over the standardized ``REWARDS`` (a unit vector)."""

    name: str
    weights: tuple[float, ...]

    def score(self, standardized: torch.Tensor) -> torch.Tensor:
        """The user's reward of images from their standardized reward matrix."""
        return standardized @ standardized.new_tensor(self.weights)

    def prefers_first(self, standardized_a: torch.Tensor, standardized_b: torch.Tensor) -> torch.Tensor:
        """The judge: ``True`` where the user prefers image a over image b."""
        return self.score(standardized_a) > self.score(standardized_b)


def single_reward_users() -> list[SyntheticUser]:
    """One user per reward who wants more of it (the paper's single-reward users)."""
    names = list(REWARDS)
    return [SyntheticUser(name, tuple(float(i == k) for i in range(len(names)))) for k, name in enumerate(names)]


def random_users(count: int, rng: np.random.Generator, prefix: str = "user") -> list[SyntheticUser]:
    """Users with random signed mixtures of the rewards (unit weight vectors): some users want the
    opposite of others, which a single user-less model cannot satisfy."""
    weights = rng.normal(size=(count, len(REWARDS)))
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    return [SyntheticUser(f"{prefix}{i}", tuple(float(w) for w in row)) for i, row in enumerate(weights)]
