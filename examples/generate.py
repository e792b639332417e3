"""Generate images for one user from their preference pairs (a JSON file, or a folder with pairs.json).

    python examples/generate.py --adapter ppd-diffusers/ppd-stable-cascade-adapter \
        --encoder ppd-diffusers/ppd-llava-onevision-encoder --pairs my_pairs/ \
        --prompt "a lighthouse at dusk" --prompt "a bowl of fruit" --output_dir out
    python examples/generate.py --pipeline my-saved-pipeline --user_embeds out/user.safetensors --prompt ...

pairs.json lists {"prompt", "chosen", "rejected"} objects with image paths relative to it. The user
embedding is written to <output_dir>/user.safetensors, so later runs can skip the encoder with
--user_embeds.
"""

from __future__ import annotations

import argparse
import logging
import os

import safetensors.torch
import torch
from _pipeline_args import add_pipeline_args, check_pipeline_args, generation_kwargs, load_pipeline

from ppd_diffusers import load_preference_pairs

logger = logging.getLogger("generate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    user = parser.add_mutually_exclusive_group()
    user.add_argument("--pairs", help="JSON file of the user's preference pairs, or a folder with pairs.json")
    user.add_argument("--user_embeds", help="a user.safetensors written by an earlier run")
    parser.add_argument(
        "--user_scale", "--preference_scale", type=float, default=1.0, help="0 = plain Stable Cascade"
    )  # --preference_scale: its former name
    parser.add_argument("--num_images", type=int, default=1, help="images per prompt")
    parser.add_argument("--output_dir", default="ppd-images")
    add_pipeline_args(parser)
    args = parser.parse_args()
    check_pipeline_args(parser, args, has_user=bool(args.pairs or args.user_embeds))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pipe = load_pipeline(args)
    user = {}
    if args.pairs:
        user["user_embeds"] = pipe.encode_user(load_preference_pairs(args.pairs))
    elif args.user_embeds:
        user["user_embeds"] = safetensors.torch.load_file(args.user_embeds)["user_embeds"]
    if user:
        user["user_scale"] = args.user_scale
    output = pipe(
        args.prompt,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        **user,
        **generation_kwargs(args),
    )
    os.makedirs(args.output_dir, exist_ok=True)
    for i, image in enumerate(output.images):
        path = os.path.join(args.output_dir, f"{i // args.num_images:03d}_{i % args.num_images}.png")
        image.save(path)
        logger.info("wrote %s (%s)", path, args.prompt[i // args.num_images])
    if args.pairs:
        path = os.path.join(args.output_dir, "user.safetensors")
        safetensors.torch.save_file({"user_embeds": output.user_embeds.float().cpu().contiguous()}, path)
        logger.info("wrote %s (reuse it with --user_embeds)", path)


if __name__ == "__main__":
    main()
