"""Cost of personalization in ``PersonalizedStableCascadePipeline``, as ratios against the same pipeline
without a user, measured in the same process with interleaved runs.

- full call: prompt -> Stage C -> Stage B -> images, with a user (``user_embeds``, so the encoder is not
  timed: it runs once per user and is cached) against no user; and with a separate user guidance scale
  (three Stage C predictions per step instead of two);
- per Stage C step: from prior-only calls at N and 2N steps, ``(T(2N) - T(N)) / N``, which removes what
  happens once per call (text encoding, the user keys/values).

    python benchmarks/bench_pipeline.py --tiny                  # CPU, tiny random models, a minute
    python benchmarks/bench_pipeline.py --configs lite stage_c  # GPU, full size, random weights, bf16
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
from _measure import hardware, interleaved_median
from bench_core import CONFIGS as CORE_CONFIGS
from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet

from ppd_diffusers import PaellaVQModel, PersonalizedStableCascadePipeline, UserAdapter
from ppd_diffusers.testing_utils import (
    PAELLA_VQ,
    STAGE_B_DECODER,
    STAGE_C_PRIOR,
    STAGE_C_PRIOR_LITE,
    clip_text_encoder,
    clip_text_tokenizer,
    tiny_stage_b_config,
)

# CLIP ViT-bigG/14 text tower, as in the Stable Cascade repos
CLIP_G_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
SETUPS = {
    "stage_c": dict(prior=STAGE_C_PRIOR, decoder=STAGE_B_DECODER, vq=PAELLA_VQ, text=CLIP_G_TEXT, size=1024),
    "lite": dict(prior=STAGE_C_PRIOR_LITE, decoder=STAGE_B_DECODER, vq=PAELLA_VQ, text=CLIP_G_TEXT, size=1024),
    "tiny": dict(
        prior=CORE_CONFIGS["tiny"],  # the tiny Stage C of bench_core.py
        decoder=tiny_stage_b_config(clip_text_pooled_in_channels=32, effnet_in_channels=16),
        vq=dict(PAELLA_VQ, bottleneck_blocks=1, embed_dim=32, num_vq_embeddings=64),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        size=256,
    ),
}
USER_TOKENS, USER_WIDTH = 16, {"tiny": 32}  # 16 embedding tokens x 4 = 64 user tokens per user


def build(name: str, device: str, dtype: torch.dtype) -> tuple[PersonalizedStableCascadePipeline, torch.Tensor]:
    setup = SETUPS[name]
    torch.manual_seed(0)
    tokenizer = clip_text_tokenizer()
    text_encoder = clip_text_encoder(
        tokenizer, projection_dim=setup["prior"]["clip_text_pooled_in_channels"], **setup["text"]
    )
    prior = StableCascadeUNet(**setup["prior"])
    user_width = USER_WIDTH.get(name, 896)
    adapter = UserAdapter.from_unet(prior, user_width, num_user_tokens=4, user_token_dim=min(768, 4 * user_width))
    with torch.no_grad():  # trained-like values, so that no kernel can skip the user term
        for layer in adapter.to_v_user:
            layer.weight.normal_(0, 0.02)
    small = name == "tiny"
    pipe = PersonalizedStableCascadePipeline(
        prior=prior,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMWuerstchenScheduler(),
        user_adapter=adapter,
        decoder=StableCascadeUNet(**setup["decoder"]),
        vqgan=PaellaVQModel(**setup["vq"]),
        decoder_scheduler=DDPMWuerstchenScheduler(),
        resolution_multiple=setup["size"] / (8 if small else 24),  # 24 x 24 Stage C latents at full size
        latent_dim_scale=2.0 if small else 10.67,
    )
    pipe.set_progress_bar_config(disable=True)
    users = torch.randn(4, USER_TOKENS, user_width, device=device)
    return pipe.to(device, dtype), users


def run(pipe, users, prompts: int, steps: int, size: int, user: bool, **kwargs) -> None:
    extra = dict(user_embeds=users[:prompts]) if user else {}
    pipe(
        ["a photo of a cat"] * prompts,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        **extra,
        **kwargs,
    )


def measure(name: str, device: str, dtype: torch.dtype, rounds: int, steps: int) -> list[dict]:
    pipe, users = build(name, device, dtype)
    size, rows = SETUPS[name]["size"], []
    for prompts in (1, 4):
        call = partial(run, pipe, users, prompts, size=size)
        full = interleaved_median(
            {
                "plain": partial(call, steps, user=False),
                "user": partial(call, steps, user=True),
                "user_guidance": partial(call, steps, user=True, user_guidance_scale=6.0),
            },
            device,
            rounds,
            warmup=1,
        )
        latent = dict(output_type="latent")
        prior = interleaved_median(
            {
                f"{kind}_{n}": partial(call, n, user=kind == "user", **latent)
                for kind in ("plain", "user")
                for n in (steps, 2 * steps)
            },
            device,
            rounds,
            warmup=1,
        )
        step = {kind: (prior[f"{kind}_{2 * steps}"] - prior[f"{kind}_{steps}"]) / steps for kind in ("plain", "user")}
        rows.append(
            dict(
                config=name,
                prompts=prompts,
                steps=steps,
                call_plain_s=full["plain"],
                call_user_ratio=full["user"] / full["plain"],
                call_user_guidance_ratio=full["user_guidance"] / full["plain"],
                step_plain_ms=1000 * step["plain"],
                step_user_ratio=step["user"] / step["plain"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], hw: str) -> str:
    lines = [
        f"Hardware: {hw}",
        "",
        "| config | prompts | Stage C steps | call, no user | call with user | + user guidance | "
        "Stage C step, no user | step with user |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['prompts']} | {r['steps']} | {r['call_plain_s'] * 1000:.0f} ms | "
            f"{r['call_user_ratio']:.3f}x | {r['call_user_guidance_ratio']:.3f}x | {r['step_plain_ms']:.1f} ms | "
            f"{r['step_user_ratio']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny random models")
    parser.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=["lite", "stage_c"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="Stage C steps (Stage B runs its default 10)")
    parser.add_argument("--output", help="write results here (.json, and a .md table beside it)")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    configs = ["tiny"] if args.tiny else args.configs
    torch.set_grad_enabled(False)
    rows = [row for name in configs for row in measure(name, device, dtype, args.rounds, args.steps)]
    hw = hardware(device)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"hardware": hw, "dtype": str(dtype), "rows": rows}, f, indent=2)
        with open(args.output.removesuffix(".json") + ".md", "w") as f:
            f.write(markdown(rows, hw))
    print(markdown(rows, hw))


if __name__ == "__main__":
    main()
