"""Many outputs: a last layer's curvature and predictive variances without per-datum columns.

With ``C`` outputs, the exact GGN has ``C`` columns per datum and the Jacobian ``C`` rows.
When the last layer gives the model's output, the engine hands the structures segments that
never form them (``CurvatureProduct``: the likelihood's ``diag(d) − l lᵀ``;
``SharedProduct``: the identity rows of the Jacobian). Oracles here:

* every segment method against the same segment with its columns formed
  (:class:`Product` over explicit ``(V, B, 1, C)`` columns), in float64;
* fits in which forming the columns raises, against the brute-force reference curvature
  (``reference.py``: ``torch.func`` Jacobians and loss Hessians);
* the probit predictive's variances against the dense ``J Σ Jᵀ`` with ``Σ`` the inverse of
  the dense posterior precision.
"""

from __future__ import annotations

import warnings

import pytest
import reference as ref
import torch
from helpers import assert_close, generator
from torch import nn

laplacefim = pytest.importorskip("laplacefim")
from laplacefim.curvature.segments import Product, Samples, Tokens  # noqa: E402
from laplacefim.curvature.segments.outputs import CurvatureProduct, SharedProduct  # noqa: E402
from laplacefim.likelihoods import Binary, Classification, Regression  # noqa: E402
from laplacefim.options import KfacApprox  # noqa: E402

DTYPE = torch.float64
# Float64 reassociation only (the same sums in another order).
RTOL = 1e-11


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator(seed), dtype=DTYPE))
    return q


def _curvature(likelihood: str, batch: int, n_out: int, seed: int):
    f = torch.randn(batch, n_out, generator=generator(seed), dtype=DTYPE)
    if likelihood == "classification":
        return Classification().output_curvature(f, torch.tensor(1.0, dtype=DTYPE))
    if likelihood == "binary":
        return Binary().output_curvature(f[:, :1], torch.tensor(1.0, dtype=DTYPE))
    noise = torch.linspace(0.5, 1.5, n_out, dtype=DTYPE)
    return Regression().output_curvature(f, noise)


def _check_same(segment, formed, n_out: int, d_in: int, seed: int) -> None:
    """Every protocol answer of ``segment`` equals that of the formed segment."""
    size = segment.size
    assert (segment.size, segment.n_columns, segment.batch) == (
        formed.size,
        formed.n_columns,
        formed.batch,
    )
    g = generator(seed)
    weights = torch.rand(size, generator=g, dtype=DTYPE) + 0.1
    vectors = torch.randn(3, size, generator=g, dtype=DTYPE)
    coefficients = torch.randn(segment.n_columns, segment.batch, 3, generator=g, dtype=DTYPE)
    assert_close(segment.per_sample(), formed.per_sample(), RTOL)
    assert_close(segment.diag(), formed.diag(), RTOL)
    for ours, theirs in zip(
        segment.kron(KfacApprox.EXPAND), formed.kron(KfacApprox.EXPAND), strict=True
    ):
        assert_close(ours, theirs, RTOL)
    into = getattr(segment, "kron_into", None)
    if into is not None:  # in place into running totals, twice (a second batch, then a part)
        factors = formed.kron(KfacApprox.EXPAND)
        totals = [torch.full_like(t, 0.5) for t in factors]
        if into(KfacApprox.EXPAND, totals):
            assert into(KfacApprox.EXPAND, totals)
            assert into(KfacApprox.EXPAND, totals, inputs=False)
            output = 0 if factors[0].shape[0] == n_out else 1
            for i, (total, factor) in enumerate(zip(totals, factors, strict=True)):
                assert_close(total, 0.5 + (3 if i == output else 2) * factor, RTOL)
        else:
            assert segment.inputs is None  # only a bias declines
    assert_close(segment.gram(weights), formed.gram(weights), RTOL)
    assert_close(segment.gram_diagonal(weights), formed.gram(weights).diagonal(0, 1, 2), RTOL)
    assert_close(segment.dots(vectors), formed.dots(vectors), RTOL)
    assert_close(segment.combine(coefficients), formed.combine(coefficients), RTOL)
    assert_close(segment.total(), formed.total(), RTOL)
    first, second = (_orthonormal(n_out, seed + 1), _orthonormal(d_in, seed + 2))
    if segment.transposed:
        first, second = second, first
    for q_first, q_second in ((first, second), (None, second), (first, None)):
        ours = segment.rotated(q_first, q_second)
        theirs = formed.rotated(q_first, q_second)
        assert_close(ours.gram(weights), theirs.gram(weights), RTOL)
        assert_close(ours.gram_diagonal(weights), theirs.gram(weights).diagonal(0, 1, 2), RTOL)
        assert_close(ours.diag(), theirs.diag(), RTOL)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
def test_curvature_product_equals_formed_columns(likelihood, bias, transposed):
    batch, n_out, d_in = 6, 1 if likelihood == "binary" else 5, 4
    curvature = _curvature(likelihood, batch, n_out, seed=1)
    inputs = None if bias else torch.randn(batch, d_in, generator=generator(2), dtype=DTYPE)
    flipped = transposed and not bias
    segment = CurvatureProduct(inputs, curvature, flipped)
    columns = curvature.root()
    assert_close(torch.einsum("vbc,vbd->bcd", columns, columns), _hessians(curvature), RTOL)
    formed = Product(None if bias else inputs[:, None], columns[:, :, None], flipped)
    _check_same(segment, formed, n_out, 1 if bias else d_in, seed=3)


def _hessians(curvature) -> torch.Tensor:
    """``M_b`` densely from the closed form."""
    out = torch.diag_embed(curvature.diagonal)
    if curvature.outer is not None:
        out = out - curvature.outer[:, :, None] * curvature.outer[:, None, :]
    return out


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("identity", [True, False])
def test_shared_product_equals_formed_columns(identity, bias, transposed):
    batch, n_out, d_in = 6, 5, 4
    g = generator(4)
    columns = (
        torch.eye(n_out, dtype=DTYPE)
        if identity
        else torch.randn(3, n_out, generator=g, dtype=DTYPE)
    )
    inputs = None if bias else torch.randn(batch, d_in, generator=g, dtype=DTYPE)
    flipped = transposed and not bias
    segment = SharedProduct(inputs, columns, batch, identity, flipped)
    grads = columns[:, None, None, :].expand(-1, batch, 1, -1).clone()
    formed = Product(None if bias else inputs[:, None], grads, flipped)
    _check_same(segment, formed, n_out, 1 if bias else d_in, seed=5)


def test_gram_diagonal_of_every_segment_kind():
    g = generator(6)
    weights = torch.rand(3 * 4, generator=g, dtype=DTYPE) + 0.1
    product = Product(
        torch.randn(5, 3, 4, generator=g, dtype=DTYPE),  # T = 3 positions share the weight
        torch.randn(2, 5, 3, 3, generator=g, dtype=DTYPE),
    )
    samples = Samples(torch.randn(2, 5, 12, generator=g, dtype=DTYPE))
    tokens = Tokens(
        torch.tensor([[0, 2, 2], [1, 1, 0], [2, 0, 1], [0, 0, 0], [1, 2, 1]]),
        torch.randn(2, 5, 3, 4, generator=g, dtype=DTYPE),
        num=3,
    )
    for segment in (product, samples, tokens):
        expected = segment.gram(weights).diagonal(0, 1, 2)
        assert_close(segment.gram_diagonal(weights), expected, RTOL)


# --------------------------------------------------------------------------------------
# fits and predictions that must not form per-datum columns
# --------------------------------------------------------------------------------------
def _forbid_columns(monkeypatch) -> None:
    """Forming the loss-Hessian columns or a Jacobian's full covariance raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("per-datum columns were formed")

    for cls in (Classification, Regression, Binary):
        monkeypatch.setattr(cls, "hessian_sqrt", refuse)
    monkeypatch.setattr(SharedProduct, "gram", refuse)


def _problem(likelihood: str, n_out: int):
    g = generator(7)
    model = ref.init_(
        nn.Sequential(nn.Linear(3, 6, dtype=DTYPE), nn.Tanh(), nn.Linear(6, n_out, dtype=DTYPE)),
        g,
    )
    x = torch.randn(20, 3, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, 20, n_out, g)
    return model, x, y


LIKELIHOODS = {"classification": 30, "regression": 25, "binary": 1}


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_last_layer_fit_and_probit_without_columns(monkeypatch, likelihood, structure):
    n_out = LIKELIHOODS[likelihood]
    model, x, y = _problem(likelihood, n_out)
    sigma = torch.linspace(0.6, 1.4, n_out, dtype=DTYPE) if likelihood == "regression" else 1.0
    options = {"sigma_noise": sigma} if likelihood == "regression" else {}
    names = ref.last_linear_names(model, x)
    expected = ref.reference_curvature(model, names, x, y, likelihood, structure, "ggn", sigma)

    with monkeypatch.context() as patch:
        _forbid_columns(patch)
        fitted = laplacefim.Laplace(
            model,
            likelihood=likelihood,
            subset="last_layer",
            structure=structure,
            prior_precision=0.0,
            **options,
        )
        fitted.fit(ref.loader(x, y, batch_size=8))
        curvature = fitted.posterior_precision.to_dense()
        fitted.prior_precision = 0.7
        alone = fitted.predict(x[:7])
    assert_close(curvature, expected, 1e-10)

    fitted.prior_precision = 0.7
    joint = fitted.predict(x[:7], joint_outputs=True)
    var = joint.logit_cov.diagonal(0, 1, 2)
    jac = ref.jacobian(model, names, x[:7])
    sigma_post = torch.linalg.inv(fitted.posterior_precision.to_dense())
    dense = torch.einsum("bcp,pq,bdq->bcd", jac, sigma_post, jac).diagonal(0, 1, 2)
    assert_close(var, dense, 1e-9)
    got = alone.epistemic_var if likelihood == "regression" else alone.logit_var
    assert_close(got, dense[:, 0] if likelihood == "binary" else dense, 1e-9)


def test_all_weights_exact_ggn_with_many_outputs_says_its_cost():
    model, x, y = _problem("classification", 120)
    la = laplacefim.Laplace(model, likelihood="classification", structure="diag")
    with pytest.warns(RuntimeWarning, match=r"120 columns per datum.*curvature='fisher'"):
        la.fit(ref.loader(x, y, batch_size=8))
    quiet = laplacefim.Laplace(model, likelihood="classification", subset="last_layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.fit(ref.loader(x, y, batch_size=8))
        laplacefim.Laplace(model, likelihood="classification", curvature="fisher").fit(
            ref.loader(x, y, batch_size=8)
        )
