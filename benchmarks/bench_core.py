"""Speed and memory of the PPD core, each as a ratio against a baseline measured in the same process.

(a) Inference: one personalized Stage C denoising step (user K'/V' precomputed once, as the pipeline
    does) against the plain ``StableCascadeUNet`` step, at several batch sizes; plus the naive variant
    that recomputes K'/V' at every step. A/B runs are interleaved so drift hits both alike.
(b) Training: one adapter-only PPD step (``ppd_dpo_step`` + backward + AdamW; reference = the same UNet
    with the adapter off) against one full-model Diffusion-DPO step with a separate frozen reference
    copy; time and peak memory, with and without gradient checkpointing.

    python benchmarks/bench_core.py --tiny                      # CPU, tiny config, a minute
    python benchmarks/bench_core.py --configs lite stage_c      # GPU, full size, random weights, bf16

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU each training variant runs
in a child process and reports its peak resident set above the level after imports.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from functools import partial

import torch
from _measure import current_rss_bytes, hardware, interleaved_median, peak_rss_bytes, write_results
from diffusers import StableCascadeUNet

from ppd_diffusers import PPDLoss, UserAdapter, ppd_loss
from ppd_diffusers.noise import add_noise
from ppd_diffusers.testing_utils import STAGE_C_PRIOR, STAGE_C_PRIOR_LITE, tiny_stage_c_config
from ppd_diffusers.training import ppd_dpo_step

CONFIGS = {
    "stage_c": STAGE_C_PRIOR,
    "lite": STAGE_C_PRIOR_LITE,
    "tiny": tiny_stage_c_config(
        in_channels=16,
        out_channels=16,
        conditioning_dim=64,
        block_out_channels=(64, 64),
        num_attention_heads=(4, 4),
        down_num_layers_per_block=(2, 4),
        up_num_layers_per_block=(4, 2),
        clip_text_in_channels=32,
        clip_text_pooled_in_channels=32,
        clip_image_in_channels=24,
        clip_seq=4,
    ),
}
LATENT_SIZE = {"stage_c": 24, "lite": 24, "tiny": 12}  # 24 x 24 is Stage C at 1024 px
TEXT_TOKENS = 77


def build(config_name: str, args, dtype: torch.dtype, adapter_dtype: torch.dtype):
    config, size = CONFIGS[config_name], LATENT_SIZE[config_name]
    torch.manual_seed(0)
    with torch.device(args.device):
        unet = StableCascadeUNet(**config).to(dtype).eval().requires_grad_(False)
        adapter = UserAdapter.from_unet(
            unet, args.user_dim, args.user_tokens, args.user_token_dim, torch_dtype=adapter_dtype
        )
    with torch.no_grad():  # a trained-looking adapter: V' = 0 would let kernels skip nothing, but be honest
        for layer in adapter.to_v_user:
            layer.weight.normal_(std=0.02)
    return unet, adapter, size


def conditioning(unet: StableCascadeUNet, batch: int, device: str, dtype: torch.dtype) -> dict:
    c = unet.config
    return dict(
        clip_text_pooled=torch.randn(batch, 1, c.clip_text_pooled_in_channels, device=device, dtype=dtype),
        clip_text=torch.randn(batch, TEXT_TOKENS, c.clip_text_in_channels, device=device, dtype=dtype),
        clip_img=torch.randn(batch, 1, c.clip_image_in_channels, device=device, dtype=dtype),
    )


def bench_inference(args, config_name: str, dtype: torch.dtype) -> list[dict]:
    # inference runs the adapter in the UNet's dtype
    unet, adapter, size = build(config_name, args, dtype, adapter_dtype=dtype)
    model = adapter.attach(unet)
    rows = []
    for batch in args.batch_sizes:
        sample = torch.randn(batch, 16, size, size, device=args.device, dtype=dtype)
        t = torch.rand(batch, device=args.device, dtype=dtype)
        cond = dict(conditioning(unet, batch, args.device, dtype), timestep_ratio=t)
        users = torch.randn(batch, args.embed_tokens, args.user_dim, device=args.device, dtype=dtype)
        with torch.no_grad():
            fns = {
                "plain": partial(unet, sample, **cond),
                "personalized": partial(model, sample, **cond, user_kv=adapter(users)),
                "personalized_naive": partial(model, sample, **cond, user_embeds=users),
            }
            med = interleaved_median(fns, args.device, args.rounds, args.warmup)
        rows.append(
            {
                "config": config_name,
                "batch": batch,
                "plain_ms": 1e3 * med["plain"],
                "personalized_ms": 1e3 * med["personalized"],
                "ratio": med["personalized"] / med["plain"],
                "naive_ratio": med["personalized_naive"] / med["plain"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def training_step_fn(variant: str, args, config_name: str, dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    """Returns a closure running one optimizer step of ``variant`` and the number of trained parameters."""
    # training keeps the adapter in float32 (what `UserAdapter.from_unet` defaults to)
    unet, adapter, size = build(config_name, args, dtype, adapter_dtype=torch.float32)
    pairs, device = args.pairs, args.device
    g = torch.Generator(device).manual_seed(0)
    lat_w = torch.randn(pairs, 16, size, size, device=device, dtype=dtype, generator=g)
    lat_l = torch.randn(pairs, 16, size, size, device=device, dtype=dtype, generator=g)
    cond = conditioning(unet, pairs, device, dtype)
    users = torch.randn(pairs, args.embed_tokens, args.user_dim, device=device, dtype=dtype)
    loss_fn = PPDLoss()
    if variant.endswith("_ckpt"):
        unet.enable_gradient_checkpointing()

    if variant.startswith("adapter"):
        model = adapter.attach(unet)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)

        def step():
            out = ppd_dpo_step(
                model,
                lat_w,
                lat_l,
                cond["clip_text_pooled"],
                users,
                clip_text=cond["clip_text"],
                clip_img=cond["clip_img"],
                loss_fn=loss_fn,
                user_dropout=0.1,
                generator=g,
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, sum(p.numel() for p in adapter.parameters())

    # full-model Diffusion-DPO: the whole UNet trains against a separate frozen reference copy
    del adapter
    reference = copy.deepcopy(unet)
    unet.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}

    def step():
        t = torch.rand(pairs, device=device, generator=g)
        noise = torch.randn(lat_w.shape, device=device, dtype=dtype, generator=g)
        noise, t = torch.cat([noise, noise]), torch.cat([t, t])
        noisy = add_noise(torch.cat([lat_w, lat_l]), noise, t)
        with torch.no_grad():
            ref = reference(noisy, t.to(dtype), **cond2).sample
        pred = unet(noisy, t.to(dtype), **cond2).sample
        ppd_loss(pred, ref, noise).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in unet.parameters())


TRAIN_VARIANTS = ("adapter", "adapter_ckpt", "full_dpo", "full_dpo_ckpt")


def run_child(args, config_name: str, variant: str, dtype_name: str) -> dict:
    """Peak memory of one training variant on the CPU, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--child", variant, "--configs", config_name, "--dtype", dtype_name]
    cmd += ["--pairs", str(args.pairs), "--user-dim", str(args.user_dim), "--user-token-dim", str(args.user_token_dim)]
    cmd += ["--user-tokens", str(args.user_tokens), "--embed-tokens", str(args.embed_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def child_main(args, dtype: torch.dtype) -> None:
    baseline = current_rss_bytes()
    step, _ = training_step_fn(args.child, args, args.configs[0], dtype)
    for _ in range(2):
        step()
    peak = peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak - baseline}))


def bench_training(args, config_name: str, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    cuda = args.device.startswith("cuda")
    for variant in TRAIN_VARIANTS:
        row = {"config": config_name, "variant": variant, "pairs": args.pairs}
        step = None
        try:
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
            step, trained = training_step_fn(variant, args, config_name, dtype)
            if cuda:  # count weights, gradients, optimizer state and activations, not the fp32 build
                torch.cuda.reset_peak_memory_stats()
            seconds = interleaved_median({variant: step}, args.device, args.train_rounds, args.warmup)[variant]
            peak = torch.cuda.max_memory_allocated() if cuda else run_child(args, config_name, variant, dtype_name)
            row.update(step_s=seconds, pairs_per_s=args.pairs / seconds, trained_params_m=trained / 1e6)
            row["peak_gib"] = (peak if cuda else peak["peak_bytes"]) / 2**30
        except torch.OutOfMemoryError:
            row.update(step_s=float("nan"), pairs_per_s=float("nan"), peak_gib=float("nan"), oom=True)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del step
    base = next(r for r in rows if r["variant"] == "full_dpo")
    for row in rows:
        row["time_vs_full_dpo"] = row["step_s"] / base["step_s"]
        row["memory_vs_full_dpo"] = row["peak_gib"] / base["peak_gib"]
    return rows


def to_markdown(result: dict) -> str:
    lines = [f"Hardware: {result['hardware']}; dtype {result['dtype']}.", ""]
    lines += ["| config | batch | plain step (ms) | personalized (ms) | ratio | naive ratio (K'/V' every step) |"]
    lines += ["|---|---|---|---|---|---|"]
    for r in result["inference"]:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['plain_ms']:.2f} | {r['personalized_ms']:.2f} | "
            f"{r['ratio']:.3f} | {r['naive_ratio']:.3f} |"
        )
    lines += [
        "",
        ("| config | variant | pairs | step (s) | pairs/s | peak (GiB) | time vs full DPO | memory vs full DPO |"),
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        lines.append(
            f"| {r['config']} | {r['variant']}{' (out of memory)' if r.get('oom') else ''} | {r['pairs']} | "
            f"{r['step_s']:.3f} | {r['pairs_per_s']:.2f} | "
            f"{r['peak_gib']:.3f} | {r['time_vs_full_dpo']:.2f} | {r['memory_vs_full_dpo']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized config and fp32 (overrides the rest)")
    parser.add_argument("--configs", nargs="+", default=["lite", "stage_c"], choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--user-dim", type=int, default=896, help="encoder width (LLaVA-OneVision 0.5B: 896)")
    parser.add_argument("--user-token-dim", type=int, default=768)
    parser.add_argument("--user-tokens", type=int, default=4, help="user tokens per embedding token")
    parser.add_argument("--embed-tokens", type=int, default=16, help="embedding tokens per user (64 user tokens)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--train-rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--output", help="write the result here as JSON, and as a markdown table beside it (.md)")
    parser.add_argument("--child", choices=TRAIN_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.configs, args.device, args.dtype = ["tiny"], "cpu", "fp32"
        args.user_dim, args.user_token_dim = 64, 32
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.child:
        child_main(args, dtype)
        return

    result = {"hardware": hardware(args.device), "dtype": args.dtype, "inference": [], "training": []}
    for config_name in args.configs:
        result["inference"] += bench_inference(args, config_name, dtype)
        if not args.skip_training:
            result["training"] += bench_training(args, config_name, dtype, args.dtype)
    write_results(args.output, result, to_markdown(result))


if __name__ == "__main__":
    main()
