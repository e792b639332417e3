"""Cost of personalizing SDXL and Flux: one denoising step with a user against the plain step, in one process.

For each backbone (SDXL's ``UNet2DConditionModel``, Flux's ``FluxTransformer2DModel``) and batch size, these
variants of one denoising step run on the same inputs, interleaved, median of ``--rounds`` after ``--warmup``:

- ``plain``: the model with diffusers' own attention processors;
- ``attached_no_user``: after ``adapter.attach(model)``, called through the ``PersonalizedModel`` without a user
  (the wrapped layers run their original processors, so this should cost ~1.00x);
- ``user``: a user on every row, with the user keys/values computed once beforehand (``kv = adapter(users)``,
  then ``model_p(..., user_kv=kv)``), as a sampler does;
- ``user_guidance_layout`` (SDXL only): a user on the conditional half of a classifier-free-guidance batch, the
  negative half running the base attention. Flux-dev is guidance-distilled: one row per image, no negative half.

Eager calls pay the host's Python and kernel launches, which at small batches can take longer than the GPU's work
(the SDXL step at batch 2 on an H200 does: its eager time is the host's). ``--cuda-graphs`` adds a row per batch
size with every variant captured once in a CUDA graph and replayed: the GPU time alone, which is what a step costs
under CUDA graphs or ``torch.compile(mode="reduce-overhead")``.

The plain and personalized variants share one model: the user processors are removed or installed again
(untimed) before each call. Ratios are against ``plain`` measured in the same process; on a GPU each variant's
peak memory is ``torch.cuda.max_memory_allocated`` over one call.

Then the memory of an adapter-only DPO step on SDXL (``--dpo-pairs`` pairs, i.e. twice as many rows): the
library's ``ppd_dpo_step`` with ``SDXLObjective`` (the reference pass without gradients and no user, the policy
pass with the user and gradients, ``PPDLoss``), gradient checkpointing on the UNet, backward and AdamW on the fp32
adapter, under bf16 autocast on a GPU; its peak (weights, adapter, optimizer state and activations) against the
24 GB target.

Full size: SDXL at 1024 px (128 x 128 latents, 77 text tokens of width 2048) and Flux at 1024 px (4096 packed
latent tokens, 512 T5 tokens), random weights built directly on the GPU in bf16; 64 user tokens of width 768
from an 896-wide embedding. ``--tiny``: small SDXL- and Flux-shaped models on the CPU in fp32, one thread.

    python benchmarks/bench_backbones.py --output benchmarks/results/backbones_h200.json      # GPU, a few minutes
    python benchmarks/bench_backbones.py --backbones sdxl --dpo-pairs 0 --cuda-graphs \
        --output benchmarks/results/backbones_sdxl_cuda_graphs_h200.json                    # GPU, ~1 minute
    python benchmarks/bench_backbones.py --tiny --output benchmarks/results/backbones_tiny.json  # CPU, ~30 s
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from importlib.metadata import version

import torch
from _measure import cuda_graph_replay, default_dtype, hardware, interleaved_median, sync, write_results
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from ppd_diffusers import UserAdapter
from ppd_diffusers.testing_utils import (
    FLUX_TRANSFORMER,
    SDXL_UNET,
    tiny_flux_transformer_config,
    tiny_sdxl_unet_config,
)
from ppd_diffusers.training import SDXLObjective, ppd_dpo_step
from ppd_diffusers.user_attention_processor import install_user_processors

BACKBONE_NAMES = ("sdxl", "flux")
MODEL_CLASSES = {"sdxl": UNet2DConditionModel, "flux": FluxTransformer2DModel}
# latent_size: SDXL latents / Flux's packed latent grid per side; text_tokens: prompt tokens
FULL = {
    "sdxl": dict(config=SDXL_UNET, latent_size=128, text_tokens=77),  # 1024 px
    "flux": dict(config=FLUX_TRANSFORMER, latent_size=64, text_tokens=512),  # 1024 px: 128 x 128 latents packed 2 x 2
}
# larger than the unit tests' tiny models, so that the attention is a real share of the step
TINY = {
    "sdxl": dict(
        config=tiny_sdxl_unet_config(
            block_out_channels=(32, 64),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
        ),
        latent_size=32,
        text_tokens=16,
    ),  # fmt: skip
    "flux": dict(
        config=tiny_flux_transformer_config(
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=64,
            axes_dims_rope=(4, 6, 6),
        ),
        latent_size=16,
        text_tokens=32,
    ),  # fmt: skip
}
TARGETS = dict(step_ratio=1.03, dpo_peak_bytes=24e9)
PACKAGES = ("torch", "diffusers", "ppd-diffusers")


# ---------------------------------------------------------------------------------------------- models
def build_model(backbone: str, setting: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The backbone with random weights, built directly on ``device`` in ``dtype`` (no fp32 copy on the CPU)."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = MODEL_CLASSES[backbone](**setting["config"])
    return model.eval().requires_grad_(False)


def build_adapter(model: torch.nn.Module, args, dtype: torch.dtype) -> UserAdapter:
    """A ``UserAdapter`` for ``model`` with trained-like (non-zero) ``V'``, so that no kernel can skip the user."""
    with torch.device(args.device):
        adapter = UserAdapter.from_model(
            model, args.user_dim, args.user_tokens, args.user_token_dim, torch_dtype=dtype
        )
    with torch.no_grad():
        for layer in adapter.to_v_user:
            layer.weight.normal_(std=0.02)
    return adapter.eval()


def model_inputs(backbone: str, model: torch.nn.Module, batch: int, setting: dict, device: str, dtype, generator):
    """Keyword arguments of one denoising step of ``batch`` rows, shaped as the diffusers pipelines pass them."""
    config, size, text = model.config, setting["latent_size"], setting["text_tokens"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    if backbone == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pixels = 8 * size  # (original size, crop top-left, target size), as StableDiffusionXLPipeline builds them
        time_ids = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], device=device, dtype=dtype).repeat(batch, 1)
        return dict(
            sample=randn(batch, config.in_channels, size, size),
            timestep=torch.randint(0, 1000, (batch,), generator=generator, device=device),
            encoder_hidden_states=randn(batch, text, config.cross_attention_dim),
            added_cond_kwargs={"text_embeds": randn(batch, pooled), "time_ids": time_ids},
        )
    image_ids = torch.zeros(size, size, 3, device=device, dtype=dtype)
    image_ids[..., 1] = torch.arange(size, device=device)[:, None]
    image_ids[..., 2] = torch.arange(size, device=device)[None, :]
    inputs = dict(
        hidden_states=randn(batch, size * size, config.in_channels),
        encoder_hidden_states=randn(batch, text, config.joint_attention_dim),
        pooled_projections=randn(batch, config.pooled_projection_dim),
        timestep=torch.rand(batch, generator=generator, device=device).to(dtype),  # FluxPipeline passes t / 1000
        img_ids=image_ids.flatten(0, 1),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def log(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- step
def step_functions(backbone: str, model_p, setting: dict, args, batch: int) -> tuple[dict, dict]:
    """The step variants (see the module doc) at ``batch`` rows on the same inputs, and the untimed setup each
    needs before a call: ``plain`` runs with diffusers' processors, the others with the user processors installed.

    Args:
        backbone: ``"sdxl"`` or ``"flux"``.
        model_p: ``adapter.attach(model)``.
        setting: The backbone's entry of ``FULL`` or ``TINY``.
        args: From ``parse_args``.
        batch: Rows of the step.
    """
    model, adapter = model_p.model, model_p.adapter
    g = torch.Generator(args.device).manual_seed(batch)
    inputs = model_inputs(backbone, model, batch, setting, args.device, args.dtype, g)
    users = torch.randn(batch, args.embed_tokens, args.user_dim, generator=g, device=args.device).to(args.dtype)
    half = batch // 2
    with torch.no_grad():  # once per generation, as a sampler does
        every_row, conditional_half = adapter(users), adapter(users[half:])
    fns = {
        "plain": partial(model, **inputs),
        "attached_no_user": partial(model_p, **inputs),
        "user": partial(model_p, **inputs, user_kv=every_row),
    }
    if backbone == "sdxl":  # [negative, positive] rows: the user on the conditional half only
        fns["user_guidance_layout"] = partial(model_p, **inputs, user_kv=conditional_half, user_rows=slice(half, None))
    install = partial(install_user_processors, model, list(adapter.config.layer_names))
    setups = {name: model_p.detach if name == "plain" else install for name in fns}
    return fns, setups


def time_steps(backbone: str, model: torch.nn.Module, adapter: UserAdapter, setting: dict, args) -> list[dict]:
    """One row per batch size: each variant's median step, its ratio against ``plain`` and (GPU) its peak; with
    ``--cuda-graphs`` a second row per batch size times the same variants replayed as CUDA graphs."""
    cuda, rows = args.device.startswith("cuda"), []
    model_p = adapter.attach(model)
    try:
        for batch in args.batch_sizes:
            fns, setups = step_functions(backbone, model_p, setting, args, batch)
            with torch.no_grad():
                seconds = interleaved_median(fns, args.device, args.rounds, args.warmup, setups)
                peaks = {name: peak_bytes(fn, setups[name], args.device) for name, fn in fns.items()} if cuda else None
            rows.append(step_row(backbone, batch, "eager", seconds, peaks))
            if args.cuda_graphs:
                rows.append(step_row(backbone, batch, "cuda_graph", time_graph_replays(fns, setups, args), None))
    finally:
        model_p.detach()
    return rows


def time_graph_replays(fns: dict, setups: dict, args) -> dict:
    """Median seconds of each variant captured in a CUDA graph (with its processors installed) and replayed,
    interleaved: the GPU time of the step alone, without the Python and kernel launches of an eager call."""
    replays = {}
    with torch.no_grad():
        for name, fn in fns.items():
            setups[name]()
            replays[name] = cuda_graph_replay(fn)
        seconds = interleaved_median(replays, args.device, args.rounds, args.warmup)
    del replays  # frees the graphs' memory pools
    free()
    return seconds


def step_row(backbone: str, batch: int, launch: str, seconds: dict, peaks: dict | None) -> dict:
    row = {"backbone": backbone, "batch": batch, "launch": launch}
    row.update({f"{name}_ms": 1e3 * s for name, s in seconds.items()})
    row.update({f"ratio_{name}": s / seconds["plain"] for name, s in seconds.items() if name != "plain"})
    row["peak_bytes"] = peaks
    log(row)
    return row


def peak_bytes(fn, setup, device: str) -> int:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` (weights included)."""
    setup()
    free()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------------------------------------- DPO
def sdxl_dpo_step(model, setting: dict, args):
    """One adapter-only DPO optimizer step on SDXL (see the module doc) for ``model = adapter.attach(unet)``: the
    library's ``ppd_dpo_step`` with ``SDXLObjective`` (SDXL base's DDPM schedule, epsilon target), backward,
    AdamW."""
    unet, adapter, pairs, device, dtype = model.model, model.adapter, args.dpo_pairs, args.device, args.dtype
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    objective = SDXLObjective()
    g = torch.Generator(device).manual_seed(0)
    conditioning = model_inputs("sdxl", unet, pairs, setting, device, dtype, g)
    del conditioning["timestep"]  # the objective draws them
    chosen = conditioning.pop("sample")
    rejected = torch.randn(chosen.shape, generator=g, device=device, dtype=dtype)
    users = torch.randn(pairs, args.embed_tokens, args.user_dim, generator=g, device=device)
    # the bf16 model and the fp32 adapter meet under autocast, as the trainer runs them
    autocast = dict(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step() -> None:
        with torch.autocast(**autocast):
            out = ppd_dpo_step(
                model, chosen, rejected, user_embeds=users, conditioning=conditioning, objective=objective, generator=g
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_dpo(unet: UNet2DConditionModel, setting: dict, args) -> dict:
    """Time and (GPU) peak memory of ``sdxl_dpo_step`` with gradient checkpointing; an out-of-memory is recorded."""
    cuda = args.device.startswith("cuda")
    row = {"backbone": "sdxl", "pairs": args.dpo_pairs, "rows": 2 * args.dpo_pairs, "checkpointing": True}
    free()
    adapter = build_adapter(unet, args, torch.float32)  # fp32 master weights: bf16 would drop AdamW updates
    model = adapter.attach(unet).train()
    unet.enable_gradient_checkpointing()
    try:
        step = sdxl_dpo_step(model, setting, args)
        if cuda:  # after building: counts weights, adapter, optimizer state and activations
            torch.cuda.reset_peak_memory_stats()
        seconds = interleaved_median({"dpo": step}, args.device, args.dpo_rounds, warmup=1)["dpo"]
        row.update(step_s=seconds, pairs_per_s=args.dpo_pairs / seconds)
        row.update(trained_params_m=sum(p.numel() for p in adapter.parameters()) / 1e6)
        row["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    except torch.OutOfMemoryError:
        row.update(oom=True, peak_bytes=None)
    finally:
        unet.disable_gradient_checkpointing()
        model.detach()
    log(row)
    return row


# ---------------------------------------------------------------------------------------------- run
def run(args) -> dict:
    """Every measurement of the script; ``args`` from ``parse_args``."""
    sizes = TINY if args.tiny else FULL
    result = {
        "benchmark": "backbones",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "hardware": hardware(args.device),
        "versions": {name: version(name) for name in PACKAGES},
        "tiny": args.tiny,
        "settings": {
            "dtype": str(args.dtype).removeprefix("torch."),
            "batch_sizes": args.batch_sizes,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "user_tokens": args.embed_tokens * args.user_tokens,
            "user_token_dim": args.user_token_dim,
            "user_embed_dim": args.user_dim,
            "backbones": {name: {k: v for k, v in sizes[name].items() if k != "config"} for name in args.backbones},
        },
        "models": {},
        "rows": [],
        "dpo": None,
    }
    for backbone in args.backbones:
        start = time.perf_counter()
        model = build_model(backbone, sizes[backbone], args.device, args.dtype)
        sync(args.device)
        adapter = build_adapter(model, args, args.dtype)
        result["models"][backbone] = {
            "build_s": time.perf_counter() - start,
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
            "weight_bytes": tensor_bytes(model),
            "adapter_params_m": sum(p.numel() for p in adapter.parameters()) / 1e6,
            "user_layers": len(adapter.config.layer_names),
        }
        result["rows"] += time_steps(backbone, model, adapter, sizes[backbone], args)
        del adapter
        free()
        if backbone == "sdxl" and args.dpo_pairs:
            result["dpo"] = measure_dpo(model, sizes[backbone], args)
        del model
        free()
    result["targets"] = targets(result)
    return result


# ---------------------------------------------------------------------------------------------- report
NAMES = {"sdxl": "SDXL", "flux": "Flux"}
STATUS = {True: "met", False: "**not met**", None: "not measured"}
LAUNCH_SUFFIX = {"eager": "", "cuda_graph": " (CUDA graph replay)"}
LAUNCH_NAMES = {"eager": "eager", "cuda_graph": "CUDA graph"}


def targets(result: dict) -> list[dict]:
    """The issue's targets, judged on what ``result`` measured (``met`` is ``None`` when not measured)."""
    rows = []
    for r in result.get("rows", []):
        measured = f"{r['ratio_user']:.3f}x (adapter attached, no user: {r['ratio_attached_no_user']:.3f}x"
        if "ratio_user_guidance_layout" in r:
            measured += f"; guidance layout: {r['ratio_user_guidance_layout']:.3f}x"
        name = f"personalized {NAMES[r['backbone']]} step <= {TARGETS['step_ratio']}x plain, batch {r['batch']}"
        name += LAUNCH_SUFFIX[r.get("launch", "eager")]
        rows.append({"target": name, "measured": measured + ")", "met": r["ratio_user"] <= TARGETS["step_ratio"]})
    dpo = result.get("dpo")
    if dpo:
        name = f"SDXL adapter-only DPO step of {dpo['pairs']} pairs with checkpointing <= 24 GB"
        peak, measured, met = dpo.get("peak_bytes"), None, None
        if dpo.get("oom"):
            measured, met = "out of memory", False
        elif peak is not None:
            measured, met = f"{peak / 1e9:.2f} GB", peak <= TARGETS["dpo_peak_bytes"]
        rows.append({"target": name, "measured": measured, "met": met})
    return rows


def _step_cell(row: dict, name: str) -> str:
    key = f"{name}_ms"
    return "-" if key not in row else f"{row[key]:.2f} ({row['ratio_' + name]:.3f}x)"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def tables(result: dict) -> list[str]:
    """The step and DPO tables of ``result`` as markdown lines (``gpu_suite.py`` shows them too)."""
    lines = []
    if result.get("rows"):
        lines += [
            "| denoising step | batch | launch | plain (ms) | adapter attached, no user (ms) | "
            "user on every row (ms) | guidance layout (ms) | peak plain / user (GiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            peaks = r["peak_bytes"] or {}
            lines.append(
                f"| {NAMES[r['backbone']]} | {r['batch']} | {LAUNCH_NAMES[r.get('launch', 'eager')]} | "
                f"{r['plain_ms']:.2f} | "
                + " | ".join(_step_cell(r, name) for name in ("attached_no_user", "user", "user_guidance_layout"))
                + f" | {_gib(peaks.get('plain'))} / {_gib(peaks.get('user'))} |"
            )
    dpo = result.get("dpo")
    if dpo:
        peak = dpo.get("peak_bytes")
        lines += [
            "",
            "| SDXL adapter-only DPO step | pairs (rows) | step (s) | pairs/s | peak (GB) |",
            "|---|---|---|---|---|",
            f"| reference (no grad) + policy, checkpointing, AdamW{' (out of memory)' if dpo.get('oom') else ''} | "
            f"{dpo['pairs']} ({dpo['rows']}) | {_fmt(dpo.get('step_s'), '.3f')} | {_fmt(dpo.get('pairs_per_s'))} | "
            f"{_fmt(None if peak is None else peak / 1e9)} |",
        ]
    return lines


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def settings_line(result: dict) -> str:
    """What the steps ran on: dtype, shapes, user tokens, rounds and the models' sizes."""
    s, shapes = result["settings"], []
    for name, v in s["backbones"].items():
        size = v["latent_size"]
        grid = f"{size} x {size} latents" if name == "sdxl" else f"{size * size} packed latent tokens"
        shapes.append(f"{NAMES[name]} {grid} and {v['text_tokens']} text tokens")
    models = ", ".join(
        f"{NAMES[name]} {m['params_b']:.3g}B params ({m['user_layers']} user layers, adapter "
        f"{m['adapter_params_m']:.3g}M)"
        for name, m in result["models"].items()
    )
    return (
        f"{s['dtype']}, random weights; {'; '.join(shapes)}; {s['user_tokens']} user tokens of width "
        f"{s['user_token_dim']}; median of {s['rounds']} interleaved rounds after {s['warmup']}. Models: {models}."
    )


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['hardware']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "Settings: " + settings_line(result),
        "",
        "| target | measured | status |",
        "|---|---|---|",
    ]
    status = dict.fromkeys(STATUS, "not judged (tiny CPU run)") if result["tiny"] else STATUS
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured'] or '-'} | {status[t['met']]} |")
    return "\n".join(lines + [""] + tables(result))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small models on the CPU in fp32 (seconds)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONE_NAMES), choices=BACKBONE_NAMES)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, help="interleaved rounds per batch size (default 20; --tiny 15)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 3; --tiny 1)")
    parser.add_argument("--dpo-pairs", type=int, default=4, help="pairs of the SDXL DPO step; 0 skips it")
    parser.add_argument("--dpo-rounds", type=int, help="timed DPO steps (default 3; --tiny 1)")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time every step variant replayed as a CUDA graph: the GPU time without the host's launches",
    )
    parser.add_argument("--output", help="JSON to write; its markdown table is written beside it (.md)")
    args = parser.parse_args(argv)
    if args.cuda_graphs and args.tiny:
        parser.error("--cuda-graphs needs a GPU: it cannot run with --tiny")
    for name, full, tiny in (("rounds", 20, 15), ("warmup", 3, 1), ("dpo_rounds", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    for name in ("batch_sizes", "rounds", "dpo_rounds"):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.tiny:
        user = dict(user_dim=64, user_token_dim=32, dtype=torch.float32, device="cpu")
    else:
        user = dict(user_dim=896, user_token_dim=768, dtype=torch.bfloat16, device="cuda")
    vars(args).update(user, user_tokens=4, embed_tokens=16)  # 16 embedding tokens x 4 = 64 user tokens per user
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("[bench_backbones] no GPU: full-size SDXL and Flux (12B) need one; use --tiny on the CPU.")
    if args.tiny:
        # one thread: on a shared 2-core machine two threads contend with any other job, and the tiny steps' medians
        # then swing by 2x between runs
        torch.set_num_threads(1)
    result = run(args)
    write_results(args.output, result, markdown(result))


if __name__ == "__main__":
    main()
