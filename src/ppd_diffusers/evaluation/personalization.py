"""The paper's win-rate protocol: base against personalized images of held-out users, from the same seeds.

For every held-out user the embedding comes from their profile pairs; for each of their held-out prompts the
pipeline draws the base image (user scale 0, the plain base model) and the personalized image from the
same noise, and every reward scorer and personalized judge compares the two. Results are appended per (user,
prompt) as they come (``RecordStore``), so a killed run continues where it stopped; under ``accelerate launch``
each process takes every n-th user with work left and the main process writes the report.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..preference_pairs import PreferencePair
from ..training.pickapic import pair_from_row, stable_seed
from .records import RecordStore, record_key
from .users import EvaluationUser

__all__ = ["JudgeContext", "evaluate_personalization", "image_path"]

logger = logging.getLogger(__name__)

Scorer = Callable[[Sequence[Any], Sequence[str]], torch.Tensor]


@dataclass
class JudgeContext:
    """What a personalized judge may know of the user it judges for.

    Args:
        user_id: The user.
        profile_pairs: The pairs that built the user's embedding.
        held_out_pairs: The user's later choices (pairs not in the profile, no profile caption).
    """

    user_id: Any
    profile_pairs: list[PreferencePair]
    held_out_pairs: list[PreferencePair] = field(default_factory=list)


# A judge: (context, prompts, images a, images b) -> P(the user prefers a), one per prompt
Judge = Callable[[JudgeContext, Sequence[str], Sequence[Any], Sequence[Any]], torch.Tensor]


def image_path(user_id: Any, prompt_index: int, variant: str) -> str:
    """Where an evaluation stores an image, relative to its output folder."""
    user = re.sub(r"[^A-Za-z0-9_.-]", "_", str(user_id))
    return os.path.join("images", f"user-{user}", f"{prompt_index:03d}-{variant}.png")


def evaluate_personalization(
    pipe: Any,
    dataset: Any,
    users: Sequence[EvaluationUser],
    output_dir: str | os.PathLike,
    scorers: Mapping[str, Scorer] | None = None,
    judges: Mapping[str, Judge] | None = None,
    user_embeddings: Mapping[Any, torch.Tensor] | None = None,
    max_judge_pairs: int = 16,
    prompts_per_batch: int = 4,
    seed: int = 0,
    state: Any = None,
    show_progress: bool = True,
    **generation_kwargs: Any,
) -> list[dict] | None:
    """Generates and judges base against personalized images for every user and prompt not done yet.

    Args:
        pipe: A ``PersonalizedStableCascadePipeline`` with its user adapter and decoder (and its preference
            encoder, unless ``user_embeddings`` has every user).
        dataset: The Pick-a-Pic-format dataset ``users`` was planned on (rows are decoded for profile and
            held-out pairs only).
        users: From ``plan_evaluation_users``.
        output_dir: Images go to ``images/``, results to ``records/``.
        scorers: Reward scorers by name (``scorer(images, prompts) -> scores``), e.g. from ``load_scorer``.
        judges: Personalized judges by name (``judge(context, prompts, images_a, images_b) -> P(a)``, or
            ``(P(a), details)`` with one JSON-ready dict per prompt, recorded under ``judge_details``), e.g.
            ``held_out_pairs_judge(...)`` or ``vlm_judge(...)``.
        user_embeddings: Precomputed embeddings ``(tokens, width)`` by user id (e.g. the training run's file);
            users missing from it are encoded from their profile pairs with ``pipe.encode_user``.
        max_judge_pairs: Held-out pairs decoded per user for the judges (one per distinct caption, in row order).
        prompts_per_batch: Prompts generated together (two images each).
        seed: Seed of the noise; prompt ``i`` of user ``u`` always gets the same noise, in any process.
        state: The ``accelerate.Accelerator`` (or ``PartialState``) whose processes share the users.
        show_progress: Show a progress bar over this process's prompts.
        **generation_kwargs: Passed to the pipeline (``num_inference_steps``, ``height``, ``guidance_scale``...).

    Returns:
        Every record of the planned users and prompts (all processes) on the main process, ``None`` on the
        others. Each record
        holds ``user_id``, ``prompt_index``, ``prompt``, ``seed``, ``images`` (paths of ``base`` and
        ``personalized``), ``scores`` (per scorer, ``base`` and ``personalized``) and ``judges`` (per judge,
        the probability that the user prefers the personalized image, and ``judge_details``).
    """
    scorers, judges = dict(scorers or {}), dict(judges or {})
    if not scorers and not judges:
        raise ValueError("Give at least one scorer or judge: an evaluation with neither judges nothing.")
    if prompts_per_batch < 1:
        raise ValueError(f"`prompts_per_batch` must be positive, got {prompts_per_batch}.")
    if state is None:
        from accelerate import Accelerator

        state = Accelerator()
    output_dir = Path(output_dir)
    store = RecordStore(output_dir, state.process_index)
    done = store.load()
    # every process reads the same records before any writes: one that read after another's first record would
    # deal the users out differently and leave some to nobody
    state.wait_for_everyone()
    planned = {record_key(user.user_id, i) for user in users for i in range(len(user.prompts))}
    # users with work left are dealt out after the finished ones are set aside, so a resumed run (or one with
    # another number of processes) keeps every process busy rather than some waiting at the barrier
    todo = [(user, [i for i in range(len(user.prompts)) if record_key(user.user_id, i) not in done]) for user in users]
    todo = [(user, indices) for user, indices in todo if indices][state.process_index :: state.num_processes]
    total = sum(len(indices) for _, indices in todo)
    logger.info("Process %d: %d users, %d prompts to evaluate (%d done before).", state.process_index, len(todo),
                total, len(planned & done.keys()))  # fmt: skip
    bar = tqdm(total=total, desc="evaluating", unit="prompt", disable=not show_progress)
    for user, indices in todo:
        context = JudgeContext(
            user.user_id,
            [pair_from_row(dataset[row]) for row in user.profile_rows],
            [pair_from_row(dataset[row]) for row in user.judge_rows[:max_judge_pairs]] if judges else [],
        )
        embedding = _user_embedding(pipe, context, user_embeddings)
        for start in range(0, len(indices), prompts_per_batch):
            chunk = indices[start : start + prompts_per_batch]
            for record in _evaluate_chunk(pipe, user, context, embedding, chunk, scorers, judges, seed,
                                          output_dir, generation_kwargs):  # fmt: skip
                store.append(record)
            bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    # records of users or prompts no longer planned (a smaller --max_users) stay on disk but out of the report
    return [record for key, record in store.load().items() if key in planned]


def _user_embedding(pipe: Any, context: JudgeContext, table: Mapping[Any, torch.Tensor] | None) -> torch.Tensor:
    if table is not None and context.user_id in table:
        embedding = torch.as_tensor(table[context.user_id])
        return embedding if embedding.dim() == 3 else embedding[None]
    return pipe.encode_user(context.profile_pairs)


def _evaluate_chunk(pipe, user, context, embedding, indices, scorers, judges, seed, output_dir, generation_kwargs):
    prompts = [user.prompts[i] for i in indices]
    seeds = [stable_seed(seed, "evaluate", repr(user.user_id), i) % 2**63 for i in indices]
    # image 2k is the base model (scale 0), 2k + 1 the user, both from prompt k's noise
    output = pipe(
        [p for p in prompts for _ in range(2)],
        user_embeds=embedding.expand(2 * len(prompts), *embedding.shape[1:]),
        user_scale=[0.0, 1.0] * len(prompts),
        generator=[torch.Generator().manual_seed(s) for s in seeds for _ in range(2)],
        **generation_kwargs,
    )
    base, mine = output.images[0::2], output.images[1::2]
    scores = {name: scorer(base + mine, prompts + prompts) for name, scorer in scorers.items()}
    verdicts, details = {}, {}
    for name, judge in judges.items():
        verdict = judge(context, prompts, mine, base)
        verdicts[name], details[name] = verdict if isinstance(verdict, tuple) else (verdict, None)
    for k, (index, prompt) in enumerate(zip(indices, prompts, strict=True)):
        paths = {variant: image_path(user.user_id, index, variant) for variant in ("base", "personalized")}
        for variant, image in (("base", base[k]), ("personalized", mine[k])):
            (output_dir / paths[variant]).parent.mkdir(parents=True, exist_ok=True)
            image.save(output_dir / paths[variant])
        yield {
            "user_id": user.user_id,
            "prompt_index": index,
            "prompt": prompt,
            "seed": seeds[k],
            "images": paths,
            "scores": {
                name: {"base": float(s[k]), "personalized": float(s[len(prompts) + k])} for name, s in scores.items()
            },
            "judges": {name: float(p[k]) for name, p in verdicts.items()},
            "judge_details": {name: d[k] for name, d in details.items() if d is not None},
        }
