"""Command-line options shared by the generation examples: which pipeline to load, and how."""

from __future__ import annotations

import argparse

import torch

from ppd_diffusers import PersonalizedStableCascadePipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline")
    group.add_argument("--pipeline", help="a saved PersonalizedStableCascadePipeline (folder or Hub id)")
    group.add_argument("--adapter", help="UserAdapter folder or Hub id (replaces a saved pipeline's adapter)")
    group.add_argument("--encoder", help="saved preference encoder, or a LLaVA-OneVision id (not with --pipeline)")
    group.add_argument("--prior", default="stabilityai/stable-cascade-prior")
    group.add_argument("--prior_subfolder", default="prior", help='"prior" or "prior_lite"')
    group.add_argument("--decoder", default="stabilityai/stable-cascade")
    group.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--height", type=int, default=1024)
    group.add_argument("--width", type=int, default=1024)
    group.add_argument("--steps", type=int, default=20, help="Stage C steps")
    group.add_argument("--decoder_steps", type=int, default=10, help="Stage B steps")
    group.add_argument("--guidance_scale", type=float, default=4.0)
    group.add_argument("--user_guidance_scale", type=float, help="guide the user apart from the prompt")
    group.add_argument("--seed", type=int, default=0)


def check_pipeline_args(parser: argparse.ArgumentParser, args: argparse.Namespace, has_user: bool) -> None:
    if args.pipeline and args.encoder:
        parser.error("--encoder cannot be combined with --pipeline: a saved pipeline brings its own encoder")
    if not args.pipeline and not args.adapter and has_user:
        parser.error("a user needs an adapter: give --adapter (and --encoder for pairs) or a saved --pipeline")
    if args.user_guidance_scale is not None and not has_user:
        parser.error("--user_guidance_scale guides a user: give the user too")


def load_pipeline(args: argparse.Namespace) -> PersonalizedStableCascadePipeline:
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    if args.pipeline:
        pipe = PersonalizedStableCascadePipeline.from_pretrained(args.pipeline, dtype=dtype)
        if args.adapter:
            pipe.load_user_adapter(args.adapter)
    else:
        pipe = PersonalizedStableCascadePipeline.from_stable_cascade(
            args.adapter,
            args.encoder,
            prior_model_name_or_path=args.prior,
            prior_subfolder=args.prior_subfolder,
            decoder_model_name_or_path=args.decoder,
            dtype=dtype,
            variant="bf16" if dtype == torch.bfloat16 else None,
        )
    return pipe.to(args.device)


def generation_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        decoder_num_inference_steps=args.decoder_steps,
        guidance_scale=args.guidance_scale,
        user_guidance_scale=args.user_guidance_scale,
    )
