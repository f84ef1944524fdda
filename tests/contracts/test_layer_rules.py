"""The layer-rule contract: every registered rule's per-sample gradients are exact, and every
segment it returns answers each question consistently with those gradients.

For each case in ``RULE_CASES`` (which must cover the registered module types), a tiny
float64 model containing the module is run through the engine with the Jacobian columns
(``V = C`` unit vectors): each chosen parameter's per-sample gradients ``u (C, B, p)`` from
the rule's segments must equal the per-datum Jacobian from ``torch.func`` (reference.py).
Then every segment's fast paths are checked against ``u`` itself: the exact diagonal,
weighted Gram matrices, products with vectors, combinations, sums over the batch,
Kronecker factors (against ``Σ g gᵀ``/``Σ a aᵀ`` written out here), and the coordinates in
a rotated basis.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import reference as ref
import torch
from helpers import assert_close, generator
from torch import Tensor, nn

from laplacefim.curvature import CurvatureEngine
from laplacefim.curvature.rules import RULES
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import make_likelihood
from laplacefim.options import CurvatureKind, KfacApprox
from laplacefim.subsets import select

DTYPE = torch.float64
RTOL = 1e-10


class Head(nn.Module):
    """The module under test, then tanh, a flatten and a linear head to 3 outputs."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(width, 3, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x)).flatten(1))


def _tokens(g: torch.Generator) -> Tensor:
    ids = torch.randint(0, 6, (5, 4), generator=g)
    ids[0] = torch.tensor([1, 1, 2, 1])  # a token repeated within a datum
    return ids


# module type -> (model factory, input factory); a new rule is one line here.
RULE_CASES: dict[object, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]] = {
    nn.Linear: (
        lambda: Head(nn.Linear(3, 4, dtype=DTYPE), 8),
        lambda g: torch.randn(5, 2, 3, generator=g, dtype=DTYPE),  # weight shared over T=2
    ),
    nn.Conv2d: (
        lambda: Head(nn.Conv2d(2, 2, 2, padding=1, dtype=DTYPE), 2 * 4 * 4),
        lambda g: torch.randn(5, 2, 3, 3, generator=g, dtype=DTYPE),
    ),
    nn.Embedding: (
        lambda: Head(nn.Embedding(6, 3, padding_idx=5, dtype=DTYPE), 12),
        _tokens,
    ),
    "generic": (
        lambda: Head(nn.LayerNorm(4, dtype=DTYPE), 4),
        lambda g: torch.randn(5, 4, generator=g, dtype=DTYPE),
    ),
}


def test_case_list_covers_the_registered_types():
    assert set(RULES.types) <= set(RULE_CASES)


def _engine(model: nn.Module) -> CurvatureEngine:
    selection = select(model, "all")
    return CurvatureEngine(
        model,
        selection,
        CurvatureKind.GGN,
        make_likelihood("classification"),
        torch.ones((), dtype=DTYPE),
        ModelIO(),
        fisher_samples=1,
        dtype=DTYPE,
    )


@pytest.mark.parametrize("case", list(RULE_CASES), ids=str)
def test_rule_gradients_are_exact_and_segments_consistent(case):
    g = generator(3)
    model = ref.init_(RULE_CASES[case][0](), g)
    x = RULE_CASES[case][1](g)
    engine = _engine(model)
    rows = engine.jacobian_rows(x, x.shape[0])
    names = ref.trainable_names(model)
    jacobian = ref.jacobian(model, names, x).transpose(0, 1)  # (C, B, P)
    slices = ref.param_slices(model, names)
    for name in names:
        segments = rows.segments[name]
        u = torch.cat([s.per_sample() for s in segments], dim=2)
        assert_close(u, jacobian[:, :, slices[name]], RTOL)
        start = 0
        for segment in segments:
            part = u[:, :, start : start + segment.size]
            start += segment.size
            _check_segment(segment, part, g)


def _check_segment(segment, u: Tensor, g: torch.Generator) -> None:
    n_columns, batch, size = u.shape
    weights = torch.rand(size, generator=g, dtype=DTYPE)
    vectors = torch.randn(2, size, generator=g, dtype=DTYPE)
    coefficients = torch.randn(n_columns, batch, 2, generator=g, dtype=DTYPE)
    assert_close(segment.diag(), u.square().sum((0, 1)), RTOL)
    assert_close(segment.gram(weights), torch.einsum("vbp,wbp,p->bvw", u, u, weights), RTOL)
    assert_close(segment.dots(vectors), torch.einsum("vbp,kp->vbk", u, vectors), RTOL)
    assert_close(segment.combine(coefficients), torch.einsum("vbk,vbp->kp", coefficients, u), RTOL)
    assert_close(segment.total(), u.sum(1), RTOL)
    factors = segment.kron(KfacApprox.EXPAND)
    if factors is None:
        return
    first, second, count = factors
    dense = lambda f: torch.diag(f) if f.ndim == 1 else f  # noqa: E731
    assert torch.kron(dense(first), dense(second)).shape == (size, size)
    # a random orthonormal basis per factor (identity for a diagonal one)
    q_first = (
        None
        if first.ndim == 1
        else torch.linalg.qr(torch.randn(*first.shape, generator=g, dtype=DTYPE))[0]
    )
    q_second = (
        None
        if second.ndim == 1
        else torch.linalg.qr(torch.randn(*second.shape, generator=g, dtype=DTYPE))[0]
    )
    eye_first = torch.eye(first.shape[0], dtype=DTYPE) if q_first is None else q_first
    eye_second = torch.eye(second.shape[0], dtype=DTYPE) if q_second is None else q_second
    basis = torch.kron(eye_first.contiguous(), eye_second.contiguous())  # rotated coordinates
    rotated = segment.rotated(q_first, q_second)
    assert_close(rotated.per_sample(), u @ basis, RTOL)
    assert_close(rotated.diag(), (u @ basis).square().sum((0, 1)), RTOL)
    assert float(count) > 0


def test_product_factors_are_sums_of_outer_products():
    """Linear weight shared over T positions: G = Σ g gᵀ and A = Σ a aᵀ over (datum,
    position) rows for expand; over data, with g summed and a averaged, for reduce."""
    g = generator(4)
    model = ref.init_(RULE_CASES[nn.Linear][0](), g)
    x = RULE_CASES[nn.Linear][1](g)
    engine = _engine(model)
    rows = engine.jacobian_rows(x, x.shape[0])
    (segment,) = rows.segments["inner.weight"]
    out = torch.einsum("bti,oi->bto", x, model.inner.weight)  # layer output, (B, T, d_out)
    grads = segment.grads  # (C, B, T, d_out), against the layer output
    assert grads.shape[1:] == out.shape
    first, second, count = segment.kron(KfacApprox.EXPAND)
    rows_g, rows_a = grads.reshape(-1, 4), x.reshape(-1, 3)
    assert_close(first, rows_g.T @ rows_g, RTOL)
    assert_close(second, rows_a.T @ rows_a, RTOL)
    assert float(count) == 10
    first, second, count = segment.kron(KfacApprox.REDUCE)
    summed, mean = grads.sum(2).reshape(-1, 4), x.mean(1)
    assert_close(first, summed.T @ summed, RTOL)
    assert_close(second, mean.T @ mean, RTOL)
    assert float(count) == 5
