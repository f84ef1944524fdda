"""``nn.Embedding``: the weight gradient puts ``g_t`` in the row of token ``t``."""

from __future__ import annotations

from torch import nn

from laplacefim.curvature.hooks import Call
from laplacefim.curvature.rules.base import batched, check_batch_first
from laplacefim.curvature.segments import Segment, Tokens, join


def embedding_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """Token indices ``(B, T)`` (any index shape, broadcast ids expanded) and row gradients.

    Raises:
        ValueError: For ``scale_grad_by_freq=True`` (the gradient then depends on the other
            data in the batch, so no per-datum curvature exists).
    """
    emb: nn.Embedding = module  # type: ignore[assignment]
    if emb.scale_grad_by_freq:
        raise ValueError(
            "nn.Embedding(scale_grad_by_freq=True) scales each gradient by token counts of the "
            "whole batch, so it has no per-datum curvature; leave its weight out of the subset."
        )
    tokens, grads = [], []
    for call in calls:
        out = check_batch_first(module, call)
        ids = batched(call.arg(0, "input"), call)
        tokens.append(ids.reshape(out.shape[0], -1))
        g = call.grads[0]
        grads.append(g.reshape(g.shape[0], out.shape[0], -1, g.shape[-1]))
    ids = join(tokens, 1)
    g = join(grads, 2)
    if emb.padding_idx is not None:
        g = g * (ids != emb.padding_idx)[None, :, :, None].to(g.dtype)
    if "weight" not in wanted:
        return {}
    return {"weight": [Tokens(ids, g, emb.num_embeddings, emb.padding_idx)]}
