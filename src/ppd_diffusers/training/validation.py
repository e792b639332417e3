"""Validation grids during training: each prompt drawn by the base model and for each held-out user."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

__all__ = ["validation_grid"]

logger = logging.getLogger(__name__)


def validation_grid(
    pipe: Any,
    user_embeds: torch.Tensor,
    prompts: list[str],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    height: int = 1024,
    width: int = 1024,
) -> Any:
    """One image grid: a row per prompt; the base model first, then one column per user, from the same noise.

    Args:
        pipe: A PPD pipeline with a user adapter: ``PersonalizedStableCascadePipeline`` (with its decoder),
            ``PersonalizedStableDiffusionXLPipeline`` or ``PersonalizedFluxPipeline``.
        user_embeds: ``(users, tokens, width)`` embeddings of the users to show.
        prompts: The prompts, one row each.
        num_inference_steps: Denoising steps (Stage C's for Stable Cascade).
        guidance_scale: The pipeline's ``guidance_scale`` (classifier-free guidance; Flux's guidance embedding).
        seed: Seed of the noise, shared by every column of a row.
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        The grid as a ``PIL.Image``.

    Examples:
        ```py
        pipe.load_user_adapter("ppd-adapter")
        grid = validation_grid(pipe, user_embeds[:4], ["a lighthouse at dusk", "a bowl of fruit"])
        grid.save("grid.png")  # 2 rows; columns: base model, then the 4 users
        ```
    """
    from diffusers.utils import make_image_grid

    users, device = user_embeds.shape[0], pipe._execution_device
    images = []
    for row, prompt in enumerate(prompts):
        generators = [torch.Generator(device).manual_seed(seed + row) for _ in range(users + 1)]
        # the base column reuses the first user's embedding at user scale 0: the plain base model
        out = pipe(
            [prompt] * (users + 1),
            user_embeds=torch.cat([user_embeds[:1], user_embeds]),
            user_scale=[0.0] + [1.0] * users,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generators,
        )
        images.extend(out.images)
    return make_image_grid(images, rows=len(prompts), cols=users + 1)


def gather_adapter(accelerator: Any, adapter: Any) -> Any:
    """The trained adapter as one plain fp32 ``UserAdapter``; every process must call this.

    Under FSDP or DeepSpeed ZeRO-3 no process holds all the weights, so they are gathered
    (``accelerator.get_state_dict``) into a fresh adapter on the main process; the other processes get
    their unwrapped module back.
    """
    from ..adapter import UserAdapter

    unwrapped = accelerator.unwrap_model(adapter)
    state_dict = accelerator.get_state_dict(adapter)
    if not accelerator.is_main_process:
        return unwrapped
    full = UserAdapter.from_config(unwrapped.config)
    full.load_state_dict(state_dict)
    return full.to(accelerator.device)


def log_validation(accelerator, pipe, adapter, user_embeddings, draws, held_out, args, step: int) -> None:
    """Writes ``validation/step-N.png`` and sends it to the trackers; every process must call this.

    The main process draws the grid with a gathered copy of the adapter, cast to the pipeline's dtype (the
    trained one stays fp32); the others wait.
    """
    gathered = gather_adapter(accelerator, adapter)
    if accelerator.is_main_process and held_out and args.validation_prompts:
        first_draw = {}
        for index, draw in enumerate(draws):
            first_draw.setdefault(draw.user_id, index)
        users = user_embeddings[[first_draw[u] for u in held_out]].to(accelerator.device, pipe.user_model.dtype)
        pipe.load_user_adapter(gathered)  # a copy: loading casts it to the pipeline's dtype in place
        grid = validation_grid(
            pipe,
            users,
            args.validation_prompts,
            args.validation_inference_steps,
            args.validation_guidance_scale,
            args.seed,
            height=args.resolution,
            width=args.resolution,
        )
        pipe.unload_user_adapter()
        folder = os.path.join(args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step-{step:06d}.png"))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(grid, caption=f"base | users {held_out}")]}, step=step)
        logger.info("Validation grid of step %d: rows %s; columns base, %s", step, args.validation_prompts, held_out)
    accelerator.wait_for_everyone()
