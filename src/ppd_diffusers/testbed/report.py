"""The testbed's report: ``report.json``, ``report.md`` and matplotlib figures.

matplotlib comes with the ``testbed`` extra (``pip install ppd-diffusers[testbed]``); it is imported only
when the figures are drawn (see ``ppd_diffusers._figures``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .._figures import image_grid_figure, new_figure
from .experiments import DOMINANT_WEIGHT
from .shapes import to_pixels

__all__ = ["interpolation_figure", "markdown", "multi_reward_figure", "sample_grid", "write_report"]

METHODS = {"base": "base model", "pooled_dpo": "pooled DPO", "ppd": "PPD", "single_reward_dpo": "single-reward DPO"}


def multi_reward_figure(multi: dict):
    """Grouped bars: per reward, the mean standardized reward of each method for that reward's user."""
    rewards = list(multi["per_reward"])
    figure = new_figure(7.5, 3.6)
    axes = figure.subplots()
    width = 0.8 / len(METHODS)
    for i, (key, label) in enumerate(METHODS.items()):
        values = [multi["per_reward"][r][key] for r in rewards]
        axes.bar(np.arange(len(rewards)) + (i - 1.5) * width, values, width, label=label)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(np.arange(len(rewards)), rewards)
    axes.set_xlabel("reward (each reward is one user)")
    axes.set_ylabel("mean reward of that user's images\n(standard deviations of the base pool)")
    axes.set_title(f"Multi-reward experiment: {multi['steps']} steps x {multi['pairs_per_step']} pairs per method")
    axes.legend(fontsize="small", ncols=2)
    return figure


def interpolation_figure(path: dict):
    """Every reward's mean as the embedding moves from reward-user A (0) to reward-user B (1)."""
    figure = new_figure(6.0, 3.6)
    axes = figure.subplots()
    first, second = path["users"]
    for name, values in path["rewards"].items():
        style = "-o" if name in (first, second) else ":"
        axes.plot(path["weights"], values, style, label=name, linewidth=2 if name in (first, second) else 1)
    axes.set_xlabel(f"interpolation weight (0: the {first} user, 1: the {second} user)")
    axes.set_ylabel("mean standardized reward (SD)")
    axes.set_title(f"Moving the user embedding from the {first} user to the {second} user")
    axes.legend(title="reward", fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def sample_grid(name: str, base: tuple[torch.Tensor, torch.Tensor], mine: tuple[torch.Tensor, torch.Tensor]):
    """Base samples above the same seeds generated for the reward-user ``name``, each tile with its reward."""
    columns = min(len(base[0]), 12)
    rows, titles = [], []
    for latents, rewards in (base, mine):
        rows.append(list(to_pixels(latents[:columns]).permute(0, 2, 3, 1).numpy()))
        titles.append([f"{reward:+.1f}" for reward in rewards[:columns].tolist()])
    return image_grid_figure(
        rows,
        ("base model", f"PPD, {name} user"),
        titles,
        title=f"Same seeds and prompts; above each image its standardized {name} reward",
        tile_inches=1.0,
    )


def write_report(report: dict, out: Path, samples: dict) -> None:
    """Writes the JSON, the markdown and the figures (``multi_reward.png``, ``interpolation.png`` and per
    reward-user ``samples_<reward>.png`` from ``samples[name] = ((base latents, rewards), (PPD latents,
    rewards))``)."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    multi_reward_figure(report["multi_reward"]).savefig(out / "multi_reward.png", dpi=100)
    interpolation_figure(report["interpolation"]).savefig(out / "interpolation.png", dpi=100)
    for name, (base, mine) in samples.items():
        sample_grid(name, base, mine).savefig(out / f"samples_{name}.png", dpi=100)
    (out / "report.md").write_text(markdown(report))


def _ci(summary: dict) -> str:
    if summary["win_rate_mean"] is None:
        return "no such user"
    low, high = summary["win_rate_ci95"]
    return f"{summary['win_rate_mean']:.0%} (95 % CI {low:.0%}–{high:.0%}, {summary['users']} users)"


def markdown(report: dict) -> str:
    """The report's tables in markdown."""
    multi, mixtures = report["multi_reward"], report["mixtures"]
    lines = [
        "# Synthetic-user testbed report",
        "",
        "Synthetic users on a miniature Stage C: these numbers test the implementation and the method's mechanics,",
        "they are not comparable with the paper's figures on real Pick-a-Pic users.",
        "",
        "## Multi-reward experiment (each reward is one user)",
        "",
        f"Each method trains {multi['steps']} steps of {multi['pairs_per_step']} pairs; every reward-user has "
        f"{multi['pairs_per_user']} training pairs and PPD sees it through 4 other pairs. Mean standardized reward "
        f"of {multi['eval_samples']} images per user (0 = the base pool's mean, 1 = one standard deviation).",
        "",
        "| reward | base | pooled DPO | PPD | single-reward DPO (bound) | PPD's share of the bound's gain |"
        " PPD beats base |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in multi["per_reward"].items():
        share = "bound below base" if row["share_of_bound"] is None else f"{row['share_of_bound']:.0%}"
        lines.append(
            f"| {name} | {row['base']:+.2f} | {row['pooled_dpo']:+.2f} | {row['ppd']:+.2f} | "
            f"{row['single_reward_dpo']:+.2f} | {share} | {multi['win_rates'][name]:.0%} |"
        )
    colour = multi["prompt_colour"]
    lines += [
        "",
        "Prompt fidelity (reward hacking shows here): the object has the prompt's colour in "
        f"{colour['base']:.0%} of base images; PPD images of the "
        + ", ".join(f"{name} user {colour[name]:.0%}" for name in multi["per_reward"])
        + ".",
    ]
    path = report["interpolation"]
    first, second = path["users"]
    monotone = ", ".join(f"{k} {'monotone' if v else 'not monotone'}" for k, v in path["monotone"].items())
    heldout, train = mixtures["heldout_users"], mixtures["train_users"]
    probe = report["identification_probe"]
    encoder, oracle = probe["encoder"], probe["oracle_reward_differences"]
    singles = ", ".join(
        f"{name} {rate:.0%} ({mixtures['single_reward_gains'][name]:+.2f} SD)"
        for name, rate in mixtures["single_reward_users"].items()
    )
    lines += [
        "",
        f"Interpolation from the {first} user to the {second} user ({len(path['weights'])} points): {monotone} "
        "(`interpolation.png`).",
        "",
        "## Mixture users (random signed mixtures of the rewards, few pairs each)",
        "",
        f"PPD and pooled DPO each train {mixtures['steps']} steps. Win rate: how often the user's own judge prefers",
        "the personalized image to the base image of the same seed and prompt (chance 50 %).",
        "",
        f"- Held-out users from 4 pairs: {_ci(heldout)}.",
        f"- Held-out users not dominated by one reward (every |w_k| <= {DOMINANT_WEIGHT:.2f}): "
        f"{_ci(mixtures['heldout_mixed_users'])}.",
        f"- Pooled DPO for the same held-out users: {_ci(mixtures['heldout_pooled_dpo'])}.",
        f"- Training users: {_ci(train)}; mean own-reward gain {train['own_reward_gain_mean']:+.2f} SD.",
        f"- Single-reward users in this adapter (win rate, own-reward gain): {singles}.",
        f"- User identification among {encoder['users']} users from one 4-pair draw: top-1 {encoder['top1']:.0%}, "
        f"top-5 {encoder['top5']:.0%} (chance {encoder['chance_top1']:.1%} / {encoder['chance_top5']:.1%}); "
        f"with the true reward differences (oracle) top-1 {oracle['top1']:.0%}, top-5 {oracle['top5']:.0%}.",
        f"- Run time {report['seconds']:.0f} s.",
        "",
        "## Figures",
        "",
        "![The multi-reward table as bars](multi_reward.png)",
        "",
        "![Rewards along the interpolation](interpolation.png)",
        "",
        "Base images above the same seeds generated for each reward-user, each with its reward:",
        "",
        *(f"![{name} user](samples_{name}.png)\n" for name in multi["per_reward"]),
    ]
    return "\n".join(lines)
