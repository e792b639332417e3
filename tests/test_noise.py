"""The Stage C forward process against diffusers' `DDPMWuerstchenScheduler`."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from ppd_diffusers import add_noise, alphas_cumprod, sample_timesteps, timestep_weight


def test_add_noise_matches_ddpm_wuerstchen_scheduler():
    scheduler = DDPMWuerstchenScheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 16, 4, 4, generator=g), torch.randn(64, 16, 4, 4, generator=g)
    t = torch.cat([torch.tensor([0.0, 1.0, 0.5]), torch.rand(61, generator=g)])
    assert torch.equal(add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t))


def test_alphas_cumprod_hand_values():
    # cos^2((t + s)/(1 + s) * pi/2) / cos^2(s/(1 + s) * pi/2), clamped to [1e-4, 0.9999]
    torch.testing.assert_close(
        alphas_cumprod(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.9999, 0.4938436, 1e-4]), rtol=1e-6, atol=0.0
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=20))
def test_alphas_cumprod_is_bounded_and_decreasing(ts):
    t = torch.tensor(sorted(ts))
    abar = alphas_cumprod(t)
    assert ((abar >= 1e-4) & (abar <= 0.9999)).all()
    assert (abar[1:] <= abar[:-1]).all()


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 1000))
def test_add_noise_preserves_unit_variance_mixture(t, seed):
    # sqrt(abar)^2 + sqrt(1 - abar)^2 = 1: noising two orthogonal unit vectors keeps unit norm
    x0, noise = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    xt = add_noise(x0, noise, torch.tensor([t]))
    torch.testing.assert_close(xt.norm(), torch.tensor(1.0))


def test_add_noise_keeps_dtype_and_checks_shapes():
    x0 = torch.randn(2, 3, dtype=torch.bfloat16)
    assert add_noise(x0, torch.randn_like(x0), torch.rand(2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`noise` must have the shape of `x0`"):
        add_noise(x0, torch.randn(2, 4), torch.rand(2))
    with pytest.raises(ValueError, match=r"`t` must have shape \(2,\)"):
        add_noise(x0, torch.randn(2, 3), torch.rand(3))


def test_sample_timesteps_is_uniform_and_seeded():
    t = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01
    assert torch.equal(t, sample_timesteps(20000, generator=torch.Generator().manual_seed(0)))


def test_timestep_weight():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(timestep_weight(t), torch.ones(11))
    w = timestep_weight(t, "min_snr", gamma=5.0)
    abar = alphas_cumprod(t)
    snr = abar / (1 - abar)
    assert ((w > 0) & (w <= 1)).all()
    assert torch.equal(w[snr <= 5.0], torch.ones(int((snr <= 5.0).sum())))
    torch.testing.assert_close(w[snr > 5.0], 5.0 / snr[snr > 5.0])
    with pytest.raises(ValueError, match='`kind` must be "constant" or "min_snr"'):
        timestep_weight(t, "edm")
