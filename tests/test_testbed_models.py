"""The testbed's shipped models and their trainers: the clipped sampler, the tiny CLIP preference encoder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from ppd_diffusers import CLIPPreferenceEncoder
from ppd_diffusers.testbed.encoder import ENCODER_DIR, describe
from ppd_diffusers.testbed.scheduler import ClippedDDPMWuerstchenScheduler
from ppd_diffusers.testbed.shapes import ShapeScene, prompts, random_scenes, render

CLI = [sys.executable, "-m", "ppd_diffusers.cli"]


def scene(**changes) -> ShapeScene:
    base = dict(shape="circle", color="red", hue_shift=0.0, saturation=0.7, background_lightness=0.5,
                background_hue=0.0, background_saturation=0.0, center=(0.5, 0.5), radius=0.26)  # fmt: skip
    return ShapeScene(**{**base, **changes})


T = torch.tensor([0.75])  # the second of 4 steps


def steps(scheduler, model_output, sample):
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1:2]
    assert torch.equal(t, T)
    return scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample


def test_clipped_scheduler_equals_the_plain_one_inside_the_range_and_clips_outside():
    sample = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    plain, clipped = DDPMWuerstchenScheduler(), ClippedDDPMWuerstchenScheduler()
    # a noise prediction whose implied x0 lies in [-1, 1]: the same step
    abar = plain._alpha_cumprod(T, "cpu")
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    eps = (sample - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(steps(clipped, eps, sample), steps(plain, eps, sample), atol=1e-5, rtol=1e-5)
    # an implied x0 far outside (30): the clipped step is the plain step toward x0 = 1, the plain one overshoots
    wild = (sample - abar.sqrt() * 30) / (1 - abar).sqrt()
    toward_bound = (sample - abar.sqrt() * 1) / (1 - abar).sqrt()
    torch.testing.assert_close(steps(clipped, wild, sample), steps(plain, toward_bound, sample), atol=1e-5, rtol=1e-5)
    assert steps(plain, wild, sample).mean() > steps(clipped, wild, sample).mean() + 5


def test_clipped_scheduler_swaps_in_from_config_and_round_trips(tmp_path):
    scheduler = ClippedDDPMWuerstchenScheduler.from_config(DDPMWuerstchenScheduler(s=0.01).config)
    assert scheduler.config.s == 0.01 and scheduler.config.clip_sample_range == 1.0
    ClippedDDPMWuerstchenScheduler(clip_sample_range=0.5).save_pretrained(tmp_path)
    assert ClippedDDPMWuerstchenScheduler.from_pretrained(tmp_path).config.clip_sample_range == 0.5


@pytest.mark.parametrize(
    ("changes", "position", "word"),
    [
        (dict(background_lightness=0.2), 0, "dark"),
        (dict(background_lightness=0.8), 0, "light"),
        (dict(background_hue=0.6, background_saturation=0.4), 1, "cool"),
        (dict(background_hue=0.05, background_saturation=0.4), 1, "warm"),
        (dict(saturation=0.4), 2, "dull"),
        (dict(saturation=0.95), 2, "vivid"),
        (dict(radius=0.2), 3, "small"),
        (dict(center=(0.3, 0.5)), 6, "left"),
        (dict(center=(0.5, 0.7)), 6, "bottom"),
    ],
)
def test_captions_name_each_factor(changes, position, word):
    assert describe(scene()) == "grey plain mild mid red circle centred"
    assert describe(scene(**changes)).split()[position] == word


def test_shipped_encoder_matches_scenes_to_their_captions():
    """The trained tiny CLIP retrieves a fresh scene's caption among 64 far above chance (1/64)."""
    encoder = CLIPPreferenceEncoder.from_pretrained(str(ENCODER_DIR))
    scenes = random_scenes(np.random.default_rng(123), prompts() * 6)[:64]
    images = [PIL.Image.fromarray((render(s).transpose(1, 2, 0) * 255).astype(np.uint8)) for s in scenes]
    model = encoder.model
    with torch.no_grad():
        text = encoder.tokenizer([describe(s) for s in scenes], padding=True, return_tensors="pt")
        pixel_values = encoder.image_processor(images=images, return_tensors="pt")["pixel_values"]
        logits = model(**text, pixel_values=pixel_values)
    accuracy = (logits.logits_per_image.argmax(1) == torch.arange(64)).float().mean().item()
    assert accuracy > 0.5  # chance 0.016; measured 0.97


def test_cli_trains_an_encoder_the_preference_encoder_loads(tmp_path):
    out = tmp_path / "encoder"
    result = subprocess.run(
        [*CLI, "train-testbed-encoder", "--output", str(out), "--steps", "20", "--batch_size", "8",
         "--num_scenes", "16"],  # 20 steps: a one-step warm-up, which torch's OneCycleLR cannot take
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    encoder = CLIPPreferenceEncoder.from_pretrained(str(out), pooling="mean")
    image = PIL.Image.fromarray((render(scene()).transpose(1, 2, 0) * 255).astype(np.uint8))
    embeds = encoder.encode([[("a red circle", image, image)] * 4])
    assert embeds.shape == (1, 1, encoder.embed_dim) and torch.isfinite(embeds).all()
