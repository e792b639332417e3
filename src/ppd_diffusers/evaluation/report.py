"""The evaluation's report: per-user and overall win rates with bootstrap intervals, per-reward means, figures.

A win is the personalized image judged better than the base image of the same prompt and seed: for a reward
scorer, a higher score (a tie counts half); for a judge, a probability above one half (exactly one half counts
half). A user's win rate is the mean over their prompts; the overall rate is the mean over users (every user
weighs the same, as in the paper's per-user protocol), its 95 % interval a bootstrap over users.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from .._figures import image_grid_figure, new_figure
from .statistics import mean_of_user_means, pairwise_outcomes, user_bootstrap_ci

__all__ = ["summarize_records", "write_evaluation_report"]


def _outcomes(records: Sequence[dict]) -> dict[str, dict[str, list[float]]]:
    """Per metric (``reward/<scorer>`` or ``judge/<judge>``), per user, the outcome of each of their prompts."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        user = str(record["user_id"])
        for name, pair in record["scores"].items():
            table[f"reward/{name}"][user].extend(pairwise_outcomes([pair["personalized"]], [pair["base"]]))
        for name, probability in record["judges"].items():
            outcome = pairwise_outcomes([probability], [0.5])
            table[f"judge/{name}"][user].extend(outcome)
            detail = record.get("judge_details", {}).get(name, {})
            if detail.get("accuracy", 0) > 0.5:  # a judge that agrees with the user's held-out choices
                table[f"judge/{name} (users it fits above chance)"][user].extend(outcome)
    return table


def summarize_records(records: Sequence[dict], seed: int = 0) -> dict[str, Any]:
    """The report's numbers from the evaluation's records.

    Returns:
        A JSON-ready dict: ``users``, ``prompts``; ``win_rates`` per metric (``mean``, ``ci95``, ``per_user``,
        ``image_level`` — the mean over all prompts); ``rewards`` per scorer (mean ``base`` and
        ``personalized`` score, their ``difference`` and its ``ci95`` over users); ``judges`` per judge (the mean
        probability that the personalized image is preferred).
    """
    if not records:
        raise ValueError("There are no records to summarize: did the evaluation run?")
    win_rates = {}
    for metric, per_user in sorted(_outcomes(records).items()):
        low, high = user_bootstrap_ci(per_user, seed=seed)
        win_rates[metric] = {
            "mean": mean_of_user_means(per_user),
            "ci95": [low, high],
            "image_level": float(np.mean([v for values in per_user.values() for v in values])),
            "per_user": {user: float(np.mean(values)) for user, values in per_user.items()},
        }
    rewards = {}
    for name in sorted({name for record in records for name in record["scores"]}):
        differences: dict[str, list[float]] = defaultdict(list)
        base, mine = [], []
        for record in records:
            if name in record["scores"]:
                pair = record["scores"][name]
                base.append(pair["base"])
                mine.append(pair["personalized"])
                differences[str(record["user_id"])].append(pair["personalized"] - pair["base"])
        low, high = user_bootstrap_ci(differences, seed=seed)
        rewards[name] = {
            "base": float(np.mean(base)),
            "personalized": float(np.mean(mine)),
            "difference": mean_of_user_means(differences),
            "ci95": [low, high],
        }
    judges = {
        name: _judge_summary([r for r in records if name in r["judges"]], name)
        for name in sorted({name for record in records for name in record["judges"]})
    }
    return {
        "users": len({str(r["user_id"]) for r in records}),
        "prompts": len(records),
        "win_rates": win_rates,
        "rewards": rewards,
        "judges": judges,
    }


def _judge_summary(records: Sequence[dict], name: str) -> dict[str, Any]:
    """A judge's mean probability, and what its details tell: the VLM judge's position bias (the mean P(first
    image) over both orders, 0.5 for none), the held-out-pairs judge's chosen scorers and agreement."""
    summary: dict[str, Any] = {"mean_probability": float(np.mean([r["judges"][name] for r in records]))}
    details = [r["judge_details"][name] for r in records if name in r.get("judge_details", {})]
    if details and "p_first_ab" in details[0]:
        summary["position_bias"] = float(np.mean([(d["p_first_ab"] + d["p_first_ba"]) / 2 for d in details]))
    if details and "accuracy" in details[0]:
        per_user = {str(r["user_id"]): r["judge_details"][name] for r in records if name in r.get("judge_details", {})}
        summary["users"] = len(per_user)
        summary["users_above_chance"] = sum(d["accuracy"] > 0.5 for d in per_user.values())
        summary["mean_accuracy"] = float(np.mean([d["accuracy"] for d in per_user.values()]))
        summary["scorers_chosen"] = dict(Counter(d["scorer"] for d in per_user.values()).most_common())
    return summary


def win_rate_figure(summary: dict) -> Any:
    """Bars of every metric's win rate with its 95 % interval, against the 50 % of no effect."""
    metrics = list(summary["win_rates"])
    figure = new_figure(max(4.0, 1.1 * len(metrics) + 1.5), 3.4)
    axes = figure.subplots()
    means = np.array([summary["win_rates"][m]["mean"] for m in metrics])
    bounds = np.array([summary["win_rates"][m]["ci95"] for m in metrics])
    axes.bar(metrics, 100 * means, color="tab:blue", label="win rate (mean over users)")
    axes.errorbar(metrics, 100 * means, yerr=100 * np.abs(bounds.T - means), fmt="none", color="black",
                  capsize=4, label="95 % interval (bootstrap over users)")  # fmt: skip
    axes.axhline(50, color="tab:red", linestyle="--", linewidth=1, label="no preference (50 %)")
    axes.set_ylim(0, 100)
    axes.set_xlabel("judged by")
    axes.set_ylabel("personalized preferred over base (%)")
    axes.set_title(f"Win rate of personalized images: {summary['users']} users, {summary['prompts']} prompts")
    axes.tick_params(axis="x", labelrotation=20)
    axes.legend(fontsize="small", loc="lower right")
    return figure


def reward_figure(summary: dict) -> Any:
    """One panel per reward: mean score of the base and the personalized images (scales differ per reward)."""
    names = list(summary["rewards"])
    figure = new_figure(2.4 * len(names) + 0.5, 3.2)
    for axes, name in zip(np.atleast_1d(figure.subplots(1, len(names))), names, strict=True):
        row = summary["rewards"][name]
        axes.bar(["base", "personalized"], [row["base"], row["personalized"]], color=["tab:gray", "tab:blue"])
        axes.set_title(f"{name}\n(difference {row['difference']:+.3g})", fontsize="medium")
        axes.set_ylabel("mean score")
        low = min(row["base"], row["personalized"])
        high = max(row["base"], row["personalized"])
        margin = max(high - low, abs(high) * 0.05, 1e-6)
        axes.set_ylim(low - margin, high + margin)
    figure.suptitle("Mean reward of the same prompts and seeds, base against personalized")
    return figure


def user_grid_figure(records: Sequence[dict], root: Path, scorer: str | None, columns: int = 6) -> Any:
    """The base row above the personalized row for one user's prompts, each tile with its score."""
    records = sorted(records, key=lambda r: r["prompt_index"])[:columns]
    rows, titles = [], []
    for variant in ("base", "personalized"):
        rows.append([PIL.Image.open(root / r["images"][variant]).convert("RGB") for r in records])
        titles.append([f"{r['scores'][scorer][variant]:.3g}" if scorer else f"prompt {r['prompt_index']}"
                       for r in records])  # fmt: skip
    user = records[0]["user_id"]
    caption = f"; above each image its {scorer}" if scorer else ""
    return image_grid_figure(rows, ("base model", f"PPD, user {user}"), titles,
                             title=f"User {user}: same prompts and seeds{caption}")  # fmt: skip


def markdown(summary: dict, grids: Sequence[str]) -> str:
    """The report in markdown."""
    lines = [
        "# Personalization evaluation",
        "",
        f"{summary['users']} held-out users, {summary['prompts']} prompts; each prompt drawn by the base model and "
        "for the user from the same seed. Win rate: how often the personalized image is judged better (a tie counts "
        "half), averaged per user and then over users; 95 % intervals bootstrap the users.",
        "",
        "| judged by | win rate | 95 % interval | over all images |",
        "|---|---|---|---|",
    ]
    for metric, row in summary["win_rates"].items():
        low, high = row["ci95"]
        lines.append(f"| {metric} | {row['mean']:.1%} | {low:.1%}–{high:.1%} | {row['image_level']:.1%} |")
    if summary["rewards"]:
        lines += ["", "| reward | base | personalized | difference (mean over users) | 95 % interval |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, row in summary["rewards"].items():
            low, high = row["ci95"]
            lines.append(
                f"| {name} | {row['base']:.4g} | {row['personalized']:.4g} | {row['difference']:+.4g} | "
                f"{low:+.4g} to {high:+.4g} |"
            )
    for name, row in summary["judges"].items():
        facts = [f"mean probability that the user prefers the personalized image {row['mean_probability']:.2f}"]
        if "position_bias" in row:
            facts.append(f"position bias {row['position_bias']:.2f} (mean P(first image) over both orders; 0.5: none)")
        if "users_above_chance" in row:
            chosen = ", ".join(f"{scorer} {count}" for scorer, count in row["scorers_chosen"].items())
            facts.append(
                f"agrees with the user's held-out choices above chance for {row['users_above_chance']} of "
                f"{row['users']} users (mean accuracy {row['mean_accuracy']:.2f}; scorer chosen: {chosen})"
            )
        lines += ["", f"Judge `{name}`: " + "; ".join(facts) + "."]

    lines += ["", "## Figures", "", "![Win rates](win_rates.png)", ""]
    if summary["rewards"]:
        lines += ["![Mean rewards](rewards.png)", ""]
    lines += [f"![{Path(grid).stem}]({grid})\n" for grid in grids]
    return "\n".join(lines)


def write_evaluation_report(
    records: Sequence[dict], output_dir: str | Path, settings: dict | None = None, grid_users: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Writes ``report.json``, ``report.md``, ``win_rates.png``, ``rewards.png`` and ``grids/user-*.png``.

    Args:
        records: The evaluation's records (``evaluate_personalization``).
        output_dir: The evaluation's output folder (where its images are).
        settings: What was evaluated and how (models, seeds, counts), copied into ``report.json``.
        grid_users: Draw an image grid for this many users.
        seed: Seed of the bootstrap.

    Returns:
        The summary (``summarize_records``) with ``settings``.
    """
    root = Path(output_dir)
    summary = {**summarize_records(records, seed=seed), "settings": settings or {}}
    (root / "report.json").write_text(json.dumps(summary, indent=2))
    win_rate_figure(summary).savefig(root / "win_rates.png", dpi=100)
    if summary["rewards"]:
        reward_figure(summary).savefig(root / "rewards.png", dpi=100)
    by_user: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_user[str(record["user_id"])].append(record)
    (root / "grids").mkdir(exist_ok=True)
    grids, scorer = [], next(iter(summary["rewards"]), None)
    for user in sorted(by_user)[:grid_users]:
        grid = Path("grids") / f"{Path(by_user[user][0]['images']['base']).parent.name}.png"
        user_grid_figure(by_user[user], root, scorer).savefig(root / grid, dpi=100)
        grids.append(grid.as_posix())
    (root / "report.md").write_text(markdown(summary, grids))
    return summary
