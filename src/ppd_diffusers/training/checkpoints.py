"""Resumable training checkpoints in ``output_dir/checkpoint-N``: written atomically, found again after a kill."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

__all__ = ["list_checkpoints", "prepare_output_dir", "resolve_resume", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".tmp"


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a killed save leaves a ``.tmp`` folder, never a checkpoint)."""
    if not os.path.isdir(output_dir):
        return []
    found = [d for d in os.listdir(output_dir) if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", d)]
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def step_of(checkpoint: str) -> int:
    """The optimizer step a ``checkpoint-N`` folder was saved at."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(checkpoint)))
    if match is None:
        raise ValueError(f"`resume_from_checkpoint` must be a `{CHECKPOINT_PREFIX}N` folder, got {checkpoint!r}.")
    return int(match.group(1))


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint to resume from: ``None``, a folder, or ``"latest"`` (``None`` when there is none yet)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("No checkpoint in %s: starting a new run.", output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume_from_checkpoint):
        raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder.")
    step_of(resume_from_checkpoint)
    return resume_from_checkpoint


def prepare_output_dir(output_dir: str, checkpoint: str | None, metrics_file: str) -> None:
    """Readies ``output_dir`` on the main process before a run starts or resumes.

    A new run refuses a folder that already holds checkpoints (their steps would collide with the new
    run's). A resumed run drops the checkpoints newer than the one it resumes from and the metric lines
    logged after it, so the folder reads as if the run had never gone further. Leftovers of killed saves
    (``checkpoint-N.tmp``) are removed.
    """
    existing = list_checkpoints(output_dir)
    if checkpoint is None and existing:
        raise ValueError(
            f"`output_dir` {output_dir!r} already holds checkpoints ({os.path.basename(existing[-1])}...): resume "
            "with `--resume_from_checkpoint latest`, or train into another `output_dir`."
        )
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(CHECKPOINT_PREFIX) and name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if checkpoint is None:
        return
    step = step_of(checkpoint)
    for newer in existing:
        if step_of(newer) > step:
            shutil.rmtree(newer)
    if os.path.exists(metrics_file):
        kept = [json.dumps(record) + "\n" for record in _metric_records(metrics_file) if record["step"] <= step]
        with open(metrics_file, "w") as f:
            f.writelines(kept)


def _metric_records(metrics_file: str) -> list[dict]:
    records = []
    with open(metrics_file) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written when the run was killed
                continue
    return records


def last_metrics(metrics_file: str) -> dict[str, float]:
    """The metrics of the last logged step (without ``step``), or ``{}``."""
    records = _metric_records(metrics_file) if os.path.exists(metrics_file) else []
    return {k: v for k, v in records[-1].items() if k != "step"} if records else {}


def save_checkpoint(accelerator: Any, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """``accelerator.save_state`` into ``checkpoint-N.tmp``, renamed to ``checkpoint-N`` once every process is done.

    A run killed while saving therefore resumes from the previous checkpoint. With ``total_limit``, the
    oldest checkpoints beyond it are deleted. Every process must call this (``save_state`` gathers from all).
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    partial = final + PARTIAL_SUFFIX
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final
