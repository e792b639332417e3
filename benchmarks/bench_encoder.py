"""Cost of a user embedding with `PreferenceEncoder`, and what layer truncation saves (ratio, same process).

Users of 4 pairs (8 images of 384 px, multi-image mode: 730 tokens per image, ~6k tokens per user) are
encoded by the full-depth encoder (`layer=-1`) and by one truncated at the middle layer (`layer=N/2`,
whose upper layers are never built). Timings interleave the two encoders and include the image
preprocessing.

    python benchmarks/bench_encoder.py --small     # CPU: the 0.5B layout scaled down, fp32
    python benchmarks/bench_encoder.py             # GPU: LLaVA-OneVision 0.5B size, random weights, bf16

Peak memory is `torch.cuda.max_memory_allocated` on a GPU; on the CPU each encoder runs once more in
a child process that reports its peak resident set above the level after imports. Either way each
encoder is measured alone. "All" timings include tokenization and PIL preprocessing of 512 px images;
"model only" times the forward pass on prepared inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from functools import partial

import numpy as np
import PIL.Image
import torch
from _measure import current_rss_bytes, hardware, interleaved_median, peak_rss_bytes

from ppd_diffusers import PreferenceEncoder
from ppd_diffusers.preference_pairs import as_user_pairs
from ppd_diffusers.testing_utils import LLAVA_ONEVISION_0_5B, save_random_llava_onevision

# the 0.5B layout (384 px, 729 patches per image) with narrow, shallower towers, for a 2-core CPU
SMALL = dict(
    LLAVA_ONEVISION_0_5B,
    text_hidden=128,
    text_layers=8,
    text_heads=4,
    text_kv_heads=2,
    text_intermediate=256,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate=128,
)


def random_users(num_users: int, seed: int = 0) -> list[list[tuple]]:
    rng = np.random.default_rng(seed)

    def image() -> PIL.Image.Image:
        return PIL.Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))

    return [[(f"a picture of thing {u}-{i}", image(), image()) for i in range(4)] for u in range(num_users)]


def load(path: str, layer: int, dtype: torch.dtype, device: str) -> PreferenceEncoder:
    return PreferenceEncoder.from_pretrained(path, layer=layer, dtype=dtype).to(device)


def child_main(args: argparse.Namespace, dtype: torch.dtype) -> None:
    baseline = current_rss_bytes()
    encoder = load(args.checkpoint, args.child_layer, dtype, "cpu")
    encoder.encode(random_users(args.users), batch_size=args.users)
    print(json.dumps({"peak_bytes": peak_rss_bytes() - baseline}))


def peak_memory(args, path: str, layer: int, dtype: torch.dtype, users) -> int:
    """Peak memory of loading one encoder and encoding one batch, with nothing else loaded."""
    if args.device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        encoder = load(path, layer, dtype, args.device)
        encoder.encode(users, batch_size=args.users)
        del encoder
        return torch.cuda.max_memory_allocated()
    cmd = [sys.executable, __file__, "--checkpoint", path, "--child-layer", str(layer), "--dtype", args.dtype]
    cmd += ["--users", str(args.users)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def model_only(encoder: PreferenceEncoder, users) -> partial:
    """The forward pass alone, on inputs prepared (tokenized, preprocessed, moved) beforehand."""
    inputs = encoder.prepare_inputs(as_user_pairs(users))
    weight = encoder.model.get_input_embeddings().weight
    inputs["pixel_values"] = inputs["pixel_values"].to(weight.dtype)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        inputs[key] = inputs[key].to(weight.device)
    return partial(encoder.model, **inputs, use_cache=False)


def time_encoders(path: str, layers: int, users, dtype: torch.dtype, device: str, rounds: int, warmup: int) -> list:
    """Per-user time of the full-depth encoder and of one truncated at ``layers // 2``, interleaved.

    Each row: ``layer``, ``layers_built``, ``tokens_per_user``, ``ms_per_user`` (tokenization, PIL
    preprocessing and forward) and ``model_ms_per_user`` (the forward pass on prepared inputs).
    """
    encoders = {layer: load(path, layer, dtype, device) for layer in (-1, layers // 2)}
    fns = {}
    for layer, encoder in encoders.items():
        fns[("encode", layer)] = partial(encoder.encode, users, batch_size=len(users))
        fns[("model", layer)] = model_only(encoder, users)
    with torch.no_grad():
        seconds = interleaved_median(fns, device, rounds, warmup)
    tokens = encoders[-1].prepare_inputs(as_user_pairs(users[:1]))["input_ids"].shape[1]
    return [
        {
            "layer": layer,
            "layers_built": len(encoder.model.language_model.layers),
            "tokens_per_user": tokens,
            "ms_per_user": 1e3 * seconds[("encode", layer)] / len(users),
            "model_ms_per_user": 1e3 * seconds[("model", layer)] / len(users),
        }
        for layer, encoder in encoders.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="scaled-down layout, CPU, fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--users", type=int, default=4, help="users per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", help="write the result here as JSON, and as a markdown table beside it (.md)")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--child-layer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.device, args.dtype = "cpu", "fp32"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.child_layer is not None:
        child_main(args, dtype)
        return

    sizes = SMALL if args.small else LLAVA_ONEVISION_0_5B
    users = random_users(args.users)
    with tempfile.TemporaryDirectory() as path:
        save_random_llava_onevision(path, dtype=dtype, **sizes)
        rows = time_encoders(path, sizes["text_layers"], users, dtype, args.device, args.rounds, args.warmup)
        for row in rows:
            row["peak_gib"] = peak_memory(args, path, row["layer"], dtype, users) / 2**30
    for row in rows:
        row["time_vs_full"] = row["ms_per_user"] / rows[0]["ms_per_user"]
        row["model_time_vs_full"] = row["model_ms_per_user"] / rows[0]["model_ms_per_user"]
        row["memory_vs_full"] = row["peak_gib"] / rows[0]["peak_gib"]
    result = {
        "hardware": hardware(args.device),
        "dtype": args.dtype,
        "config": "small" if args.small else "llava-onevision-0.5b",
        "users_per_batch": args.users,
        "rows": rows,
    }
    lines = [
        f"Hardware: {result['hardware']}; {result['config']}, dtype {args.dtype}, {args.users} users a batch.",
        "",
    ]
    lines += [
        "| layer | decoder layers built | tokens per user | ms per user (all) | ms per user (model only) "
        "| peak (GiB) | time vs full (all / model) | memory vs full |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['layers_built']} | {r['tokens_per_user']} | {r['ms_per_user']:.1f} | "
            f"{r['model_ms_per_user']:.1f} | {r['peak_gib']:.3f} | {r['time_vs_full']:.2f} / "
            f"{r['model_time_vs_full']:.2f} | {r['memory_vs_full']:.2f} |"
        )
    table = "\n".join(lines)
    if args.output:
        with open(args.output, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        with open(args.output.removesuffix(".json") + ".md", "w") as f:
            f.write(table + "\n")
    print(json.dumps(result, indent=2))
    print(table)


if __name__ == "__main__":
    main()
