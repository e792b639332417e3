"""User attention processors for diffusers ``Attention`` layers (SDXL and Flux), IP-Adapter style.

``install_user_processors(model, adapter)`` wraps the processor of every layer the adapter personalizes (see
``backbones.user_layers``) and leaves every other processor as it was. The user keys/values reach the layers as
an *argument*: the model's ``cross_attention_kwargs`` (SDXL) or ``joint_attention_kwargs`` (Flux) carry
``{USER_KV_KWARG: adapter(user_embeds)}``, computed once per generation. An argument rather than state on the
processors keeps gradient checkpointing right: a recomputed block sees the user it ran with.

A wrapped layer without a user in the call runs its original processor, so a model with processors installed
equals the base model bit for bit whenever no user is given. With a user:

- **SDXL** (``UNet2DConditionModel``'s ``attn2``): ``Z' = softmax(Q K^T) V + softmax(Q K'^T) (scale V')``,
  both summed before the output projection. Over diffusers' default ``AttnProcessor2_0`` (no masks or norms in
  the layer) this runs ``decoupled_attention``, whose base term uses exactly that processor's operations, so a
  zero ``V'`` (a fresh adapter, scale 0) gives the base output bit for bit.
- **Flux** (the double-stream blocks' joint attention): the *image* tokens' queries (after ``norm_q``, before the
  rotary embedding: user tokens have no position) attend to the user tokens in a separate softmax; the result is
  added to the image stream's attention output before ``to_out``, so it passes the block's gate like the joint
  attention does. The text stream and the single-stream blocks are left alone: the text tokens carry the prompt,
  and in the single-stream blocks text and image share one stream (Flux IP-Adapters stop at the same place).
- **Any other processor** (an IP-Adapter's, a custom one): the original processor runs, then the user term is
  added through the output projection without its bias, ``out + (proj(u) - proj(0)) / rescale`` with
  ``u = softmax(Q K'^T) V'``, which is the same sum since the projection is affine (a LoRA on it included), at
  the cost of computing ``Q`` and projecting the user rows a second time.

diffusers warns once per layer and call about attention kwargs a processor does not take; the untouched layers
(SDXL's self-attention, Flux's single-stream blocks) are handed ``USER_KV_KWARG`` too, so a logging filter drops
exactly those warnings about this one key.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import add_user_rows, decoupled_attention, user_row_slice

if TYPE_CHECKING:
    from .adapter import UserKeyValues

__all__ = [
    "USER_KV_KWARG",
    "FluxUserAttnProcessor",
    "UserAttnProcessor",
    "install_user_processors",
    "remove_user_processors",
    "runs_user_processors",
    "user_processor_layers",
]

USER_KV_KWARG = "ppd_user_kv"


class _UserKwargWarningFilter(logging.Filter):
    """Drops diffusers' "kwargs [...] are not expected" warning when the user key/values are the only such kwarg."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"attention_kwargs ['{USER_KV_KWARG}'] are not expected" not in record.getMessage()


_FILTER = _UserKwargWarningFilter()
_FILTERED_LOGGERS = ("diffusers.models.attention_processor", "diffusers.models.transformers.transformer_flux")


def _quiet_user_kwarg_warnings() -> None:
    for name in _FILTERED_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class _WrappingProcessor(nn.Module):
    """A processor that adds the user term of layer ``layer_index`` to the result of ``base``.

    An ``nn.Module`` (without weights of its own: they live in the ``UserAdapter``) so that a wrapped processor
    that has weights, such as an IP-Adapter's, stays a submodule of its layer and moves with the model.
    """

    def __init__(self, base: Any, layer_index: int):
        super().__init__()
        self.base = base
        self.layer_index = layer_index
        self._base_parameters = set(inspect.signature(base.__call__).parameters)

    # diffusers' `set_attention_backend` sets these on every processor: the wrapped one must see them too
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.base, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.base._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.base, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.base._parallel_config = value

    def _run_base(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k in self._base_parameters}
        return self.base(attn, *args, **kwargs)

    def _user_tensors(self, user_kv: UserKeyValues, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, slice]:
        rows = user_row_slice(user_kv.rows, batch_size)
        return user_kv.keys[self.layer_index], user_kv.values[self.layer_index], rows

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, base={type(self.base).__name__}"


def _user_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: slice) -> torch.Tensor:
    """``softmax(Q K'^T / sqrt d) V'`` for the user rows of ``query`` ``(batch, heads, tokens, head_dim)``."""
    count = rows.stop - rows.start
    if key.shape[0] not in (1, count):
        raise ValueError(
            f"`{USER_KV_KWARG}` holds {key.shape[0]} users for {count} rows with a user: pass one user per row or "
            "one for all of them."
        )
    key, value = (t.to(query.dtype).expand(count, -1, -1, -1) for t in (key, value))
    user_query = query if count == query.shape[0] else query[rows]
    return F.scaled_dot_product_attention(user_query, key, value, dropout_p=0.0, is_causal=False)


def _through_output_projection(attn: nn.Module, user_out: torch.Tensor) -> torch.Tensor:
    """The user term carried through the layer's output projection without its bias: ``proj(u) - proj(0)``.

    The projection module itself runs (not its ``weight``), so a LoRA on ``to_out``, a quantized layer or an
    offload hook act on the user term as on the rest of the attention output.
    """
    flat = user_out.transpose(1, 2).flatten(2)
    projection = attn.to_out[0]
    return projection(flat) - projection(flat.new_zeros(1, 1, flat.shape[-1]))


class UserAttnProcessor(_WrappingProcessor):
    """User attention for a diffusers ``Attention`` cross-attention layer (SDXL's ``attn2``), around its processor.

    Args:
        base: The layer's processor before installation; it runs alone when a call has no user.
        layer_index: The layer's index in the adapter's keys/values.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
        ppd_user_kv: UserKeyValues | None = None,
    ) -> torch.Tensor:
        extra = dict(temb=temb, ip_adapter_masks=ip_adapter_masks)
        if ppd_user_kv is None:
            return self._run_base(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        key, value, rows = self._user_tensors(ppd_user_kv, hidden_states.shape[0])
        if self._is_plain(attn, encoder_hidden_states, attention_mask, temb):
            user_rows = rows if rows.stop > rows.start else 0
            return decoupled_attention(attn, hidden_states, encoder_hidden_states, key, value, user_rows)
        out = self._run_base(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if rows.stop == rows.start:
            return out
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        user_out = _through_output_projection(attn, _user_attention(query, key, value, rows))
        return add_user_rows(out, (user_out / attn.rescale_output_factor).to(out.dtype), rows)

    def _is_plain(self, attn: nn.Module, encoder_hidden_states: Any, attention_mask: Any, temb: Any) -> bool:
        """Whether the layer is what ``decoupled_attention`` reproduces: ``AttnProcessor2_0`` on a plain layer."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        return (
            type(self.base) is AttnProcessor2_0
            and encoder_hidden_states is not None
            and attention_mask is None
            and temb is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and attn.norm_cross is None
            and attn.norm_q is None
            and attn.norm_k is None
            and not attn.residual_connection
        )


class FluxUserAttnProcessor(_WrappingProcessor):
    """User attention for the joint attention of a Flux double-stream block, around its processor.

    Args:
        base: The layer's processor before installation (``FluxAttnProcessor`` or an IP-Adapter's).
        layer_index: The layer's index in the adapter's keys/values.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
        ppd_user_kv: UserKeyValues | None = None,
    ) -> Any:
        inputs = (hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        extra = dict(ip_hidden_states=ip_hidden_states, ip_adapter_masks=ip_adapter_masks)
        if ppd_user_kv is None:
            return self._run_base(attn, *inputs, **extra)
        key, value, rows = self._user_tensors(ppd_user_kv, hidden_states.shape[0])
        if self._is_plain(attn, encoder_hidden_states):
            return self._joint_attention_with_user(attn, *inputs, key, value, rows)
        outputs = self._run_base(attn, *inputs, **extra)
        if rows.stop == rows.start:
            return outputs
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
        user_out = _through_output_projection(attn, _user_attention(query, key, value, rows))
        image_out = outputs[0] if isinstance(outputs, tuple) else outputs
        image_out = add_user_rows(image_out, user_out.to(image_out.dtype), rows)
        return (image_out, *outputs[1:]) if isinstance(outputs, tuple) else image_out

    def _is_plain(self, attn: nn.Module, encoder_hidden_states: Any) -> bool:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return (
            type(self.base) is FluxAttnProcessor
            and encoder_hidden_states is not None
            and attn.added_kv_proj_dim is not None
            and not getattr(attn, "fused_projections", False)
        )

    def _joint_attention_with_user(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_rotary_emb: Any,
        user_key: torch.Tensor,
        user_value: torch.Tensor,
        rows: slice,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``FluxAttnProcessor``'s joint attention, step for step, with the image queries' user term added."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        def split(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(split(attn.to_q(hidden_states)))
        key = attn.norm_k(split(attn.to_k(hidden_states)))
        value = split(attn.to_v(hidden_states))
        image_query = query
        text_query = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
        text_key = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
        text_value = split(attn.add_v_proj(encoder_hidden_states))
        query = torch.cat([text_query, query], dim=1)
        key = torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )  # fmt: skip
        out = out.flatten(2, 3).to(query.dtype)
        text_out, image_out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        if rows.stop > rows.start:
            user_out = _user_attention(image_query.transpose(1, 2), user_key, user_value, rows)
            user_out = user_out.transpose(1, 2).flatten(2).to(image_out.dtype)
            image_out = add_user_rows(image_out.contiguous(), user_out, rows)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def install_user_processors(model: nn.Module, layer_names: list[str]) -> None:
    """Wraps the processor of each layer in ``layer_names`` (an adapter's ``config.layer_names``, in its order)
    with a user processor; every other layer keeps its processor. Installing again re-wraps the current ones."""
    from .backbones import backbone_of

    processor_class = FluxUserAttnProcessor if backbone_of(model) == "flux" else UserAttnProcessor
    model = getattr(model, "_orig_mod", model)
    for index, name in enumerate(layer_names):
        attn = model.get_submodule(name)
        base = attn.processor.base if isinstance(attn.processor, _WrappingProcessor) else attn.processor
        attn.set_processor(processor_class(base, index))
    _quiet_user_kwarg_warnings()


def remove_user_processors(model: nn.Module) -> None:
    """Puts back the processor each user processor of ``model`` wraps."""
    for _, module in user_processor_layers(model):
        module.set_processor(module.processor.base)


def runs_user_processors(layers: list[nn.Module]) -> bool:
    """Whether every one of ``layers`` (attention modules) still runs a user processor: diffusers methods such as
    ``set_attn_processor`` or ``load_ip_adapter`` replace processors, and so does another model's ``detach``."""
    return all(isinstance(getattr(layer, "processor", None), _WrappingProcessor) for layer in layers)


def user_processor_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer of ``model`` running a user processor."""
    model = getattr(model, "_orig_mod", model)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "processor", None), _WrappingProcessor)
    ]
