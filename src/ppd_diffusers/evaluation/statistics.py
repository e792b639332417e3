"""Win rates and percentile-bootstrap confidence intervals, including a cluster bootstrap over users.

A personalized evaluation compares images *per user*, and one user's outcomes are correlated (the same taste
judges all of them), so the honest uncertainty of a win rate comes from resampling users, not comparisons:
``user_bootstrap_ci``. ``bootstrap_ci`` is the plain percentile bootstrap for independent values.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "mean_of_user_means", "pairwise_outcomes", "user_bootstrap_ci", "win_rate"]


def _as_1d(values: Any, name: str) -> np.ndarray:
    """A finite float64 vector from a list, numpy array or tensor (any device)."""
    if type(values).__module__.startswith("torch"):
        values = values.detach().float().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers, got {type(values).__name__}.") from error
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"`{name}` is empty: a statistic needs at least one value.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or Inf values.")
    return array


def pairwise_outcomes(scores_a: Any, scores_b: Any) -> np.ndarray:
    """Per-comparison outcomes of ``a`` against ``b``: 1 where ``a`` scores higher, 0.5 on a tie, 0 where lower.

    Args:
        scores_a: Scores of the first system, one per comparison (list, numpy array or tensor).
        scores_b: Scores of the second system for the same comparisons.

    Returns:
        A float64 array of the same length, with values in ``{0, 0.5, 1}``.

    Examples:
        >>> pairwise_outcomes([3, 1, 2], [1, 1, 5]).tolist()
        [1.0, 0.5, 0.0]
    """
    a, b = _as_1d(scores_a, "scores_a"), _as_1d(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"`scores_a` and `scores_b` must have the same length, got {a.size} and {b.size}.")
    return (a > b) + 0.5 * (a == b)


def win_rate(scores_a: Any, scores_b: Any | None = None) -> float:
    """The fraction of comparisons that ``a`` wins, a tie counting one half.

    With two score vectors, comparison ``i`` is ``scores_a[i]`` against ``scores_b[i]``, so that
    ``win_rate(a, b) + win_rate(b, a) == 1``. With one argument, ``scores_a`` already holds per-comparison
    outcomes in ``[0, 1]`` (1 a win, 0.5 a tie, 0 a loss, or a judge's probability that ``a`` is preferred),
    and their mean is returned.

    Args:
        scores_a: Scores of system ``a``, or per-comparison outcomes when ``scores_b`` is ``None``.
        scores_b: Scores of system ``b`` for the same comparisons.

    Returns:
        The win rate of ``a`` in ``[0, 1]``.

    Raises:
        ValueError: Empty or non-finite input, lengths that differ, or outcomes outside ``[0, 1]``.

    Examples:
        >>> win_rate([3, 1, 2, 4], [1, 1, 5, 0])  # win, tie, loss, win
        0.625
        >>> win_rate([1.0, 0.5, 0.0, 1.0])  # the same outcomes
        0.625
    """
    if scores_b is not None:
        return float(pairwise_outcomes(scores_a, scores_b).mean())
    outcomes = _as_1d(scores_a, "scores_a")
    if outcomes.min() < 0 or outcomes.max() > 1:
        raise ValueError(
            "`scores_a` alone must hold per-comparison outcomes in [0, 1], got values in "
            f"[{outcomes.min():.3g}, {outcomes.max():.3g}]; to compare two score vectors pass `scores_b` too."
        )
    return float(outcomes.mean())


def _check_bootstrap_args(num_resamples: int, confidence: float) -> None:
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int | np.integer) or num_resamples < 1:
        raise ValueError(f"`num_resamples` must be a positive integer, got {num_resamples!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must lie strictly between 0 and 1, got {confidence!r}.")


def _resampled_statistics(values: np.ndarray, statistic: Callable[..., Any], num_resamples: int, seed: int):
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, values.size, size=(num_resamples, values.size))]
    try:  # numpy reductions take `axis`: one vectorised call instead of thousands
        stats = np.asarray(statistic(samples, axis=1), dtype=np.float64)
        if stats.shape == (num_resamples,):
            return stats
    except TypeError:
        pass
    return np.array([float(statistic(sample)) for sample in samples])


def bootstrap_ci(
    values: Any,
    statistic: Callable[..., Any] = np.mean,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval of ``statistic(values)``.

    ``values`` is resampled with replacement ``num_resamples`` times; the interval runs between the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled statistics. The same
    ``seed`` gives the same resamples, so the interval is reproducible and, for one seed, widens monotonically
    with ``confidence``. It assumes independent values: for outcomes grouped by user, use ``user_bootstrap_ci``.

    Args:
        values: The sample (list, numpy array or tensor), 1-D.
        statistic: A function of a 1-D sample returning a number. Numpy reductions that take ``axis`` (``np.mean``,
            ``np.median``) are evaluated on all resamples at once.
        num_resamples: Bootstrap resamples.
        confidence: Coverage of the interval, strictly between 0 and 1.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: Empty or non-finite ``values``, ``confidence`` outside ``(0, 1)``, ``num_resamples < 1``.

    Examples:
        >>> bootstrap_ci([0.25, 0.25, 0.25])
        (0.25, 0.25)
        >>> low, high = bootstrap_ci([0, 1, 1, 0, 1, 1, 1, 0])
        >>> bool(low < 0.625 < high)
        True
    """
    _check_bootstrap_args(num_resamples, confidence)
    stats = _resampled_statistics(_as_1d(values, "values"), statistic, num_resamples, seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


def _user_means(per_user: Mapping[Hashable, Sequence[float]]) -> np.ndarray:
    if not isinstance(per_user, Mapping):
        raise ValueError(f"`per_user` must map each user to their outcomes, got {type(per_user).__name__}.")
    if not per_user:
        raise ValueError("`per_user` is empty: it needs at least one user.")
    return np.array([_as_1d(outcomes, f"per_user[{user!r}]").mean() for user, outcomes in per_user.items()])


def mean_of_user_means(per_user: Mapping[Hashable, Sequence[float]]) -> float:
    """The mean over users of each user's mean outcome: every user weighs the same, however many comparisons
    they have (the point estimate whose interval ``user_bootstrap_ci`` gives).

    Examples:
        >>> mean_of_user_means({"ann": [1, 1, 1, 1], "bob": [0]})  # the pooled mean would be 0.8
        0.5
    """
    return float(_user_means(per_user).mean())


def user_bootstrap_ci(
    per_user: Mapping[Hashable, Sequence[float]],
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A cluster-bootstrap confidence interval of the mean of per-user means.

    The statistic is ``mean_of_user_means``: each user's outcomes (e.g. win/tie/loss as 1/0.5/0 over their
    prompts) are averaged first, then users are averaged with equal weights, as a per-user win rate is. The
    bootstrap resamples *users* with replacement, keeping each user's outcomes together, because outcomes of
    one user are correlated; resampling single comparisons would understate the uncertainty. Since the
    statistic depends on a user only through their mean, this equals ``bootstrap_ci`` of the per-user means.

    Args:
        per_user: Maps each user to a non-empty sequence of their outcomes.
        num_resamples: Resamples of the users.
        confidence: Coverage of the interval, strictly between 0 and 1.
        seed: Seed of the user resampling.

    Returns:
        ``(low, high)``, bounds of the mean of per-user means.

    Raises:
        ValueError: No users, a user without outcomes, non-finite outcomes, or bad ``confidence`` /
            ``num_resamples`` (each message names the argument or the user).

    Examples:
        >>> per_user = {"ann": [1, 1, 0.5], "bob": [0, 1], "eve": [1, 1, 1, 0]}
        >>> low, high = user_bootstrap_ci(per_user)
        >>> bool(low <= mean_of_user_means(per_user) <= high)
        True
    """
    _check_bootstrap_args(num_resamples, confidence)
    return bootstrap_ci(_user_means(per_user), np.mean, num_resamples, confidence, seed)
