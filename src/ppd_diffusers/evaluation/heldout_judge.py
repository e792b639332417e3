"""``HeldOutPairsJudge``: a personalized judge that stands in for a user with the reward model that best agrees
with the user's own held-out choices."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..preference_pairs import ImageLike, as_user_pairs, load_rgb_image
from .statistics import bootstrap_ci, pairwise_outcomes

__all__ = ["HeldOutPairsJudge", "ScorerAgreement", "check_comparisons", "scorer_agreement"]

logger = logging.getLogger(__name__)

Scorer = Callable[[list[Any], list[str]], torch.Tensor]


@dataclass(frozen=True)
class ScorerAgreement:
    """How often one reward model agrees with one user's held-out choices.

    Args:
        name: The scorer's name.
        accuracy: Fraction of held-out pairs where it scores the chosen image above the rejected one (a tie
            counts one half).
        ci_low: Lower end of the percentile-bootstrap interval of ``accuracy`` (pairs resampled).
        ci_high: Upper end of that interval.
        num_pairs: Held-out pairs it was measured on.
    """

    name: str
    accuracy: float
    ci_low: float
    ci_high: float
    num_pairs: int


def _named_scorers(scorers: Sequence[Scorer] | Mapping[str, Scorer]) -> dict[str, Scorer]:
    if isinstance(scorers, Mapping):
        named = dict(scorers)
    elif isinstance(scorers, Sequence) and not isinstance(scorers, str):
        named = {}
        for i, scorer in enumerate(scorers):
            name = getattr(scorer, "name", None)
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"`scorers[{i}]` has no `name`: give each scorer a `name` or pass a dict {{name: scorer}}."
                )
            if name in named:
                raise ValueError(f"`scorers` has two scorers named {name!r}: pass a dict {{name: scorer}}.")
            named[name] = scorer
    else:
        raise ValueError(
            f"`scorers` must be a list of scorers or a dict {{name: scorer}}, got {type(scorers).__name__}."
        )
    if not named:
        raise ValueError("`scorers` is empty: the judge needs at least one reward model.")
    for name, scorer in named.items():
        if not callable(scorer):
            raise ValueError(f"scorer {name!r} is not callable: scorers are called as `scorer(images, prompts)`.")
    return named


class _DistinctImages:
    """Each distinct (prompt, image) once: images with the same pixels under the same prompt are scored a single
    time, however many pairs hold them and whether they came as one object, one file path or two copies."""

    def __init__(self, max_side: int | None):
        self.max_side = max_side
        self.prompts: list[str] = []
        self.images: list[PIL.Image.Image] = []
        self._index: dict[tuple[str, tuple[int, int], str], int] = {}

    def add(self, prompt: str, image: ImageLike, name: str) -> int:
        image = load_rgb_image(image, name, self.max_side)
        key = (prompt, image.size, hashlib.sha256(image.tobytes()).hexdigest())
        if key not in self._index:
            self._index[key] = len(self.images)
            self.prompts.append(prompt)
            self.images.append(image)
        return self._index[key]

    def score(self, scorer: Scorer, name: str, batch_size: int, show_progress: bool | None) -> torch.Tensor:
        starts = range(0, len(self.images), batch_size)
        show = len(starts) > 1 if show_progress is None else show_progress
        scores = []
        for start in tqdm(starts, desc=f"Scoring with {name}", disable=not show):
            images, prompts = self.images[start : start + batch_size], self.prompts[start : start + batch_size]
            batch = torch.as_tensor(scorer(images, prompts)).detach().float().cpu()
            if batch.shape != (len(images),):
                raise ValueError(
                    f"scorer {name!r} returned shape {tuple(batch.shape)} for {len(images)} images; a scorer "
                    "returns one score per image, shape (N,)."
                )
            scores.append(batch)
        return torch.cat(scores)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")


def _heldout_outcomes(
    scorers: dict[str, Scorer],
    heldout_pairs: Sequence[Any],
    batch_size: int,
    max_side: int | None,
    show_progress: bool | None,
) -> dict[str, np.ndarray]:
    """Per scorer, the outcome (1 / 0.5 / 0) of each held-out pair: did it score the chosen image higher?"""
    _check_batch_size(batch_size)
    users = as_user_pairs(heldout_pairs, name="heldout_pairs", max_side=max_side)
    if len(users) != 1:
        raise ValueError(f"`heldout_pairs` must hold one user's pairs, got {len(users)} users' pair lists.")
    distinct = _DistinctImages(max_side)  # `as_user_pairs` has loaded and shrunk the images already
    chosen = [distinct.add(pair.prompt, pair.chosen, "heldout_pairs") for pair in users[0]]
    rejected = [distinct.add(pair.prompt, pair.rejected, "heldout_pairs") for pair in users[0]]
    outcomes = {}
    for name, scorer in scorers.items():
        scores = distinct.score(scorer, name, batch_size, show_progress).numpy()
        outcomes[name] = pairwise_outcomes(scores[chosen], scores[rejected])
    return outcomes


def _agreement_table(
    outcomes: dict[str, np.ndarray], num_resamples: int, confidence: float, seed: int
) -> list[ScorerAgreement]:
    table = []
    for name, values in outcomes.items():
        low, high = bootstrap_ci(values, np.mean, num_resamples, confidence, seed)
        table.append(ScorerAgreement(name, float(values.mean()), low, high, len(values)))
    return table


def scorer_agreement(
    scorers: Sequence[Scorer] | Mapping[str, Scorer],
    heldout_pairs: Sequence[Any],
    batch_size: int = 16,
    max_side: int | None = None,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    show_progress: bool | None = None,
) -> list[ScorerAgreement]:
    """Scores one user by how accurately each reward model agrees with their held-out choices.

    For every held-out pair ``(prompt, chosen, rejected)`` a scorer agrees when it scores ``chosen`` above
    ``rejected`` under ``prompt`` (1), ties count one half, disagreement 0; its accuracy is the mean over the
    pairs, with a percentile-bootstrap interval over pairs. Each distinct image is scored once per scorer.

    Args:
        scorers: Reward models called as ``scorer(images, prompts) -> (N,)`` scores (a list of scorers with a
            ``name``, or a dict ``{name: scorer}``).
        heldout_pairs: One user's held-out pairs (``PreferencePair``s, tuples or dicts; images in any form
            ``load_rgb_image`` takes).
        batch_size: Images per scorer call.
        max_side: Shrink larger images to this side before scoring (``None``: as given).
        num_resamples: Bootstrap resamples of the interval.
        confidence: Coverage of the interval.
        seed: Seed of the bootstrap.
        show_progress: Show progress bars; by default only when a scorer needs more than one batch.

    Returns:
        One ``ScorerAgreement`` per scorer, in the order given.

    Examples:
        ```py
        table = scorer_agreement([load_scorer("pickscore"), load_scorer("aesthetic")], user_heldout_pairs)
        pandas.DataFrame(map(dataclasses.asdict, table))
        ```
    """
    outcomes = _heldout_outcomes(_named_scorers(scorers), heldout_pairs, batch_size, max_side, show_progress)
    return _agreement_table(outcomes, num_resamples, confidence, seed)


class HeldOutPairsJudge:
    r"""A personalized judge for one user: the reward model that best agrees with the user's held-out choices.

    PPD is judged per user, but a user cannot be asked about new images. Their *held-out* pairs (choices not
    used to build their embedding) are the next best thing: this judge measures, on those pairs, how often
    each reward model agrees with the user (``agreement``, see ``scorer_agreement``) and then judges new pairs
    with the single scorer of highest accuracy (``scorer_name``; ties go to the scorer listed first, so list
    your default first).

    Why the best single scorer and not an accuracy-weighted combination: scorers live on unrelated scales
    (CLIP ~0.3, aesthetic ~5, PickScore ~20), so a combination needs a normalisation that 4-10 held-out pairs
    cannot calibrate, and accuracies measured on so few pairs are too noisy to be useful as weights. One named
    scorer per user is also easy to report and to audit.

    The verdict is hard: ``judge`` returns 1 where the chosen scorer scores ``a`` higher, 0 where lower,
    0.5 on a tie (scores are not probabilities, and their differences have no common scale).

    What it measures, and its biases:

    - it approximates the user by a reward model; tastes that no scorer captures cannot be represented;
    - accuracy on 4-10 held-out pairs is noisy (the interval of ``agreement`` says how much: 4 agreements in
      6 pairs give a 95% interval of [0.33, 1]), and picking the maximum of noisy accuracies overstates the chosen
      scorer's true agreement (winner's curse); report it as an estimate, not as the user's verdict;
    - where no scorer beats 0.5 the judge is no better than a coin for that user (a warning is logged; check
      ``best.accuracy`` to leave such users out);
    - images are compared under their own prompt, so a scorer's prompt-alignment term counts as taste.

    Args:
        scorers: Reward models called as ``scorer(images, prompts) -> (N,)`` (a list of scorers with a ``name``,
            or a dict ``{name: scorer}``); the same scorers may serve many users' judges.
        heldout_pairs: The user's held-out pairs (see ``scorer_agreement``).
        batch_size: Images per scorer call.
        max_side: Shrink larger images to this side before scoring (``None``: as given).
        num_resamples: Bootstrap resamples of the agreement intervals.
        confidence: Coverage of the agreement intervals.
        seed: Seed of the bootstrap.
        show_progress: Show progress bars; by default only when a scorer needs more than one batch.

    Examples:
        ```py
        scorers = [load_scorer("pickscore"), load_scorer("hps"), load_scorer("aesthetic")]
        judge = HeldOutPairsJudge(scorers, heldout_pairs_of_user)
        judge.scorer_name, judge.best.accuracy   # e.g. ("hps", 0.8)
        p_a = judge(prompts, ppd_images, base_images)  # 1 / 0.5 / 0 per prompt
        ```
    """

    def __init__(
        self,
        scorers: Sequence[Scorer] | Mapping[str, Scorer],
        heldout_pairs: Sequence[Any],
        batch_size: int = 16,
        max_side: int | None = None,
        num_resamples: int = 2000,
        confidence: float = 0.95,
        seed: int = 0,
        show_progress: bool | None = None,
    ):
        self.scorers = _named_scorers(scorers)
        self.batch_size = batch_size
        self.max_side = max_side
        self.show_progress = show_progress
        outcomes = _heldout_outcomes(self.scorers, heldout_pairs, batch_size, max_side, show_progress)
        self.agreement: list[ScorerAgreement] = _agreement_table(outcomes, num_resamples, confidence, seed)
        self.best: ScorerAgreement = max(self.agreement, key=lambda row: row.accuracy)  # first of equals
        if self.best.accuracy <= 0.5:
            logger.warning(
                "No scorer agrees with this user's %d held-out pairs better than chance (best: %s at %.2f); "
                "the judge is a coin flip for this user.",
                self.best.num_pairs,
                self.best.name,
                self.best.accuracy,
            )

    @property
    def scorer_name(self) -> str:
        """The name of the scorer that judges for this user."""
        return self.best.name

    def judge(
        self, prompts: str | Sequence[str], images_a: Sequence[ImageLike], images_b: Sequence[ImageLike]
    ) -> torch.Tensor:
        """P(the user prefers ``images_a[i]`` over ``images_b[i]`` for ``prompts[i]``), as the chosen scorer
        sees it: 1, 0.5 (a tie) or 0.

        Args:
            prompts: One prompt per comparison, or one prompt for all.
            images_a: The first candidates (any form ``load_rgb_image`` takes).
            images_b: The second candidates, as many.

        Returns:
            A float32 CPU tensor ``(N,)``. ``judge(p, a, b) == 1 - judge(p, b, a)``.
        """
        prompts, images_a, images_b = check_comparisons(prompts, images_a, images_b)
        _check_batch_size(self.batch_size)
        distinct = _DistinctImages(self.max_side)
        index_a = [distinct.add(prompts[i], image, f"images_a[{i}]") for i, image in enumerate(images_a)]
        index_b = [distinct.add(prompts[i], image, f"images_b[{i}]") for i, image in enumerate(images_b)]
        name = self.scorer_name
        scores = distinct.score(self.scorers[name], name, self.batch_size, self.show_progress).numpy()
        return torch.from_numpy(pairwise_outcomes(scores[index_a], scores[index_b])).float()

    __call__ = judge

    def __repr__(self) -> str:
        table = ", ".join(f"{row.name}={row.accuracy:.2f}" for row in self.agreement)
        return f"{type(self).__name__}(scorer={self.scorer_name!r}, agreement: {table})"


def check_comparisons(
    prompts: str | Sequence[str], images_a: Sequence[ImageLike], images_b: Sequence[ImageLike]
) -> tuple[list[str], list[ImageLike], list[ImageLike]]:
    """Validates the arguments of a judge call: ``N`` prompts (or one for all), ``N`` images a and b.

    Raises:
        ValueError: Naming the argument that is not a list, is empty, has the wrong length or holds a bad prompt.
    """
    lists = {}
    for name, value in (("images_a", images_a), ("images_b", images_b)):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ValueError(f"`{name}` must be a list of images, got {type(value).__name__}.")
        lists[name] = list(value)
    if not lists["images_a"]:
        raise ValueError("`images_a` is empty: there is nothing to judge.")
    if len(lists["images_a"]) != len(lists["images_b"]):
        raise ValueError(
            f"`images_a` and `images_b` must have the same length, got {len(images_a)} and {len(images_b)}."
        )
    if isinstance(prompts, str):
        prompts = [prompts] * len(images_a)
    if not isinstance(prompts, Sequence) or len(prompts) != len(images_a):
        what = f"{len(prompts)} prompts" if isinstance(prompts, Sequence) else type(prompts).__name__
        raise ValueError(f"`prompts` must be a string or a list of {len(images_a)} strings, got {what}.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"`prompts[{i}]` must be a non-empty string, got {prompt!r}.")
    return list(prompts), lists["images_a"], lists["images_b"]
