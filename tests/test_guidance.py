"""guided_prediction / guidance_branches: the formula, hand values and its properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ppd_diffusers.guidance import guidance_branches, guided_prediction

scales = st.floats(0.0, 12.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


def predictions(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))


def test_hand_computed_values():
    e_u, e_t, e_0 = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0])
    assert guided_prediction(e_u, e_t, e_0, 4.0, 2.0).item() == 1 + 4 * (2 - 1) + 2 * (3 - 2)
    assert guided_prediction(e_u, e_t, None, 4.0, 2.0).item() == 2 + 2 * (3 - 2)
    assert guided_prediction(e_u, None, e_0, 4.0).item() == 1 + 4 * (3 - 1)
    assert guided_prediction(None, e_t, e_0, 4.0).item() == 1 + 4 * (2 - 1)
    assert guided_prediction(e_u, None, None, 4.0).item() == 3


@given(seeds, scales)
def test_user_guided_like_text_needs_no_text_only_prediction(seed, g):
    e_u, e_t, e_0 = predictions(seed)
    torch.testing.assert_close(guided_prediction(e_u, e_t, e_0, g, g), guided_prediction(e_u, None, e_0, g))


@given(seeds, scales)
def test_zero_user_guidance_is_plain_classifier_free_guidance(seed, g):
    e_u, e_t, e_0 = predictions(seed)
    torch.testing.assert_close(guided_prediction(e_u, e_t, e_0, g, 0.0), guided_prediction(None, e_t, e_0, g))


@given(seeds, scales, scales)
def test_linear_in_the_user_difference(seed, g, g_u):
    """Moving e_u by d moves the result by g_u * d, whatever the text guidance."""
    e_u, e_t, e_0 = predictions(seed)
    d = torch.full_like(e_u, 0.25)
    shifted = guided_prediction(e_u + d, e_t, e_0, g, g_u) - guided_prediction(e_u, e_t, e_0, g, g_u)
    torch.testing.assert_close(shifted, g_u * d)


@given(seeds, scales, scales)
def test_equal_predictions_give_that_prediction(seed, g, g_u):
    e, _, _ = predictions(seed)
    torch.testing.assert_close(guided_prediction(e, e, e, g, g_u), e)


def test_missing_inputs_raise():
    e = torch.zeros(1)
    with pytest.raises(ValueError, match="needs `personalized` or `text`"):
        guided_prediction(None, None, e, 2.0)
    with pytest.raises(ValueError, match="`user_guidance_scale` is needed"):
        guided_prediction(e, e, e, 2.0)


@pytest.mark.parametrize(
    ("has_user", "g", "g_u", "expected"),
    [
        (False, 4.0, None, (False, True, True)),
        (False, 1.0, None, (False, True, False)),
        (True, 4.0, None, (True, False, True)),
        (True, 4.0, 4.0, (True, False, True)),
        (True, 4.0, 2.0, (True, True, True)),
        (True, 1.0, None, (True, False, False)),
        (True, 1.0, 1.0, (True, False, False)),
        (True, 0.0, 3.0, (True, True, False)),
        # after a guidance cutoff (guidance_scale 0, as diffusers' SDCFGCutoffCallback sets it)
        (False, 0.0, None, (False, True, False)),
        (True, 0.0, None, (True, False, False)),
        (True, 0.0, 4.0, (True, True, False)),
    ],
)
def test_branches(has_user, g, g_u, expected):
    assert guidance_branches(has_user, g, g_u) == expected
