"""matplotlib figures shared by the testbed's and the evaluation's reports.

matplotlib comes with the ``testbed`` and ``eval`` extras; it is imported only when a figure is drawn, and
without pyplot (no global figure state, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def new_figure(width: float, height: float) -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches with a constrained layout."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - the extras are installed by scripts/setup.sh
        raise ImportError(
            "Figures need matplotlib: `pip install ppd-diffusers[eval]` (or `[testbed]`), or `pip install matplotlib`."
        ) from error
    return Figure(figsize=(width, height), layout="constrained")


def image_grid_figure(
    rows: Sequence[Sequence[Any]],
    row_labels: Sequence[str],
    tile_titles: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    tile_inches: float = 1.25,
) -> Any:
    """A labelled image grid: one row per entry of ``rows``, the row's label on its left, a title above each tile.

    Args:
        rows: Rows of images (``PIL.Image`` or ``(height, width, 3)`` arrays in [0, 1] or uint8), all rows as long.
        row_labels: One label per row (e.g. ``"base model"``, ``"PPD, user 42"``).
        tile_titles: A short title per tile (e.g. its reward), or ``None``.
        title: The figure's title.
        tile_inches: Size of one tile.
    """
    if len(rows) != len(row_labels) or len({len(row) for row in rows}) > 1:
        raise ValueError("`rows` must be rows of the same length, one label each.")
    columns = len(rows[0]) if rows else 0
    if columns == 0:
        raise ValueError("`rows` holds no image.")
    figure = new_figure(tile_inches * columns + 0.6, tile_inches * len(rows) + 0.5 + 0.3 * (title is not None))
    tiles = figure.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            axes = tiles[r, c]
            axes.imshow(np.asarray(image), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if tile_titles is not None:
                axes.set_title(tile_titles[r][c], fontsize="small")
        tiles[r, 0].set_ylabel(row_labels[r], fontsize="small")
    if title:
        figure.suptitle(title, fontsize="medium")
    return figure
