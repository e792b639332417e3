"""Everything that depends on the internals of diffusers' ``StableCascadeUNet`` lives here.

``StableCascadeUNet.forward`` passes one conditioning tensor to every ``SDCascadeAttnBlock`` and takes
no attention kwargs, so user keys/values cannot reach its attention layers. This module runs the same
network block by block (``stage_c_forward``) and hands each attention block its own user keys/values
as *arguments*, which keeps gradient checkpointing correct (a recomputed block sees the same inputs).

The private pieces used: the block lists ``down_blocks``/``up_blocks``, ``down_downscalers``/
``up_upscalers``, ``down_repeat_mappers``/``up_repeat_mappers``, the block classes, the submodules
``embedding``/``effnet_mapper``/``pixels_mapper``/``clf`` and ``_gradient_checkpointing_func``.
``tests/test_stable_cascade_internals.py`` pins them: without a user, ``stage_c_forward`` must equal
``StableCascadeUNet.forward`` bit for bit on several configurations. ``NEWEST_TESTED_DIFFUSERS`` is the newest
diffusers release they passed on; the ``stable-cascade`` extra caps diffusers below its next minor release, and
the Stage C entry points here warn once on a newer one (SDXL and Flux need none of this and have no cap).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from importlib.metadata import version

import torch
import torch.nn.functional as F
from diffusers import StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import (
    SDCascadeAttnBlock,
    SDCascadeResBlock,
    SDCascadeTimestepBlock,
    StableCascadeUNetOutput,
)

from .attention import decoupled_attention

__all__ = [
    "NEWEST_TESTED_DIFFUSERS",
    "attention_block_shapes",
    "attention_blocks",
    "check_diffusers_version",
    "compile_blocks",
    "stage_c_forward",
]

# the newest diffusers release tests/test_stable_cascade_internals.py passed on (the newest on PyPI when checked);
# raise it, and the cap of the `stable-cascade` extra in pyproject.toml, after they pass on a newer one
NEWEST_TESTED_DIFFUSERS = "0.42.1"


@functools.cache
def check_diffusers_version() -> None:
    """Warns once if the installed diffusers is a newer minor release than ``NEWEST_TESTED_DIFFUSERS``, whose
    ``StableCascadeUNet`` internals this module was tested against (patch releases of it are accepted, as the
    ``stable-cascade`` extra's ``diffusers<0.43`` accepts them)."""
    from packaging.version import Version

    installed = version("diffusers")
    if Version(installed).release[:2] > Version(NEWEST_TESTED_DIFFUSERS).release[:2]:
        warnings.warn(
            f"diffusers {installed} is newer than {NEWEST_TESTED_DIFFUSERS}, the newest release whose Stable Cascade "
            "internals ppd-diffusers was tested on: the personalized Stage C may fail or differ from "
            "`StableCascadeUNet`. Install `ppd-diffusers[stable-cascade]`, which caps diffusers at the tested "
            "releases (SDXL and Flux are not affected).",
            UserWarning,
            stacklevel=3,
        )


def attention_blocks(unet: StableCascadeUNet) -> list[SDCascadeAttnBlock]:
    """The UNet's attention blocks in the order ``stage_c_forward`` visits them (down, then up)."""
    check_diffusers_version()  # every Stage C adapter, personalized model and pipeline starts here
    return [block for level in (*unet.down_blocks, *unet.up_blocks) for block in level if _is_attn(block)]


def attention_block_shapes(unet: StableCascadeUNet) -> list[tuple[int, int]]:
    """``(channels, heads)`` of each attention block, in visiting order."""
    return [(block.attention.query_dim, block.attention.heads) for block in attention_blocks(unet)]


def _is_attn(block: torch.nn.Module) -> bool:
    return isinstance(block, SDCascadeAttnBlock)


class _PersonalizedAttnBlock(torch.nn.Module):
    """``SDCascadeAttnBlock.forward`` with the user term added inside the attention.

    A stateless module rather than a function: diffusers' checkpointing helper calls
    ``module.__call__``, which torch.compile traces for modules but not for plain functions.
    """

    def forward(
        self,
        block: SDCascadeAttnBlock,
        x: torch.Tensor,
        clip: torch.Tensor,
        user_key: torch.Tensor,
        user_value: torch.Tensor,
        user_rows: int | None = None,
    ) -> torch.Tensor:
        kv = block.kv_mapper(clip)
        norm_x = block.norm(x)
        if block.self_attn:
            batch_size, channel, _, _ = x.shape
            kv = torch.cat([norm_x.view(batch_size, channel, -1).transpose(1, 2), kv], dim=1)
        return x + decoupled_attention(block.attention, norm_x, kv, user_key, user_value, user_rows)


_personalized_attn_block = _PersonalizedAttnBlock()


RECOMPILE_LIMIT = 64


def compile_blocks(unet: StableCascadeUNet, **compile_kwargs) -> int:
    """Regional compilation: ``torch.compile`` each block of ``unet`` in place, and the personalized attention.

    Blocks of one level share their shapes, so each distinct block is compiled once and the compiled code
    serves all its copies (PyTorch inlines built-in modules and treats their weights as inputs); the
    personalized attention block is one module whose ``block`` argument changes, compiled once per shape.
    ``StableCascadeUNet.forward`` and ``stage_c_forward`` both call the blocks, so both run compiled.
    Every block class shares one compiled-code cache over its instances, levels, batch sizes and grad
    modes (a DPO step runs the reference without gradients and the policy with them), more variants than
    torch's default ``recompile_limit`` of 8 allows; it is raised to ``RECOMPILE_LIMIT`` so that no block
    silently falls back to eager. Shapes are static unless ``dynamic`` is given: the two levels' blocks
    differ in size, and automatic dynamic shapes would otherwise recompile them again on the second call.
    Returns the number of UNet blocks compiled.
    """
    import torch._dynamo

    check_diffusers_version()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compile_kwargs.setdefault("dynamic", False)
    blocks = [block for level in (*unet.down_blocks, *unet.up_blocks) for block in level]
    for block in blocks:
        block.compile(**compile_kwargs)
    _personalized_attn_block.compile(**compile_kwargs)
    return len(blocks)


def _conditioning_embedding(
    unet: StableCascadeUNet,
    timestep_ratio: torch.Tensor,
    sca: torch.Tensor | float | None,
    crp: torch.Tensor | float | None,
) -> torch.Tensor:
    embeds = [unet.get_timestep_ratio_embedding(timestep_ratio)]
    extra = {"sca": sca, "crp": crp}
    for name in unet.config.timestep_conditioning_type:
        value = extra.get(name)
        # diffusers writes `cond or zeros`, which fails for a batch tensor; this accepts one.
        value = torch.zeros_like(timestep_ratio) if value is None else torch.as_tensor(value).to(timestep_ratio)
        embeds.append(unet.get_timestep_ratio_embedding(value.expand_as(timestep_ratio)))
    return torch.cat(embeds, dim=1)


def _clip_embedding(
    unet: StableCascadeUNet,
    clip_text_pooled: torch.Tensor,
    clip_text: torch.Tensor | None,
    clip_img: torch.Tensor | None,
) -> torch.Tensor:
    if clip_text_pooled.ndim == 2:  # diffusers crashes on (batch, channels)
        clip_text_pooled = clip_text_pooled.unsqueeze(1)
    if clip_text is not None and clip_img is None and hasattr(unet, "clip_img_mapper"):
        # diffusers silently drops `clip_text` without `clip_img`; zeros are what the prior
        # pipeline passes when there is no image prompt.
        clip_img = clip_text.new_zeros(clip_text.shape[0], 1, unet.config.clip_image_in_channels)
    return unet.get_clip_embeddings(clip_txt_pooled=clip_text_pooled, clip_txt=clip_text, clip_img=clip_img)


def stage_c_forward(
    unet: StableCascadeUNet,
    sample: torch.Tensor,
    timestep_ratio: torch.Tensor | float,
    clip_text_pooled: torch.Tensor,
    clip_text: torch.Tensor | None = None,
    clip_img: torch.Tensor | None = None,
    effnet: torch.Tensor | None = None,
    pixels: torch.Tensor | None = None,
    sca: torch.Tensor | float | None = None,
    crp: torch.Tensor | float | None = None,
    user_keys: Sequence[torch.Tensor] | None = None,
    user_values: Sequence[torch.Tensor] | None = None,
    user_rows: int | None = None,
) -> StableCascadeUNetOutput:
    """Runs ``unet`` like ``StableCascadeUNet.forward``, with optional user keys/values per attention block.

    ``user_keys[i]``/``user_values[i]`` (values with the user scale folded in) belong to the i-th block
    of ``attention_blocks(unet)``; a block that a repeat mapper runs twice sees its own pair both times.
    Only the first ``user_rows`` rows of the batch (default: all) have a user; the others run the base blocks.
    With ``user_keys=None`` the result equals ``unet(...)`` bit for bit wherever diffusers accepts the
    inputs and ``clip_text`` comes with ``clip_img``. In addition this accepts a 2-D ``clip_text_pooled``,
    per-sample ``sca``/``crp`` tensors and a scalar ``timestep_ratio``, and supplies the zero image
    embedding that makes ``clip_text`` count without ``clip_img`` (see ``_clip_embedding``).
    """
    batch_size = sample.shape[0]
    timestep_ratio = torch.as_tensor(timestep_ratio, device=sample.device)
    if timestep_ratio.ndim == 0:
        timestep_ratio = timestep_ratio.expand(batch_size)
    if pixels is None:
        pixels = sample.new_zeros(batch_size, 3, 8, 8)

    # A float32 timestep keeps its precision in the sinusoidal embedding; only the result is cast.
    r_embed = _conditioning_embedding(unet, timestep_ratio, sca, crp).to(sample.dtype)
    clip = _clip_embedding(unet, clip_text_pooled, clip_text, clip_img)

    x = unet.embedding(sample)
    if hasattr(unet, "effnet_mapper") and effnet is not None:
        effnet = F.interpolate(effnet, size=x.shape[-2:], mode="bilinear", align_corners=True)
        x = x + unet.effnet_mapper(effnet)
    if hasattr(unet, "pixels_mapper"):
        x = x + F.interpolate(unet.pixels_mapper(pixels), size=x.shape[-2:], mode="bilinear", align_corners=True)

    checkpointing = torch.is_grad_enabled() and unet.gradient_checkpointing

    def run(block: torch.nn.Module, x: torch.Tensor, attn_index: int, skip: torch.Tensor | None) -> torch.Tensor:
        if isinstance(block, SDCascadeResBlock):
            fn, args = block, (x, skip)
        elif isinstance(block, SDCascadeTimestepBlock):
            fn, args = block, (x, r_embed)
        elif isinstance(block, SDCascadeAttnBlock):
            if user_keys is None:
                fn, args = block, (x, clip)
            else:
                user = (user_keys[attn_index], user_values[attn_index])
                fn, args = _personalized_attn_block, (block, x, clip, *user, user_rows)
        else:
            fn, args = block, (x,)
        if checkpointing:
            return unet._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    # down path
    level_outputs = []
    attn_offset = 0
    down_path = zip(unet.down_blocks, unet.down_downscalers, unet.down_repeat_mappers, strict=True)
    for level, downscaler, repeat_mappers in down_path:
        x = downscaler(x)
        for repeat in range(len(repeat_mappers) + 1):
            attn_index = attn_offset
            for block in level:
                x = run(block, x, attn_index, None)
                attn_index += _is_attn(block)
            if repeat < len(repeat_mappers):
                x = repeat_mappers[repeat](x)
        attn_offset = attn_index
        level_outputs.insert(0, x)

    # up path
    x = level_outputs[0]
    up_path = zip(unet.up_blocks, unet.up_upscalers, unet.up_repeat_mappers, strict=True)
    for i, (level, upscaler, repeat_mappers) in enumerate(up_path):
        for repeat in range(len(repeat_mappers) + 1):
            attn_index = attn_offset
            for k, block in enumerate(level):
                skip = level_outputs[i] if k == 0 and i > 0 and isinstance(block, SDCascadeResBlock) else None
                if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                    x = F.interpolate(x.float(), skip.shape[-2:], mode="bilinear", align_corners=True).to(x.dtype)
                x = run(block, x, attn_index, skip)
                attn_index += _is_attn(block)
            if repeat < len(repeat_mappers):
                x = repeat_mappers[repeat](x)
        attn_offset = attn_index
        x = upscaler(x)

    return StableCascadeUNetOutput(sample=unet.clf(x))
