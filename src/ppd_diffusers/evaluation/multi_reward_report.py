"""The multi-reward experiment's table, markdown and figure (``reproduce_multi_reward`` writes them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._figures import new_figure

__all__ = ["results_figure", "results_markdown", "results_table", "share_of_bound"]


def share_of_bound(base: float, bound: float, ppd: float) -> float | None:
    """PPD's share of the single-reward bound's gain over the base model, in %: ``100 (ppd - base) / (bound - base)``.

    ``None`` when the bound equals the base (no gain to share). A bound below the base gives a share whose
    sign is flipped; ``results.md`` flags such rows.

    Examples:
        >>> share_of_bound(5.33, 6.42, 5.92)  # the paper's aesthetic row
        54.12844036697247
    """
    gain = bound - base
    return None if gain == 0 else 100.0 * (ppd - base) / gain


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def results_table(scores: Mapping[str, Mapping[str, list[float]]], rewards: Sequence[str]) -> dict[str, dict]:
    """Stage 5b: the paper's table from ``evaluate``'s scores: per reward the mean of that reward over the images
    of the base model, its single-reward bound, pooled DPO and PPD with that reward-user, and the share."""
    table = {}
    for reward in rewards:
        row = {
            "base": _mean(scores["base"][reward]),
            "bound": _mean(scores[f"bound-{reward}"][reward]),
            "pooled_dpo": _mean(scores["pooled_dpo"][reward]),
            "ppd": _mean(scores[f"ppd-{reward}"][reward]),
        }
        row["share_of_bound"] = share_of_bound(row["base"], row["bound"], row["ppd"])
        table[reward] = row
    return table


def results_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the table, PPD's images under every reward, and the budget."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        "# Multi-reward experiment",
        "",
        f"Mean reward on {results['eval_images']} held-out images per model (the same prompts and seeds).",
        "",
        "| Reward | Stable Cascade | Single-reward DPO (bound) | Pooled DPO | PPD | PPD's share of the bound's gain |",
        "|---|---|---|---|---|---|",
    ]
    for reward, row in results["table"].items():
        share = "n/a" if row["share_of_bound"] is None else f"{row['share_of_bound']:.1f}%"
        if row["bound"] < row["base"]:
            share += " (bound below base)"
        lines.append(
            f"| {reward} | {fmt(row['base'])} | {fmt(row['bound'])} | {fmt(row['pooled_dpo'])} | {fmt(row['ppd'])} "
            f"| {share} |"
        )
    rewards = list(results["table"])
    lines += ["", "PPD's images of each reward-user (rows) under every reward (columns):", ""]
    lines += ["| PPD user | " + " | ".join(rewards) + " |", "|---" * (len(rewards) + 1) + "|"]
    for user, row in results["ppd_cross_rewards"].items():
        lines.append(f"| {user} | " + " | ".join(fmt(row[r]) for r in rewards) + " |")
    budget = results["budget"]
    lines += [
        "",
        f"Every model trained {budget['steps']} steps of {budget['pairs_per_step']} pairs (the same adapter; the "
        "baselines with one constant user). Training pairs: "
        + ", ".join(f"{name} {stats['pairs']}" for name, stats in results["training_pairs"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def results_figure(results: Mapping[str, Any]) -> Any:
    """The table as bars: one panel per reward (each on its own scale), one bar per model.

    Returns:
        A ``matplotlib.figure.Figure`` (needs matplotlib, in the ``eval`` extra).
    """
    columns = {"base": "Stable Cascade", "pooled_dpo": "pooled DPO", "ppd": "PPD", "bound": "single-reward DPO"}
    table = results["table"]
    figure = new_figure(3.2 * len(table) + 1.8, 3.6)
    axes = figure.subplots(1, len(table), squeeze=False)[0]
    for ax, (reward, row) in zip(axes, table.items(), strict=True):
        values = [row[key] for key in columns]
        low, high = min(values), max(values)
        pad = (high - low) * 0.5 or abs(high) * 0.05 or 1.0
        # bars rise from the panel's floor: the methods differ by little against each reward's offset
        floor = low - pad
        for i, (value, label) in enumerate(zip(values, columns.values(), strict=True)):
            ax.bar(i, value - floor, 0.8, bottom=floor, label=label, color=f"C{i}")
        ax.set_ylim(floor, high + pad)
        ax.set_xticks(range(len(columns)), ["base", "pooled", "PPD", "bound"])
        ax.set_xlabel("model")
        ax.set_ylabel(f"mean {reward}")
        ax.set_title(f"{reward} (its user's images)")
    axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    budget = results["budget"]
    figure.suptitle(
        f"Multi-reward experiment on {results['eval_images']} held-out images: "
        f"{budget['steps']} steps x {budget['pairs_per_step']} pairs per method"
    )
    return figure
