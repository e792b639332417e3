"""Tiny Stage C models built from configs, saved and loaded through the user-facing `from_pretrained` path."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import StableCascadeUNet
from hypothesis import settings

from ppd_diffusers import UserAdapter
from ppd_diffusers.testing_utils import tiny_stage_c_config

USER_DIM = 24

# CI replays the same examples every run (reproducible); locally hypothesis keeps exploring new ones
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def tiny_unet_config(**overrides) -> dict:
    """A miniature of the Stage C prior (two levels of different widths, text + pooled + image conditioning)."""
    two_widths = dict(
        block_out_channels=(32, 48),
        num_attention_heads=(2, 4),
        down_num_layers_per_block=(1, 2),
        up_num_layers_per_block=(2, 1),
        clip_image_in_channels=12,
    )
    return tiny_stage_c_config(**{**two_widths, **overrides})


def build_unet(seed: int = 0, **overrides) -> StableCascadeUNet:
    torch.manual_seed(seed)
    return StableCascadeUNet(**tiny_unet_config(**overrides)).eval()


def unet_inputs(unet: StableCascadeUNet, batch: int = 3, size: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    inputs = dict(
        sample=torch.randn(batch, config.in_channels, size, size, generator=g),
        timestep_ratio=torch.rand(batch, generator=g),
        clip_text_pooled=torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g),
    )
    if config.clip_text_in_channels is not None:
        inputs["clip_text"] = torch.randn(batch, 5, config.clip_text_in_channels, generator=g)
        inputs["clip_img"] = torch.randn(batch, 1, config.clip_image_in_channels, generator=g)
    return inputs


def randomize_(adapter: UserAdapter, seed: int = 0, std: float = 0.5) -> UserAdapter:
    """Gives every adapter weight a random non-zero value, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * std)
    return adapter


def gradients_with_and_without_checkpointing(saved_unet_dir: str, adapter: UserAdapter, loss_of) -> list[list]:
    """Adapter gradients of ``loss_of(model)`` without, then with gradient checkpointing.

    Also checks that checkpointing really ran: every res, timestep and attention block of the tiny
    UNet's 3 + 3 layers (18 blocks) must go through diffusers' checkpoint function.
    """
    grads = []
    for checkpointing in (False, True):
        unet = StableCascadeUNet.from_pretrained(saved_unet_dir)
        calls = [0]
        if checkpointing:
            unet.enable_gradient_checkpointing()
            inner = unet._gradient_checkpointing_func

            def counting(*args, inner=inner, calls=calls):
                calls[0] += 1
                return inner(*args)

            unet._gradient_checkpointing_func = counting
        adapter.zero_grad(set_to_none=True)
        loss_of(adapter.attach(unet)).backward()
        assert calls[0] == (18 if checkpointing else 0)
        grads.append([p.grad.clone() for p in adapter.parameters()])
    return grads


@pytest.fixture(scope="session")
def saved_unet_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prior")
    build_unet().save_pretrained(path)
    return str(path)


@pytest.fixture
def unet(saved_unet_dir) -> StableCascadeUNet:
    # Loaded the way a Hub id is: StableCascadeUNet.from_pretrained(repo, subfolder="prior").
    return StableCascadeUNet.from_pretrained(saved_unet_dir).eval()


@pytest.fixture
def adapter(unet) -> UserAdapter:
    torch.manual_seed(2)
    return UserAdapter.from_unet(unet, user_embed_dim=USER_DIM, num_user_tokens=3, user_token_dim=8)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> str:
    from ppd_diffusers.testing_utils import save_random_llava_onevision

    path = tmp_path_factory.mktemp("tiny-llava-onevision")
    save_random_llava_onevision(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    from ppd_diffusers.testing_utils import save_random_clip

    path = tmp_path_factory.mktemp("tiny-clip")
    save_random_clip(path)
    return str(path)


def random_image(rng, size: tuple[int, int] | None = None):
    """A random RGB PIL image of a random (or given) size."""
    import numpy as np
    import PIL.Image

    height, width = size or (int(rng.integers(16, 80)), int(rng.integers(16, 80)))
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_users(num_users: int, num_pairs: int = 4, seed: int = 0) -> list[list[tuple]]:
    """Users as lists of (prompt, chosen, rejected) tuples of random images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ["red cat", "blue dog", "a photo", "grass"]
    # prompts of different lengths, so that batched users are padded
    return [
        [(f"{words[(u + i) % 4]} " * (1 + (u + i) % 3) + f"{u} {i}", random_image(rng), random_image(rng))
         for i in range(num_pairs)]
        for u in range(num_users)
    ]  # fmt: skip
