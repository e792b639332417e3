"""Precompute the Stage C latents of both images of every pair of a Pick-a-Pic-format dataset.

    python examples/precompute_latents.py --dataset yuvalkirstain/pickapic_v2 --split train --streaming \
        --effnet_checkpoint stabilityai/stable-cascade --resolution 1024 --batch_size 32 \
        --output_dir pickapic_v2_latents
    python examples/precompute_latents.py --dataset train.parquet --image_encoder my-saved-encoder ...

The encoder is Stability's EfficientNetV2-S ("effnet"): `--effnet_checkpoint` takes Stability's single
file (a path, a folder holding effnet_encoder.safetensors, or a Hub repo), `--image_encoder` a folder or
Hub id written by `StageCImageEncoder.save_pretrained`. Every row gets `latents_0`, `latents_1`
(16 x 24 x 24 at 1024 px) and `latents_ok` (False where an image could not be read: zeros, counted in the
log). Ties are kept so row indices match the source dataset. The result is written with `save_to_disk`
to `--output_dir`, with the settings in `<output_dir>/latents_info.json`; the image columns are left out
(training from latents needs none: ~29 GB of latents instead of the images' ~335 GB for Pick-a-Pic v2)
unless `--keep_images`. `--streaming` reads the images as they are encoded, so they are never stored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import datasets
import torch

from ppd_diffusers.stage_c_image_encoder import StageCImageEncoder
from ppd_diffusers.training import add_stage_c_latents, count_unreadable_rows, load_pickapic_dataset

logger = logging.getLogger("precompute_latents")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="Hub id, a local file/folder, or a save_to_disk folder")
    parser.add_argument("--split", default="train")
    encoder = parser.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--image_encoder", help="a StageCImageEncoder folder or Hub id (save_pretrained layout)")
    encoder.add_argument("--effnet_checkpoint", help="Stability's effnet file, a folder holding it, or a Hub repo")
    parser.add_argument("--effnet_filename", default="effnet_encoder.safetensors")
    parser.add_argument("--resolution", type=int, default=1024, help="Stage C image size in pixels (1024 -> 24x24)")
    parser.add_argument("--batch_size", type=int, default=16, help="rows (two images each) per encoder call")
    parser.add_argument("--encoder_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--latents_dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--max_rows", type=int, default=None, help="encode only the first rows (a trial run)")
    parser.add_argument("--streaming", action="store_true", help="read the images as they are encoded, never stored")
    parser.add_argument("--keep_images", action="store_true", help="also write jpg_0/jpg_1 (training needs none)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.image_encoder:
        image_encoder = StageCImageEncoder.from_pretrained(args.image_encoder)
    else:
        image_encoder = StageCImageEncoder.from_stability_checkpoint(args.effnet_checkpoint, args.effnet_filename)
    image_encoder = image_encoder.to(device=device, dtype=getattr(torch, args.encoder_dtype))

    dataset = load_pickapic_dataset(args.dataset, args.split, streaming=args.streaming)
    if args.max_rows is not None:
        dataset = (
            dataset.take(args.max_rows) if args.streaming else dataset.select(range(min(args.max_rows, len(dataset))))
        )
    dataset = add_stage_c_latents(
        dataset,
        image_encoder,
        height=args.resolution,
        width=args.resolution,
        batch_size=args.batch_size,
        dtype=args.latents_dtype,
    )
    if not args.keep_images:
        dataset = dataset.remove_columns(["jpg_0", "jpg_1"])
    if args.streaming:
        # the stream is read once, in order: row i of the output is row i of the source
        stream = dataset
        dataset = datasets.Dataset.from_generator(lambda: iter(stream), features=stream.features)
    unreadable = count_unreadable_rows(dataset)
    dataset.save_to_disk(args.output_dir)
    info = {
        "rows": len(dataset),
        "rows_with_unreadable_images": unreadable,
        "resolution": args.resolution,
        "latent_shape": list(dataset.features["latents_0"].shape),
        "latents_dtype": args.latents_dtype,
        "encoder_dtype": args.encoder_dtype,
        "image_encoder": args.image_encoder or args.effnet_checkpoint,
        "dataset": args.dataset,
        "split": args.split,
    }
    with open(os.path.join(args.output_dir, "latents_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    logger.info(
        "%d rows encoded, %d with an unreadable image (latents_ok=False); latents %s; wrote %s",
        len(dataset),
        unreadable,
        "x".join(map(str, info["latent_shape"])),
        args.output_dir,
    )


if __name__ == "__main__":
    main()
