"""Decoupled user cross-attention: the maths that adds a user's tokens beside the base attention.

For an attention layer with queries ``Q`` and base keys/values ``K, V``, PPD adds a second attention
over the user tokens with its own keys and values ``K' = u W_k'`` and ``V' = u W_v'``::

    Z' = softmax(Q K^T / sqrt(d)) V + scale * softmax(Q K'^T / sqrt(d)) V'

Both terms are summed *before* the layer's output projection, as in IP-Adapter. ``scale`` is folded
into ``V'`` beforehand (``scale * softmax(Q K'^T) V' = softmax(Q K'^T) (scale * V')``), once per
generation rather than at every step. The base term is computed with exactly the operations of
diffusers' default ``AttnProcessor2_0``, so a zero ``V'`` (the adapter's initial state, or scale 0)
reproduces the base layer bit for bit.

Rows without a user (the negative and text-only rows of a guided sampling step) skip the user term
altogether: ``user_rows`` says which rows of the batch have one (how many leading rows, or a slice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

__all__ = ["decoupled_attention", "user_row_slice"]


def user_row_slice(user_rows: int | slice | None, batch_size: int) -> slice:
    """The rows of a batch of ``batch_size`` that have a user: all (``None``), the first ``n`` (an int) or a slice
    (e.g. ``slice(b, None)``: the conditional half of a ``[negative, positive]`` guidance batch), with concrete
    bounds. Raises ``ValueError`` for rows outside the batch or a stepped slice.

    Examples:
        >>> user_row_slice(None, 4), user_row_slice(2, 4), user_row_slice(slice(2, None), 4)
        (slice(0, 4, None), slice(0, 2, None), slice(2, 4, None))
    """
    if user_rows is None:
        return slice(0, batch_size)
    if isinstance(user_rows, slice):
        start, stop, step = user_rows.indices(batch_size)
        if step == 1 and 0 <= start <= stop <= batch_size:
            return slice(start, stop)
    elif isinstance(user_rows, int) and not isinstance(user_rows, bool) and 0 <= user_rows <= batch_size:
        return slice(0, user_rows)
    raise ValueError(
        f"`user_rows` must be None, a number of leading rows between 0 and the batch size {batch_size}, or a slice "
        f"of consecutive rows, got {user_rows!r}."
    )


def add_user_rows(out: torch.Tensor, user_out: torch.Tensor, rows: slice) -> torch.Tensor:
    """``out`` with ``user_out`` added to its ``rows`` (dim 0): in place when sampling, out of place for autograd."""
    if rows.stop - rows.start == out.shape[0]:
        return out + user_out
    if torch.is_grad_enabled():  # the attention's backward keeps `out`: no in-place update
        return torch.cat([out[: rows.start], out[rows] + user_out, out[rows.stop :]])
    out[rows] += user_out  # sampling: add where the user rows are, no copy of the other rows
    return out


def _split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch_size, length, inner_dim = tensor.shape
    return tensor.view(batch_size, length, heads, inner_dim // heads).transpose(1, 2)


def _batch_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with ``rows`` rows: a batch of one (one user for every row) is expanded, not copied."""
    return tensor.expand(rows, -1, -1, -1) if tensor.shape[0] != rows else tensor


def decoupled_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    user_key: torch.Tensor | None = None,
    user_value: torch.Tensor | None = None,
    user_rows: int | slice | None = None,
) -> torch.Tensor:
    """Runs ``attn`` on ``hidden_states`` with an extra, separately normalised user attention.

    Args:
        attn: A diffusers ``Attention`` module without group/spatial/q-k norms, masks or residual
            (the configuration ``SDCascadeAttnBlock`` uses). Its ``to_q``/``to_k``/``to_v``/``to_out``
            weights are used as they are.
        hidden_states: Queries, ``(batch, channels, height, width)`` or ``(batch, tokens, channels)``.
        encoder_hidden_states: Base keys/values source, ``(batch, context_tokens, channels)``.
        user_key: User keys already split into heads, ``(batch, heads, user_tokens, head_dim)``;
            ``None`` skips the user term.
        user_value: User values, same shape as ``user_key``, with the user scale already applied. A batch
            of one serves every row that has a user.
        user_rows: Which rows of the batch have a user: ``None`` (all), how many leading rows, or a slice (see
            ``user_row_slice``). The other rows get the base attention alone, without computing a user term.

    Returns:
        The attention output, same shape as ``hidden_states``.

    Examples:
        >>> import torch
        >>> from diffusers.models.attention_processor import Attention
        >>> attn = Attention(query_dim=8, heads=2, dim_head=4, bias=True)
        >>> x, ctx = torch.randn(1, 8, 2, 2), torch.randn(1, 3, 8)
        >>> k = v = torch.zeros(1, 2, 5, 4)
        >>> torch.equal(decoupled_attention(attn, x, ctx, k, v), attn(x, encoder_hidden_states=ctx))
        True
    """
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size = encoder_hidden_states.shape[0]

    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    query, key, value = (_split_heads(t, attn.heads) for t in (query, key, value))

    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    if user_key is not None:
        rows = user_row_slice(user_rows, batch_size)
        count = rows.stop - rows.start
        if user_key.shape[0] not in (1, count):
            raise ValueError(
                f"`user_key` must hold 1 row or one per user row ({count} of the batch of {batch_size}), got "
                f"{user_key.shape[0]} rows."
            )
        if count > 0:
            user_key, user_value = (_batch_rows(t.to(query.dtype), count) for t in (user_key, user_value))
            user_query = query if count == batch_size else query[rows]
            user_out = F.scaled_dot_product_attention(user_query, user_key, user_value, dropout_p=0.0, is_causal=False)
            out = add_user_rows(out, user_out, rows)

    out = out.transpose(1, 2).reshape(batch_size, -1, out.shape[1] * out.shape[-1])
    out = out.to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
    return out / attn.rescale_output_factor
