"""Every GPU figure of the project in one command, within a time budget; ``--tiny`` runs the same code on a CPU.

Full-size models with random weights (Stage C 3.6B, a CLIP ViT-bigG text tower, LLaVA-OneVision 0.5B),
bf16, 1024 px (24 x 24 Stage C latents), 64 user tokens per user. Sections, in this order (``--skip``
drops any; once the budget is spent the rest are skipped and say so):

- ``step``: one Stage C denoising step, the plain ``StableCascadeUNet`` against ``PersonalizedStageC`` with
  the user keys/values computed once, at batch 2 and 8, A/B interleaved. Two personalized layouts: a user
  on every row, and the guidance layout a sampler runs (a user on the first half of the rows only, the
  negative half skipping the user attention);
- ``prior``: the Stage C prior of one 1024 px image through ``PersonalizedStableCascadePipeline``
  (20 steps, guidance 4, prompt encoding included, ``output_type="latent"``), with a user and without;
- ``compile``: ``pipe.compile_prior()`` (regional ``torch.compile``, on freshly built models) and the
  first, compiling calls;
  then ``step_compiled`` and ``prior_compiled``, the two sections above on the compiled prior;
- ``training``: the trainer's adapter-only DPO step (``bench_training.trainer_step``: bf16 frozen base,
  fp32 adapter, AdamW) at 4 and 16 pairs, with and without gradient checkpointing, against full-model
  Diffusion-DPO with a separate reference copy at 4 pairs (the baseline): pairs/s and peak memory;
- ``encoder``: a LLaVA-OneVision 0.5B user embedding of 4 pairs (8 images), full depth and truncated at
  layer 12 (``bench_encoder.time_encoders``);
- ``backbones``: the personalized SDXL (1024 px) and Flux (12B, 1024 px) denoising steps against the plain ones
  at batch 2 and 8, eager and (GPU) replayed as CUDA graphs, and the memory of an SDXL adapter-only DPO step of
  4 pairs with checkpointing (``bench_backbones``, with fewer rounds than that script's default);
- ``training_compiled``: the trainer's step at 16 pairs with ``--torch_compile``;
- ``prior_whole_graph``: the prior of one image after ``pipe.compile_prior(regional=False)`` (one graph for
  the plain and one for the personalized prior: minutes of compiling, the fastest small-batch steps);
- ``evaluation``: the four reward scorers of ``ppd_diffusers.evaluation`` (CLIP score, PickScore, aesthetic,
  HPSv2) on 1000 images of 512 px, the published architectures with random weights
  (``bench_evaluation.measure``; ~5 GB of checkpoints written to a temporary folder first). Last, so the
  default budget usually skips it: run it alone with ``--skip`` listing the other sections.

    python benchmarks/gpu_suite.py --output benchmarks/results/gpu_suite_h200.json   # GPU, ~8 minutes
    python benchmarks/gpu_suite.py --tiny --output /tmp/suite.json                    # CPU, under a minute
    python benchmarks/gpu_suite.py --render benchmarks/results/gpu_suite_h200.json    # JSON -> .md beside it

The JSON is written after every section (a run cut short keeps what it measured); the markdown table
beside it, which ``docs/benchmarks.md`` includes, is generated from the JSON by ``--render`` (or at the end
of a run), targets included.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from functools import partial
from importlib.metadata import version
from types import SimpleNamespace

import bench_backbones
import torch
from _measure import hardware, interleaved_median
from bench_core import CONFIGS, LATENT_SIZE, conditioning, training_step_fn
from bench_encoder import random_users, time_encoders
from bench_evaluation import (
    SCORER_NAMES,
    TARGET_IMAGES,
    TARGET_S,
    measure,
    random_full_size_sources,
    random_images,
    tiny_sources,
)
from bench_pipeline import CLIP_G_TEXT
from bench_training import Case, default_dtype, measure_group
from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet

from ppd_diffusers import PersonalizedStableCascadePipeline, UserAdapter
from ppd_diffusers.testing_utils import (
    LLAVA_ONEVISION_0_5B,
    TINY_LLAVA_ONEVISION,
    clip_text_encoder,
    clip_text_tokenizer,
    save_random_llava_onevision,
)

SECTIONS = ("step", "prior", "training", "encoder", "backbones", "compile", "step_compiled", "prior_compiled")
SECTIONS += ("training_compiled", "prior_whole_graph", "evaluation")
# rough seconds each section needs at full size on an H100/H200, to skip one that cannot finish in the budget
ESTIMATE_S = dict(step=30, prior=25, compile=120, step_compiled=20, prior_compiled=15, training=120, encoder=60)
# backbones: building Flux (12B) and SDXL on the GPU, ~10 rounds of 3 (SDXL 4) step variants, 3 DPO steps (93 s on
# an H200), then the same variants as CUDA graph replays (~70 s more, mostly Flux at batch 8)
ESTIMATE_S.update(backbones=180)
ESTIMATE_S.update(training_compiled=90, prior_whole_graph=200, evaluation=150)
TARGETS = dict(step_ratio=1.03, prior_s=0.7, pairs_per_s=14.0, ckpt_4_pairs_bytes=24e9, encoder_layer12_ms=37.0)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
PROMPT = "a lighthouse at dusk, oil painting"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "ppd-diffusers")


class Budget:
    """Wall-clock budget of the suite: a section starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float, scale: float):
        self.end, self.scale = time.perf_counter() + seconds, scale

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, section: str) -> bool:
        return self.left() >= ESTIMATE_S[section] * self.scale


# ---------------------------------------------------------------------------------------------- models
def build_stage_c(args) -> tuple[StableCascadeUNet, UserAdapter]:
    """Stage C and a user adapter in the run's dtype, on the device, with trained-like (non-zero) V'."""
    torch.manual_seed(0)
    with torch.device(args.device), default_dtype(args.dtype):
        unet = StableCascadeUNet(**CONFIGS[args.config]).eval().requires_grad_(False)
        adapter = UserAdapter.from_unet(
            unet, args.user_dim, args.user_tokens, args.user_token_dim, torch_dtype=args.dtype
        ).eval()
    with torch.no_grad():
        for layer in adapter.to_v_user:
            layer.weight.normal_(std=0.02)
    return unet, adapter


def build_pipeline(args, unet: StableCascadeUNet, adapter: UserAdapter) -> PersonalizedStableCascadePipeline:
    tokenizer = clip_text_tokenizer()
    with torch.device(args.device), default_dtype(args.dtype):
        text_encoder = clip_text_encoder(
            tokenizer, projection_dim=unet.config.clip_text_pooled_in_channels, **args.text_sizes
        )
    pipe = PersonalizedStableCascadePipeline(
        prior=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMWuerstchenScheduler(),
        user_adapter=adapter,
        resolution_multiple=args.image_size / args.latent_size,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- sections
def step_functions(args, unet: StableCascadeUNet, adapter: UserAdapter, batch: int) -> dict:
    """The plain step and the two personalized layouts at ``batch`` rows, on the same inputs."""
    g = torch.Generator(args.device).manual_seed(batch)
    size, device, dtype = args.latent_size, args.device, args.dtype
    sample = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=dtype, generator=g)
    inputs = dict(conditioning(unet, batch, device, dtype), timestep_ratio=torch.rand(batch, device=device).to(dtype))
    users = torch.randn(batch, args.embed_tokens, args.user_dim, device=device, dtype=dtype, generator=g)
    model, half = adapter.attach(unet), batch // 2
    with torch.no_grad():
        every_row, guided = adapter(users), adapter(users[:half])
    return {
        "plain": partial(unet, sample, **inputs),
        "user_every_row": partial(model, sample, **inputs, user_kv=every_row),
        "user_guidance_layout": partial(model, sample, **inputs, user_kv=guided, user_rows=half),
    }


def time_steps(args, unet, adapter, compiled: str) -> list[dict]:
    rows = []
    for batch in args.batch_sizes:
        fns = step_functions(args, unet, adapter, batch)
        with torch.no_grad():
            seconds = interleaved_median(fns, args.device, args.rounds, args.warmup)
        rows.append(
            {
                "batch": batch,
                "compiled": compiled,
                "plain_ms": 1e3 * seconds["plain"],
                "user_every_row_ms": 1e3 * seconds["user_every_row"],
                "user_guidance_layout_ms": 1e3 * seconds["user_guidance_layout"],
                "ratio_every_row": seconds["user_every_row"] / seconds["plain"],
                "ratio_guidance_layout": seconds["user_guidance_layout"] / seconds["plain"],
            }
        )
        log(rows[-1])
    return rows


def prior_call(args, pipe, users: torch.Tensor | None) -> None:
    pipe(
        PROMPT,
        height=args.image_size,
        width=args.image_size,
        num_inference_steps=args.prior_steps,
        guidance_scale=4.0,
        user_embeds=users,
        output_type="latent",
        generator=torch.Generator(args.device).manual_seed(0),
    )


def time_prior(args, pipe, users: torch.Tensor, compiled: str) -> dict:
    fns = {"plain": partial(prior_call, args, pipe, None), "user": partial(prior_call, args, pipe, users)}
    with torch.no_grad():
        seconds = interleaved_median(fns, args.device, args.prior_rounds, warmup=1)
    row = {"compiled": compiled, "steps": args.prior_steps, "image_size": args.image_size}
    row.update(plain_s=seconds["plain"], user_s=seconds["user"], ratio=seconds["user"] / seconds["plain"])
    log(row)
    return row


def compile_prior(args, pipe, unet, adapter, users) -> dict:
    """Compiles the prior in place and times the first call of each shape (that is where compiling happens)."""
    start = time.perf_counter()
    pipe.compile_prior(fullgraph=True, backend=args.compile_backend)
    first_calls = {}
    with torch.no_grad():
        for batch in args.batch_sizes:
            for name, fn in step_functions(args, unet, adapter, batch).items():
                first_calls[f"step_{name}_batch_{batch}"] = timed(fn, args.device)
        for name, user in (("prior_plain", None), ("prior_user", users)):
            first_calls[name] = timed(partial(prior_call, args, pipe, user), args.device)
    return {"backend": args.compile_backend, "first_call_s": first_calls, "total_s": time.perf_counter() - start}


def prior_whole_graph(args, models: dict) -> dict:
    """The prior of one image with ``compile_prior(regional=False)``: one graph for the plain prior and one for
    the personalized prior (the first calls compile them)."""
    torch._dynamo.reset()  # nothing compiled earlier in the run is reused
    pipe, users = models["pipe"], models["users"]
    pipe.compile_prior(regional=False, fullgraph=True, backend=args.compile_backend)
    with torch.no_grad():
        first = {name: timed(partial(prior_call, args, pipe, user), args.device) for name, user in
                 (("prior_plain", None), ("prior_user", users))}  # fmt: skip
    return dict(time_prior(args, pipe, users, "whole graph"), first_call_s=first)


def timed(fn, device: str) -> float:
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def training_namespace(args) -> SimpleNamespace:
    """The settings ``bench_training``/``bench_core`` read, from this suite's."""
    return SimpleNamespace(
        device=args.device,
        cpu_memory=args.cpu_memory,
        latent_size=args.latent_size,
        user_dim=args.user_dim,
        user_token_dim=args.user_token_dim,
        user_tokens=args.user_tokens,
        embed_tokens=args.embed_tokens,
        pairs=4,
        rounds=args.train_rounds,
        train_rounds=args.train_rounds,
        warmup=args.warmup_train,
    )


def time_training(args, cases: list[Case], budget: Budget, with_baseline: bool) -> dict:
    ns, rows = training_namespace(args), []
    for case in cases:
        if budget.left() < 0:
            rows.append({"key": case.key, "skipped": "time budget spent"})
            continue
        rows += measure_group([case], ns)
    baseline = time_full_dpo(args, ns) if with_baseline and budget.left() > 0 else None
    return {"rows": rows, "full_dpo_baseline": baseline}


def time_full_dpo(args, ns: SimpleNamespace) -> dict:
    """Full-model Diffusion-DPO, reference = a frozen copy, 4 pairs (``bench_core``'s baseline)."""
    row = {"variant": "full_dpo", "pairs": ns.pairs}
    cuda = args.device.startswith("cuda")
    step = None
    try:
        free()
        step, trained = training_step_fn("full_dpo", ns, args.config, args.dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = interleaved_median({"full_dpo": step}, args.device, args.train_rounds, args.warmup_train)["full_dpo"]
        row.update(step_s=seconds, pairs_per_s=ns.pairs / seconds, trained_params_m=trained / 1e6)
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError:
        row["oom"] = True
    del step
    free()
    log(row)
    return row


def time_encoder(args) -> dict:
    import tempfile

    sizes = TINY_LLAVA_ONEVISION if args.tiny else LLAVA_ONEVISION_0_5B
    users = random_users(args.encoder_users)
    with tempfile.TemporaryDirectory() as path:
        save_random_llava_onevision(path, dtype=args.dtype, **sizes)
        rows = time_encoders(path, sizes["text_layers"], users, args.dtype, args.device, args.rounds_encoder, 1)
    for row in rows:
        row["model_time_vs_full"] = row["model_ms_per_user"] / rows[0]["model_ms_per_user"]
        log(row)
    return {"config": "tiny" if args.tiny else "llava-onevision-0.5b", "users_per_batch": len(users), "rows": rows}


def time_backbones(args) -> dict:
    """``bench_backbones`` at the suite's batch sizes with ``args.backbone_rounds`` rounds (fewer than the
    script's default, to fit the budget); the section keeps its settings, models, step rows and DPO row."""
    argv = (["--tiny"] if args.tiny else []) + ["--batch-sizes", *map(str, args.batch_sizes)]
    argv += ["--rounds", str(args.backbone_rounds), "--warmup", str(args.backbone_warmup)]
    argv += ["--dpo-pairs", str(args.backbone_dpo_pairs), "--dpo-rounds", "1" if args.tiny else "3"]
    argv += [] if args.tiny else ["--cuda-graphs"]
    result = bench_backbones.run(bench_backbones.parse_args(argv))
    return {key: result[key] for key in ("settings", "models", "rows", "dpo")}


def time_evaluation(args) -> dict:
    """Every reward scorer on ``TARGET_IMAGES`` random 512 px images (``bench_evaluation``), random full-size
    weights in the run's dtype; tiny checkpoints and 16 images of 64 px with ``--tiny``."""
    import tempfile

    count, size = (16, 64) if args.tiny else (TARGET_IMAGES, 512)
    settings = SimpleNamespace(device=args.device, torch_dtype=args.dtype, batch_size=8 if args.tiny else 64)
    settings.__dict__.update(compare_fp32=0 if args.tiny else 64, tiny=args.tiny, random_weights=not args.tiny)
    images, prompts = random_images(count, size)
    with tempfile.TemporaryDirectory() as folder:
        sources = tiny_sources(folder) if args.tiny else random_full_size_sources(folder)
        rows = [measure(name, *sources[name], images, prompts, settings) for name in SCORER_NAMES]
    for row in rows:
        log(row)
    return {"num_images": count, "image_size": size, "rows": rows, "total_score_s": sum(r["score_s"] for r in rows)}


# ---------------------------------------------------------------------------------------------- the run
def log(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def run(args) -> dict:
    result = {
        "suite": "gpu_suite",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "hardware": hardware(args.device),
        "versions": {name: version(name) for name in PACKAGES},
        "tiny": args.tiny,
        "settings": {
            "config": args.config,
            "dtype": str(args.dtype).removeprefix("torch."),
            "latent_size": args.latent_size,
            "image_size": args.image_size,
            "user_tokens": args.embed_tokens * args.user_tokens,
            "user_token_dim": args.user_token_dim,
            "user_embed_dim": args.user_dim,
            "rounds": args.rounds,
            "budget_s": args.budget,
        },
        "sections": {},
        "section_seconds": {},
    }
    budget = Budget(args.budget, 0.02 if args.tiny else 1.0)
    inference = {}

    def section(name: str, fn) -> None:
        if name in args.skip:
            result["sections"][name] = {"skipped": "--skip"}
        elif not budget.allows(name):
            result["sections"][name] = {"skipped": f"time budget: {budget.left():.0f} s left"}
        else:
            start = time.perf_counter()
            try:
                result["sections"][name] = fn()
            except Exception as error:  # one failing section must not lose the others' figures
                result["sections"][name] = {"error": "".join(traceback.format_exception_only(error)).strip()}
                traceback.print_exc()
            result["section_seconds"][name] = time.perf_counter() - start
        print(f"[gpu_suite] {name}: done, {budget.left():.0f} s of the budget left", file=sys.stderr, flush=True)
        if args.output:
            write_json(args.output, result)

    def models():
        if not inference:
            unet, adapter = build_stage_c(args)
            g = torch.Generator(args.device).manual_seed(1)
            users = torch.randn(1, args.embed_tokens, args.user_dim, device=args.device, generator=g)
            inference.update(unet=unet, adapter=adapter, pipe=build_pipeline(args, unet, adapter), users=users)
        return inference

    def compiled(fn):
        compile_section = result["sections"].get("compile", {})
        if "first_call_s" not in compile_section:
            return {"skipped": "the prior was not compiled"}
        return fn()

    # eager inference first; training and the encoder next (their figures do not depend on compiling, whose
    # time is hard to bound); then the compiled prior on freshly built models, and compiled training last
    section("step", lambda: {"rows": time_steps(args, models()["unet"], models()["adapter"], "eager")})
    section("prior", lambda: time_prior(args, models()["pipe"], models()["users"], "eager"))
    inference.clear()
    free()
    cases = [Case(args.config, ckpt, "bf16", pairs) for pairs in (4, 16) for ckpt in (False, True)]
    section("training", lambda: time_training(args, cases, budget, with_baseline=True))
    section("encoder", lambda: time_encoder(args))
    section("backbones", lambda: time_backbones(args))
    section("compile", lambda: compile_prior(args, **{k: models()[k] for k in ("pipe", "unet", "adapter", "users")}))
    section(
        "step_compiled",
        lambda: compiled(lambda: {"rows": time_steps(args, inference["unet"], inference["adapter"], "regional")}),
    )
    section(
        "prior_compiled", lambda: compiled(lambda: time_prior(args, inference["pipe"], inference["users"], "regional"))
    )
    inference.clear()
    free()
    compiled_case = [Case(args.config, False, "bf16", 16 if not args.tiny else 4, compiled=True)]
    section("training_compiled", lambda: time_training(args, compiled_case, budget, with_baseline=False))
    section("prior_whole_graph", lambda: prior_whole_graph(args, models()))
    inference.clear()
    free()
    section("evaluation", lambda: time_evaluation(args))
    result["targets"] = targets(result)
    return result


# ---------------------------------------------------------------------------------------------- report
def targets(result: dict) -> list[dict]:
    """The project's GPU targets, judged on what this run measured (``None``: not measured)."""
    sections, rows = result["sections"], []

    def add(name: str, measured: str | None, met: bool | None) -> None:
        rows.append({"target": name, "measured": measured, "met": met})

    for key in ("step_compiled", "step"):
        for r in sections.get(key, {}).get("rows", []):
            ratio = r["ratio_guidance_layout"]
            add(
                f"personalized step <= {TARGETS['step_ratio']}x plain, batch {r['batch']}, {key.replace('_', ' ')}",
                f"{ratio:.3f}x (user on every row: {r['ratio_every_row']:.3f}x)",
                ratio <= TARGETS["step_ratio"],
            )
    rows += bench_backbones.targets(sections.get("backbones", {}))
    for key in ("prior_whole_graph", "prior_compiled"):
        prior = sections.get(key, {})
        if "user_s" in prior:
            name = f"prior of one image with a user, {prior['steps']} steps, CFG, {_mode(prior)}"
            name += f" <= {TARGETS['prior_s']} s"
            add(name, f"{prior['user_s']:.3f} s", prior["user_s"] <= TARGETS["prior_s"])
    training = [r for key in ("training", "training_compiled") for r in sections.get(key, {}).get("rows", [])]
    measured = [r for r in training if r.get("pairs_per_s")]
    if measured:
        best = max(measured, key=lambda r: r["pairs_per_s"])
        add(f">= {TARGETS['pairs_per_s']:g} pairs/s adapter-only DPO", f"{best['pairs_per_s']:.2f} ({best['key']})",
            best["pairs_per_s"] >= TARGETS["pairs_per_s"])  # fmt: skip
    ckpt4 = next((r for r in training if r.get("checkpointing") and r.get("pairs") == 4 and "compiled" not in
                  r["key"]), None)  # fmt: skip
    if ckpt4 and (ckpt4.get("peak_bytes") or ckpt4.get("oom")):
        peak = ckpt4.get("peak_bytes")
        add("4 pairs with checkpointing <= 24 GB", "out of memory" if peak is None else f"{peak / 1e9:.2f} GB",
            peak is not None and peak <= TARGETS["ckpt_4_pairs_bytes"])  # fmt: skip
    encoder = [r for r in sections.get("encoder", {}).get("rows", []) if r["layer"] != -1]
    if encoder:
        r = encoder[0]
        add(f"user embedding truncated at layer {r['layer']} <= {TARGETS['encoder_layer12_ms']:g} ms (model only)",
            f"{r['model_ms_per_user']:.1f} ms ({r['ms_per_user']:.1f} ms with preprocessing)",
            r["model_ms_per_user"] <= TARGETS["encoder_layer12_ms"])  # fmt: skip
    evaluation = sections.get("evaluation", {})
    if "total_score_s" in evaluation:
        count, total = evaluation["num_images"], evaluation["total_score_s"]
        add(f"{TARGET_IMAGES} images scored by all {len(evaluation['rows'])} reward scorers <= {TARGET_S:g} s",
            f"{total:.1f} s for {count} images", total * TARGET_IMAGES / count <= TARGET_S)  # fmt: skip
    return rows


def _ratio(row: dict, baseline: dict, key: str) -> float | None:
    return row[key] / baseline[key] if row.get(key) and baseline.get(key) else None


def _mode(row: dict) -> str:
    """How a row ran: "eager", "regional" or "whole graph" (the first results stored a bool for regional)."""
    mode = row["compiled"]
    return {True: "regional", False: "eager"}.get(mode, mode) if isinstance(mode, bool) else mode


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    s, sections = result["settings"], result["sections"]
    lines = [
        f"Device: {result['hardware']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        f"Settings: {s['config']} Stage C, {s['dtype']}, {s['latent_size']} x {s['latent_size']} latents "
        f"({s['image_size']} px), {s['user_tokens']} user tokens of width {s['user_token_dim']}, random weights.",
        "",
        "| target | measured | status |",
        "|---|---|---|",
    ]
    status = {True: "met", False: "**not met**", None: "not measured"}
    if result["tiny"]:  # the targets are for full size on a GPU
        status = dict.fromkeys(status, "not judged (tiny CPU run)")
    for t in result.get("targets") or targets(result):
        lines.append(f"| {t['target']} | {t['measured'] or '-'} | {status[t['met']]} |")
    skipped = {k: v.get("skipped") or v.get("error") for k, v in sections.items() if "skipped" in v or "error" in v}
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"`{k}`: {v}" for k, v in skipped.items()) + "."]

    steps = [r for key in ("step", "step_compiled") for r in sections.get(key, {}).get("rows", [])]
    if steps:
        lines += ["", "| Stage C step | batch | plain (ms) | user on every row (ms) | ratio | guidance layout (ms) | "
                  "ratio |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in steps:
            lines.append(
                f"| {_mode(r)} | {r['batch']} | {r['plain_ms']:.2f} | "
                f"{r['user_every_row_ms']:.2f} | {r['ratio_every_row']:.3f} | {r['user_guidance_layout_ms']:.2f} | "
                f"{r['ratio_guidance_layout']:.3f} |"
            )
    priors = [sections.get(k, {}) for k in ("prior", "prior_compiled", "prior_whole_graph")]
    priors = [r for r in priors if "plain_s" in r]
    if priors:
        lines += ["", "| prior of one image | steps | no user (s) | with a user (s) | ratio |"]
        lines += ["|---|---|---|---|---|"]
        for r in priors:
            lines.append(f"| {_mode(r)} | {r['steps']} | {r['plain_s']:.3f} | {r['user_s']:.3f} | {r['ratio']:.3f} |")
    compiled = sections.get("compile", {})
    if "first_call_s" in compiled:
        calls = ", ".join(f"{k} {v:.1f} s" for k, v in compiled["first_call_s"].items())
        lines += ["", f"Compilation (`compile_prior`, backend {compiled['backend']}): {compiled['total_s']:.0f} s "
                  f"in all; first calls: {calls}."]  # fmt: skip
    training = [r for key in ("training", "training_compiled") for r in sections.get(key, {}).get("rows", [])]
    baseline = sections.get("training", {}).get("full_dpo_baseline")
    if training:
        lines += ["", "| DPO training step | pairs | step (s) | pairs/s | peak (GiB) | pairs/s vs full DPO "
                  "(same pairs) | peak vs full DPO |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in training + ([dict(baseline, key="full-model Diffusion-DPO (baseline)")] if baseline else []):
            peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30
            # ratios only against a baseline of as many pairs
            same = baseline if baseline and baseline.get("pairs") == r.get("pairs") else {}
            name = r["key"] + (" (out of memory)" if r.get("oom") else "") + (f" ({r['skipped']})" if "skipped" in r
                                                                               else "")  # fmt: skip
            lines.append(
                f"| {name} | {r.get('pairs', '-')} | {_fmt(r.get('step_s'), '.3f')} | {_fmt(r.get('pairs_per_s'))} | "
                f"{_fmt(peak, '.1f')} | {_fmt(_ratio(r, same, 'pairs_per_s'))} | "
                f"{_fmt(_ratio(r, same, 'peak_bytes'))} |"
            )
    encoder = sections.get("encoder", {}).get("rows", [])
    if encoder:
        lines += ["", "| user embedding (4 pairs) | layers run | tokens | ms per user (all) | ms (model only) | "
                  "model time vs full |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in encoder:
            lines.append(
                f"| {'full depth' if r['layer'] == -1 else 'truncated at ' + str(r['layer'])} | {r['layers_built']} | "
                f"{r['tokens_per_user']} | {r['ms_per_user']:.1f} | {r['model_ms_per_user']:.1f} | "
                f"{r['model_time_vs_full']:.2f} |"
            )
    backbones = sections.get("backbones", {})
    if backbones.get("rows") or backbones.get("dpo"):
        lines += ["", "SDXL and Flux steps (`bench_backbones`): " + bench_backbones.settings_line(backbones), ""]
        lines += bench_backbones.tables(backbones)
    evaluation = sections.get("evaluation", {})
    if evaluation.get("rows"):
        scored = f"{evaluation['num_images']} images of {evaluation['image_size']} px"
        lines += ["", f"| reward scorer ({scored}) | load (s) | score (s) | images/s | peak (GiB) | diff vs fp32 |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in evaluation["rows"]:
            lines.append(
                f"| {r['scorer']} | {r['load_s']:.1f} | {r['score_s']:.2f} | {r['images_per_s']:.1f} | "
                f"{_fmt(r['peak_gib'], '.2f')} | {_fmt(r.get('max_abs_diff_vs_fp32'), '.3g')} |"
            )
    return "\n".join(lines) + "\n"


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def render(path: str) -> str:
    """Writes the markdown table beside the JSON at ``path`` (``.json`` -> ``.md``) and returns its path."""
    with open(path) as f:
        result = json.load(f)
    out = path.removesuffix(".json") + ".md"
    with open(out, "w") as f:
        f.write(markdown(result))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the same code, for CI)")
    parser.add_argument("--render", metavar="JSON", help="only regenerate the markdown table of a saved result")
    parser.add_argument("--output", help="JSON to write (after every section); its .md table is written beside it")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    parser.add_argument("--config", default="stage_c", choices=["stage_c", "lite"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per step timing")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args(argv)
    if args.render:
        return args
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    full = dict(latent_size=LATENT_SIZE[args.config], image_size=1024, user_dim=896, user_token_dim=768)
    full.update(text_sizes=CLIP_G_TEXT, dtype=torch.bfloat16, prior_steps=20, prior_rounds=5, encoder_users=4)
    full.update(train_rounds=5, warmup=3, warmup_train=2, rounds_encoder=5)
    full.update(backbone_rounds=10, backbone_warmup=2, backbone_dpo_pairs=4)
    if args.tiny:  # same code, CPU-sized; compiled with aot_eager (no C++ toolchain needed, compiles fast)
        args.config, args.batch_sizes, args.rounds, args.compile_backend = "tiny", [2, 4], 3, "aot_eager"
        full.update(latent_size=LATENT_SIZE["tiny"], image_size=256, user_dim=64, user_token_dim=32)
        full.update(text_sizes=TINY_TEXT, dtype=torch.float32, prior_steps=3, prior_rounds=1, encoder_users=1)
        full.update(train_rounds=1, warmup=1, warmup_train=1, rounds_encoder=1)
        full.update(backbone_rounds=2, backbone_warmup=1, backbone_dpo_pairs=2)
    # on the CPU the training rows skip bench_training's per-case child processes that measure memory
    vars(args).update(full, device=device, user_tokens=4, embed_tokens=16, cpu_memory=not args.tiny)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        print(render(args.render))
        return
    if not args.tiny and args.device == "cpu":
        sys.exit("[gpu_suite] no GPU: the full-size suite would take hours on the CPU; use --tiny.")
    result = run(args)
    if args.output:
        write_json(args.output, result)
        render(args.output)
    print(markdown(result))


if __name__ == "__main__":
    main()
