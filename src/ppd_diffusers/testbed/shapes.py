"""The testbed's image domain: one coloured shape on a plain background, drawn procedurally.

A prompt names the shape and its colour ("a red circle"); everything else varies at random, and that
variation is what synthetic users have tastes about: background lightness, how saturated and how warm
the colours are, where the shape sits and how big it is. Images are small (16 x 16 by default) and live
in [-1, 1] with 3 channels, so they are Stage C "latents" of a trivial latent space: decoding is
rescaling to [0, 1] (and upsampling for display).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["COLORS", "SHAPES", "ShapeScene", "prompts", "random_scenes", "render", "to_pixels"]

SHAPES = ("circle", "square", "triangle")
# hue of each colour name; the saturation and lightness of a scene vary around it
COLORS = {"red": 0.0, "yellow": 0.15, "green": 0.33, "blue": 0.62}


@dataclass(frozen=True)
class ShapeScene:
    """One image's content: what the prompt says, and the nuisance factors users care about."""

    shape: str
    color: str
    hue_shift: float  # added to the colour's hue, in turns
    saturation: float  # of the shape's colour, 0..1
    background_lightness: float  # 0..1
    background_hue: float  # 0..1
    background_saturation: float  # 0..1
    center: tuple[float, float]  # (x, y) in [0, 1]
    radius: float  # fraction of the image size

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape}"


def prompts() -> list[str]:
    """Every prompt of the domain."""
    return [f"a {color} {shape}" for color in COLORS for shape in SHAPES]


def random_scenes(rng: np.random.Generator, prompt_list: list[str]) -> list[ShapeScene]:
    """A random scene for each prompt (``"a <colour> <shape>"``)."""
    scenes = []
    for text in prompt_list:
        _, color, shape = text.split()
        scenes.append(
            ShapeScene(
                shape=shape,
                color=color,
                hue_shift=float(rng.uniform(-0.06, 0.06)),
                saturation=float(rng.uniform(0.35, 1.0)),
                background_lightness=float(rng.uniform(0.1, 0.9)),
                background_hue=float(rng.uniform(0, 1)),
                background_saturation=float(rng.uniform(0.0, 0.4)),
                center=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))),
                radius=float(rng.uniform(0.2, 0.32)),
            )
        )
    return scenes


def _mask(scene: ShapeScene, size: int) -> np.ndarray:
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    cx, cy = scene.center
    dx, dy, r = xs - cx, ys - cy, scene.radius
    if scene.shape == "circle":
        return (dx**2 + dy**2 <= r**2).astype(np.float32)
    if scene.shape == "square":
        return ((np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)).astype(np.float32)
    # triangle pointing up: inside when below the two slanted edges and above the base
    inside = (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    return inside.astype(np.float32)


def render(scene: ShapeScene, size: int = 16) -> np.ndarray:
    """The scene as an RGB float array ``(3, size, size)`` in [0, 1]."""
    hue = (COLORS[scene.color] + scene.hue_shift) % 1.0
    shape_rgb = np.array(colorsys.hls_to_rgb(hue, 0.5, scene.saturation), dtype=np.float32)
    background = colorsys.hls_to_rgb(scene.background_hue, scene.background_lightness, scene.background_saturation)
    background_rgb = np.array(background, dtype=np.float32)
    mask = _mask(scene, size)[None]
    return mask * shape_rgb[:, None, None] + (1 - mask) * background_rgb[:, None, None]


def to_pixels(latents: torch.Tensor) -> torch.Tensor:
    """Testbed latents in [-1, 1] to images in [0, 1] (the trivial decoder)."""
    return ((latents.float() + 1) / 2).clamp(0, 1)
