"""``nn.MultiheadAttention``: the four projections are linear maps at positions.

The query, key and value projections (packed in ``in_proj_weight`` or separate
``q/k/v_proj_weight``) and ``out_proj`` — which attention calls functionally, never as a
module — are each ``Σ_t g_t a_tᵀ`` over the positions of a sequence. The rule recomputes
the attention of every recorded call from its inputs, checks that it reproduces the
module's output, and backpropagates the columns' gradients to the projections' outputs
(and to the learned ``bias_k`` / ``bias_v`` key and value). Supports ``batch_first`` either
way, ``key_padding_mask``, ``attn_mask`` (boolean or additive, 2-D or per head),
``is_causal``, ``need_weights`` and head-averaged or per-head weights, ``add_bias_kv``,
``add_zero_attn`` and separate key/value sizes. Dropout is off (the fit runs in eval mode).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from laplacefim.curvature.hooks import Call, column_grads
from laplacefim.curvature.segments import Product, Segment
from laplacefim.curvature.segments.product import stack_positions


def attention_claims(module: nn.Module) -> tuple[str, ...]:
    """The module's own parameters and those of ``out_proj``."""
    own = tuple(name for name, _ in module.named_parameters(recurse=False))
    projection: nn.Module = module.get_submodule("out_proj")
    return own + tuple(f"out_proj.{name}" for name, _ in projection.named_parameters())


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype.is_floating_point:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def _batch_first(value: Tensor, batch_first: bool) -> Tensor:
    return value if batch_first else value.transpose(0, 1)


def _option(call: Call, index: int, name: str, default: Any) -> Any:
    value = call.arg(index, name)
    return default if value is None else value


class _Attention:
    """One recorded call, recomputed from its projected queries, keys and values."""

    def __init__(self, module: nn.MultiheadAttention, call: Call) -> None:
        first = module.batch_first
        self.module = module
        self.query = _batch_first(call.arg(0, "query"), first)
        self.key = _batch_first(call.arg(1, "key"), first)
        self.value = _batch_first(call.arg(2, "value"), first)
        if self.query.shape[0] != call.batch:
            raise ValueError(
                f"MultiheadAttention(batch_first={first}) got a query of shape "
                f"{tuple(call.arg(0, 'query').shape)} for a batch of {call.batch}."
            )
        dtype = self.query.dtype
        self.key_padding_mask = _float_mask(call.arg(3, "key_padding_mask"), dtype)
        self.need_weights = bool(_option(call, 4, "need_weights", True))
        self.attn_mask = _float_mask(call.arg(5, "attn_mask"), dtype)
        self.average = bool(_option(call, 6, "average_attn_weights", True))
        self.is_causal = bool(_option(call, 7, "is_causal", False))

    def projections(self) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` ``(B, L|S, E)`` from the module's weights, detached."""
        m = self.module
        e = m.embed_dim
        bias = m.in_proj_bias.detach() if m.in_proj_bias is not None else None
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(e)
        if m._qkv_same_embed_dim:
            w_q, w_k, w_v = m.in_proj_weight.detach().split(e)
        else:
            w_q, w_k, w_v = (
                m.q_proj_weight.detach(),
                m.k_proj_weight.detach(),
                m.v_proj_weight.detach(),
            )
        with torch.no_grad():
            return (
                F.linear(self.query, w_q, b_q),
                F.linear(self.key, w_k, b_k),
                F.linear(self.value, w_v, b_v),
            )

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Context ``(B, L, E)``, output ``(B, L, E)`` and attention weights."""
        m = self.module
        batch, length, e = q.shape
        heads, head = m.num_heads, e // m.num_heads
        mask = self.attn_mask
        padding = self.key_padding_mask
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(batch, heads, *mask.shape[1:])
        if self.add_zero:
            k = torch.cat([k, k.new_zeros(batch, 1, e)], 1)
            v = torch.cat([v, v.new_zeros(batch, 1, e)], 1)
        extra = k.shape[1] - self.key.shape[1]  # appended bias_k / zero-attention positions
        if mask is not None and extra:
            mask = F.pad(mask, (0, extra))
        if padding is not None and extra:
            padding = F.pad(padding, (0, extra))

        def split(x: Tensor) -> Tensor:
            return x.reshape(batch, x.shape[1], heads, head).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head)
        if mask is not None:
            scores = scores + mask if mask.dim() == 4 else scores + mask[None]
        elif self.is_causal:
            causal = torch.ones(length, k.shape[1], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, -math.inf)
        if padding is not None:
            scores = scores + padding[:, None, None, :]
        weights = scores.softmax(-1)
        context = (weights @ split(v)).transpose(1, 2).reshape(batch, length, e)
        out = F.linear(context, m.out_proj.weight.detach(), _detached(m.out_proj.bias))
        return context, out, weights.mean(1) if self.average else weights

    @property
    def add_zero(self) -> bool:
        return bool(self.module.add_zero_attn)


def _detached(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach()


def _one_call(module: nn.MultiheadAttention, call: Call) -> dict[str, list[Product]]:
    attention = _Attention(module, call)
    first = module.batch_first
    recorded = _batch_first(call.outputs[0], first)
    g_out = call.grads[0] if first else call.grads[0].transpose(1, 2)
    q, k, v = (t.requires_grad_() for t in attention.projections())
    batch = q.shape[0]
    with torch.enable_grad():
        leaves = [q, k, v]
        keys, values = k, v
        if module.bias_k is not None and module.bias_v is not None:
            bias_k = module.bias_k.detach().reshape(1, 1, -1).expand(batch, 1, -1).clone()
            bias_v = module.bias_v.detach().reshape(1, 1, -1).expand(batch, 1, -1).clone()
            leaves += [bias_k.requires_grad_(), bias_v.requires_grad_()]
            keys, values = torch.cat([k, bias_k], 1), torch.cat([v, bias_v], 1)
        context, out, weights = attention.forward(q, keys, values)
        tolerance = 1e-4 if out.dtype == torch.float64 else 5e-2
        scale = float(recorded.detach().abs().max().clamp_min(1e-30))
        if float((out.detach() - recorded.detach()).abs().max()) > tolerance * scale:
            raise ValueError(
                "the attention rule does not reproduce this MultiheadAttention call (an option "
                "it does not cover); leave the module's parameters out of the subset."
            )
        outputs, cotangents = [out], [g_out]
        if attention.need_weights and len(call.grads) > 1:
            outputs.append(weights)
            cotangents.append(call.grads[1])
        grads = column_grads(outputs, leaves, cotangents)
    g_q, g_k, g_v, *g_bias = (
        torch.zeros_like(leaf).expand(g_out.shape[0], *leaf.shape) if g is None else g
        for leaf, g in zip(leaves, grads, strict=True)
    )
    shared: dict[object, Tensor] = {}  # factors shared by the call's products
    q_in, k_in, v_in = attention.query, attention.key, attention.value
    products = {
        "q": Product(q_in, g_q, False, shared, sole_inputs=False),
        "k": Product(k_in, g_k, False, shared, sole_inputs=False),
        "v": Product(v_in, g_v, False, shared, sole_inputs=False),
    }
    rows: dict[str, list[Product]] = {
        "in_proj_weight": [products["q"], products["k"], products["v"]],
        "q_proj_weight": [products["q"]],
        "k_proj_weight": [products["k"]],
        "v_proj_weight": [products["v"]],
        "in_proj_bias": [
            Product(None, g_q, False, shared),
            Product(None, g_k, False, shared),
            Product(None, g_v, False, shared),
        ],
        "out_proj.weight": [Product(context.detach(), g_out, False, shared)],
        "out_proj.bias": [Product(None, g_out, False, shared)],
    }
    if g_bias:  # one appended key / value position each: (V, B, 1, E)
        rows["bias_k"] = [Product(None, g_bias[0])]
        rows["bias_v"] = [Product(None, g_bias[1])]
    return rows


def attention_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """Segments of the wanted projections; several calls stack as more positions."""
    mha: nn.MultiheadAttention = module  # type: ignore[assignment]
    per_call = [_one_call(mha, call) for call in calls]
    out: dict[str, list[Segment]] = {}
    for name in wanted:
        parts = [rows[name] for rows in per_call]
        out[name] = [stack_positions(list(p)) for p in zip(*parts, strict=True)]
    return out
