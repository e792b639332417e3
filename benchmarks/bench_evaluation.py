"""Cost of scoring generated images with every reward scorer of `ppd_diffusers.evaluation`.

N images (random 512 px RGB, one prompt each) are scored by CLIP score, PickScore, the LAION aesthetic
predictor and HPSv2.1, one scorer at a time: seconds and images/s per scorer (preprocessing included,
after one warm-up batch), the sum over scorers (the issue's target: 1000 images with all scorers in
<= 60 s on one H100/H200), the loading time (Hub download included on a first run, not in the sum) and
peak GPU memory. With ``--compare-fp32 K`` the first K images are scored again in float32, and the largest
difference from the run's dtype is reported.

    python benchmarks/bench_evaluation.py --tiny --output benchmarks/results/evaluation_tiny.json  # CPU
    python benchmarks/bench_evaluation.py --output benchmarks/results/evaluation_h100.json        # GPU

``--tiny`` builds tiny random checkpoints in the published layouts in a temporary folder (the same loading
and scoring code; timings say nothing about the real models); the full mode loads the real published
checkpoints from the Hub (about 8 GB on a first run); ``--random-weights`` builds the published
architectures with random weights instead (same compute, for a machine without the Hub; its scores mean
nothing and the tiny byte-level tokenizer makes prompts somewhat longer than CLIP's BPE would).

    python benchmarks/bench_evaluation.py --random-weights --output /tmp/evaluation.json         # GPU, offline
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from typing import Any

import numpy as np
import PIL.Image
import torch
from _measure import hardware, sync, write_results

from ppd_diffusers.evaluation import SCORERS, load_scorer

SCORER_NAMES = ("clip_score", "pickscore", "aesthetic", "hps")
TARGET_S = 60.0
TARGET_IMAGES = 1000
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_images(count: int, size: int, seed: int = 0) -> tuple[list[PIL.Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    subjects = ("a lighthouse at dusk", "a red cat on a sofa", "a bowl of ramen", "a city street in the rain")
    styles = ("oil painting", "photograph, 35 mm", "watercolor", "3d render, studio lighting")
    prompts = [f"{subjects[i % 4]}, {styles[(i // 4) % 4]}, variation {i}" for i in range(count)]
    return images, prompts


def tiny_sources(folder: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Tiny random checkpoints in the published layouts, and how each scorer loads them."""
    from ppd_diffusers.testing_utils import TINY_OPEN_CLIP_NAME, save_tiny_aesthetic_predictor, save_tiny_hps

    clip, hps = f"{folder}/clip", f"{folder}/hps"
    save_tiny_aesthetic_predictor(clip)
    save_tiny_hps(hps)
    return {
        "clip_score": (clip, {}),
        "pickscore": (clip, {"processor_name_or_path": clip}),
        "aesthetic": (clip, {"clip_name_or_path": clip}),
        "hps": (hps, {"model_name": TINY_OPEN_CLIP_NAME}),
    }


def random_full_size_sources(folder: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The published architectures with random weights, in the published layouts (for a GPU without the Hub):
    CLIP ViT-L/14 and the aesthetic head, a CLIP ViT-H/14 (PickScore) and open_clip's ViT-H-14 (HPSv2),
    saved in half precision as the Hub files are (~5 GB written to ``folder``)."""
    from ppd_diffusers.testing_utils import (
        CLIP_VIT_H_14,
        CLIP_VIT_L_14,
        save_random_aesthetic_head,
        save_random_clip_like,
        save_tiny_hps,
    )

    clip_l, clip_h, hps = f"{folder}/clip-l", f"{folder}/clip-h", f"{folder}/hps"
    save_random_clip_like(clip_l, CLIP_VIT_L_14, dtype=torch.float16)
    save_random_aesthetic_head(clip_l)
    save_random_clip_like(clip_h, CLIP_VIT_H_14, dtype=torch.float16)
    save_tiny_hps(hps, model_name="ViT-H-14", dtype=torch.float16)
    return {
        "clip_score": (clip_l, {}),
        "pickscore": (clip_h, {"processor_name_or_path": clip_h}),
        "aesthetic": (clip_l, {"clip_name_or_path": clip_l}),
        "hps": (hps, {"model_name": "ViT-H-14"}),
    }


def measure(name: str, source: str | None, kwargs: dict, images, prompts, args) -> dict:
    """Loads one scorer, scores every image once after a warm-up batch, and frees it."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    scorer = load_scorer(
        name, source, device=args.device, torch_dtype=args.torch_dtype, batch_size=args.batch_size, **kwargs
    )
    sync(args.device)
    load_s = time.perf_counter() - start
    scorer.show_progress = False
    scorer(images[: args.batch_size], prompts[: args.batch_size])  # warm-up: kernels, allocator, lazy imports
    sync(args.device)
    start = time.perf_counter()
    scores = scorer(images, prompts)
    sync(args.device)
    seconds = time.perf_counter() - start
    row = {
        "scorer": name,
        "source": source_label(name, source, args),
        "load_s": load_s,
        "score_s": seconds,
        "images_per_s": len(images) / seconds,
        "mean_score": scores.mean().item(),
        "std_score": scores.std().item() if len(scores) > 1 else 0.0,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    if args.compare_fp32 and args.torch_dtype != torch.float32:
        count = min(args.compare_fp32, len(images))
        reference = scorer.to(dtype=torch.float32)(images[:count], prompts[:count])
        row["max_abs_diff_vs_fp32"] = (scores[:count] - reference).abs().max().item()
    del scorer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"[bench_evaluation] {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return row


def source_label(name: str, source: str | None, args) -> str:
    if args.tiny or args.random_weights:
        return f"{'tiny' if args.tiny else 'random full-size'} {name}"
    return source or SCORERS[name].default_name_or_path


def markdown(result: dict) -> str:
    rows, s = result["rows"], result["settings"]
    lines = [
        f"Hardware: {result['hardware']}; {s['checkpoints']} checkpoints, dtype {s['dtype']}, "
        f"{s['num_images']} images of {s['image_size']} px, batch {s['batch_size']}.",
        "",
        "| scorer | checkpoint | load (s) | score (s) | images/s | mean score | peak (GiB) | max diff vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        diff = r.get("max_abs_diff_vs_fp32")
        lines.append(
            f"| {r['scorer']} | `{r['source']}` | {r['load_s']:.1f} | {r['score_s']:.2f} | {r['images_per_s']:.1f} | "
            f"{r['mean_score']:.4g} | {peak} | {'-' if diff is None else f'{diff:.3g}'} |"
        )
    total = result["total_score_s"]
    lines += ["", f"All scorers: {total:.2f} s for {s['num_images']} images ({s['num_images'] / total:.1f} images/s)."]
    target = result["target"]
    if target["met"] is None:
        lines.append(f"Target ({target['name']}): not judged ({target['why']}).")
    else:
        lines.append(f"Target ({target['name']}): {'met' if target['met'] else '**not met**'}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoints on the CPU, fp32, 64 images")
    parser.add_argument(
        "--random-weights", action="store_true", help="the published architectures with random weights (no Hub)"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 (fp32 with --tiny)")
    parser.add_argument("--num-images", type=int, default=None, help=f"default: {TARGET_IMAGES} (64 with --tiny)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scorers", nargs="+", default=list(SCORER_NAMES), choices=SCORER_NAMES)
    parser.add_argument("--compare-fp32", type=int, default=64, metavar="K", help="images re-scored in fp32 (0: off)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: its own choice)")
    parser.add_argument("--output", help="write the result here as JSON, and as a markdown table beside it (.md)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    args.num_images = args.num_images or (64 if args.tiny else TARGET_IMAGES)
    args.torch_dtype = DTYPES[args.dtype]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:  # on a loaded machine, fewer threads than cores avoids OpenMP's oversubscription stalls
        torch.set_num_threads(args.threads)
    if not args.tiny and args.device == "cpu":
        sys.exit("[bench_evaluation] no GPU: the real scorers would take an hour on the CPU; use --tiny.")
    images, prompts = random_images(args.num_images, args.image_size)
    with tempfile.TemporaryDirectory() as folder:
        if args.tiny:
            sources = tiny_sources(folder)
        elif args.random_weights:
            sources = random_full_size_sources(folder)
        else:
            sources = {name: (None, {}) for name in SCORER_NAMES}
        rows = [measure(name, *sources[name], images, prompts, args) for name in args.scorers]
    total = sum(r["score_s"] for r in rows)
    full_run = not args.tiny and args.device.startswith("cuda") and set(args.scorers) == set(SCORER_NAMES)
    full_run = full_run and args.num_images >= TARGET_IMAGES
    target = {"name": f"{TARGET_IMAGES} images with all scorers <= {TARGET_S:g} s on one GPU", "met": None}
    if full_run:
        target["met"] = total * TARGET_IMAGES / args.num_images <= TARGET_S
    else:
        target["why"] = "tiny CPU run" if args.tiny else "not a full run of all scorers on a GPU"
    result = {
        "hardware": hardware(args.device),
        "settings": {
            "checkpoints": "tiny random" if args.tiny else "random full-size" if args.random_weights else "published",
            "device": args.device,
            "dtype": args.dtype,
            "num_images": args.num_images,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
        },
        "rows": rows,
        "total_score_s": total,
        "images_per_s_all_scorers": args.num_images / total,
        "target": target,
    }
    write_results(args.output, result, markdown(result))


if __name__ == "__main__":
    main()
