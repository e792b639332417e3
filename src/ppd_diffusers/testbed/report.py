"""The testbed's report: ``report.json``, ``report.md`` and PNG figures (drawn with PIL, no plotting library)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from .shapes import to_pixels

__all__ = ["line_plot", "write_report"]

PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def line_plot(xs: list[float], series: dict[str, list[float]], title: str, size=(480, 320)) -> PIL.Image.Image:
    """A minimal line chart: one coloured line per series, a legend, the y range printed."""
    width, height = size
    left, right, top, bottom = 50, 120, 30, 30
    image = PIL.Image.new("RGB", size, "white")
    draw = PIL.ImageDraw.Draw(image)
    values = np.array(list(series.values()), dtype=float)
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1

    def point(x: float, y: float) -> tuple[float, float]:
        px = left + (x - min(xs)) / (max(xs) - min(xs) or 1) * (width - left - right)
        return px, top + (high - y) / (high - low) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    draw.text((4, top), f"{high:.2f}", fill=(0, 0, 0))
    draw.text((4, height - bottom - 10), f"{low:.2f}", fill=(0, 0, 0))
    draw.text((left, height - bottom + 6), f"{min(xs):g}", fill=(0, 0, 0))
    draw.text((width - right - 20, height - bottom + 6), f"{max(xs):g}", fill=(0, 0, 0))
    for i, (name, ys) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        draw.line([point(x, y) for x, y in zip(xs, ys, strict=True)], fill=color, width=2)
        draw.text((width - right + 8, top + 16 * i), name, fill=color)
    return image


def _grid(latents: torch.Tensor, rows: int, scale: int = 4) -> PIL.Image.Image:
    pixels = (to_pixels(latents).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    cols = len(pixels) // rows
    _, h, w, _ = pixels.shape
    grid = pixels[: rows * cols].reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    return PIL.Image.fromarray(grid).resize((cols * w * scale, rows * h * scale), PIL.Image.NEAREST)


def write_report(report: dict, out: Path, grids: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Writes the JSON, the markdown tables and the figures: the interpolation curve, and for each
    ``grids`` entry ``name: (base latents, personalized latents)`` an image grid ``samples_<name>.png``
    (base samples on top, the same seeds for that user below)."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    interpolation = report["interpolation"]
    line_plot(
        interpolation["weights"],
        interpolation["rewards"],
        f"rewards from user '{interpolation['users'][0]}' (0) to '{interpolation['users'][1]}' (1)",
    ).save(out / "interpolation.png")
    for name, (base, mine) in grids.items():
        _grid(torch.cat([base, mine]), rows=2).save(out / f"samples_{name}.png")
    (out / "report.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The report's tables in markdown."""
    lines = [
        "# Synthetic-user testbed report",
        "",
        "Mean standardized reward of generated images (0 = the base pool's mean, 1 = one standard deviation).",
        "PPD is conditioned on the single-reward user of that column's reward.",
        "",
        "| reward | base | pooled DPO | PPD (single-reward user) | single-reward DPO (bound) |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["per_reward"].items():
        bound = "not run (--quick)" if row["single_reward_dpo"] is None else f"{row['single_reward_dpo']:+.2f}"
        lines.append(
            f"| {name} | {row['base']:+.2f} | {row['pooled_dpo']:+.2f} | {row['ppd_single_reward_user']:+.2f} | "
            f"{bound} |"
        )
    heldout, train = report["heldout_users"], report["train_users"]
    low, high = heldout["win_rate_ci95"]
    train_low, train_high = train["win_rate_ci95"]
    probe = report["identification_probe"]
    encoder, oracle = probe["encoder"], probe["oracle_reward_differences"]
    lines += [
        "",
        f"- Training users ({len(train['win_rates'])} evaluated): PPD beats the base under their own judge in "
        f"{train['win_rate_mean']:.0%} of paired samples (95 % CI over users {train_low:.0%}–{train_high:.0%}; "
        f"mean own-reward gain {train['own_reward_gain_mean']:+.2f} SD).",
        f"- Held-out users ({len(heldout['win_rates'])}), from 4 pairs only: win rate {heldout['win_rate_mean']:.0%} "
        "against the base "
        f"(95 % bootstrap CI over users {low:.0%}–{high:.0%}; chance is 50 %).",
        f"- User identification among {encoder['users']} users from one 4-pair draw: top-1 {encoder['top1']:.0%}, "
        f"top-5 {encoder['top5']:.0%} (chance {encoder['chance_top1']:.1%} / {encoder['chance_top5']:.1%}); "
        f"with the true reward differences (oracle) top-1 {oracle['top1']:.0%}, top-5 {oracle['top5']:.0%}.",
        f"- Run time {report['seconds']:.0f} s.",
        "",
        "Figures: `interpolation.png` (rewards as the embedding moves between two users), `samples_<reward>.png`",
        "(base samples on top, the same seeds generated for that single-reward user below).",
        "",
    ]
    return "\n".join(lines)
