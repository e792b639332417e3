"""The testbed's preference encoder: a tiny CLIP that has learned, from captions, what the users care about.

PPD relies on a vision-language model that already knows how images look (the paper's LLaVA-OneVision). A
CLIP with random weights knows nothing, and the users it embeds can hardly be told apart. The stand-in here
is honest and small: a tiny ``CLIPModel`` trained contrastively on rendered scenes whose captions name the
nuisance factors in words ("light warm vivid large red circle centred"), never the users or their rewards.
``CLIPPreferenceEncoder`` then embeds a user's pairs with it, as it would with any CLIP checkpoint. The
package ships the trained weights (``ppd_diffusers/testbed/encoder``); ``train_testbed_encoder`` remakes them.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .shapes import ShapeScene, prompts, random_scenes, render

if TYPE_CHECKING:
    from transformers import CLIPModel

__all__ = ["ENCODER_DIR", "describe", "train_testbed_encoder"]

ENCODER_DIR = Path(__file__).parent / "encoder"


def _bucket(value: float, low: float, high: float, words: tuple[str, str, str]) -> str:
    return words[0] if value < low else words[2] if value > high else words[1]


def describe(scene: ShapeScene) -> str:
    """A caption naming every factor of ``scene`` in words, in a fixed order.

    Examples:
        >>> from ppd_diffusers.testbed.shapes import ShapeScene
        >>> describe(ShapeScene("circle", "red", 0.0, 1.0, 0.8, 0.05, 0.3, (0.5, 0.5), 0.3))
        'light warm vivid large red circle centred'
    """
    red, _, blue = colorsys.hls_to_rgb(scene.background_hue, scene.background_lightness, scene.background_saturation)
    dx, dy = scene.center[0] - 0.5, scene.center[1] - 0.5
    if max(abs(dx), abs(dy)) < 0.07:
        place = "centred"
    elif abs(dx) > abs(dy):
        place = "left" if dx < 0 else "right"
    else:
        place = "top" if dy < 0 else "bottom"
    words = [
        _bucket(scene.background_lightness, 0.37, 0.63, ("dark", "grey", "light")),
        _bucket(red - blue, -0.08, 0.08, ("cool", "plain", "warm")),
        _bucket(scene.saturation, 0.57, 0.78, ("dull", "mild", "vivid")),
        _bucket(scene.radius, 0.24, 0.28, ("small", "mid", "large")),
        scene.color,
        scene.shape,
        place,
    ]
    return " ".join(words)


def _pixels(scenes: list[ShapeScene], rng: np.random.Generator, noise: float) -> list[PIL.Image.Image]:
    # the base model's samples are noisier than the rendered scenes: train on noisy renders
    images = []
    for scene in scenes:
        pixels = render(scene) + rng.normal(0, noise, (3, 16, 16))
        images.append(PIL.Image.fromarray((pixels.clip(0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)))
    return images


def train_testbed_encoder(
    output_dir: str | os.PathLike,
    steps: int = 1500,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    num_scenes: int = 20_000,
    noise: float = 0.05,
    seed: int = 0,
) -> CLIPModel:
    """Trains the tiny CLIP on captioned scenes (CLIP's contrastive loss) and saves model, tokenizer and
    image processor to ``output_dir``, loadable by ``CLIPPreferenceEncoder.from_pretrained``.

    Args:
        output_dir: Where the checkpoint is written.
        steps: Optimizer steps (AdamW, cosine decay).
        batch_size: Image-caption pairs per step (the contrastive negatives).
        learning_rate: Peak learning rate.
        num_scenes: Size of the scene set drawn once and cycled through.
        noise: Standard deviation of the pixel noise added to each render.
        seed: Seed of the weights and the scenes.

    Returns:
        The trained ``CLIPModel``.
    """
    from ..testing_utils import tiny_clip
    from .base_model import one_cycle

    model, tokenizer, image_processor = tiny_clip(seed, hidden_size=64, projection_dim=32, patch_size=4)
    rng = np.random.default_rng(seed)
    scenes = random_scenes(rng, [prompts()[i] for i in rng.integers(0, len(prompts()), num_scenes)])
    pixel_values = image_processor(images=_pixels(scenes, rng, noise), return_tensors="pt")["pixel_values"]
    captions = [describe(scene) for scene in scenes]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = one_cycle(optimizer, learning_rate, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in (bar := tqdm(range(steps), desc="Training the testbed encoder")):
        batch = torch.randint(0, num_scenes, (batch_size,), generator=generator)
        out = model(
            input_ids=tokens.input_ids[batch],
            attention_mask=tokens.attention_mask[batch],
            pixel_values=pixel_values[batch],
            return_loss=True,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(output_dir)
    return model
