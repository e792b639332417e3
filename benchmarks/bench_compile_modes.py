"""Which way of compiling Stage C makes the small-batch step fastest, plain and personalized (same process).

At batch 2 (one image with classifier-free guidance) the eager Stage C step is bound by kernel launches,
so how much of the network one compiled graph covers, and whether CUDA graphs replay it, decides the
step time. Variants, each on freshly built models after ``torch._dynamo.reset()``:

- ``eager``: no compilation (the baseline of every ratio);
- ``full``: ``torch.compile`` of the whole plain UNet and of the whole ``PersonalizedStageC``;
- ``regional``: ``compile_repeated_blocks()`` (what ``pipe.compile_prior()`` does);
- ``regional_cudagraphs``: the same with ``mode="reduce-overhead"`` (CUDA graphs per block).

The personalized step is the guidance layout (a user on the first half of the rows). Each row gives the
first call (compilation), the median step of plain and personalized (interleaved) and their ratio.

    python benchmarks/bench_compile_modes.py --output benchmarks/results/compile_modes_h200.json   # GPU
    python benchmarks/bench_compile_modes.py --tiny                                                 # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _measure import hardware, interleaved_median, write_results
from gpu_suite import build_stage_c, free, parse_args, step_functions, timed

from ppd_diffusers._stable_cascade import _personalized_attn_block

VARIANTS = ("eager", "full", "regional", "regional_cudagraphs")


def compiled_functions(variant: str, args, unet, adapter, batch: int) -> dict:
    if variant.startswith("regional"):
        mode = "reduce-overhead" if variant == "regional_cudagraphs" else None
        adapter.attach(unet).compile_repeated_blocks(fullgraph=True, backend=args.compile_backend, mode=mode)
    fns = step_functions(args, unet, adapter, batch)
    if variant == "full":
        for name in ("plain", "user_guidance_layout"):
            fn = fns[name]
            fns[name] = _bind(torch.compile(fn.func, fullgraph=True, backend=args.compile_backend), fn)
    return {name: fns[name] for name in ("plain", "user_guidance_layout")}


def _bind(compiled, partial_fn):
    return lambda: compiled(*partial_fn.args, **partial_fn.keywords)


def measure(args) -> list[dict]:
    rows, end = [], time.perf_counter() + args.budget
    for variant in args.variants:
        for batch in args.batch_sizes:
            if time.perf_counter() > end:
                rows.append({"variant": variant, "batch": batch, "skipped": "time budget spent"})
                continue
            torch._dynamo.reset()
            _personalized_attn_block._compiled_call_impl = None  # shared by every model: start uncompiled
            free()
            row = {"variant": variant, "batch": batch}
            try:
                unet, adapter = build_stage_c(args)
                with torch.no_grad():
                    fns = compiled_functions(variant, args, unet, adapter, batch)
                    row["first_call_s"] = {name: timed(fn, args.device) for name, fn in fns.items()}
                    seconds = interleaved_median(fns, args.device, args.rounds, args.warmup)
                row.update(plain_ms=1e3 * seconds["plain"], user_ms=1e3 * seconds["user_guidance_layout"])
                row["ratio"] = row["user_ms"] / row["plain_ms"]
            except Exception as error:  # keep the other variants' figures
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            unet = adapter = fns = None
    eager = {r["batch"]: r.get("plain_ms") for r in rows if r["variant"] == "eager"}
    for row in rows:
        if row.get("plain_ms") and eager.get(row["batch"]):
            row["plain_vs_eager"] = row["plain_ms"] / eager[row["batch"]]
            row["user_vs_eager_plain"] = row["user_ms"] / eager[row["batch"]]
    return rows


def to_markdown(result: dict) -> str:
    lines = [f"Device: {result['hardware']}; {result['settings']}.", ""]
    lines += ["| variant | batch | first calls (s) | plain (ms) | personalized (ms) | ratio | plain vs eager |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "plain_ms" not in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        first = " / ".join(f"{v:.1f}" for v in r["first_call_s"].values())
        lines.append(
            f"| {r['variant']} | {r['batch']} | {first} | {r['plain_ms']:.2f} | {r['user_ms']:.2f} | "
            f"{r['ratio']:.3f} | {r.get('plain_vs_eager', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--budget", type=float, default=360.0, help="seconds; later variants are skipped past it")
    parser.add_argument("--output")
    own = parser.parse_args()
    args = parse_args(["--tiny"] if own.tiny else [])
    args.batch_sizes, args.budget, args.variants = own.batch_sizes, own.budget, own.variants
    args.rounds, args.warmup = (3, 1) if own.tiny else (20, 3)
    if own.tiny:  # CUDA graphs need a GPU
        args.variants = [v for v in args.variants if v != "regional_cudagraphs"]
    result = {
        "hardware": hardware(args.device),
        "settings": f"{args.config} Stage C, {args.dtype}, {args.latent_size} x {args.latent_size} latents, backend "
        f"{args.compile_backend}, median of {args.rounds} interleaved rounds",
        "rows": measure(args),
    }
    write_results(own.output, result, to_markdown(result))


if __name__ == "__main__":
    main()
