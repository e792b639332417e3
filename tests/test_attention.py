"""`decoupled_attention` against the formula written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from hypothesis import given, settings
from hypothesis import strategies as st

from ppd_diffusers import decoupled_attention


def _by_hand(attn, x, ctx, user_k, user_v, scale):
    """softmax(Q K^T / sqrt d) V + scale * softmax(Q K'^T / sqrt d) V', head by head, then to_out."""
    b, c, h, w = x.shape
    tokens = x.view(b, c, h * w).transpose(1, 2).double()
    ctx = ctx.double()
    weight = {name: getattr(attn, name).weight.double() for name in ("to_q", "to_k", "to_v")}
    bias = {name: getattr(attn, name).bias.double() for name in ("to_q", "to_k", "to_v")}
    q = tokens @ weight["to_q"].T + bias["to_q"]
    k = ctx @ weight["to_k"].T + bias["to_k"]
    v = ctx @ weight["to_v"].T + bias["to_v"]
    heads, d = attn.heads, c // attn.heads
    out = torch.zeros_like(q)
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        base = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1) @ v[..., sl]
        uk, uv = user_k[:, head].double(), user_v[:, head].double()
        user = torch.softmax(q[..., sl] @ uk.transpose(1, 2) / math.sqrt(d), dim=-1) @ uv
        out[..., sl] = base + scale.view(-1, 1, 1) * user
    out = out @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
    return out.transpose(1, 2).reshape(b, c, h, w)


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    user_tokens=st.integers(1, 5),
    scale=st.floats(-2.0, 2.0),
    per_sample=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_the_formula(heads, user_tokens, scale, per_sample, seed):
    torch.manual_seed(seed)
    channels = 8
    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads, bias=True).eval()
    x, ctx = torch.randn(2, channels, 3, 2), torch.randn(2, 6, channels)
    user_k = torch.randn(2, heads, user_tokens, channels // heads)
    user_v = torch.randn(2, heads, user_tokens, channels // heads)
    s = torch.tensor([scale, 0.5 * scale]) if per_sample else scale
    with torch.no_grad():
        scale = torch.as_tensor(s).reshape(-1, 1, 1, 1) if per_sample else s
        got = decoupled_attention(attn, x, ctx, user_k, scale * user_v)  # the scale is folded into V'

    torch.testing.assert_close(got.double(), _by_hand(attn, x, ctx, user_k, user_v, s), rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 3), one_user=st.booleans(), grad=st.booleans(), seed=st.integers(0, 10_000))
def test_user_rows_get_the_formula_and_the_other_rows_the_base_attention(rows, one_user, grad, seed):
    """Row slicing, with gradients (a copy) and without (an in-place add): rows past `user_rows` get no user."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=8, heads=2, dim_head=4, bias=True).eval()
    x, ctx = torch.randn(3, 8, 2, 2), torch.randn(3, 5, 8)
    users = 1 if one_user else rows
    user_k, user_v = torch.randn(users, 2, 4, 4), torch.randn(users, 2, 4, 4)
    with torch.set_grad_enabled(grad):
        got = decoupled_attention(attn, x, ctx, user_k, user_v, user_rows=rows)
    # by hand: every row has user keys/values, with scale 1 on the first `rows` rows and 0 after them
    full_k, full_v = (t.expand(3, -1, -1, -1) if one_user else torch.cat([t, t.new_zeros(3 - rows, 2, 4, 4)])
                      for t in (user_k, user_v))  # fmt: skip
    scale = torch.tensor([1.0] * rows + [0.0] * (3 - rows))
    torch.testing.assert_close(got.double(), _by_hand(attn, x, ctx, full_k, full_v, scale), rtol=1e-4, atol=1e-5)


def test_bad_user_rows_raise_clear_errors():
    attn = Attention(query_dim=8, heads=2, dim_head=4, bias=True).eval()
    x, ctx, k = torch.randn(3, 8, 2, 2), torch.randn(3, 5, 8), torch.randn(2, 2, 4, 4)
    for rows, message in (
        (4, "batch size 3.*got 4"),
        (-1, "got -1"),
        (slice(0, 3, 2), "consecutive rows, got slice"),
        (3, "one per user row \\(3 of the batch of 3\\), got 2 rows"),
    ):
        with pytest.raises(ValueError, match=message):
            decoupled_attention(attn, x, ctx, k, k, user_rows=rows)
