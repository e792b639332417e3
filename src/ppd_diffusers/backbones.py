"""Which attention layers of each supported backbone a ``UserAdapter`` personalizes.

Three backbones, one rule each:

- ``"stable_cascade"``: every ``SDCascadeAttnBlock`` of Stage C (``StableCascadeUNet``), down path then up path;
  their width is the block's channels (queries, keys and values share it).
- ``"sdxl"``: every cross-attention layer (``attn2``) of a ``UNet2DConditionModel``, where the text enters the
  UNet, in ``named_modules`` order; the width is that of the layer's keys/values (``to_k``'s output). Any
  ``UNet2DConditionModel`` (SD 1.x and 2.x too) is this kind and gets the same layers, but the pipeline and the
  training objective are SDXL's, and only SDXL is tested.
- ``"flux"``: the attention of every double-stream block (``transformer_blocks.N.attn``) of a
  ``FluxTransformer2DModel``, where the text tokens still form their own stream; width ``heads * head_dim``.

Only public module attributes are read for SDXL and Flux; Stage C's layout lives in ``_stable_cascade``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BACKBONES", "UserLayer", "backbone_of", "user_layers"]

BACKBONES = ("stable_cascade", "sdxl", "flux")


@dataclass(frozen=True)
class UserLayer:
    """One attention layer that gets user keys/values.

    Args:
        name: The layer's module name in the model (``model.get_submodule(name)``).
        channels: Width of the layer's keys and values (``heads * head_dim``).
        heads: Its attention heads.
    """

    name: str
    channels: int
    heads: int


def backbone_of(model: torch.nn.Module) -> str:
    """The backbone kind of ``model`` (one of ``BACKBONES``); ``TypeError`` for a model PPD cannot personalize.

    Examples:
        >>> from diffusers import UNet2DConditionModel
        >>> backbone_of(UNet2DConditionModel(block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=8,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1, attention_head_dim=2,
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8))
        'sdxl'
    """
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    model = _unwrap_compiled(model)
    try:  # Stable Cascade is deprecated in diffusers: a release without it must still serve SDXL and Flux
        from diffusers import StableCascadeUNet
    except ImportError:
        StableCascadeUNet = None  # noqa: N806
    if StableCascadeUNet is not None and isinstance(model, StableCascadeUNet):
        return "stable_cascade"
    if isinstance(model, UNet2DConditionModel):
        return "sdxl"
    if isinstance(model, FluxTransformer2DModel):
        return "flux"
    raise TypeError(
        f"PPD personalizes a `StableCascadeUNet` (Stage C), a `UNet2DConditionModel` (SDXL) or a "
        f"`FluxTransformer2DModel`, got {type(model).__name__}."
    )


def user_layers(model: torch.nn.Module) -> list[UserLayer]:
    """The layers of ``model`` that a ``UserAdapter`` personalizes, in the adapter's order (see the module doc)."""
    backbone = backbone_of(model)
    model = _unwrap_compiled(model)
    if backbone == "stable_cascade":
        from ._stable_cascade import attention_blocks

        names = {id(module): name for name, module in model.named_modules()}
        return [
            UserLayer(names[id(block)], block.attention.query_dim, block.attention.heads)
            for block in attention_blocks(model)
        ]
    if backbone == "sdxl":
        from diffusers.models.attention_processor import Attention

        return [
            UserLayer(name, module.to_k.out_features, module.heads)
            for name, module in model.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention
        ]
    return [
        UserLayer(f"transformer_blocks.{index}.attn", block.attn.inner_dim, block.attn.heads)
        for index, block in enumerate(model.transformer_blocks)
    ]


def _unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``torch.compile`` wrapper (``_orig_mod``), or ``model``."""
    return getattr(model, "_orig_mod", model)
