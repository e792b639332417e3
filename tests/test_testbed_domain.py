"""The testbed's shapes domain and its rewards: hand-computed values and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ppd_diffusers.testbed.rewards import (
    REWARDS,
    RewardScaler,
    SyntheticUser,
    brightness,
    centring,
    random_users,
    reward_matrix,
    saturation,
    single_reward_users,
    warmth,
)
from ppd_diffusers.testbed.shapes import COLORS, SHAPES, ShapeScene, prompts, random_scenes, render, to_pixels


def scene(**changes) -> ShapeScene:
    base = dict(shape="circle", color="red", hue_shift=0.0, saturation=1.0, background_lightness=0.5,
                background_hue=0.0, background_saturation=0.0, center=(0.5, 0.5), radius=0.3)  # fmt: skip
    return ShapeScene(**{**base, **changes})


def test_prompts_and_scenes_follow_the_prompt():
    assert len(prompts()) == len(COLORS) * len(SHAPES)
    rng = np.random.default_rng(0)
    scenes = random_scenes(rng, ["a blue square", "a red circle"])
    assert [s.prompt for s in scenes] == ["a blue square", "a red circle"]
    image = render(scenes[0])
    assert image.shape == (3, 16, 16) and image.min() >= 0 and image.max() <= 1


def test_render_hand_values():
    image = render(scene(), size=16)
    assert np.allclose(image[:, 8, 8], [1.0, 0.0, 0.0])  # pure red at the centre
    assert np.allclose(image[:, 0, 0], [0.5, 0.5, 0.5])  # grey background in the corner
    # a square covers more of its box than a circle of the same radius, a triangle less
    areas = {s: (render(scene(shape=s), 32)[1] == 0).sum() for s in SHAPES}  # red shape: no green
    assert areas["triangle"] < areas["circle"] < areas["square"] * 1.3 and areas["triangle"] > 0


def test_rewards_hand_values():
    white, black = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    assert brightness(white).item() == pytest.approx(1.0) and brightness(black).item() == 0
    assert brightness(red).item() == pytest.approx(0.299)
    assert saturation(red).item() == pytest.approx(1.0) and saturation(white).item() == 0
    # chroma, not HSV saturation: a near-black pixel with a tiny tint is nearly grey, not fully saturated
    assert saturation(torch.tensor([0.02, 0.0, 0.0]).view(1, 3, 1, 1)).item() == pytest.approx(0.02)
    assert saturation(torch.tensor([0.75, 0.5, 0.25]).view(1, 3, 1, 1)).item() == pytest.approx(0.5)
    assert warmth(red).item() == pytest.approx(1.0) and warmth(red.flip(1)).item() == pytest.approx(-1.0)
    centred = torch.from_numpy(render(scene(), 32))[None]
    corner = torch.from_numpy(render(scene(center=(0.25, 0.25), radius=0.15), 32))[None]
    assert centring(centred).item() > 0.95 and centring(corner).item() < 0.4
    assert centring(white).item() == 0  # no object, no centre
    faint = centred.clone()
    faint[..., :, :4] += 0.05  # a faint background gradient does not move the object's centre
    assert centring(faint).item() == pytest.approx(centring(centred).item())
    assert reward_matrix(torch.cat([white, red])).shape == (2, len(REWARDS))


@given(st.floats(0.1, 0.9), st.floats(0.1, 0.9))
def test_centring_falls_with_distance_from_the_centre(x, y):
    near = torch.from_numpy(render(scene(center=(0.5 + (x - 0.5) / 2, 0.5 + (y - 0.5) / 2), radius=0.12), 32))
    far = torch.from_numpy(render(scene(center=(x, y), radius=0.12), 32))
    assert centring(near[None]).item() >= centring(far[None]).item() - 0.05


def test_scaler_and_users():
    raw = torch.randn(100, len(REWARDS)) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 5
    z = RewardScaler.fit(raw)(raw)
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5) and torch.allclose(z.std(0), torch.ones(4))
    users = random_users(20, np.random.default_rng(0))
    assert all(np.isclose(np.linalg.norm(u.weights), 1) for u in users)
    bright = single_reward_users()[0]
    assert bright.name == "brightness" and bright.weights == (1.0, 0.0, 0.0, 0.0)
    a, b = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0.0, 5, 5, 5]])
    assert bright.prefers_first(a, b).item() and not SyntheticUser("dark", (-1.0, 0, 0, 0)).prefers_first(a, b).item()


def test_to_pixels():
    assert torch.equal(to_pixels(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_prompt_colour_hits_reads_the_objects_colour_and_misses_a_frame_without_one():
    from ppd_diffusers.testbed.evaluate import prompt_colour_hits

    red, blue = render(scene()), render(scene(color="blue", shape="square"))
    filled = np.full((3, 16, 16), 0.5, dtype=np.float32)  # the object painted over: nothing stands out
    images = torch.from_numpy(np.stack([red, blue, filled]))
    assert prompt_colour_hits(images, ["a red circle", "a blue square", "a red circle"]) == pytest.approx(2 / 3)
    assert prompt_colour_hits(images[:2], ["a blue circle", "a red square"]) == 0.0
