"""Resumable training checkpoints in ``output_dir/checkpoint-N``: written atomically, found again after a kill."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

__all__ = [
    "changed_settings",
    "list_checkpoints",
    "prepare_output_dir",
    "resolve_resume",
    "run_outputs",
    "save_checkpoint",
]

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


# what a finished run leaves beside its checkpoints (adapter, model card, validation grids)
FINAL_OUTPUTS = ("README.md", "config.json", "diffusion_pytorch_model.safetensors", "validation")
SETTINGS_FILE = "training_args.json"


def run_outputs(output_dir: str, metrics_file: str) -> list[str]:
    """Paths in ``output_dir`` that a training run writes and that are there already (from an earlier run)."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in sorted(os.listdir(output_dir)) if d.startswith(CHECKPOINT_PREFIX)]
    names += [name for name in FINAL_OUTPUTS if os.path.exists(os.path.join(output_dir, name))]
    found = [os.path.join(output_dir, name) for name in names]
    return found + ([metrics_file] if os.path.exists(metrics_file) else [])


def prepare_output_dir(
    output_dir: str,
    checkpoint: str | None,
    metrics_file: str,
    overwrite: bool = False,
    resuming: bool = False,
) -> None:
    """Readies ``output_dir`` on the main process before a run starts or resumes; never loses data silently.

    - A new run refuses a folder that already holds a run's outputs (checkpoints, adapter, model card,
      metrics, validation grids), naming them, unless ``overwrite``: then exactly those are removed first,
      and nothing else in the folder is touched. ``resuming`` (``--resume_from_checkpoint latest`` that found
      no checkpoint) restarts a run killed before its first checkpoint in place: its metric lines go.
    - A run resumed from a checkpoint *in* ``output_dir`` continues that run: the checkpoints newer than the
      one it resumes from and the metric lines logged after it are dropped, so the folder reads as if the
      run had never gone further.
    - A run resumed from a checkpoint *elsewhere* writes into ``output_dir`` as a new run would (the same
      refusal applies) and deletes nothing, in either folder.

    Leftovers of killed saves (``checkpoint-N.tmp``) in ``output_dir`` are removed.
    """
    own = checkpoint is not None and os.path.realpath(os.path.dirname(os.path.normpath(checkpoint))) == (
        os.path.realpath(output_dir)
    )
    existing = [path for path in run_outputs(output_dir, metrics_file) if not path.endswith(PARTIAL_SUFFIX)]
    if not own and existing:
        # a run killed before its first checkpoint, resumed with `latest`, starts again in place
        restarting = resuming and existing == [metrics_file]
        if not (restarting or overwrite):
            names = ", ".join(os.path.relpath(p, output_dir) for p in existing[:6])
            raise ValueError(
                f"`output_dir` {output_dir!r} already holds a training run's outputs ({names}): resume it with "
                "`--resume_from_checkpoint latest`, train into another `output_dir`, or pass `--overwrite_output_dir` "
                "to delete those outputs first."
            )
        for path in existing:
            if overwrite:
                logger.warning("Removing %s of an earlier run (`overwrite_output_dir`).", path)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(CHECKPOINT_PREFIX) and name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if not own:
        return
    step = step_of(checkpoint)
    for newer in list_checkpoints(output_dir):
        if step_of(newer) > step:
            shutil.rmtree(newer)
    if os.path.exists(metrics_file):
        kept = [json.dumps(record) + "\n" for record in _metric_records(metrics_file) if record["step"] <= step]
        with open(metrics_file, "w") as f:
            f.writelines(kept)


def changed_settings(checkpoint: str, settings: dict[str, Any], ignored: set[str]) -> dict[str, tuple[Any, Any]]:
    """Settings that differ from those the checkpoint was saved with: ``{name: (saved, now)}``.

    ``ignored`` names settings that do not change the training (paths of outputs, logging, validation).
    A checkpoint saved before settings were recorded gives ``{}``.
    """
    path = os.path.join(checkpoint, SETTINGS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    return {
        name: (saved.get(name), value)
        for name, value in settings.items()
        if name not in ignored and name in saved and saved[name] != value
    }


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


def save_checkpoint(
    accelerator: Any, output_dir: str, step: int, total_limit: int | None = None, settings: dict | None = None
) -> str:
    """``accelerator.save_state`` into ``checkpoint-N.tmp``, renamed to ``checkpoint-N`` once every process is done.

    A run killed while saving therefore resumes from the previous checkpoint. With ``total_limit``, the
    oldest checkpoints beyond it are deleted. ``settings`` (JSON-serialisable) are stored beside the state,
    for ``changed_settings`` to compare on resume. Every process must call this (``save_state`` gathers from
    all).
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    partial = final + PARTIAL_SUFFIX
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if settings is not None:
            with open(os.path.join(partial, SETTINGS_FILE), "w") as f:
                json.dump(settings, f, indent=2, sort_keys=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final
