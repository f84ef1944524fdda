"""``Product.diag`` and ``gram_diagonal`` over positions, in per-sample chunks, against
explicit per-datum sums.

The exact diagonal of a weight applied at several positions (a convolution, a sequence) is
``Σ_v Σ_b (Σ_t g_{vbt} a_{bt}ᵀ)²``; the segment forms it chunk by chunk in one reused
buffer. The oracle builds each per-sample gradient with an explicit loop of outer products,
in float64, for chunk sizes that divide the batch, leave an uneven last chunk, or take it
whole.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, generator

laplacefim = pytest.importorskip("laplacefim")
from laplacefim.curvature.segments import Product  # noqa: E402
from laplacefim.curvature.segments import base as segments_base  # noqa: E402

DTYPE = torch.float64


def _brute_diag(grads: torch.Tensor, inputs: torch.Tensor, transposed: bool) -> torch.Tensor:
    n_cols, batch, positions, d_out = grads.shape
    total = torch.zeros(d_out, inputs.shape[-1], dtype=DTYPE)
    for v in range(n_cols):
        for b in range(batch):
            u = sum(torch.outer(grads[v, b, t], inputs[b, t]) for t in range(positions))
            total += u.square()
    return (total.T if transposed else total).reshape(-1)


@pytest.mark.parametrize("chunk", [1, 2, 5])  # samples per chunk: uneven, even, whole
@pytest.mark.parametrize("transposed", [False, True])
def test_diag_in_chunks_matches_per_sample_sums(monkeypatch, chunk, transposed):
    n_cols, batch, positions, d_out, d_in = 3, 5, 4, 2, 6
    g = generator(chunk + 10 * transposed)
    grads = torch.randn(n_cols, batch, positions, d_out, generator=g, dtype=DTYPE)
    inputs = torch.randn(batch, positions, d_in, generator=g, dtype=DTYPE)
    monkeypatch.setattr(segments_base, "CHUNK_ELEMENTS", chunk * n_cols * d_out * d_in)
    segment = Product(inputs, grads, transposed)
    assert_close(segment.diag(), _brute_diag(grads, inputs, transposed), rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_gram_diagonal_in_chunks_matches_per_sample_sums(monkeypatch, chunk):
    """``(B, V)``: each per-sample gradient squared against the weights, in batch order."""
    n_cols, batch, positions, d_out, d_in = 3, 5, 4, 2, 6
    g = generator(100 + chunk)
    grads = torch.randn(n_cols, batch, positions, d_out, generator=g, dtype=DTYPE)
    inputs = torch.randn(batch, positions, d_in, generator=g, dtype=DTYPE)
    weights = torch.rand(d_out * d_in, generator=g, dtype=DTYPE)
    monkeypatch.setattr(segments_base, "CHUNK_ELEMENTS", chunk * n_cols * d_out * d_in)
    expected = torch.zeros(batch, n_cols, dtype=DTYPE)
    for v in range(n_cols):
        for b in range(batch):
            u = sum(torch.outer(grads[v, b, t], inputs[b, t]) for t in range(positions))
            expected[b, v] = (u.reshape(-1).square() * weights).sum()
    actual = Product(inputs, grads).gram_diagonal(weights)
    assert_close(actual, expected, rtol=1e-12)


@pytest.mark.parametrize("d", [5, 511, 512, 515, 1030])
def test_symmetric_gram_equals_the_full_product(d, monkeypatch):
    """The block-triangle Gram equals ``cols @ cols.T`` (float64) and is exactly symmetric,
    for sizes below, at and above the row threshold and with a ragged last block."""
    from laplacefim.curvature.segments import product
    from laplacefim.curvature.segments.product import symmetric_gram

    monkeypatch.setattr(product, "SYMMETRIC_GRAM_MIN_ENTRIES", 0)  # small n, blocked anyway
    cols = torch.randn(d, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    gram = symmetric_gram(cols)
    torch.testing.assert_close(gram, cols @ cols.T, rtol=1e-12, atol=1e-12)
    if d >= 512:  # mirrored blocks; below, whatever the BLAS returns
        assert torch.equal(gram, gram.T)
    transposed = symmetric_gram(cols.T.contiguous().T)  # a strided (d, n) view
    torch.testing.assert_close(transposed, cols @ cols.T, rtol=1e-12, atol=1e-12)
    # added in place to a running total, over two batches
    more = torch.randn(d, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    total = torch.zeros(d, d, dtype=torch.float64)
    assert symmetric_gram(cols, total) is total
    symmetric_gram(more, total)
    expected = cols @ cols.T + more @ more.T
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("transposed", [False, True])
def test_kron_into_running_totals_equals_explicit_row_sums(approx, transposed):
    """``Product.kron_into`` adds the factors of two batches (the second in two column
    parts) to running totals; the oracle sums ``g gᵀ`` and ``a aᵀ`` row by row (reduce:
    per datum, gradients summed and inputs averaged over the positions)."""
    from laplacefim.options import KfacApprox

    kind = KfacApprox(approx)
    n_cols, positions, d_out, d_in = 3, 4, 2, 5
    g = generator(7 + transposed)
    batches = [
        (
            torch.randn(batch, positions, d_in, generator=g, dtype=DTYPE),
            torch.randn(n_cols, batch, positions, d_out, generator=g, dtype=DTYPE),
        )
        for batch in (3, 6)
    ]
    first = torch.zeros(d_out, d_out, dtype=DTYPE)
    second = torch.zeros(d_in, d_in, dtype=DTYPE)
    count = torch.zeros((), dtype=DTYPE)
    totals = [second, first, count] if transposed else [first, second, count]
    expected_g = torch.zeros(d_out, d_out, dtype=DTYPE)
    expected_a = torch.zeros(d_in, d_in, dtype=DTYPE)
    rows = 0
    for index, (inputs, grads) in enumerate(batches):
        parts = [grads] if index == 0 else [grads[:1], grads[1:]]
        for number, part in enumerate(parts):
            assert Product(inputs, part, transposed).kron_into(kind, totals, inputs=number == 0)
        gs = grads.sum(2, keepdim=True) if approx == "reduce" else grads
        a_rows = inputs.mean(1, keepdim=True) if approx == "reduce" else inputs
        for row in gs.reshape(-1, d_out):
            expected_g += torch.outer(row, row)
        for row in a_rows.reshape(-1, d_in):
            expected_a += torch.outer(row, row)
        rows += a_rows.shape[0] * a_rows.shape[1]
    assert_close(first, expected_g, rtol=1e-12)
    assert_close(second, expected_a, rtol=1e-12)
    assert float(count) == rows
    # a bias, inputs shared with another segment, and a float32 total are declined, untouched
    inputs, grads = batches[0]
    before = [t.clone() for t in totals]
    assert not Product(None, grads).kron_into(kind, totals)
    assert not Product(inputs, grads, transposed, sole_inputs=False).kron_into(kind, totals)
    narrow = [t.float() for t in totals]
    assert not Product(inputs, grads, transposed).kron_into(kind, narrow)
    for total, kept in zip(totals, before, strict=True):
        assert torch.equal(total, kept)
