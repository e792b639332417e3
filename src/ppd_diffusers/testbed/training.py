"""Training the testbed's adapters: the library's ``ppd_dpo_step``, several adapters at once.

Every adapter of an experiment (PPD, pooled DPO, each single-reward bound) is independent of the others, so
``config.workers`` of them train side by side, each in its own Python thread with torch's ops single-threaded:
on a 2-core laptop two single-threaded trainings finish about 30 % sooner than one after the other with two
threads each (the models are small: much of a step is too small or too serial to split across cores).
Threads, not processes: torch releases the GIL inside its ops, and a thread needs no pickling, no re-import
of the caller's script and no fork of a process whose thread pools have started. Each training is seeded by
the configuration alone and runs single-threaded however many run beside it, so the adapters, and the
report, do not depend on ``workers``.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapter import UserAdapter
from ..loss import PPDLoss
from ..training.dpo_step import ppd_dpo_step
from ..training.objectives import StageCObjective
from .loop import PairPool, TestbedConfig, UserPairs

if TYPE_CHECKING:
    from ..pipeline_personalized_stable_cascade import PersonalizedStableCascadePipeline

__all__ = ["StratifiedStageCObjective", "TrainingJob", "train_adapters"]


@dataclass
class TrainingJob:
    """One adapter to train: the pairs of its users and one embedding per user.

    Args:
        training: The users' training pairs.
        user_embeds: ``(len(training), tokens, width)``; one constant row per user gives user-less DPO.
        name: Shown while it trains.
    """

    training: list[UserPairs]
    user_embeds: torch.Tensor
    name: str


class StratifiedStageCObjective(StageCObjective):
    """Stage C's objective with a step's timesteps stratified: one uniform draw in each of ``batch_size``
    equal strata of [0, 1), in random order, so every step sees the whole noise range (less gradient
    noise than independent draws, the same distribution per pair)."""

    def sample_timesteps(self, batch_size, device=None, generator=None):
        rng_device = generator.device if generator is not None else device  # as the plain objective draws
        strata = torch.randperm(batch_size, generator=generator, device=rng_device)
        offset = torch.rand(batch_size, generator=generator, device=rng_device)
        return ((strata + offset) / batch_size).to(device)


def train_adapters(
    pipe: PersonalizedStableCascadePipeline,
    pool: PairPool,
    jobs: list[TrainingJob],
    embed_dim: int,
    config: TestbedConfig,
    steps: int,
) -> list[UserAdapter]:
    """One ``UserAdapter`` per job, each trained for ``steps`` steps of ``config.pairs_per_step`` pairs.

    Args:
        pipe: The testbed's base pipeline (its prior is the model trained against; it is not changed).
        pool: The base samples the pairs index.
        jobs: What to train.
        embed_dim: Width of the user embeddings.
        config: The hyperparameters and ``workers``, how many adapters train at once.
        steps: Optimizer steps per adapter.

    Returns:
        The trained adapters, in the order of ``jobs``, in ``eval()`` mode.
    """
    with torch.no_grad():
        hidden, pooled = pipe.encode_prompt(config.prompts, pipe.prior.device)
    # every job gets its own copy of the prior, so no module is shared between threads (attaching may set a
    # model's processors and flags), and its adapter's initial weights, made here in job order so they do not
    # depend on which thread runs first
    starts = [(copy.deepcopy(pipe.prior), _new_adapter(pipe.prior, embed_dim, config)) for _ in jobs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: each training runs single-threaded wherever it runs
    try:
        with (
            ThreadPoolExecutor(max(1, config.workers)) as executor,
            tqdm(total=len(jobs), desc="training adapters", leave=False) as bar,
        ):
            futures = [
                executor.submit(_train, prior, adapter, hidden, pooled, pool, job, config, steps)
                for (prior, adapter), job in zip(starts, jobs, strict=True)
            ]
            for future, job in zip(futures, jobs, strict=True):
                future.add_done_callback(lambda _, name=job.name: (bar.set_postfix_str(name), bar.update()))
            try:
                return [future.result().eval() for future in futures]
            except BaseException:
                executor.shutdown(cancel_futures=True)  # fail now, not after the queued trainings
                raise
    finally:
        torch.set_num_threads(threads)


def _new_adapter(prior, embed_dim: int, config: TestbedConfig) -> UserAdapter:
    torch.manual_seed(config.seed)
    return UserAdapter.from_unet(
        prior, embed_dim, num_user_tokens=config.num_user_tokens, user_token_dim=config.user_token_dim
    )


def _train(prior, adapter: UserAdapter, hidden, pooled, pool: PairPool, job: TrainingJob, config, steps):
    """One job's training loop; its random draws come from its own generators, seeded by the configuration."""
    prior.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    model = adapter.attach(prior)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, weight_decay=0.0)
    loss_fn = PPDLoss(beta=config.beta)
    objective = StratifiedStageCObjective() if config.stratified_timesteps else StageCObjective()
    owner = np.concatenate([np.full(len(p.chosen), u) for u, p in enumerate(job.training)])
    chosen = np.concatenate([p.chosen for p in job.training])
    rejected = np.concatenate([p.rejected for p in job.training])
    rng = np.random.default_rng(config.seed)
    averaged = [p.detach().clone() for p in adapter.parameters()] if config.ema_decay > 0 else None
    for step in range(steps):
        batch = rng.integers(0, len(chosen), config.pairs_per_step)
        prompt = pool.prompt_index[chosen[batch]]
        out = ppd_dpo_step(
            model,
            pool.latents[chosen[batch]],
            pool.latents[rejected[batch]],
            pooled[prompt],
            job.user_embeds[owner[batch]],
            clip_text=hidden[prompt],
            loss_fn=loss_fn,
            user_dropout=config.user_dropout,
            timestep_weighting=config.timestep_weighting,
            generator=generator,
            objective=objective,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if averaged is not None:
            _ema_update(averaged, adapter, config.ema_decay, step)
    if averaged is not None:
        with torch.no_grad():
            for mean, param in zip(averaged, adapter.parameters(), strict=True):
                param.copy_(mean)
    return adapter


@torch.no_grad()
def _ema_update(averaged: list[torch.Tensor], adapter: torch.nn.Module, decay: float, step: int) -> None:
    # diffusers' EMAModel warm-up: the average follows the first steps closely instead of lingering at the
    # initial weights (the rate reaches `decay` = 0.9 at step 80; about 0.82 at the last of 40 steps)
    rate = min(decay, (1 + step) / (10 + step))
    for mean, param in zip(averaged, adapter.parameters(), strict=True):
        mean.lerp_(param, 1 - rate)
