"""The testbed's base model: a miniature Stage C (``StableCascadeUNet``) trained on the shapes domain.

It is an ordinary prior-only ``PersonalizedStableCascadePipeline`` (tiny CLIP text encoder, byte-level CLIP
tokenizer, ``DDPMWuerstchenScheduler``) whose "latents" are the 16 x 16 images themselves
(``resolution_multiple=1``). ``train_base_model`` trains it from scratch; the package ships the weights it
wrote (``ppd_diffusers/testbed/base_model``, a few hundred kB) so the testbed never retrains, and
``load_base_pipeline`` loads them through ``from_pretrained``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..noise import add_noise, alphas_cumprod
from .shapes import prompts, random_scenes, render

if TYPE_CHECKING:
    from ..pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

__all__ = ["BASE_MODEL_DIR", "IMAGE_SIZE", "base_unet_config", "load_base_pipeline", "one_cycle", "train_base_model"]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 16
TEXT_WIDTH = 32
MAX_TOKENS = 24  # the prompts are a handful of characters
BASE_MODEL_DIR = Path(__file__).parent / "base_model"


def base_unet_config() -> dict:
    """Stage C's layout at 64 channels: 2 levels, 3 + 3 attention blocks, 3 image channels, no dropout."""
    from ..testing_utils import tiny_stage_c_config

    return tiny_stage_c_config(
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 64),
        num_attention_heads=(4, 4),
        conditioning_dim=64,
        down_num_layers_per_block=(1, 2),
        up_num_layers_per_block=(2, 1),
        clip_text_in_channels=TEXT_WIDTH,
        clip_text_pooled_in_channels=TEXT_WIDTH,
        clip_image_in_channels=TEXT_WIDTH,
        timestep_ratio_embedding_dim=32,
        dropout=(0.0, 0.0),
    )


def _text_encoder(seed: int):
    from ..testing_utils import clip_text_encoder, clip_text_tokenizer

    tokenizer = clip_text_tokenizer(model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    return clip_text_encoder(tokenizer, hidden_size=TEXT_WIDTH, projection_dim=TEXT_WIDTH), tokenizer


def one_cycle(
    optimizer: torch.optim.Optimizer, learning_rate: float, steps: int, warmup: float = 0.05
) -> torch.optim.lr_scheduler.OneCycleLR:
    """``OneCycleLR`` with a ``warmup`` fraction of warm-up steps (the testbed trainers' schedule).

    torch divides by zero when the warm-up is exactly one step (``warmup * steps == 1``); it then lasts two.
    """
    if warmup * steps == 1:
        warmup = 2 / steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=warmup)


def train_base_model(
    output_dir: str | os.PathLike,
    steps: int = 4000,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    max_weight: float = 10.0,
    prompt_dropout: float = 0.1,
    seed: int = 0,
) -> PersonalizedStableCascadePipeline:
    """Trains the base model on freshly drawn scenes and saves it as a prior-only pipeline.

    The loss is the Stage C eps-prediction MSE weighted by ``min((1 - abar) / abar, max_weight)``, i.e. an
    x0-error weighting clipped at high noise: with plain eps-MSE the prompt barely matters to the loss
    (at high noise eps is almost the noisy input itself) and the model learns to ignore it.

    Args:
        output_dir: Where the pipeline is saved (``save_pretrained``).
        steps: Optimizer steps.
        batch_size: Scenes per step (random prompts).
        learning_rate: AdamW learning rate (cosine decay to 0).
        max_weight: Clip of the x0 weighting.
        prompt_dropout: Fraction of empty prompts, for classifier-free guidance.
        seed: Seed of the weights and the scenes.

    Returns:
        The trained ``PersonalizedStableCascadePipeline``.
    """
    from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet

    from ..pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

    text_encoder, tokenizer = _text_encoder(seed)
    texts = prompts() + [""]
    with torch.no_grad():
        tokens = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        encoded = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    hidden, pooled = encoded.hidden_states[-1], encoded.text_embeds.unsqueeze(1)
    torch.manual_seed(seed)
    unet = StableCascadeUNet(**base_unet_config())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = one_cycle(optimizer, learning_rate, steps)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    no_image = torch.zeros(batch_size, 1, TEXT_WIDTH)
    for _ in (bar := tqdm(range(steps), desc="Training the base model")):
        index = rng.integers(0, len(texts) - 1, batch_size)
        scenes = random_scenes(rng, [texts[i] for i in index])
        x0 = torch.from_numpy(np.stack([render(s, IMAGE_SIZE) for s in scenes])) * 2 - 1
        index = np.where(rng.random(batch_size) < prompt_dropout, len(texts) - 1, index)
        t = torch.rand(batch_size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        pred = unet(add_noise(x0, noise, t), t, pooled[index], hidden[index], no_image).sample
        abar = alphas_cumprod(t)
        weight = ((1 - abar) / abar).clamp(max=max_weight)
        loss = (weight * ((pred - noise) ** 2).mean((1, 2, 3))).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    pipe = PersonalizedStableCascadePipeline(
        prior=unet.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMWuerstchenScheduler(),
        resolution_multiple=1.0,
    )
    pipe.save_pretrained(output_dir)
    return pipe


def load_base_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The trained base model as a prior-only ``PersonalizedStableCascadePipeline`` (shipped weights by default).

    Its scheduler is swapped for ``ClippedDDPMWuerstchenScheduler`` (``from_config``, as one swaps any
    diffusers scheduler): the plain one lets about half of the pixels overshoot [-1, 1].
    """
    from ..pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline
    from .scheduler import ClippedDDPMWuerstchenScheduler

    path = BASE_MODEL_DIR if path is None else Path(path)
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No base model at {path}: train one with `ppd-diffusers train-testbed-base --output {path}`."
        )
    pipe = PersonalizedStableCascadePipeline.from_pretrained(path).to(device)
    pipe.scheduler = ClippedDDPMWuerstchenScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
