"""The testbed on several seeds: one report per seed and a summary of how much each figure moves between them.

One run of the testbed is one draw: the pool, the users, their pairs and every training's noise follow the seed,
and at the testbed's budgets the figures move a lot from seed to seed (the guide's diagnosis, steps 7 and 8).
``run_testbed_seeds`` runs the same configuration on each seed and writes ``seeds.json`` and ``seeds.md``: every
headline figure per seed with its mean and range, and on how many seeds each of issue 12's targets holds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from .loop import TestbedConfig
from .rewards import REWARDS
from .run import report_config, run_testbed

__all__ = ["run_testbed_seeds", "seeds_markdown", "summarize_seeds"]

logger = logging.getLogger(__name__)

# PPD's share of a bound's gain that issue 12 asks for, by mode, on every reward whose bound gains this much
SHARE_TARGET = {"quick": 0.6, "full": 0.8}
MIN_BOUND_GAIN = 0.5


def run_testbed_seeds(
    config: TestbedConfig,
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    mode: Literal["quick", "full"] | None = None,
    base_model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    resume: bool = False,
) -> dict:
    """Runs ``run_testbed`` once per seed (reports in ``out_dir/seed-<seed>``) and writes the summary.

    Args:
        config: The configuration; its ``seed`` is replaced by each of ``seeds`` in turn.
        seeds: Distinct seeds, at least two.
        out_dir: Output folder: a report folder per seed, ``seeds.json`` and ``seeds.md``.
        mode: Which targets apply (``"quick"`` or ``"full"``: the share of each bound differs). By default
            ``"quick"`` or ``"full"`` when ``config`` is ``TestbedConfig.quick()`` or ``.full()`` (whatever its seed
            and ``workers``); a changed configuration must name its mode.
        base_model: As ``run_testbed``'s.
        encoder: As ``run_testbed``'s.
        resume: Keep a seed's report already in ``out_dir/seed-<seed>`` when it was written with the same
            configuration (e.g. to go on after an interrupted run) instead of running that seed again. The
            report does not record the base model and encoder folders: resume only with the same ones.

    Returns:
        The summary (what ``seeds.json`` holds).
    """
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` must be at least two distinct seeds, got {list(seeds)}.")
    if mode is None:
        mode = _mode_of(config)
    if mode not in SHARE_TARGET:
        raise ValueError(f"`mode` must be one of {sorted(SHARE_TARGET)}, got {mode!r}.")
    out = Path(out_dir)
    reports = {}
    for seed in seeds:
        seed_config, folder = replace(config, seed=seed), out / f"seed-{seed}"
        kept = _finished_report(folder, seed_config) if resume else None
        if kept is not None:
            logger.info("Seed %d: keeping the report in %s", seed, folder)
        reports[seed] = kept if kept is not None else run_testbed(seed_config, folder, base_model, encoder)
    summary = summarize_seeds(reports, mode)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "seeds.md").write_text(seeds_markdown(summary))
    return summary


def _mode_of(config: TestbedConfig) -> str:
    """``"quick"`` or ``"full"``: the preset ``config`` is, whatever its seed (the report's view of it)."""
    mine = report_config(replace(config, seed=0))
    for mode, preset in (("quick", TestbedConfig.quick), ("full", TestbedConfig.full)):
        if mine == report_config(preset(0)) and config.prompts == preset(0).prompts:
            return mode
    raise ValueError(
        "`config` is neither TestbedConfig.quick() nor .full() (whatever the seed): pass mode='quick' or mode='full' "
        "to say which of issue 12's targets it is judged against."
    )


def _finished_report(folder: Path, config: TestbedConfig) -> dict | None:
    path = folder / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("config") == json.loads(json.dumps(report_config(config))) else None


def _share(reward: str) -> Callable[[dict], float | None]:
    def value(report: dict) -> float | None:
        row = report["multi_reward"]["per_reward"][reward]
        return row["share_of_bound"] if row["single_reward_dpo"] - row["base"] >= MIN_BOUND_GAIN else None

    return value


def _above_pooled(reward: str) -> Callable[[dict], float]:
    def value(report: dict) -> float:
        row = report["multi_reward"]["per_reward"][reward]
        return row["ppd"] - row["pooled_dpo"]

    return value


def _fidelity(reward: str) -> Callable[[dict], float]:
    return lambda report: report["multi_reward"]["prompt_colour"][reward]


def _figures() -> dict[str, Callable[[dict], float | None]]:
    """Every summarized figure: its name and how to read it from one report."""
    by_reward = {
        "multi-reward: PPD's share of the {} bound": _share,
        "multi-reward: PPD minus pooled DPO, {} (SD)": _above_pooled,
        "multi-reward: prompt fidelity of the {} user": _fidelity,
    }
    figures = {name.format(r): read(r) for name, read in by_reward.items() for r in REWARDS}
    mixtures = {
        "held-out users": "heldout_users",
        "held-out users not dominated by one reward": "heldout_mixed_users",
        "held-out users, pooled DPO": "heldout_pooled_dpo",
    }
    for name, key in mixtures.items():
        figures[f"mixtures: {name}"] = lambda rep, key=key: rep["mixtures"][key]["win_rate_mean"]
    figures["mixtures: held-out users, 95 % CI low"] = lambda rep: rep["mixtures"]["heldout_users"]["win_rate_ci95"][0]
    for r in REWARDS:
        figures[f"mixtures: single-reward {r} user"] = lambda rep, r=r: rep["mixtures"]["single_reward_users"][r]
    figures["seconds"] = lambda rep: rep["seconds"]
    return figures


def _targets(mode: str) -> dict[str, Callable[[dict], bool | None]]:
    """Issue 12's targets, each judged on one report (``None``: does not apply to that run)."""
    share = SHARE_TARGET[mode]

    def shares(report: dict) -> bool | None:
        counted = [v for v in (_share(r)(report) for r in REWARDS) if v is not None]
        return all(v >= share for v in counted) if counted else None

    def above_pooled(report: dict) -> bool:
        return all(_above_pooled(r)(report) > 0 for r in REWARDS)

    def heldout(report: dict) -> bool:
        users = report["mixtures"]["heldout_users"]
        return users["win_rate_mean"] >= 0.85 and users["win_rate_ci95"][0] > 0.75

    def not_dominated(report: dict) -> bool | None:
        rate = report["mixtures"]["heldout_mixed_users"]["win_rate_mean"]  # None: no such held-out user
        return None if rate is None else rate >= 0.75

    def single_reward(report: dict) -> bool:
        return min(report["mixtures"]["single_reward_users"].values()) >= 0.8

    def monotone(report: dict) -> bool:
        return all(report["interpolation"]["monotone"].values())

    return {
        f"PPD >= {100 * share:.0f} % of every bound that gains >= +{MIN_BOUND_GAIN} SD": shares,
        "PPD above pooled DPO on every reward": above_pooled,
        "held-out users >= 85 %, 95 % CI low > 75 %": heldout,
        "held-out users not dominated by one reward >= 75 %": not_dominated,
        "every single-reward user >= 80 %": single_reward,
        "interpolation monotone in both rewards": monotone,
    }


def summarize_seeds(reports: dict[int, dict], mode: Literal["quick", "full"]) -> dict:
    """Each figure per seed with its mean, minimum and maximum over the seeds where it applies, and each target
    with the seeds it holds on.

    Args:
        reports: ``run_testbed``'s reports by seed.
        mode: ``"quick"`` or ``"full"`` (the share-of-bound target differs).

    Returns:
        ``{"mode", "seeds", "figures": {name: {"values", "mean", "min", "max"}}, "targets": {name: {"met",
        "judged"}}}``; a value is ``None`` where the figure does not apply (a bound under +0.5 SD).
    """
    seeds = list(reports)
    figures = {}
    for name, read in _figures().items():
        values = [read(reports[s]) for s in seeds]
        present = [v for v in values if v is not None]
        stats = dict(mean=float(np.mean(present)), min=min(present), max=max(present)) if present else {}
        figures[name] = {"values": values, **dict.fromkeys(("mean", "min", "max")), **stats}
    targets = {}
    for name, judge in _targets(mode).items():
        verdicts = {s: judge(reports[s]) for s in seeds}
        targets[name] = {
            "met": [s for s, v in verdicts.items() if v],
            "judged": [s for s, v in verdicts.items() if v is not None],
        }
    return {"mode": mode, "seeds": seeds, "figures": figures, "targets": targets}


def _cell(value: float | None, name: str) -> str:
    if value is None:
        return "-"
    if name == "seconds":
        return f"{value:.0f}"
    if "(SD)" in name:
        return f"{value:+.2f}"
    return f"{100 * value:.0f} %"


def seeds_markdown(summary: dict) -> str:
    """``summarize_seeds``' summary as markdown: targets first, then every figure per seed."""
    seeds = summary["seeds"]
    lines = [
        f"# Testbed on {len(seeds)} seeds ({summary['mode']} mode)",
        "",
        "One `ppd-diffusers testbed` run per seed, the same configuration on each. Reports: "
        + ", ".join(f"[seed {s}](seed-{s}/report.md)" for s in seeds)
        + ".",
        "",
        "| target | seeds where it holds |",
        "|---|---|",
    ]
    for name, target in summary["targets"].items():
        met, judged = target["met"], target["judged"]
        listed = f" ({', '.join(map(str, met))})" if met else ""
        lines.append(f"| {name} | {len(met)} of {len(judged)}{listed} |")
    lines += [
        "",
        "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name, f in summary["figures"].items():
        cells = [_cell(v, name) for v in f["values"]]
        spread = "-" if f["min"] is None else f"{_cell(f['min'], name)} to {_cell(f['max'], name)}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(f['mean'], name)} | {spread} |")
    lines += [
        "",
        f"A share of a bound is left out (-) where that seed's bound gained less than +{MIN_BOUND_GAIN} SD over the "
        "base; the mean and range are over the seeds where it applies.",
    ]
    return "\n".join(lines) + "\n"
