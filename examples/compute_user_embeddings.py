"""Compute user embeddings for a Pick-a-Pic-format dataset, once per user, resumable, across processes.

    python examples/compute_user_embeddings.py --dataset yuvalkirstain/pickapic_v2 --split train \
        --encoder llava-hf/llava-onevision-qwen2-0.5b-ov-hf --layer 12 --output_dir user_embeddings
    accelerate launch --multi_gpu --num_processes 8 examples/compute_user_embeddings.py ...  # users split over GPUs
    torchrun --nproc_per_node 2 examples/compute_user_embeddings.py ...  # several CPU processes (gloo)

Ties are dropped, pairs are grouped by `user_id`, and `--draws` sets of `--num_pairs` pairs are drawn
per user with `--seed` (users with fewer pairs are skipped and counted). Each process encodes its
slice of the users; embeddings go through a cache in `<output_dir>/cache`, so an interrupted run
re-started with the same arguments only encodes what is missing. Output:
`<output_dir>/user_embeddings.safetensors` and `.index.json` (user, draw and dataset rows of every
embedding, so training can leave those pairs out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from accelerate import PartialState

from ppd_diffusers import BasePreferenceEncoder, CLIPPreferenceEncoder, PreferenceEncoder, UserEmbeddingCache
from ppd_diffusers.training import (
    encode_user_draws,
    load_pickapic_dataset,
    merge_user_embedding_shards,
    sample_user_draws,
    save_user_embeddings,
)

logger = logging.getLogger("compute_user_embeddings")


def load_encoder(args: argparse.Namespace, device: torch.device) -> BasePreferenceEncoder:
    # only the options given on the command line: a saved encoder folder keeps its own
    options = {k: getattr(args, k) for k in ("num_pairs", "pooling", "layer") if getattr(args, k) is not None}
    if args.encoder_type == "clip":
        options.pop("layer", None)
        options.pop("pooling", None)
        return CLIPPreferenceEncoder.from_pretrained(args.encoder, device_map=str(device), **options)
    return PreferenceEncoder.from_pretrained(args.encoder, dtype=args.dtype, device_map=str(device), **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="Hub id, or a local folder/file loadable by `datasets`")
    parser.add_argument("--split", default="train")
    parser.add_argument("--encoder", required=True, help="VLM/CLIP id or path, or a saved encoder folder")
    parser.add_argument("--encoder_type", choices=["vlm", "clip"], default="vlm")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--pooling", default=None, choices=["last", "mean_after_images", "last_k"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num_pairs", type=int, default=None, help="pairs per user (default: the encoder's, 4)")
    parser.add_argument("--draws", type=int, default=1, help="embeddings per user, each from other pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    state = PartialState(cpu=not torch.cuda.is_available())
    dataset = load_pickapic_dataset(args.dataset, args.split)
    encoder = load_encoder(args, state.device)
    draws, stats = sample_user_draws(dataset, encoder.num_pairs, args.draws, args.seed)
    if state.is_main_process:
        logger.info(
            "%d rows, %d ties dropped; %d users with a draw, %d with fewer than %d pairs skipped; %d draws.",
            stats.rows,
            stats.ties,
            stats.users,
            stats.users_with_too_few_pairs,
            encoder.num_pairs,
            stats.draws,
        )

    cache = UserEmbeddingCache(os.path.join(args.output_dir, "cache"), encoder)
    shard = os.path.join(args.output_dir, f"shard-{state.process_index:05d}.safetensors")
    with state.split_between_processes(draws) as my_draws:
        encoded = encode_user_draws(cache, dataset, my_draws, batch_size=args.batch_size)
        # the cache computed the fingerprint (a pass over the weights) already
        metadata = {"encoder_fingerprint": cache.fingerprint, "encoder": encoder.config, "seed": args.seed}
        metadata["unreadable"] = encoded.unreadable
        save_user_embeddings(shard, encoded.embeddings, encoded.draws, metadata)
    logger.info(
        "process %d: %d from the cache, %d encoded, %d draws with unreadable images left out",
        state.process_index, cache.hits, cache.misses, len(encoded.unreadable),
    )  # fmt: skip
    state.wait_for_everyone()

    if state.is_main_process:
        shards = [os.path.join(args.output_dir, f"shard-{i:05d}.safetensors") for i in range(state.num_processes)]
        final = os.path.join(args.output_dir, "user_embeddings.safetensors")
        unreadable = merge_user_embedding_shards(shards, final).get("unreadable", [])
        for path in shards:
            os.remove(path)
            os.remove(path + ".index.json")
        encoder.save_pretrained(os.path.join(args.output_dir, "encoder"))
        with open(os.path.join(args.output_dir, "stats.json"), "w") as f:
            summary = {k: v for k, v in vars(stats).items() if k != "per_user_pairs"}
            json.dump({**summary, "draws_left_out_unreadable": unreadable}, f, indent=2)
        kept = stats.draws - len(unreadable)
        logger.info("wrote %s (%d embeddings, %d draws left out)", final, kept, len(unreadable))
    state.destroy_process_group()


if __name__ == "__main__":
    main()
