"""Move between two users' tastes: one image per mixing weight, written as a grid.

    python examples/interpolate_users.py --adapter ppd-diffusers/ppd-stable-cascade-adapter \
        --encoder ppd-diffusers/ppd-llava-onevision-encoder --pairs_a alice/ --pairs_b bob/ \
        --prompt "a cabin in the woods" --num_weights 5 --output interpolation.png

Both users are encoded once; the image for weight a uses u = (1 - a) * u_A + a * u_B, with the same seed
for every column, so only the user changes across the grid (one row per prompt).
"""

from __future__ import annotations

import argparse
import logging

import torch
from _pipeline_args import add_pipeline_args, check_pipeline_args, generation_kwargs, load_pipeline
from diffusers.utils import make_image_grid

from ppd_diffusers import load_preference_pairs

logger = logging.getLogger("interpolate_users")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several rows")
    parser.add_argument("--pairs_a", required=True, help="user A's pairs (JSON file or folder with pairs.json)")
    parser.add_argument("--pairs_b", required=True, help="user B's pairs")
    parser.add_argument("--num_weights", type=int, default=5, help="columns, from user A (0) to user B (1)")
    parser.add_argument("--output", default="interpolation.png")
    add_pipeline_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.num_weights < 2:
        parser.error("--num_weights must be at least 2")
    check_pipeline_args(parser, args, has_user=True)

    pipe = load_pipeline(args)
    users = pipe.encode_user([load_preference_pairs(args.pairs_a), load_preference_pairs(args.pairs_b)])
    weights = torch.linspace(0, 1, args.num_weights).tolist()
    rows = []
    for prompt in args.prompt:
        # one batch per prompt: a row of mixed users, each image from the same starting noise
        mixed = torch.cat([torch.lerp(users[:1], users[1:], w) for w in weights])
        generators = [torch.Generator().manual_seed(args.seed) for _ in weights]
        output = pipe([prompt] * len(weights), user_embeds=mixed, generator=generators, **generation_kwargs(args))
        rows += output.images
    make_image_grid(rows, rows=len(args.prompt), cols=len(weights)).save(args.output)
    logger.info("wrote %s: %d prompt(s) x weights %s", args.output, len(args.prompt), [f"{w:.2f}" for w in weights])


if __name__ == "__main__":
    main()
