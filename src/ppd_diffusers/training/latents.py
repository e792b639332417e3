"""Precomputed Stage C latents of both images of every Pick-a-Pic pair, stored as dataset columns.

Encoding an image costs far more than a DPO step needs to spend on it, and every pair is seen once per
epoch by each of its user's draws: the latents are computed once, with ``datasets.Dataset.map``, so they are
cached by fingerprint, written to disk with ``save_to_disk`` and read back as arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..preference_pairs import load_rgb_image
from ..stage_c_image_encoder import StageCImageEncoder, stage_c_latent_size
from .pickapic import undecoded_images

__all__ = ["add_stage_c_latents", "count_unreadable_rows"]

logger = logging.getLogger(__name__)

_STORAGE_DTYPES = ("float16", "float32")


def add_stage_c_latents(
    dataset: Any,
    image_encoder: StageCImageEncoder,
    height: int = 1024,
    width: int = 1024,
    batch_size: int = 16,
    dtype: str = "float16",
    image_columns: Sequence[str] = ("jpg_0", "jpg_1"),
    latent_columns: Sequence[str] = ("latents_0", "latents_1"),
    ok_column: str = "latents_ok",
    **map_kwargs: Any,
) -> Any:
    """Adds the Stage C latents of ``jpg_0`` and ``jpg_1`` to a Pick-a-Pic-format dataset.

    Every row gets ``latents_0`` and ``latents_1`` (``Array3D`` of shape ``(latent_channels, h, w)`` with
    ``(h, w) = stage_c_latent_size(height, width)``, 16 x 24 x 24 at 1024 px) and ``latents_ok``. A row whose
    image bytes cannot be decoded (either image) gets ``latents_ok=False`` and zeros in both latent columns
    instead of failing the whole run; the number of such rows is logged.

    Every row is kept, ties (``label_0 == 0.5``) included, so row indices stay those of the source dataset
    (user-embedding indexes refer to them); training drops ties and rows with ``latents_ok=False``. Filter
    ties out beforehand to save their ~12% of the encoding time, at the cost of renumbered rows.

    Storage: ``float16`` by default. The latents leave the encoder's BatchNorm standardised (unit scale per
    channel), far inside float16's range, and float16 keeps ~3 significant digits, below what the diffusion
    noise added in training can tell apart, at half the disk of float32 (~36 KB a pair at 1024 px, ~29 GB
    for Pick-a-Pic v2's ~0.8M pairs). ``datasets``' numpy and torch formats read them back as float32.

    The work runs in ``dataset.map(batched=True)``: ``datasets`` shows a progress bar, caches the result
    next to a file-backed dataset under a fingerprint that covers the encoder's weights and these arguments
    (a second call with the same inputs loads the cache), and the result can be ``save_to_disk``-ed.
    Images are decoded and resized on the CPU in this process; the encoder runs on its own device and dtype.

    A streaming ``datasets.IterableDataset`` works too: the latents are then computed as its rows are
    iterated (write them with ``datasets.Dataset.from_generator``, as ``examples/precompute_latents.py
    --streaming`` does), with no cache and no count.

    Args:
        dataset: A ``datasets.Dataset`` (or ``IterableDataset``) with the image columns (encoded image bytes,
            ``datasets.Image`` features, or anything ``preprocess_images`` reads).
        image_encoder: The Stage C image encoder (``StageCImageEncoder.from_stability_checkpoint()``).
        height: Height in pixels of the Stage C images the latents stand for (1024 -> 24 latent rows).
        width: Width in pixels, likewise.
        batch_size: Dataset rows per encoder call (two images each).
        dtype: Storage dtype of the latents, ``"float16"`` or ``"float32"``.
        image_columns: The two image columns.
        latent_columns: The two latent columns to add, in the same order.
        ok_column: The column that tells whether both images of a row could be read.
        **map_kwargs: Passed to ``dataset.map`` (``cache_file_name``, ``load_from_cache_file``,
            ``writer_batch_size``, ``desc``, ...). ``num_proc`` copies the encoder into every worker: only
            worth it for a CPU encoder.

    Returns:
        The dataset with the three columns added.

    Raises:
        ValueError: A column is missing or would be overwritten, a size is not positive, ``dtype`` is not
            supported, or the encoder produced non-finite values (e.g. float16 overflow: encode in float32).

    Examples:
        ```py
        import datasets
        from ppd_diffusers import StageCImageEncoder
        from ppd_diffusers.training import add_stage_c_latents

        pairs = datasets.load_dataset("yuvalkirstain/pickapic_v2", split="validation_unique")
        encoder = StageCImageEncoder.from_stability_checkpoint().to("cuda")
        pairs = add_stage_c_latents(pairs, encoder, height=1024, width=1024, batch_size=32)
        pairs.save_to_disk("pickapic_latents")
        row = pairs.with_format("torch", columns=["latents_0", "latents_1", "latents_ok"])[0]
        row["latents_0"].shape  # torch.Size([16, 24, 24])
        ```
    """
    import datasets

    if dtype not in _STORAGE_DTYPES:
        raise ValueError(f"`dtype` must be one of {_STORAGE_DTYPES}, got {dtype!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    latent_height, latent_width = stage_c_latent_size(height, width)
    image_columns, latent_columns = tuple(image_columns), tuple(latent_columns)
    if len(image_columns) != 2 or len(latent_columns) != 2:
        raise ValueError(
            f"`image_columns` and `latent_columns` need two names each, got {image_columns} and {latent_columns}."
        )
    streaming = isinstance(dataset, datasets.IterableDataset)
    columns = dataset.column_names
    if columns is None:
        raise ValueError(
            "The streaming `dataset` does not know its features yet: pass one whose features are known (files "
            "with a schema such as parquet, or `.cast(features)`)."
        )
    missing = [c for c in image_columns if c not in columns]
    if missing:
        raise ValueError(
            f"`dataset` has no column {', '.join(map(repr, missing))} (columns: {columns}); "
            "pass the names of the two image columns as `image_columns`."
        )
    existing = [c for c in (*latent_columns, ok_column) if c in columns]
    if existing:
        raise ValueError(
            f"`dataset` already has {', '.join(map(repr, existing))}: remove them first "
            "(`dataset.remove_columns(...)`) or choose other `latent_columns`/`ok_column`."
        )

    # decoding inside `datasets` would raise on the first corrupt image: hand the raw bytes to `_encode_rows`
    dataset, decoded = undecoded_images(dataset, image_columns)

    latent_feature = datasets.Array3D(
        shape=(image_encoder.config.latent_channels, latent_height, latent_width), dtype=dtype
    )
    features = dataset.features.copy()
    features.update({latent_columns[0]: latent_feature, latent_columns[1]: latent_feature})
    features[ok_column] = datasets.Value("bool")
    fn_kwargs = dict(
        image_encoder=image_encoder,
        height=height,
        width=width,
        dtype=dtype,
        image_columns=image_columns,
        latent_columns=latent_columns,
        ok_column=ok_column,
    )
    if not streaming:
        map_kwargs.setdefault("desc", f"Stage C latents ({latent_height}x{latent_width})")
    result = dataset.map(
        _encode_rows,
        batched=True,
        batch_size=batch_size,
        features=features,
        fn_kwargs=fn_kwargs,
        **map_kwargs,
    )
    for column in decoded:
        result = result.cast_column(column, datasets.Image())
    if streaming:  # rows are encoded as they are iterated: nothing to count yet
        return result

    bad_rows = count_unreadable_rows(result, ok_column)
    if bad_rows:
        logger.warning(
            "%d of %d rows have an unreadable image: `%s` is False and their latents are zeros.",
            bad_rows,
            len(result),
            ok_column,
        )
    return result


def count_unreadable_rows(dataset: Any, ok_column: str = "latents_ok") -> int:
    """Rows of a dataset made by ``add_stage_c_latents`` whose ``ok_column`` is False.

    Examples:
        ```py
        pairs = add_stage_c_latents(pairs, encoder)
        count_unreadable_rows(pairs)  # rows training will skip
        ```
    """
    ok = dataset.with_format("numpy", columns=[ok_column])[:][ok_column]
    return len(dataset) - int(np.count_nonzero(ok))


def _encode_rows(
    batch: dict[str, list],
    image_encoder: StageCImageEncoder,
    height: int,
    width: int,
    dtype: str,
    image_columns: tuple[str, str],
    latent_columns: tuple[str, str],
    ok_column: str,
) -> dict[str, Any]:
    rows = len(batch[image_columns[0]])
    latent_height, latent_width = stage_c_latent_size(height, width)
    shape = (rows, image_encoder.config.latent_channels, latent_height, latent_width)
    outputs = [np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=dtype)]
    ok = [True] * rows
    images: list[list[Any]] = [[None] * rows, [None] * rows]
    for side, column in enumerate(image_columns):
        for row, data in enumerate(batch[column]):
            try:
                images[side][row] = load_rgb_image(data, name=f"{column}[{row}]")
            except Exception as error:  # PIL's decoders raise assorted types on malformed files: none may stop a run
                ok[row] = False
                logger.debug("unreadable image: %s", error)
    good = [row for row in range(rows) if ok[row]]
    if good:
        pixels = [images[0][row] for row in good] + [images[1][row] for row in good]
        latents = image_encoder.encode(pixels, height=height, width=width, batch_size=len(pixels))
        latents = latents.to(device="cpu", dtype=torch.float32).numpy().astype(dtype)
        if not np.isfinite(latents).all():
            raise ValueError(
                f"The image encoder produced non-finite latents (in {image_encoder.dtype}, stored as {dtype}): "
                "encode in float32 (`image_encoder.to(torch.float32)`) and/or store with `dtype='float32'`."
            )
        outputs[0][good] = latents[: len(good)]
        outputs[1][good] = latents[len(good) :]
    return {latent_columns[0]: outputs[0], latent_columns[1]: outputs[1], ok_column: ok}
