"""Per-layer rules: curvature statistics from a layer's inputs and output gradients.

For a layer whose weight gradient is ``Σ_t g_t a_tᵀ`` (``nn.Linear``, ``nn.Conv2d`` with
unfolded patches) the rule needs inputs ``a`` of shape ``(B, T, d_in)`` and output
gradients ``g`` of shape ``(V, B, T, d_out)``: ``V`` backpropagated columns, ``T`` positions
that share the weight. Nothing here builds a ``(V, B, P)`` Jacobian except where the
quantity asked for needs per-sample gradients (the full structure, and the exact diagonal
of a weight shared over positions, computed in bounded chunks).

Any other module's parameters are handled by :class:`GenericRule`, which takes per-sample
gradients of that module alone with ``torch.func``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from laplacefim.curvature.hooks import Call

# Upper bound on elements of a per-sample gradient chunk (V_chunk · B · p); keeps memory bounded.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Rows:
    """A layer's inputs and output gradients for one batch.

    Attributes:
        inputs: ``(B, T, d_in)`` inputs (dense layers) or ``(B, T)`` token indices (Embedding).
        grads: ``(V, B, T, d_out)`` gradients of the columns w.r.t. the layer's outputs.
    """

    inputs: Tensor
    grads: Tensor


def _v_chunks(n_columns: int, per_column: int) -> int:
    return max(1, min(n_columns, CHUNK_ELEMENTS // max(per_column, 1)))


class DenseInputRule:
    """``nn.Linear`` and ``nn.Conv2d`` (groups=1): weight gradient ``Σ_t g_t a_tᵀ``."""

    def rows(self, module: nn.Module, calls: list[Call], grads: list[Tensor]) -> Rows:
        """Stack all calls of the layer along the position axis."""
        inputs = [self._inputs(module, call) for call in calls]
        outs = [self._grads(module, g) for g in grads]
        return Rows(torch.cat(inputs, dim=1), torch.cat(outs, dim=2))

    def _inputs(self, module: nn.Module, call: Call) -> Tensor:
        x = call.args[0] if call.args else call.kwargs["input"]
        if isinstance(module, nn.Linear):
            if x.ndim < 2:
                raise ValueError(f"nn.Linear got an unbatched input of shape {tuple(x.shape)}.")
            return x.reshape(x.shape[0], -1, x.shape[-1])
        conv: nn.Conv2d = module  # type: ignore[assignment]
        if x.ndim != 4:
            raise ValueError(f"nn.Conv2d needs batched (B, C, H, W) inputs, got {tuple(x.shape)}.")
        padding: Any = conv.padding
        if isinstance(padding, str) or conv.padding_mode != "zeros":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        patches = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)
        return patches.transpose(1, 2)

    def _grads(self, module: nn.Module, g: Tensor) -> Tensor:
        if isinstance(module, nn.Linear):
            return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
        return g.flatten(3).transpose(2, 3)

    def diag(self, rows: Rows, local: str) -> Tensor:
        """Exact diagonal of ``Σ_{v,n} vec(∇_n)vec(∇_n)ᵀ`` for ``weight`` or ``bias``."""
        a, g = rows.inputs, rows.grads
        n_columns, batch, positions, d_out = g.shape
        if local == "bias":
            return g.sum(2).square().sum((0, 1))
        if positions == 1:
            return g[:, :, 0].square().sum(0).T @ a[:, 0].square()
        total = a.new_zeros(d_out, a.shape[-1])
        step = _v_chunks(n_columns, batch * total.numel())
        for start in range(0, n_columns, step):
            per_sample = torch.einsum("vbto,bti->vboi", g[start : start + step], a)
            total += per_sample.square().sum((0, 1))
        return total

    def output_factor(self, rows: Rows) -> Tensor:
        """``G = Σ_{v,n,t} g gᵀ``, the output-gradient Kronecker factor."""
        g = rows.grads.reshape(-1, rows.grads.shape[-1])
        return g.T @ g

    def kron(self, rows: Rows) -> list[Tensor]:
        """State ``[G, A, count]`` of the weight's Kronecker block ``(G ⊗ A) / count``."""
        a = rows.inputs.reshape(-1, rows.inputs.shape[-1])
        count = a.new_full((), float(a.shape[0]))  # a fill kernel, not a host-to-device copy
        return [self.output_factor(rows), a.T @ a, count]

    def per_sample(self, rows: Rows, local: str) -> Tensor:
        """Per-sample, per-column gradients ``(V, B, p)``."""
        if local == "bias":
            return rows.grads.sum(2)
        per_sample = torch.einsum("vbto,bti->vboi", rows.grads, rows.inputs)
        return per_sample.flatten(2)


class EmbeddingRule:
    """``nn.Embedding``: the weight gradient puts ``g_t`` in the row of token ``t``."""

    def rows(self, module: nn.Module, calls: list[Call], grads: list[Tensor]) -> Rows:
        """Token indices ``(B, T)`` and output gradients ``(V, B, T, dim)``; padding masked."""
        emb: nn.Embedding = module  # type: ignore[assignment]
        tokens = torch.cat(
            [
                (c.args[0] if c.args else c.kwargs["input"]).reshape(c.output.shape[0], -1)
                for c in calls
            ],
            1,
        )
        g = torch.cat([gr.reshape(gr.shape[0], gr.shape[1], -1, gr.shape[-1]) for gr in grads], 2)
        if emb.padding_idx is not None:
            g = g * (tokens != emb.padding_idx)[None, :, :, None].to(g.dtype)
        return Rows(tokens, g)

    def _per_sample_rows(self, rows: Rows, num: int) -> tuple[Tensor, Tensor]:
        """Gradients summed over equal tokens of a sample ``(V, U, dim)``; their tokens ``(U,)``."""
        tokens, g = rows.inputs, rows.grads
        batch, positions = tokens.shape
        keys = torch.arange(batch, device=tokens.device)[:, None] * num + tokens
        unique, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        sums = g.new_zeros(g.shape[0], unique.numel(), g.shape[-1])
        sums.index_add_(1, inverse, g.reshape(g.shape[0], batch * positions, -1))
        return sums, unique % num

    def diag(self, rows: Rows, module: nn.Embedding) -> Tensor:
        """Exact diagonal ``(num, dim)``."""
        sums, token = self._per_sample_rows(rows, module.num_embeddings)
        out = sums.new_zeros(module.num_embeddings, sums.shape[-1])
        return out.index_add_(0, token, sums.square().sum(0))

    def kron(self, rows: Rows, module: nn.Embedding) -> list[Tensor]:
        """State ``[diag(token counts), G, count]`` of the block ``(A ⊗ G) / count``."""
        tokens, g = rows.inputs.reshape(-1), rows.grads
        counts = torch.bincount(tokens, minlength=module.num_embeddings).to(g.dtype)
        if module.padding_idx is not None:
            counts[module.padding_idx] = 0
        flat = g.reshape(-1, g.shape[-1])
        count = g.new_full((), float(tokens.numel()))
        return [counts, flat.T @ flat, count]

    def per_sample(self, rows: Rows, module: nn.Embedding) -> Tensor:
        """Per-sample, per-column gradients ``(V, B, num·dim)``."""
        one_hot = F.one_hot(rows.inputs, module.num_embeddings).to(rows.grads.dtype)
        return torch.einsum("bti,vbtd->vbid", one_hot, rows.grads).flatten(2)


class GenericRule:
    """Any module: per-sample gradients of its own parameters with ``torch.func``.

    The module is re-run on each sample alone (with a batch dimension of one), so it must
    treat samples independently, as modules in eval mode do.
    """

    def per_sample(
        self, module: nn.Module, locals_: list[str], calls: list[Call], grads: list[Tensor]
    ) -> dict[str, Tensor]:
        """Per-sample, per-column gradients ``(V, B, p)`` of each parameter, summed over calls."""
        params = {name: module._parameters[name].detach() for name in locals_}  # type: ignore[union-attr]
        total: dict[str, Tensor] = {}
        for call, g in zip(calls, grads, strict=True):
            batch = call.output.shape[0]
            for name, value in self._one_call(module, params, call, g, batch).items():
                total[name] = total[name] + value if name in total else value
        return total

    def _one_call(
        self, module: nn.Module, params: dict[str, Tensor], call: Call, g: Tensor, batch: int
    ) -> dict[str, Tensor]:
        batched = tuple(
            isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == batch for a in call.args
        )
        in_dims: tuple[int | None, ...] = tuple(0 if b else None for b in batched)

        def one_sample(args: tuple[Any, ...], g_sample: Tensor) -> dict[str, Tensor]:
            args1 = tuple(a.unsqueeze(0) if b else a for a, b in zip(args, batched, strict=True))

            def forward(p: dict[str, Tensor]) -> Tensor:
                return torch.func.functional_call(module, p, args1, call.kwargs)

            _, vjp, *_ = torch.func.vjp(forward, params)
            return torch.func.vmap(lambda column: vjp(column.unsqueeze(0))[0])(g_sample)

        per_sample = torch.func.vmap(one_sample, in_dims=(in_dims, 1))(call.args, g)
        # (B, V, *shape) -> (V, B, p)
        return {name: value.transpose(0, 1).flatten(2) for name, value in per_sample.items()}


DENSE_INPUT = DenseInputRule()
EMBEDDING = EmbeddingRule()
GENERIC = GenericRule()


def kron_capable(module: nn.Module) -> bool:
    """Whether a module's weight has a Kronecker rule (Linear, Conv2d with groups=1, Embedding)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    if isinstance(module, nn.Embedding):
        return not module.scale_grad_by_freq
    return False
