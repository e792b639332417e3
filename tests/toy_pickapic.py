"""A generated Pick-a-Pic-format dataset with a learnable taste per user, for the training tests.

Half the users prefer bright images, half dark ones; each user's embedding says which (its sign), so the
adapter has something user-dependent to learn. Precomputed latents follow the same rule (positive or
negative mean). Rows include ties and, optionally, one row with an unreadable image.
"""

from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image
import torch

from ppd_diffusers.training import sample_user_draws, save_user_embeddings

USER_DIM = 8
LATENT_SHAPE = (4, 4, 4)  # the tiny Stage C: 4 channels; 32 px images with resolution_multiple 8


def _png(value: float, rng, size: int) -> bytes:
    pixels = np.clip(value * 255 + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _latents(sign: float, rng) -> np.ndarray:
    return (sign * 0.8 + rng.normal(0, 0.3, LATENT_SHAPE)).astype(np.float16)


def toy_rows(
    users: int = 8, pairs: int = 10, ties: int = 1, corrupt: bool = True, image_size: int = 32, seed: int = 0
) -> dict[str, list]:
    """Rows of ``users`` users, each with ``pairs`` non-tied pairs and ``ties`` ties; user ``u`` likes bright
    images when ``u`` is even. Captions and image uids are distinct (no row leaks into another). With
    ``corrupt``, row 3's ``jpg_1`` is not an image."""
    rng = np.random.default_rng(seed)
    columns = ["caption", "jpg_0", "jpg_1", "image_0_uid", "image_1_uid", "label_0", "label_1", "user_id"]
    columns += ["latents_0", "latents_1", "latents_ok"]
    rows: dict[str, list] = {c: [] for c in columns}
    for user in range(users):
        likes_bright = user % 2 == 0
        for i in range(pairs + ties):
            tie = i >= pairs
            label = 0.5 if tie else float(rng.integers(0, 2))
            bright_first = (label == 1) == likes_bright  # the preferred image is the one the user likes
            rows["caption"].append(f"picture {i} for user {user}")
            rows["image_0_uid"].append(f"u{user}-{i}-0")
            rows["image_1_uid"].append(f"u{user}-{i}-1")
            rows["jpg_0"].append(_png(0.8 if bright_first else 0.2, rng, image_size))
            rows["jpg_1"].append(_png(0.2 if bright_first else 0.8, rng, image_size))
            rows["latents_0"].append(_latents(1.0 if bright_first else -1.0, rng))
            rows["latents_1"].append(_latents(-1.0 if bright_first else 1.0, rng))
            rows["latents_ok"].append(True)
            rows["label_0"].append(label)
            rows["label_1"].append(1 - label)
            rows["user_id"].append(f"user{user}")
    if corrupt:
        rows["jpg_1"][3] = b"definitely not an image"
        rows["latents_ok"][3] = False
    return rows


def user_embedding_of(user_id: str) -> torch.Tensor:
    sign = 1.0 if int(user_id.removeprefix("user")) % 2 == 0 else -1.0
    return torch.full((1, USER_DIM), sign)


def write_parquet(path: str | os.PathLike, rows: dict[str, list]) -> str:
    """Writes Pick-a-Pic-format ``rows`` (column name -> values) as a parquet file; returns its path."""
    import datasets

    datasets.Dataset.from_dict(rows).to_parquet(path)
    return str(path)


def write_toy_data(folder: str | os.PathLike, **kwargs) -> dict[str, str]:
    """Writes ``pickapic.parquet`` (images only), ``pickapic_latents/`` (``save_to_disk`` with latents) and
    ``user_embeddings.safetensors`` (one draw of 4 pairs per user); returns their paths."""
    import datasets

    rows = toy_rows(**kwargs)
    images_only = {k: v for k, v in rows.items() if not k.startswith("latents")}
    paths = {
        "images": os.path.join(folder, "pickapic.parquet"),
        "latents": os.path.join(folder, "pickapic_latents"),
        "user_embeddings": os.path.join(folder, "user_embeddings.safetensors"),
    }
    write_parquet(paths["images"], images_only)
    datasets.Dataset.from_dict(rows).save_to_disk(paths["latents"])
    draws, _ = sample_user_draws(rows, num_pairs=4, draws=1, seed=0)
    embeddings = torch.stack([user_embedding_of(d.user_id) for d in draws])
    save_user_embeddings(paths["user_embeddings"], embeddings, draws, {"encoder": {"toy": True}})
    return paths
