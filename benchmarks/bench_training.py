"""Throughput (pairs/s) and peak memory of the training step as ``train_ppd`` runs it, per configuration.

One step is the trainer's own: ``accelerate`` prepares the fp32 ``UserAdapter`` and its AdamW (the
trainer's hyperparameters, from ``PPDTrainingArguments``), and inside ``accelerator.accumulate`` and
``accelerator.autocast()`` (bf16) the trainer's ``_train_batch`` runs ``ppd_dpo_step`` (a no-grad
reference pass with the adapter off + a policy pass with it, over chosen and rejected latents; zero
CLIP image embeddings), then ``accelerator.backward``, ``accelerator.clip_grad_norm_``, ``optimizer.step``
and ``zero_grad``. The prompt encoder is replaced by fixed random CLIP states (77 tokens), so the text
encoder's forward and the learning-rate scheduler are not timed. Configurations:

- model: full Stage C (3.6B), Stage C lite (1B), or a tiny Stage C for the CPU (bench_core's);
- gradient checkpointing off / on (``prior.enable_gradient_checkpointing()``, as ``--gradient_checkpointing``);
- frozen base stored in fp32 under bf16 autocast (the baseline: everything prepared with accelerate,
  frozen weights not cast) or stored in bf16 under bf16 autocast (what ``train_ppd`` does); the adapter
  keeps fp32 master weights in both;
- pairs per micro-batch (``--pairs``).

    # CPU, tiny config, about two minutes
    python benchmarks/bench_training.py --tiny --out benchmarks/results/training-cpu.json
    # GPU, one command of a few minutes: 1024 px (24 x 24 latents), random weights, 4 and 16 pairs
    python benchmarks/bench_training.py --configs lite stage_c --out benchmarks/results/training-h200.json

Ratios are against the fp32-stored baseline of the same model, checkpointing and pairs, in the same
process. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (reset after the models are built, so
it counts weights, adapter, optimizer state and activations); on the CPU each configuration runs again in
a child process, which reports its peak resident set during two steps above its level after imports. An
out-of-memory configuration is recorded as such. On a GPU with full Stage C the result also says whether
the trainer's configuration with checkpointing at 4 pairs fits in 24 GB and how its best pairs/s compares
with the target of 14 pairs/s on one H200.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from _measure import current_rss_bytes, hardware, interleaved_median, peak_rss_bytes, write_results
from accelerate import Accelerator
from bench_core import CONFIGS, LATENT_SIZE, TEXT_TOKENS
from diffusers import StableCascadeUNet

from ppd_diffusers import PPDLoss, UserAdapter
from ppd_diffusers._stable_cascade import compile_blocks
from ppd_diffusers.personalized_unet import PersonalizedStageC
from ppd_diffusers.training import PPDTrainingArguments, StageCObjective
from ppd_diffusers.training.backbone_training import StageCTraining
from ppd_diffusers.training.trainer import _optimizer, _optimizer_step  # the trainer's own step (private, by design)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "fp32"  # frozen base stored in fp32 under bf16 autocast
GB24 = 24e9
TARGET_PAIRS_PER_S = 14.0  # full Stage C, 1024 px, one H200


@dataclass(frozen=True)
class Case:
    config: str
    checkpointing: bool
    storage: str  # dtype of the frozen Stage C weights; autocast is bf16 either way
    pairs: int
    compiled: bool = False  # train_ppd's --torch_compile

    @property
    def key(self) -> str:
        key = f"{self.config}/{'ckpt' if self.checkpointing else 'no-ckpt'}/{self.storage}/{self.pairs}"
        return key + ("/compiled" if self.compiled else "")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Builds modules directly in ``dtype`` (no transient fp32 copy), like ``from_pretrained(torch_dtype=...)``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def trainer_step(case: Case, args) -> tuple:
    """Builds one configuration as ``train_ppd`` sets it up; returns (step closure, accelerator)."""
    storage, size, device = DTYPES[case.storage], args.latent_size or LATENT_SIZE[case.config], args.device
    train_args = PPDTrainingArguments(
        dataset_name="unused",
        user_embeddings="unused",
        train_batch_size=case.pairs,
        mixed_precision="bf16",
        gradient_checkpointing=case.checkpointing,
        torch_compile=case.compiled,
        num_user_tokens=args.user_tokens,
        user_token_dim=args.user_token_dim,
    )
    torch.manual_seed(0)
    with torch.device(device), default_dtype(storage):
        prior = StableCascadeUNet(**CONFIGS[case.config])
    prior.requires_grad_(False).eval()
    if train_args.gradient_checkpointing:
        prior.enable_gradient_checkpointing()
    if train_args.torch_compile:
        compile_blocks(prior)
    adapter = UserAdapter.from_unet(
        prior, args.user_dim, num_user_tokens=train_args.num_user_tokens, user_token_dim=train_args.user_token_dim
    )
    with torch.no_grad():  # a trained-looking adapter rather than V' = 0
        for layer in adapter.to_v_user:
            layer.weight.normal_(std=0.02)
    adapter.train()
    accelerator = Accelerator(mixed_precision=train_args.mixed_precision, cpu=device == "cpu")
    optimizer = _optimizer(adapter, train_args)
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    model = PersonalizedStageC(prior, adapter)

    # what the data loader and the frozen text encoder would hand over, in the frozen models' dtype
    g = torch.Generator(device).manual_seed(0)
    c = prior.config
    batch = {
        "latents_chosen": torch.randn(case.pairs, c.in_channels, size, size, generator=g, device=device),
        "latents_rejected": torch.randn(case.pairs, c.in_channels, size, size, generator=g, device=device),
        "user_embeds": torch.randn(case.pairs, args.embed_tokens, args.user_dim, generator=g, device=device),
        "caption": ["a photo of a red cat"] * case.pairs,
    }
    text = torch.randn(case.pairs, TEXT_TOKENS, c.clip_text_in_channels, generator=g, device=device).to(storage)
    pooled = torch.randn(case.pairs, 1, c.clip_text_pooled_in_channels, generator=g, device=device).to(storage)
    pipe = SimpleNamespace(prior=prior, encode_prompt=lambda captions, device, **kwargs: (text, pooled))

    loss_fn = PPDLoss(beta=train_args.beta_dpo)
    base = StageCTraining(train_args, storage)  # the trainer's Stage C base model, on these stand-ins
    base.pipe, base.objective = pipe, StageCObjective()

    def step() -> None:  # the body of train_ppd's loop, less the scheduler and logging
        _optimizer_step(accelerator, batch, base, model, loss_fn, adapter, optimizer, None, train_args, g, storage)

    return step, accelerator


def cases_of(args) -> list[list[Case]]:
    """Groups of cases timed together: both storages interleaved on the CPU, one case at a time on a GPU."""
    groups = []
    for config in args.configs:
        for checkpointing in (mode == "on" for mode in args.checkpointing):
            for pairs in args.pairs:
                group = [Case(config, checkpointing, storage, pairs) for storage in args.storages]
                groups += [group] if args.device == "cpu" else [[case] for case in group]
    return groups


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ CPU memory: one child process per case
def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child_main(args, case: Case) -> None:
    baseline = current_rss_bytes()
    step, _ = trainer_step(case, args)
    reset = reset_peak_rss()  # as on a GPU: weights count, the build's transients do not
    for _ in range(2):
        step()
    peak = vm_hwm_bytes() if reset else peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak - baseline, "resident_bytes": current_rss_bytes() - baseline}))


def run_child(args, case: Case) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(case)), "--device", "cpu"]
    cmd += ["--user-dim", str(args.user_dim), "--user-token-dim", str(args.user_token_dim)]
    cmd += ["--user-tokens", str(args.user_tokens), "--embed-tokens", str(args.embed_tokens)]
    cmd += ["--latent-size", str(args.latent_size)] if args.latent_size else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. killed for memory
        return {"error": f"child exited with {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the benchmark
def measure_group(group: list[Case], args) -> list[dict]:
    cuda = args.device.startswith("cuda")
    rows = [{**asdict(case), "key": case.key} for case in group]
    steps, accelerators = {}, []
    try:
        for case in group:
            steps[case.key], accelerator = trainer_step(case, args)
            accelerators.append(accelerator)
            del accelerator
        if cuda:  # group of one on a GPU
            torch.cuda.reset_peak_memory_stats()
        seconds = interleaved_median(steps, args.device, args.rounds, args.warmup)
        for row in rows:
            row.update(step_s=seconds[row["key"]], pairs_per_s=row["pairs"] / seconds[row["key"]])
        if cuda:
            rows[0].update(
                peak_bytes=torch.cuda.max_memory_allocated(),
                peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                resident_bytes=torch.cuda.memory_allocated(),  # weights, adapter, optimizer state
            )
    except torch.OutOfMemoryError:
        for row in rows:
            row.update(oom=True)
    for accelerator in accelerators:
        accelerator.free_memory()
    steps.clear()
    del accelerators
    free(args.device)
    if not cuda and getattr(args, "cpu_memory", True):  # CPU memory: a child process per case
        for row, case in zip(rows, group):
            row.update(run_child(args, case))
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    return rows


def add_ratios(rows: list[dict]) -> None:
    base = {(r["config"], r["checkpointing"], r["pairs"]): r for r in rows if r["storage"] == BASELINE}
    for row in rows:
        b = base.get((row["config"], row["checkpointing"], row["pairs"]), {})
        row["pairs_per_s_vs_baseline"] = ratio(row.get("pairs_per_s"), b.get("pairs_per_s"))
        row["peak_vs_baseline"] = ratio(row.get("peak_bytes"), b.get("peak_bytes"))


def ratio(a, b):
    return a / b if a is not None and b else None


def gpu_checks(rows: list[dict], device_name: str) -> dict:
    """The two full-size targets: 24 GB with checkpointing at 4 pairs, and >= 14 pairs/s on one H200."""
    trainer = [r for r in rows if r["config"] == "stage_c" and r["storage"] == "bf16"]
    fits = next((r for r in trainer if r["checkpointing"] and r["pairs"] == 4), None)
    checks = {"fits_24gb": "not measured", "pairs_per_s_target": "not measured"}
    if fits is not None:
        checks["fits_24gb"] = {
            "case": fits["key"],
            "peak_allocated_bytes": fits.get("peak_bytes"),
            "peak_reserved_bytes": fits.get("peak_reserved_bytes"),
            "fits": bool(not fits.get("oom") and fits.get("peak_bytes") is not None and fits["peak_bytes"] < GB24),
        }
    measured = [r for r in trainer if r.get("pairs_per_s")]
    if measured:
        best = max(measured, key=lambda r: r["pairs_per_s"])
        checks["pairs_per_s_target"] = {
            "best_case": best["key"],
            "pairs_per_s": best["pairs_per_s"],
            "target": TARGET_PAIRS_PER_S,
            "met": best["pairs_per_s"] >= TARGET_PAIRS_PER_S,
            "device": device_name,
            "note": None if "H200" in device_name else "the target is for an H200; this device differs",
        }
    return checks


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.3f}"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(result: dict) -> str:
    lines = [f"Hardware: {result['hardware']}; bf16 autocast, adapter fp32; {result['settings']}.", ""]
    lines += ["| config | checkpointing | frozen base | pairs | step (s) | pairs/s | peak (GiB) | "]
    lines[-1] += "pairs/s vs fp32 base | peak vs fp32 base |"
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        base = "fp32 (baseline)" if r["storage"] == BASELINE else f"{r['storage']} (train_ppd)"
        if r.get("oom"):
            base += ", out of memory"
        lines.append(
            f"| {r['config']} | {'on' if r['checkpointing'] else 'off'} | {base} | {r['pairs']} | "
            f"{fmt(r.get('step_s'), '.3f')} | {fmt(r.get('pairs_per_s'), '.2f')} | {gib(r.get('peak_bytes'))} | "
            f"{fmt(r['pairs_per_s_vs_baseline'], '.2f')} | {fmt(r['peak_vs_baseline'], '.2f')} |"
        )
    checks = result.get("checks")
    if checks:
        lines += ["", "| target | case | measured | status |", "|---|---|---|---|"]
        fits, speed = checks["fits_24gb"], checks["pairs_per_s_target"]
        if isinstance(fits, dict):
            allocated, reserved = fits["peak_allocated_bytes"], fits["peak_reserved_bytes"]
            measured = (
                "out of memory"
                if allocated is None
                else f"peak {allocated / 1e9:.2f} GB (reserved {reserved / 1e9:.2f})"
            )
            row = ["full Stage C fits in 24 GB", fits["case"], measured, "met" if fits["fits"] else "not met"]
            lines.append("| " + " | ".join(row) + " |")
        if isinstance(speed, dict):
            status = ("met" if speed["met"] else "not met") + (f" ({speed['note']})" if speed["note"] else "")
            measured = f"{speed['pairs_per_s']:.2f} pairs/s on {speed['device']}"
            row = [f">= {speed['target']:g} pairs/s, full Stage C, 1024 px", speed["best_case"], measured, status]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized config (overrides --configs/--device)")
    parser.add_argument("--configs", nargs="+", default=["lite", "stage_c"], choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 16], help="pairs per micro-batch")
    parser.add_argument("--storages", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--latent-size", type=int, help="Stage C latent side (default: 24 = 1024 px; tiny: 12)")
    parser.add_argument("--user-dim", type=int, default=896, help="encoder width (LLaVA-OneVision 0.5B: 896)")
    parser.add_argument("--user-token-dim", type=int, default=768, help="train_ppd's default")
    parser.add_argument("--user-tokens", type=int, default=4, help="user tokens per embedding token (train_ppd's)")
    parser.add_argument("--embed-tokens", type=int, default=16, help="embedding tokens per user (64 user tokens)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", help="write the result here as JSON, and as a markdown table beside it (.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.configs, args.device = ["tiny"], "cpu"
        args.user_dim, args.user_token_dim = 64, 32
    if args.child:
        child_main(args, Case(**json.loads(args.child)))
        return
    if BASELINE not in args.storages:
        parser.error(f"`--storages` must include the baseline {BASELINE!r}.")

    sides = {c: args.latent_size or LATENT_SIZE[c] for c in args.configs}
    settings = (
        f"{args.embed_tokens} x {args.user_tokens} user tokens of width {args.user_token_dim}, user embedding width "
        f"{args.user_dim}; latents {', '.join(f'{c} {n} x {n}' for c, n in sides.items())}; "
        f"median of {args.rounds} steps after {args.warmup}"
    )
    result = {"hardware": hardware(args.device), "settings": settings, "training": []}
    load_before = os.getloadavg()[0]  # other processes on a shared CPU skew timings: keep a record
    for group in cases_of(args):
        result["training"] += measure_group(group, args)
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    add_ratios(result["training"])
    if args.device.startswith("cuda") and "stage_c" in args.configs:
        result["checks"] = gpu_checks(result["training"], torch.cuda.get_device_name())
    write_results(args.out, result, to_markdown(result))


if __name__ == "__main__":
    main()
