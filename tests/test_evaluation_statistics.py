"""Win rates and bootstrap intervals: hand-computed values, hypothesis properties, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppd_diffusers.evaluation import bootstrap_ci, user_bootstrap_ci, win_rate
from ppd_diffusers.evaluation.statistics import mean_of_user_means, pairwise_outcomes

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
scores = st.lists(st.integers(-3, 3), min_size=1, max_size=30)  # small integers: ties happen
FEW = settings(max_examples=40, deadline=None)


def test_win_rate_by_hand():
    # win, tie, loss, win, tie
    a, b = [3.0, 1.0, 2.0, 4.0, 0.0], [1.0, 1.0, 5.0, 0.0, 0.0]
    assert pairwise_outcomes(a, b).tolist() == [1.0, 0.5, 0.0, 1.0, 0.5]
    assert win_rate(a, b) == 3 / 5
    assert win_rate(b, a) == 2 / 5
    assert win_rate(torch.tensor(a), np.array(b)) == 3 / 5  # tensors and arrays as well as lists
    assert win_rate([1.0, 0.5, 0.0, 1.0, 0.5]) == 3 / 5  # precomputed outcomes
    assert win_rate([0.9, 0.2]) == pytest.approx(0.55)  # a judge's soft probabilities


@FEW
@given(st.data())
def test_win_rate_is_symmetric(data):
    a = data.draw(scores)
    b = data.draw(st.lists(st.integers(-3, 3), min_size=len(a), max_size=len(a)))
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0, abs=1e-12)
    assert win_rate(a, a) == 0.5
    assert win_rate(pairwise_outcomes(a, b)) == win_rate(a, b)


def test_bootstrap_by_hand():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_ci([0.0, 1.0], confidence=0.95) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], confidence=0.4) == (0.5, 0.5)  # the 30% and 70% quantiles
    assert bootstrap_ci([3.5]) == (3.5, 3.5)
    # any statistic, including one without `axis` (evaluated resample by resample)
    assert bootstrap_ci([0.0, 1.0], statistic=lambda x: x.max(), confidence=0.4) == (1.0, 1.0)
    assert bootstrap_ci([0.0, 4.0, 4.0], statistic=np.median, confidence=0.3) == (4.0, 4.0)  # P(median 0) = 7/27


def test_bootstrap_interval_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    width = [high - low for low, high in (bootstrap_ci(small), bootstrap_ci(large))]
    # the standard error of the mean shrinks by sqrt(100): about 0.88 wide for 20 values, 0.088 for 2000
    assert 0.4 < width[0] < 1.3 and 0.06 < width[1] < 0.12


@FEW
@given(finite, st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_constant_sample_gives_a_point(value, size, seed):
    sample = [value] * size
    low, high = bootstrap_ci(sample, seed=seed)
    assert low == pytest.approx(np.mean(sample), abs=1e-9) and high == pytest.approx(np.mean(sample), abs=1e-9)
    assert low <= high


@FEW
@given(st.lists(finite, min_size=2, max_size=40), st.floats(0.05, 0.9), st.floats(0.01, 0.09))
def test_interval_widens_with_confidence(sample, confidence, extra):
    low, high = bootstrap_ci(sample, confidence=confidence, num_resamples=300)
    wide_low, wide_high = bootstrap_ci(sample, confidence=confidence + extra, num_resamples=300)
    assert wide_low <= low <= high <= wide_high


@FEW
@given(st.lists(finite, min_size=5, max_size=40), st.integers(0, 1000))
def test_mean_lies_inside_the_interval(sample, seed):
    low, high = bootstrap_ci(sample, seed=seed)
    tolerance = 1e-9 * (1 + max(abs(x) for x in sample))
    assert low - tolerance <= np.mean(sample) <= high + tolerance


@FEW
@given(st.lists(finite, min_size=1, max_size=30), st.integers(0, 2**32 - 1))
def test_same_seed_same_interval(sample, seed):
    assert bootstrap_ci(sample, seed=seed, num_resamples=200) == bootstrap_ci(sample, seed=seed, num_resamples=200)


def test_different_seeds_resample_differently():
    sample = np.random.default_rng(1).normal(size=30)
    assert bootstrap_ci(sample, seed=0) != bootstrap_ci(sample, seed=1)


def test_user_bootstrap_weights_users_equally():
    per_user = {"ann": [1.0, 1.0, 1.0, 1.0], "bob": [0.0]}
    assert mean_of_user_means(per_user) == 0.5  # the pooled mean of the 5 outcomes would be 0.8
    # users resampled: means of (1, 0) resamples are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert user_bootstrap_ci(per_user) == (0.0, 1.0)
    assert user_bootstrap_ci(per_user, confidence=0.4) == (0.5, 0.5)
    # a user's outcomes count only through their mean: repeating them changes nothing
    repeated = {"ann": [1.0] * 40, "bob": [0.0] * 7}
    assert user_bootstrap_ci(repeated, seed=3) == user_bootstrap_ci(per_user, seed=3)


@FEW
@given(st.dictionaries(st.integers(0, 50), st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=8),
                       min_size=1, max_size=15), st.integers(0, 1000))  # fmt: skip
def test_user_bootstrap_is_a_bootstrap_of_user_means(per_user, seed):
    user_means = [np.mean(outcomes) for outcomes in per_user.values()]
    low, high = user_bootstrap_ci(per_user, seed=seed, num_resamples=500)
    assert (low, high) == bootstrap_ci(user_means, seed=seed, num_resamples=500)
    assert 0.0 <= low <= mean_of_user_means(per_user) + 1e-12 and mean_of_user_means(per_user) - 1e-12 <= high <= 1


def test_user_bootstrap_is_wider_than_a_comparison_bootstrap_for_correlated_users():
    # each user agrees with themselves: 10 users who always win, 10 who always lose, 20 comparisons each
    per_user = {u: [float(u < 10)] * 20 for u in range(20)}
    pooled = [x for outcomes in per_user.values() for x in outcomes]
    user_low, user_high = user_bootstrap_ci(per_user)
    low, high = bootstrap_ci(pooled)
    assert user_high - user_low > 2 * (high - low)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="`values` is empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="`confidence` must lie strictly between 0 and 1, got 1"):
        bootstrap_ci([1.0, 2.0], confidence=1)
    with pytest.raises(ValueError, match="`confidence` must lie strictly between 0 and 1, got 0"):
        user_bootstrap_ci({"a": [1.0]}, confidence=0)
    with pytest.raises(ValueError, match="`num_resamples` must be a positive integer, got 0"):
        bootstrap_ci([1.0], num_resamples=0)
    with pytest.raises(ValueError, match="`values` contains NaN or Inf"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"`values` must be 1-D, got shape \(2, 2\)"):
        bootstrap_ci([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="`scores_a` and `scores_b` must have the same length, got 2 and 3"):
        win_rate([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="`scores_a` is empty"):
        win_rate([], [])
    with pytest.raises(ValueError, match=r"outcomes in \[0, 1\].*pass `scores_b`"):
        win_rate([0.2, 3.0])
    with pytest.raises(ValueError, match="`per_user` is empty"):
        user_bootstrap_ci({})
    with pytest.raises(ValueError, match=r"`per_user\['bob'\]` is empty"):
        user_bootstrap_ci({"ann": [1.0], "bob": []})
    with pytest.raises(ValueError, match="`per_user` must map each user"):
        user_bootstrap_ci([[1.0], [0.0]])
    with pytest.raises(ValueError, match="`scores_a` must be a 1-D sequence of numbers"):
        win_rate(["a", "b"], [1, 2])
