"""`train_ppd --backbone sdxl|flux`: tiny SDXL and Flux repos, the generated Pick-a-Pic data, exact resume."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from ppd_diffusers.testing_utils import save_tiny_flux, save_tiny_sdxl
from ppd_diffusers.training import PPDTrainingArguments, adapter_model_card, train_ppd
from ppd_diffusers.training.backbone_training import backbone_training, vae_pixels

from .toy_pickapic import user_embedding_of, write_toy_data

WEIGHTS = "diffusion_pytorch_model.safetensors"
# the tiny VAEs downsample 2x: SDXL trains on 16x16 latents at 32 px, Flux on 8x8 latents (4x4 tokens) at 16 px
RESOLUTION = {"sdxl": 32, "flux": 16}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train_backbones")
    save_tiny_sdxl(root / "sdxl")
    save_tiny_flux(root / "flux")
    return {"sdxl": str(root / "sdxl"), "flux": str(root / "flux"), **write_toy_data(root)}


def _args(repos: dict[str, str], backbone: str, out: Path, **overrides) -> PPDTrainingArguments:
    settings = dict(
        backbone=backbone,
        dataset_name=repos["images"],
        user_embeddings=repos["user_embeddings"],
        pretrained_model_name_or_path=repos[backbone],
        resolution=RESOLUTION[backbone],
        num_user_tokens=2,
        user_token_dim=16,
        output_dir=str(out),
        learning_rate=3e-3,
        lr_warmup_steps=0,
        beta_dpo=500.0,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        user_dropout=0.25,
        prompt_dropout=0.3,
        num_validation_users=2,
        report_to="none",
        validation_prompts=["a cat", "a dog"],
        validation_inference_steps=2,
        max_sequence_length=16,
        seed=0,
    )
    settings.update(overrides)
    return PPDTrainingArguments(**settings)


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone", ["sdxl", "flux"])
def test_training_resumes_exactly_and_writes_grids_and_card(repos, tmp_path, backbone, caplog):
    """A whole run against one resumed from its mid-epoch checkpoint: the same weights and losses, bit for bit.

    The whole run draws validation grids at step 3 (which load the adapter into the pipeline and take it out
    again) before training on; the resumed run draws none before step 4, so the two also agree only if training
    after a grid still sees its users."""
    caplog.set_level(logging.INFO)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # 36 pairs in batches of 2, 2 batches a step: 9 steps an epoch; step 3 is mid-epoch
    common = dict(max_train_steps=5, checkpointing_steps=3, validation_steps=3, gradient_checkpointing=True)
    result = train_ppd(_args(repos, backbone, whole, **common))
    assert result.global_step == 5 and sorted(os.listdir(whole / "validation")) == [
        "step-000003.png",
        "step-000005.png",
    ]
    train_ppd(_args(repos, backbone, resumed, resume_from_checkpoint=str(whole / "checkpoint-3"), **common))
    assert f"Resumed from {whole / 'checkpoint-3'} (step 3)" in caplog.text

    expected, got = load_file(whole / WEIGHTS), load_file(resumed / WEIGHTS)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert _losses(resumed) == _losses(whole)[3:]
    losses = [line["loss"] for line in _losses(whole)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter is the base model
    assert len(set(losses[2:])) > 1 and any(v.abs().sum() > 0 for k, v in got.items() if "to_v_user" in k)

    # a grid: a row per prompt; the base model, then each of the 2 validation users
    size = RESOLUTION[backbone]
    assert PIL.Image.open(whole / "validation" / "step-000005.png").size == (3 * size, 2 * size)
    card = (whole / "README.md").read_text()
    name = {"sdxl": "SDXL", "flux": "Flux"}[backbone]
    assert f"# PPD user adapter for {name}" in card and f"base model `{repos[backbone]}`" in card
    assert f"| `backbone` | {backbone} |" in card and f'"{repos[backbone]}", "{whole.name}"' in card

    # the backbone's pipeline loads the adapter, and the adapter changes its images
    pipe = backbone_training(_args(repos, backbone, tmp_path), torch.float32).load(load_decoder=True).pipe
    pipe.load_user_adapter(str(whole))
    assert all(torch.equal(got[k], v) for k, v in pipe.user_adapter.state_dict().items())
    users = torch.cat([user_embedding_of("user0"), user_embedding_of("user1")]).unsqueeze(1)
    call = dict(height=size, width=size, num_inference_steps=2, output_type="latent")
    if backbone == "flux":
        call["max_sequence_length"] = 16

    def latents(scale: float) -> torch.Tensor:
        generator = [torch.Generator().manual_seed(0) for _ in range(2)]
        return pipe(["a cat", "a cat"], user_embeds=users, user_scale=scale, generator=generator, **call).images

    assert not torch.equal(latents(1.0), latents(0.0))


# ------------------------------------------------------------------------------------------ pieces, fast


def test_vae_pixels_cover_and_center_crop_into_minus_one_to_one():
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # the central 20 columns are white: what a center crop keeps
    pixels = vae_pixels(PIL.Image.fromarray(wide), resolution=16)
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, 2:-2].min() > 0.9  # white -> 1


def test_backbone_settings_are_checked():
    base = dict(dataset_name="d", user_embeddings="u.safetensors")
    assert PPDTrainingArguments(**base).pretrained_model_name_or_path == "stabilityai/stable-cascade-prior"
    assert PPDTrainingArguments(**base, backbone="sdxl").pretrained_model_name_or_path == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )
    assert (
        PPDTrainingArguments(**base, backbone="flux").pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    )
    with pytest.raises(ValueError, match="`backbone` must be one of stable_cascade, sdxl, flux"):
        PPDTrainingArguments(**base, backbone="sd3")
    with pytest.raises(ValueError, match="`image_encoder`: for `backbone='stable_cascade'` only"):
        PPDTrainingArguments(**base, backbone="sdxl", image_encoder="effnet")
    with pytest.raises(ValueError, match="`torch_compile`: for `backbone='stable_cascade'` only"):
        PPDTrainingArguments(**base, backbone="flux", torch_compile=True)
    with pytest.raises(ValueError, match="for Flux leave it `constant`"):
        PPDTrainingArguments(**base, backbone="flux", timestep_weighting="min_snr")


def test_vae_backbones_need_the_images(repos, tmp_path):
    import datasets

    latents_only = datasets.load_from_disk(repos["latents"]).remove_columns(["jpg_0", "jpg_1"])
    base = backbone_training(_args(repos, "sdxl", tmp_path), torch.float32)
    with pytest.raises(ValueError, match="encodes the images with its VAE, but the dataset has no `jpg_0`, `jpg_1`"):
        base.training_dataset(latents_only)
    both = base.training_dataset(datasets.load_from_disk(repos["latents"]))
    assert not {"latents_0", "latents_1", "latents_ok"} & set(both.column_names)  # Stage C's latents set aside
    odd = backbone_training(_args(repos, "flux", tmp_path, resolution=18), torch.float32)
    with pytest.raises(ValueError, match="`resolution` must be a multiple of 4 for flux"):
        odd.load(load_decoder=False)


def test_model_card_names_the_backbone_and_base_model(tmp_path):
    from ppd_diffusers.training import PairStats

    config = {"user_embed_dim": 8, "num_user_tokens": 2, "user_token_dim": 16}
    for backbone, base, title in [
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "SDXL"),
        ("flux", "black-forest-labs/FLUX.1-dev", "Flux"),
    ]:
        args = PPDTrainingArguments(dataset_name="d", user_embeddings="u", backbone=backbone, output_dir="my-adapter")
        card = str(adapter_model_card(args, config, PairStats(pairs=3, users=2), {"loss": 0.5}, 10, 8))
        assert f"# PPD user adapter for {title}" in card and f"base_model: {base}" in card
        assert f'from_base_model(\n    "{base}", "my-adapter"' in card
    assert "Flow-DPO" in card and "| `flux_guidance_scale` | 3.5 |" in card and "- flux" in card
