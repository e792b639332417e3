"""`ppd_loss` / `PPDLoss`: hand computation, properties, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppd_diffusers import PPDLoss, ppd_loss

LOG2 = torch.tensor(math.log(2.0), dtype=torch.float32)


def _batch(pairs: int, seed: int, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * pairs, *shape, generator=g) for _ in range(3)]


def _hand_loss(model_pred, ref_pred, target, beta, weight=None):
    """The formula written out with numpy in float64, pair by pair."""
    m, r, t = (x.double().numpy() for x in (model_pred, ref_pred, target))
    pairs = m.shape[0] // 2
    losses = []
    for i in range(pairs):
        mse = [np.mean((m[j] - t[j]) ** 2) for j in (i, pairs + i)]
        ref = [np.mean((r[j] - t[j]) ** 2) for j in (i, pairs + i)]
        w = 1.0 if weight is None else float(weight[i])
        inside = -0.5 * beta * w * ((mse[0] - ref[0]) - (mse[1] - ref[1]))
        losses.append(np.log1p(np.exp(-inside)))  # -log(sigmoid(inside))
    return float(np.mean(losses))


@pytest.mark.parametrize("beta", [1.0, 50.0, 5000.0])
def test_matches_hand_computation(beta):
    model_pred, ref_pred, target = _batch(4, seed=0)
    ref_pred = model_pred + 0.01 * ref_pred  # keep inside moderate so the check is not saturated
    weight = torch.tensor([1.0, 0.5, 2.0, 0.0])
    for w in (None, weight):
        out = ppd_loss(model_pred, ref_pred, target, beta=beta, weight=w)
        assert out.loss.item() == pytest.approx(_hand_loss(model_pred, ref_pred, target, beta, w), rel=1e-4)


def test_equal_policy_and_reference_give_exactly_log_2():
    model_pred, _, target = _batch(3, seed=1)
    out = PPDLoss()(model_pred, model_pred.clone(), target)
    assert torch.equal(out.loss, LOG2)
    assert out.implicit_accuracy.item() == 0.5
    assert torch.equal(out.inside, torch.zeros(3))


def test_diagnostics():
    target = torch.zeros(4, 1)
    model_pred = torch.tensor([[1.0], [3.0], [2.0], [1.0]])  # mse: w=(1, 9), l=(4, 1)
    ref_pred = torch.tensor([[2.0], [2.0], [2.0], [2.0]])  # all 4
    out = ppd_loss(model_pred, ref_pred, target, beta=0.1)
    assert out.model_diff.tolist() == [-3.0, 8.0]
    assert out.ref_diff.tolist() == [0.0, 0.0]
    torch.testing.assert_close(out.inside, torch.tensor([0.15, -0.4]))
    assert out.implicit_accuracy.item() == 0.5  # pair 0 right, pair 1 wrong
    assert not out.inside.requires_grad


def test_gradient_flows_to_model_pred_only():
    model_pred, ref_pred, target = _batch(2, seed=2)
    model_pred.requires_grad_(True)
    ref_pred.requires_grad_(True)
    ppd_loss(model_pred, ref_pred, target).loss.backward()
    assert model_pred.grad is not None and model_pred.grad.abs().sum() > 0
    assert ref_pred.grad is None


def test_bf16_inputs_are_computed_in_float32():
    model_pred, ref_pred, target = _batch(2, seed=3)
    out = ppd_loss(model_pred.bfloat16(), ref_pred.bfloat16(), target.bfloat16(), beta=10.0)
    expected = ppd_loss(model_pred.bfloat16().float(), ref_pred.bfloat16().float(), target.bfloat16().float(), 10.0)
    assert out.loss.dtype == torch.float32
    assert torch.equal(out.loss, expected.loss)


def _swap(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]])


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    beta=st.floats(0.01, 10.0),
    noise=st.floats(0.0, 1.0),
)
def test_swapping_preferred_and_rejected_negates_inside(pairs, seed, beta, noise):
    model_pred, ref_pred, target = _batch(pairs, seed, shape=(2, 3))
    ref_pred = model_pred + noise * ref_pred
    out = ppd_loss(model_pred, ref_pred, target, beta=beta)
    swapped = ppd_loss(_swap(model_pred), _swap(ref_pred), _swap(target), beta=beta)
    torch.testing.assert_close(swapped.inside, -out.inside)
    # softplus(-x) - softplus(x) = -x, so the two losses differ by the mean of inside
    torch.testing.assert_close(out.loss - swapped.loss, -out.inside.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.implicit_accuracy + swapped.implicit_accuracy, torch.tensor(1.0))
    assert out.loss.item() > 0


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    beta=st.floats(0.01, 10.0),
    w=st.one_of(st.just(0.0), st.floats(1e-3, 4.0)),  # (a subnormal w would make beta * w underflow to 0)
)
def test_weight_multiplies_beta(pairs, seed, beta, w):
    model_pred, ref_pred, target = _batch(pairs, seed, shape=(4,))
    weighted = ppd_loss(model_pred, ref_pred, target, beta=beta, weight=torch.full((pairs,), w))
    if w > 0:
        scaled = ppd_loss(model_pred, ref_pred, target, beta=beta * w)
        torch.testing.assert_close(weighted.loss, scaled.loss, rtol=1e-4, atol=1e-6)
    else:
        assert torch.equal(weighted.loss, LOG2)


@settings(max_examples=40, deadline=None)
@given(pairs=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), beta=st.floats(0.01, 10.0))
def test_swapping_policy_and_reference_negates_inside(pairs, seed, beta):
    model_pred, ref_pred, target = _batch(pairs, seed, shape=(3,))
    out = ppd_loss(model_pred, ref_pred, target, beta=beta)
    swapped = ppd_loss(ref_pred, model_pred, target, beta=beta)
    torch.testing.assert_close(swapped.inside, -out.inside)
    assert torch.equal(swapped.model_diff, out.ref_diff) and torch.equal(swapped.ref_diff, out.model_diff)


@settings(max_examples=40, deadline=None)
@given(pairs=st.integers(2, 5), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_permuting_pairs_permutes_diagnostics_and_keeps_the_loss(pairs, seed, data):
    model_pred, ref_pred, target = _batch(pairs, seed, shape=(3,))
    perm = torch.tensor(data.draw(st.permutations(range(pairs))))
    both = torch.cat([perm, perm + pairs])  # the same permutation in both halves keeps pairs together
    out = ppd_loss(model_pred, ref_pred, target)
    permuted = ppd_loss(model_pred[both], ref_pred[both], target[both])
    assert torch.equal(permuted.inside, out.inside[perm])
    torch.testing.assert_close(permuted.loss, out.loss)


def test_bad_inputs_raise_clear_errors():
    model_pred, ref_pred, target = _batch(2, seed=4)
    with pytest.raises(ValueError, match="even, non-zero batch"):
        ppd_loss(model_pred[:3], ref_pred[:3], target[:3])
    with pytest.raises(ValueError, match=r"`ref_pred` must have the shape of `model_pred` \(4, 3, 4, 4\)"):
        ppd_loss(model_pred, ref_pred[:, :2], target)
    with pytest.raises(ValueError, match="`target` must have the shape"):
        ppd_loss(model_pred, ref_pred, target[:2])
    for index, name in enumerate(("model_pred", "ref_pred", "target")):
        tensors = [model_pred.clone(), ref_pred.clone(), target.clone()]
        tensors[index][1, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=f"`{name}` contains NaN or Inf"):
            ppd_loss(*tensors)
    with pytest.raises(ValueError, match="`beta` must be positive"):
        PPDLoss(beta=0)
    with pytest.raises(ValueError, match=r"`weight` must be a float or a \(2,\) tensor"):
        ppd_loss(model_pred, ref_pred, target, weight=torch.ones(4))
