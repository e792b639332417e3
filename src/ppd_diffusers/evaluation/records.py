"""The evaluation's results, one JSON line per (user, prompt), written as they come so a killed run resumes.

Each process appends to its own ``records/process-<rank>.jsonl``; a run (resumed with any number of processes)
reads every file to learn what is done. A line cut short by a kill is ignored and that item is redone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

__all__ = ["RecordStore", "check_settings", "record_key"]

logger = logging.getLogger(__name__)


def record_key(user_id: Any, prompt_index: int) -> str:
    """The identity of one evaluated (user, prompt): the same for a user id before and after a JSON round trip."""
    return f"{type(user_id).__name__}:{user_id}:{prompt_index}"


class RecordStore:
    """Append-only JSON-lines records under ``folder/records``.

    Args:
        folder: The evaluation's output folder.
        process_index: This process's rank (``accelerate``'s ``process_index``); it owns one file.
    """

    def __init__(self, folder: str | os.PathLike, process_index: int = 0):
        self.folder = Path(folder) / "records"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"process-{process_index}.jsonl"

    def load(self) -> dict[str, dict]:
        """Every complete record of every process, by ``record_key`` (a later line for the same key wins)."""
        records: dict[str, dict] = {}
        for path in sorted(self.folder.glob("process-*.jsonl")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the tail of a killed write
                    logger.warning("Ignoring an incomplete line %d of %s; that item is evaluated again.", number, path)
                    continue
                records[record_key(record["user_id"], record["prompt_index"])] = record
        return records

    def append(self, record: dict) -> None:
        """Writes one record and flushes it to disk before returning."""
        # a previous run killed mid-line leaves no newline: start on a fresh line so this record parses
        prefix = ""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                prefix = "" if existing.read(1) == b"\n" else "\n"
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(prefix + json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())


def check_settings(
    folder: str | os.PathLike,
    settings: dict,
    may_change: Collection[str] = ("users",),
    filename: str = "settings.json",
    write: bool = True,
) -> None:
    """Records a run's settings in ``folder/<filename>``, refusing to continue one run with others.

    A resumed run must make its outputs the same way, or they would mix two experiments; the keys in
    ``may_change`` (e.g. how many users, batch sizes) may differ, and are updated.

    Args:
        folder: The run's output folder.
        settings: The settings, JSON-ready (other values are recorded as ``str``).
        may_change: Keys that may differ from the recorded run.
        filename: The settings file in ``folder``.
        write: Record the settings (the main process); ``False`` only checks them (the other processes).

    Raises:
        ValueError: Naming every setting that differs from the recorded run.
    """
    path = Path(folder) / filename
    settings = json.loads(json.dumps(settings, default=str))  # as it will read back
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(
            k for k in set(recorded) | set(settings) if k not in may_change and recorded.get(k) != settings.get(k)
        )
        if changed:
            details = "; ".join(f"{k}: {recorded.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            raise ValueError(
                f"{folder} holds a run made with other settings ({details}): its outputs would be reused. Continue it "
                "with the same settings or write to another output folder."
            )
        if recorded == settings:
            return
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed: a kill never leaves a half file
    path.with_suffix(".tmp").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    os.replace(path.with_suffix(".tmp"), path)
