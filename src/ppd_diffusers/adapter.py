"""``UserAdapter``: the user-embedding projection and the decoupled K'/V' layers of every personalized attention
layer, for Stable Cascade Stage C, SDXL and Flux (see ``backbones``)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .backbones import BACKBONES, UserLayer, backbone_of, user_layers

if TYPE_CHECKING:
    from .personalized_model import PersonalizedModel

__all__ = ["UserAdapter", "UserKeyValues"]


@dataclass
class UserKeyValues:
    """Per-block user keys and values, computed once and reused at every denoising step.

    Args:
        keys: One tensor per personalized layer, ``(batch, heads, user_tokens, head_dim)``.
        values: Same shapes as ``keys``, already multiplied by ``user_scale``.
        user_scale: The user scale folded into ``values`` (a float or a ``(batch,)`` tensor), for reference.
        rows: Which rows of the model's batch have a user: ``None`` (all), how many leading rows, or a slice
            (e.g. the conditional half of a guidance batch); row ``i`` of ``keys`` belongs to the ``i``-th of them
            (a batch of one serves them all). The other rows run the base attention.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    user_scale: float | torch.Tensor = 1.0
    rows: int | slice | None = None

    @property
    def scale(self) -> float | torch.Tensor:
        """The deprecated name of ``user_scale`` (``FutureWarning``)."""
        warnings.warn("`UserKeyValues.scale` is deprecated: read `user_scale`.", FutureWarning, stacklevel=2)
        return self.user_scale

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def to(self, *args, **kwargs) -> UserKeyValues:
        """Moves/casts every tensor like ``torch.Tensor.to`` (e.g. to the UNet's dtype once per generation)."""
        return UserKeyValues(
            keys=tuple(k.to(*args, **kwargs) for k in self.keys),
            values=tuple(v.to(*args, **kwargs) for v in self.values),
            user_scale=self.user_scale,
            rows=self.rows,
        )

    def for_rows(self, rows: int | slice | None) -> UserKeyValues:
        """The same keys/values for other ``rows`` of the batch (see ``rows``); no tensor is copied."""
        return UserKeyValues(keys=self.keys, values=self.values, user_scale=self.user_scale, rows=rows)


_KINDS = {"stable_cascade": "Stage C UNet", "sdxl": "SDXL UNet", "flux": "Flux transformer"}


def _describe(shapes: list[tuple[int, int]]) -> str:
    runs = ", ".join(f"{len(list(group))} x ({c} channels, {h} heads)" for (c, h), group in groupby(shapes))
    return f"{len(shapes)} attention layers [{runs}]"


class UserAdapter(ModelMixin, ConfigMixin):
    r"""Decoupled user cross-attention (PPD) for Stable Cascade Stage C, SDXL or Flux.

    A user embedding ``e`` of shape ``(batch, tokens, user_embed_dim)`` (from a ``PreferenceEncoder``)
    becomes ``num_user_tokens`` user tokens per input token, ``u = LayerNorm(reshape(e W_p + b_p))`` of
    width ``user_token_dim``. Each personalized attention layer ``i`` of the model gets its own
    ``K'_i = u W_k'_i`` and ``V'_i = u W_v'_i``, attended beside the layer's own keys and values (see
    ``decoupled_attention`` and ``user_attention_processor``). ``W_v'`` starts at zero, so a fresh adapter
    leaves the model unchanged.

    The config names the target: its ``backbone`` (``"stable_cascade"``, ``"sdxl"`` or ``"flux"``), the
    personalized layers (``layer_names``) and their widths and heads; ``check_model`` refuses a model that does
    not fit. The adapter never changes the model's weights: ``attach`` returns a ``PersonalizedModel`` running
    both. Calling the adapter computes the user keys/values once, to reuse at every denoising step.

    Args:
        user_embed_dim: Width of the incoming user embedding (the VLM hidden size, e.g. 896).
        block_channels: Width of the keys/values of each personalized layer, in the adapter's order.
        block_heads: Attention heads of each layer, same order.
        num_user_tokens: User tokens produced per input embedding token.
        user_token_dim: Width of a user token (smaller is cheaper: K'/V' cost
            ``2 * user_token_dim * channels`` parameters per layer).
        backbone: The model kind the adapter was built for (one of ``backbones.BACKBONES``).
        layer_names: Module names of the personalized layers in the model (``None`` in adapters saved before
            0.2, which were all Stage C: only the shapes are checked then).
        ppd_diffusers_version: The release that saved the weights; filled in automatically.

    Examples:
        >>> import torch
        >>> from diffusers import StableCascadeUNet
        >>> unet = StableCascadeUNet(
        ...     block_out_channels=(32, 32), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        ...     up_num_layers_per_block=(1, 1), conditioning_dim=32, clip_text_pooled_in_channels=16,
        ...     clip_text_in_channels=16, clip_image_in_channels=16, in_channels=4, out_channels=4,
        ...     switch_level=(False,))
        >>> adapter = UserAdapter.from_model(unet, user_embed_dim=24, num_user_tokens=4, user_token_dim=8)
        >>> user_kv = adapter(torch.randn(2, 1, 24))
        >>> adapter.config.backbone, len(user_kv.keys), tuple(user_kv.keys[0].shape)
        ('stable_cascade', 4, (2, 2, 4, 16))
    """

    @register_to_config
    def __init__(
        self,
        user_embed_dim: int,
        block_channels: list[int] | tuple[int, ...],
        block_heads: list[int] | tuple[int, ...],
        num_user_tokens: int = 4,
        user_token_dim: int = 768,
        backbone: str = "stable_cascade",
        layer_names: list[str] | tuple[str, ...] | None = None,
        ppd_diffusers_version: str | None = None,
    ):
        super().__init__()
        for name, value in (
            ("user_embed_dim", user_embed_dim),
            ("num_user_tokens", num_user_tokens),
            ("user_token_dim", user_token_dim),
        ):
            if not _positive_int(value):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name, values in (("block_channels", block_channels), ("block_heads", block_heads)):
            if not isinstance(values, list | tuple) or not values or not all(_positive_int(v) for v in values):
                raise ValueError(f"`{name}` must be a non-empty list of positive integers, got {values!r}.")
        if len(block_channels) != len(block_heads):
            raise ValueError(
                f"`block_channels` and `block_heads` need one entry per attention layer, got "
                f"{len(block_channels)} and {len(block_heads)}."
            )
        for channels, heads in zip(block_channels, block_heads, strict=True):
            if channels % heads:
                raise ValueError(f"`block_channels` entry {channels} is not divisible by its `block_heads` {heads}.")
        if backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {BACKBONES}, got {backbone!r}.")
        if layer_names is not None and (
            not isinstance(layer_names, list | tuple)
            or len(layer_names) != len(block_channels)
            or not all(isinstance(name, str) and name for name in layer_names)
        ):
            raise ValueError(
                f"`layer_names` must name each of the {len(block_channels)} attention layers, got {layer_names!r}."
            )
        if layer_names is None and backbone != "stable_cascade":
            raise ValueError(f"A {backbone!r} adapter needs `layer_names`: build it with `UserAdapter.from_model`.")
        if ppd_diffusers_version is None:
            self.register_to_config(ppd_diffusers_version=_package_version())

        self.user_proj = nn.Linear(user_embed_dim, num_user_tokens * user_token_dim)
        self.user_norm = nn.LayerNorm(user_token_dim)
        self.to_k_user = nn.ModuleList(nn.Linear(user_token_dim, c, bias=False) for c in block_channels)
        self.to_v_user = nn.ModuleList(nn.Linear(user_token_dim, c, bias=False) for c in block_channels)
        for layer in self.to_v_user:
            nn.init.zeros_(layer.weight)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        user_embed_dim: int,
        num_user_tokens: int = 4,
        user_token_dim: int = 768,
        torch_dtype: torch.dtype = torch.float32,
    ) -> UserAdapter:
        """Builds an adapter for every personalized layer of ``model`` (same count, widths and heads), on
        ``model``'s device.

        Args:
            model: A Stage C ``StableCascadeUNet``, an SDXL ``UNet2DConditionModel`` or a
                ``FluxTransformer2DModel`` (see ``backbones`` for the layers each gets).
            user_embed_dim: Width of the incoming user embedding.
            num_user_tokens: User tokens produced per input embedding token.
            user_token_dim: Width of a user token.
            torch_dtype: The adapter's dtype. Keep float32 for training even with a bf16 model: bf16
                weights drop most AdamW updates at the learning rates PPD uses (1e-5).
        """
        backbone = backbone_of(model)
        layers = user_layers(model)
        if not layers:
            raise ValueError(f"The {backbone} model has no attention layer to personalize.")
        adapter = cls(
            user_embed_dim=user_embed_dim,
            block_channels=[layer.channels for layer in layers],
            block_heads=[layer.heads for layer in layers],
            num_user_tokens=num_user_tokens,
            user_token_dim=user_token_dim,
            backbone=backbone,
            layer_names=[layer.name for layer in layers],
        )
        if torch_dtype != adapter.dtype:
            adapter = adapter.to(dtype=torch_dtype)
        device = next(model.parameters()).device
        return adapter.to(device) if device != adapter.device else adapter

    @classmethod
    def from_unet(cls, unet: nn.Module, *args: Any, **kwargs: Any) -> UserAdapter:
        """``from_model`` under the name earlier releases used for Stage C."""
        return cls.from_model(unet, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> UserAdapter:
        """Loads an adapter saved with ``save_pretrained`` (a local folder or a Hub id), like ``ModelMixin``'s.

        Only safetensors weights are read: ``use_safetensors`` defaults to ``True`` here, so a folder holding
        nothing but a pickled ``.bin`` is refused rather than unpickled. Pass ``use_safetensors=False`` to
        accept a pickle you trust.

        Args:
            pretrained_model_name_or_path: A folder written by ``save_pretrained`` or a Hub repo id.
            **kwargs: As for ``diffusers.ModelMixin.from_pretrained`` (``subfolder``, ``revision``,
                ``torch_dtype``, ``variant``, ...).
        """
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        source = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
        if (os.path.isabs(source) or source.startswith((".", "~"))) and not os.path.isdir(source):
            # a path, not a Hub id: say so instead of diffusers' "could not connect to the Hub"
            raise FileNotFoundError(f"`pretrained_model_name_or_path` {source!r} is not a folder.")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Writes ``config.json`` and safetensors weights (see ``ModelMixin.save_pretrained``).

        The config records the ppd-diffusers release that saved the weights.
        """
        self.register_to_config(ppd_diffusers_version=_package_version())
        super().save_pretrained(save_directory, **kwargs)

    @property
    def layers(self) -> list[UserLayer]:
        """The personalized layers this adapter was built for (names are ``None`` for old Stage C adapters)."""
        names = self.config.layer_names or [None] * len(self.config.block_channels)
        return [
            UserLayer(name, channels, heads)
            for name, channels, heads in zip(names, self.config.block_channels, self.config.block_heads, strict=True)
        ]

    def check_model(self, model: nn.Module) -> None:
        """Raises ``ValueError`` naming both shapes if this adapter does not fit ``model`` (backbone kind, layer
        names, widths and heads)."""
        backbone = backbone_of(model)
        found = user_layers(model)
        expected = self.layers
        names = self.config.layer_names
        same_names = names is None or [layer.name for layer in found] == list(names)
        shapes = [(layer.channels, layer.heads) for layer in found]
        wanted = [(layer.channels, layer.heads) for layer in expected]
        if backbone != self.config.backbone or not same_names or shapes != wanted:
            detail = ""
            if not same_names and backbone == self.config.backbone:
                names = [(a.name, b.name) for a, b in zip(expected, found, strict=False) if a.name != b.name]
                detail = f" (its layer {names[0][0]!r} is {names[0][1]!r} in the model)" if names else ""
            raise ValueError(
                f"This `UserAdapter` was built for a {_KINDS[self.config.backbone]} with {_describe(wanted)}{detail}, "
                f"but the given model is a {_KINDS[backbone]} with {_describe(shapes)}. Build a matching adapter with "
                "`UserAdapter.from_model(model, ...)`."
            )

    def check_unet(self, unet: nn.Module) -> None:
        """``check_model`` under the name earlier releases used for Stage C."""
        self.check_model(unet)

    def attach(self, model: nn.Module) -> PersonalizedModel:
        """Checks that this adapter fits ``model`` and returns the ``PersonalizedModel`` running both.

        The model's weights are never changed. As peft does with its base models, this freezes ``model``
        (``requires_grad_(False)``) and keeps it in ``eval()``; for SDXL and Flux it installs the user attention
        processors (``user_attention_processor``). ``PersonalizedModel.detach()`` gives the model back as it was.
        """
        from .personalized_model import PersonalizedModel

        return PersonalizedModel.for_model(model, self)

    def project(self, user_embeds: torch.Tensor) -> torch.Tensor:
        """Maps ``(batch, tokens, user_embed_dim)`` (or ``(batch, user_embed_dim)``) embeddings to user
        tokens ``(batch, tokens * num_user_tokens, user_token_dim)``."""
        if user_embeds.ndim == 2:
            user_embeds = user_embeds.unsqueeze(1)
        if user_embeds.ndim != 3 or user_embeds.shape[-1] != self.config.user_embed_dim:
            raise ValueError(
                f"`user_embeds` must have shape (batch, tokens, {self.config.user_embed_dim}) to match this adapter's "
                f"`user_embed_dim`, got {tuple(user_embeds.shape)}."
            )
        batch_size, tokens, _ = user_embeds.shape
        tokens_out = self.user_proj(user_embeds.to(self.user_proj.weight))
        tokens_out = tokens_out.view(batch_size, tokens * self.config.num_user_tokens, self.config.user_token_dim)
        return self.user_norm(tokens_out)

    def forward(
        self, user_embeds: torch.Tensor, user_scale: float | torch.Tensor = 1.0, *, scale: Any = None
    ) -> UserKeyValues:
        """Computes every layer's user keys/values from user embeddings (once per generation or step).

        Args:
            user_embeds: ``(batch, tokens, user_embed_dim)`` or ``(batch, user_embed_dim)``; row ``b`` is the
                user of sample ``b`` (a batch of one serves the whole batch).
            user_scale: Weight of the user term, a float or a per-sample ``(batch,)`` tensor (0 switches a
                sample's user off); folded into the values here so the denoising steps need no multiply.
            scale: The deprecated name of ``user_scale`` (``FutureWarning``).

        Returns:
            A ``UserKeyValues`` with keys and values split into each layer's heads.
        """
        if scale is not None:  # the name of earlier releases
            warnings.warn("`scale` is deprecated: pass `user_scale` instead.", FutureWarning, stacklevel=2)
            user_scale = scale
        tokens = self.project(user_embeds)
        batch_size, length, _ = tokens.shape
        if isinstance(user_scale, torch.Tensor) and user_scale.ndim > 0:
            if user_scale.ndim != 1 or batch_size not in (1, user_scale.shape[0]):
                raise ValueError(
                    f"`user_scale` must be a float or a (batch,) tensor matching the {batch_size} users, "
                    f"got shape {tuple(user_scale.shape)}."
                )
            tokens = tokens.expand(user_scale.shape[0], -1, -1)
            batch_size = user_scale.shape[0]
            value_scale = user_scale.to(tokens).view(-1, 1, 1, 1)
        else:
            value_scale = user_scale

        def heads(layer: nn.Linear, num_heads: int) -> torch.Tensor:
            return layer(tokens).view(batch_size, length, num_heads, -1).transpose(1, 2)

        block_heads = self.config.block_heads
        keys = tuple(heads(layer, h) for layer, h in zip(self.to_k_user, block_heads, strict=True))
        values = tuple(heads(layer, h) for layer, h in zip(self.to_v_user, block_heads, strict=True))
        if not (isinstance(value_scale, float | int) and value_scale == 1):
            values = tuple(v * value_scale for v in values)
        return UserKeyValues(keys=keys, values=values, user_scale=user_scale)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _package_version() -> str:
    from . import __version__

    return __version__
