"""``structure="ekfac"`` against independent oracles.

* a dense float64 brute force: the exact GGN of ``reference.dense_ggn`` restricted to a
  block's slice, projected onto the block's Kronecker basis ``Q = Q₁ ⊗ Q₂`` (built with
  ``torch.kron``), gives the re-fitted eigenvalues ``diag(Qᵀ G Q)``; the basis itself
  diagonalises the brute-force KFAC block of ``reference.CurvatureReference``;
* the optimality of the eigenvalue correction: block by block, EKFAC is never further
  from the exact GGN in Frobenius norm than KFAC is (and strictly closer somewhere);
* curvlinops 3.0.1's ``EKFACLinearOperator`` (a pinned peer library) with a "sum" loss;
* dense formulas for the evidence, the GLM output covariance ``J Σ Jᵀ`` (Jacobians by
  ``torch.func``), the pyro posterior and the sampling map (replayed generator).

Tiny float64 models, local generators only.
"""

from __future__ import annotations

import copy
import math

import pytest
import reference as ref
import torch
from helpers import assert_max_close, generator
from torch import Tensor, nn

from laplacefim import Laplace

DTYPE = ref.DTYPE
N_DATA = 10
BATCH = 4  # uneven last batch
N_OUT = {"classification": 3, "regression": 2, "binary": 1}
SIGMA = 0.7  # a regression noise != 1, so that a missing 1/σ² shows
CL_SIGMA = 1.0 / math.sqrt(2.0)  # curvlinops' MSELoss(sum) is the Gaussian NLL at this σ

# Dense float64 brute force against the structured path: reassociation only.
RTOL = 1e-10
# "reduce" and "expand" bases give blocks differing by O(1) relative amounts at T > 1.
DIFFERENT = 1e-3
# Dense inverses / log-determinants of the posterior precision (condition number ~1e2).
DENSE_RTOL = 1e-9
# "never further than KFAC": the two distances agree to rounding where EKFAC = KFAC.
FROB_SLACK = 1e-10
# "strictly closer somewhere": EKFAC's distance below this fraction of KFAC's on some block.
STRICT_FRACTION = 0.99
# Newton on the log prior stops at a predicted gain of 1e-10: the gradient of the
# evidence in log δ is then of order 1e-5; compared with the parameter count P.
STATIONARY_RTOL = 1e-4
# Whitened Monte-Carlo covariance of N_MC samples: entries have standard deviation about
# 1/sqrt(N_MC) (2^-7 ≈ 0.008 on the diagonal, less off it); 6 of those.
N_MC = 16384
MC_ATOL = 6.0 * math.sqrt(2.0 / N_MC)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
class SeqNet(nn.Module):
    """A Linear applied to (B, T, d) inputs (shared over T), then a flattening head."""

    def __init__(self, c: int, t: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4, dtype=DTYPE)
        self.head = nn.Linear(4 * t, c, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x)).flatten(1))


def _cnn(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 2, padding=1, dtype=DTYPE),
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2, dtype=DTYPE),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, c, dtype=DTYPE),
    )


def _problem(arch: str, likelihood: str, seed: int = 0):
    """(model, x, y) on a local generator."""
    g = generator(4100 + 17 * seed)
    c = N_OUT[likelihood]
    if arch == "mlp":
        model = ref.mlp(c, g)  # 4-5-c with tanh
        x = torch.randn(N_DATA, 4, generator=g, dtype=DTYPE)
    elif arch == "seq":
        model = ref.init_(SeqNet(c), g)
        x = torch.randn(N_DATA, 3, 3, generator=g, dtype=DTYPE)
    else:
        model = ref.init_(_cnn(c), g, 0.6)
        x = torch.randn(N_DATA, 1, 3, 3, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, N_DATA, c, g)
    return model, x, y


def _fit(model, x, y, likelihood, structure="ekfac", *, sigma=SIGMA, prior=1.0, **options):
    kw = {"sigma_noise": sigma} if likelihood == "regression" else {}
    la = Laplace(model, likelihood, structure=structure, prior_precision=prior, **kw, **options)
    return la.fit(ref.loader(x, y, BATCH))


def _sigma(likelihood: str, sigma: float = SIGMA) -> float:
    return sigma if likelihood == "regression" else 1.0


# --------------------------------------------------------------------------------------
# the dense EKFAC oracle
# --------------------------------------------------------------------------------------
def _slices(la: Laplace) -> list[slice]:
    out, start = [], 0
    for block in la.curvature.blocks:
        out.append(slice(start, start + block.numel))
        start += block.numel
    return out


def _dense_basis(block) -> Tensor:
    """``Q₁ ⊗ Q₂`` of a block's basis, the identity standing in for None."""
    m, n = block.basis.shape
    first = block.basis.first
    second = block.basis.second
    eye_m = torch.eye(m, dtype=DTYPE)
    eye_n = torch.eye(n, dtype=DTYPE)
    return torch.kron(
        eye_m if first is None else first.to(DTYPE), eye_n if second is None else second.to(DTYPE)
    )


def _oracle_ekfac(la: Laplace, ggn: Tensor) -> Tensor:
    """Block diagonal of ``Q diag(diag(Qᵀ G Q)) Qᵀ`` with ``G`` the exact dense GGN."""
    parts = []
    for block, s in zip(la.curvature.blocks, _slices(la), strict=True):
        q = _dense_basis(block)
        values = torch.diagonal(q.T @ ggn[s, s] @ q)
        parts.append((q * values) @ q.T)
    return torch.block_diag(*parts)


CASES = [
    ("mlp", "classification"),
    ("mlp", "regression"),
    ("seq", "classification"),
    ("seq", "regression"),
    ("cnn", "classification"),
    ("cnn", "regression"),
]


# --------------------------------------------------------------------------------------
# 1. the eigenvalues are diag(Qᵀ G Q) in KFAC's eigenbasis
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "likelihood"), CASES)
def test_eigenvalues_are_the_exact_ggn_in_the_kfac_basis(arch, likelihood):
    model, x, y = _problem(arch, likelihood)
    la = _fit(model, x, y, likelihood)
    names = ref.trainable_names(model)
    sigma = _sigma(likelihood)
    ggn = ref.dense_ggn(model, names, x, likelihood, sigma)
    kfac = ref.CurvatureReference(model, names, x, likelihood, sigma).ggn("kron")
    assert la.curvature.numel == ggn.shape[0]
    for block, s in zip(la.curvature.blocks, _slices(la), strict=True):
        q = _dense_basis(block)
        eye = torch.eye(q.shape[0], dtype=DTYPE)
        assert_max_close(q.T @ q, eye, RTOL)  # orthonormal
        # Q is KFAC's eigenbasis: it diagonalises the brute-force KFAC block
        rotated = q.T @ kfac[s, s] @ q
        off = rotated - torch.diag(torch.diagonal(rotated))
        assert float(off.abs().max()) <= RTOL * float(kfac[s, s].abs().max()), block.names
        # the re-fitted eigenvalues: the exact GGN block seen in that basis
        expected = torch.diagonal(q.T @ ggn[s, s] @ q)
        assert_max_close(block.values, expected, RTOL)
        assert_max_close(block.to_dense(), (q * expected) @ q.T, RTOL)
        assert_max_close(block.diagonal(), torch.diagonal((q * expected) @ q.T), RTOL)
    assert_max_close(la.curvature.to_dense(), _oracle_ekfac(la, ggn), RTOL)


def test_eigenvalues_with_kfac_reduce_basis():
    """With ``kfac_approx="reduce"`` the basis changes, the rule does not: the eigenvalues
    are still the exact GGN's in the (reduce) basis."""
    model, x, y = _problem("seq", "classification", seed=3)
    la = _fit(model, x, y, "classification", kfac_approx="reduce")
    la_expand = _fit(model, x, y, "classification")
    ggn = ref.dense_ggn(model, ref.trainable_names(model), x, "classification")
    assert_max_close(la.curvature.to_dense(), _oracle_ekfac(la, ggn), RTOL)
    # the shared weight's basis really is another one than expand's
    inner = la.curvature.blocks[0]
    assert inner.names == ("inner.weight",)
    gap = (inner.to_dense() - la_expand.curvature.blocks[0].to_dense()).abs().max()
    assert float(gap) > DIFFERENT * float(inner.to_dense().abs().max())


class TwiceConv(nn.Module):
    """Convolutions of several geometries, the last called twice on images of two sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1, dtype=DTYPE)
        self.c = nn.Conv2d(3, 3, 3, dilation=2, padding=(3, 1), dtype=DTYPE)
        self.head = nn.Linear(3, 3, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        z = self.c(h).mean((2, 3)) + self.c(h[:, :, ::2, 1:]).mean((2, 3))
        return self.head(z)


@pytest.mark.parametrize("cache_mb", [0.0, 256.0])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_convolutions_called_twice_over_many_batches(approx, cache_mb):
    """Many batches, biases whose rotations share one (reduce: scalar) basis, layers with
    different position counts: every rotated product belongs to its own tensor (the
    per-batch cache once handed a bias another bias's product of another shape), and the
    eigenvalues are the exact GGN's in the basis."""
    g = generator(4242)
    model = ref.init_(TwiceConv(), g, 0.6)
    x = torch.randn(18, 2, 5, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (18,), generator=g)
    la = Laplace(
        model, "classification", structure="ekfac", kfac_approx=approx, pass_cache_mb=cache_mb
    )
    la.fit(ref.loader(x, y, 3))
    ggn = ref.dense_ggn(model, ref.trainable_names(model), x, "classification")
    assert_max_close(la.curvature.to_dense(), _oracle_ekfac(la, ggn), RTOL)


def _scratch(kept: list) -> list:
    """The non-empty per-batch scratch dicts of kept segments."""
    return [
        s.shared
        for segments, _ in kept
        for ss in segments.values()
        for s in ss
        if getattr(s, "shared", None)
    ]


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_replayed_batches_keep_no_scratch(monkeypatch, subset):
    """The batches kept for the second pass hold only their counted tensors: the per-batch
    scratch (input factors, a head's columns) is emptied, once after the first pass's
    accumulation and again after the replay, and formed again where needed; the
    eigenvalues stay the exact GGN's in the basis."""
    from laplacefim import fitting

    kept: list = []
    replay = fitting._next_pass

    def spy(sums, *args, **kwargs):
        assert sums.cache
        kept.extend(sums.cache)
        assert not _scratch(kept)
        replay(sums, *args, **kwargs)

    monkeypatch.setattr(fitting, "_next_pass", spy)
    model, x, y = _problem("cnn", "classification")
    la = _fit(model, x, y, "classification", subset=subset, pass_cache_mb=256.0)
    assert kept
    assert not _scratch(kept)
    last = subset == "last_layer"
    names = ref.last_linear_names(model, x) if last else ref.trainable_names(model)
    ggn = ref.dense_ggn(model, names, x, "classification")
    assert_max_close(la.curvature.to_dense(), _oracle_ekfac(la, ggn), RTOL)


# --------------------------------------------------------------------------------------
# 2. never further from the exact GGN than KFAC
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("arch", "likelihood"), CASES)
def test_ekfac_is_never_further_from_the_ggn_than_kfac(arch, likelihood, seed):
    model, x, y = _problem(arch, likelihood, seed=seed)
    ekfac = _fit(model, x, y, likelihood)
    kfac = _fit(model, x, y, likelihood, "kron")
    ggn = ref.dense_ggn(model, ref.trainable_names(model), x, likelihood, _sigma(likelihood))
    ratios = []
    for e, k, s in zip(ekfac.curvature.blocks, kfac.curvature.blocks, _slices(ekfac), strict=True):
        assert e.names == k.names and e.numel == k.numel
        exact = ggn[s, s]
        d_e = float(torch.linalg.matrix_norm(e.to_dense() - exact))
        d_k = float(torch.linalg.matrix_norm(k.to_dense() - exact))
        scale = float(torch.linalg.matrix_norm(exact))
        assert d_e <= d_k + FROB_SLACK * scale, (e.names, d_e, d_k)
        if d_k > FROB_SLACK * scale:
            ratios.append(d_e / d_k)
    # and strictly closer on some block: the correction does something
    assert ratios and min(ratios) < STRICT_FRACTION, ratios


# --------------------------------------------------------------------------------------
# 3. against curvlinops' EKFACLinearOperator
# --------------------------------------------------------------------------------------
CL_LOSSES = {
    "classification": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "regression": lambda: nn.MSELoss(reduction="sum"),
    "binary": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}


def _curvlinops_ekfac(model, x, y, likelihood, fisher_type, kfac_approx="expand") -> Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    y_cl = y.unsqueeze(-1) if likelihood == "binary" else y  # target shaped like the output
    data = [(x[i : i + BATCH], y_cl[i : i + BATCH]) for i in range(0, N_DATA, BATCH)]
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.EKFACLinearOperator(
        model,
        CL_LOSSES[likelihood](),
        params,
        data,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    P = sum(p.numel() for p in params)
    return op @ torch.eye(P, dtype=DTYPE)


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_matches_curvlinops_ekfac(arch, likelihood):
    """curvlinops (loss reduction "sum") fits the eigenvalues as Σₙ (Qᵀuₙ)² in the
    eigenbasis of its KFAC factors; with A = Σ aaᵀ/(N·T) its factors differ from ours by
    a scale only, which leaves the basis and so the matrix unchanged."""
    pytest.importorskip("curvlinops")
    model, x, y = _problem(arch, likelihood, seed=5)
    for kind, fisher_type in (("ggn", "type-2"), ("empirical_fisher", "empirical")):
        expected = _curvlinops_ekfac(model, x, y, likelihood, fisher_type)
        la = _fit(model, x, y, likelihood, curvature=kind, sigma=CL_SIGMA, prior=0.0)
        assert_max_close(la.curvature.to_dense(), expected, RTOL)


def test_matches_curvlinops_ekfac_on_shared_weights_both_flavours():
    pytest.importorskip("curvlinops")
    model, x, y = _problem("seq", "classification", seed=6)
    for approx in ("expand", "reduce"):
        expected = _curvlinops_ekfac(model, x, y, "classification", "type-2", approx)
        la = _fit(model, x, y, "classification", kfac_approx=approx, prior=0.0)
        assert_max_close(la.curvature.to_dense(), expected, RTOL)


# --------------------------------------------------------------------------------------
# 4. evidence, tuning, predictive, posterior, sampling, persistence
# --------------------------------------------------------------------------------------
def _log_likelihood(model, x, y, likelihood, sigma) -> Tensor:
    f = ref.outputs(model, x)
    return -sum(ref.nll(likelihood, f[n], y[n], sigma) for n in range(x.shape[0]))


def _dense_evidence(model, x, y, likelihood, sigma, curvature: Tensor, prior: Tensor) -> Tensor:
    """``log p(D|θ) − ½ θᵀP₀θ − ½ (log det(F + P₀) − log det P₀)`` for a per-parameter prior."""
    theta = ref.flat_params(model, ref.trainable_names(model))
    precision = curvature + torch.diag(prior)
    return (
        _log_likelihood(model, x, y, likelihood, sigma)
        - 0.5 * (prior * theta.square()).sum()
        - 0.5 * (torch.linalg.slogdet(precision)[1] - prior.log().sum())
    )


def _layer_prior(values: Tensor, la: Laplace) -> Tensor:
    """A per-module prior expanded over the flat parameters (modules in parameter order)."""
    modules = [name.rpartition(".")[0] for name in la.parameter_names]
    index = {m: i for i, m in enumerate(dict.fromkeys(modules))}
    sizes = [dict(la.model.named_parameters())[n].numel() for n in la.parameter_names]
    return torch.cat(
        [values[index[m]].expand(size) for m, size in zip(modules, sizes, strict=True)]
    )


@pytest.fixture(scope="module", params=["classification", "regression"])
def fitted(request):
    likelihood = request.param
    model, x, y = _problem("mlp", likelihood, seed=9)
    la = _fit(model, x, y, likelihood)
    ggn = ref.dense_ggn(model, ref.trainable_names(model), x, likelihood, _sigma(likelihood))
    return likelihood, model, x, y, la, _oracle_ekfac(la, ggn)


@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise"])
def test_evidence_matches_dense_formula(fitted, prior_kind):
    likelihood, model, x, y, la, curvature = fitted
    prior = (
        torch.tensor(0.8, dtype=DTYPE)
        if prior_kind == "scalar"
        else torch.tensor([0.5, 2.0], dtype=DTYPE)
    )
    per_param = (
        prior.expand(la.n_params) if prior_kind == "scalar" else _layer_prior(prior.to(DTYPE), la)
    )
    expected = _dense_evidence(model, x, y, likelihood, _sigma(likelihood), curvature, per_param)
    assert_max_close(la.log_marginal_likelihood(prior), expected, DENSE_RTOL)
    if likelihood == "regression":  # a noise changed after the fit rescales F by σ_fit²/σ²
        sigma = 1.3
        scaled = curvature * SIGMA**2 / sigma**2
        expected = _dense_evidence(model, x, y, likelihood, sigma, scaled, per_param)
        assert_max_close(la.log_marginal_likelihood(prior, sigma_noise=sigma), expected, DENSE_RTOL)


def test_glm_output_covariance_is_j_sigma_jt(fitted):
    _likelihood, model, x, _y, la, curvature = fitted
    prior = 0.6
    la.prior_precision = prior
    xt = torch.randn(5, *x.shape[1:], generator=generator(11), dtype=DTYPE)
    cov = torch.linalg.inv(curvature + prior * torch.eye(la.n_params, dtype=DTYPE))
    J = ref.jacobian(model, ref.trainable_names(model), xt)
    expected = torch.einsum("bcp,pq,bdq->bcd", J, cov, J)
    prediction = la.predict(xt, joint_outputs=True)
    assert_max_close(prediction.logit_cov, expected, DENSE_RTOL)
    assert_max_close(
        la.posterior_precision.to_dense(),
        curvature + prior * torch.eye(la.n_params, dtype=DTYPE),
        RTOL,
    )


def test_posterior_density_and_entropy(fitted):
    _likelihood, _model, _x, _y, la, curvature = fitted
    la.prior_precision = 1.5
    precision = curvature + 1.5 * torch.eye(la.n_params, dtype=DTYPE)
    dense = torch.distributions.MultivariateNormal(la.mean, precision_matrix=precision)
    points = la.mean + torch.randn(4, la.n_params, generator=generator(12), dtype=DTYPE)
    assert_max_close(la.posterior.log_prob(points), dense.log_prob(points), DENSE_RTOL)
    assert_max_close(la.posterior.entropy(), dense.entropy(), DENSE_RTOL)


def test_samples_have_the_posterior_covariance(fitted):
    """Samples are ``θ* + L z`` with ``z`` standard normal rows drawn from ``generator``:
    replaying the generator recovers ``L`` exactly (least squares with residual 0), and
    ``L Lᵀ`` must be ``Σ``. A whitened Monte-Carlo check does not rely on the draw order."""
    _likelihood, _model, _x, _y, la, curvature = fitted
    la.prior_precision = 0.9
    P = la.n_params
    cov = torch.linalg.inv(curvature + 0.9 * torch.eye(P, dtype=DTYPE))
    g = generator(13)
    replay = generator(13)
    n = 3 * P
    samples = la.sample(n, generator=g)
    z = torch.randn((n, P), generator=replay, dtype=DTYPE)
    solution = torch.linalg.lstsq(z, samples - la.mean)
    lt = solution.solution  # (P, P): samples - mean = z @ Lᵀ
    assert_max_close(z @ lt, samples - la.mean, RTOL)
    assert_max_close(lt.T @ lt, cov, DENSE_RTOL)
    # Monte Carlo, with a named tolerance
    many = la.sample(N_MC, generator=generator(14)) - la.mean
    white = many @ torch.linalg.cholesky(torch.linalg.inv(cov))  # Lᵀ_P: cov(white) = I
    empirical = white.T @ white / N_MC
    assert float((empirical - torch.eye(P, dtype=DTYPE)).abs().max()) <= MC_ATOL


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise"])
def test_tune_prior_converges_to_a_stationary_point(prior_structure):
    likelihood = "classification"
    model, x, y = _problem("mlp", likelihood, seed=15)
    la = _fit(model, x, y, likelihood, prior=1.0)
    result = la.tune_prior(prior_structure=prior_structure)
    assert result.converged
    curvature = la.curvature.to_dense()
    n_prior = 1 if prior_structure == "scalar" else 2
    log_prior = result.prior_precision.to(DTYPE).log().reshape(n_prior).clone()
    log_prior.requires_grad_(True)

    def evidence(lp: Tensor) -> Tensor:
        prior = lp.exp()
        per_param = prior.expand(la.n_params) if n_prior == 1 else _layer_prior(prior, la)
        return _dense_evidence(model, x, y, likelihood, 1.0, curvature, per_param)

    (grad,) = torch.autograd.grad(evidence(log_prior), log_prior)
    assert float(grad.abs().max()) <= STATIONARY_RTOL * la.n_params, grad
    assert_max_close(result.log_marginal_likelihood, evidence(log_prior.detach()), DENSE_RTOL)
    # a local maximum: nudging the prior either way lowers the dense evidence
    for step in (-1e-2, 1e-2):
        assert float(evidence(log_prior.detach() + step)) < float(evidence(log_prior.detach()))


def test_per_parameter_prior_is_refused():
    """A prior varying within a Kronecker block does not commute with its basis."""
    model, x, y = _problem("mlp", "classification", seed=15)
    la = _fit(model, x, y, "classification")
    with pytest.raises(ValueError, match="Kronecker"):
        la.tune_prior(prior_structure="diagonal")
    with pytest.raises(ValueError, match="Kronecker"):
        la.log_marginal_likelihood(torch.ones(la.n_params, dtype=DTYPE))


def test_save_load_round_trip_is_bit_identical(tmp_path, fitted):
    likelihood, model, x, _y, la, _curvature = fitted
    la.prior_precision = 0.7
    path = tmp_path / "ekfac.pt"
    la.save(path)
    loaded = Laplace.load(path, model)
    assert loaded.structure == "ekfac"
    xt = torch.randn(4, *x.shape[1:], generator=generator(16), dtype=DTYPE)
    a = la.predict(xt, joint_outputs=True)
    b = loaded.predict(xt, joint_outputs=True)
    assert torch.equal(a.logit_cov, b.logit_cov)
    field = "probs" if likelihood == "classification" else "mean"
    assert torch.equal(getattr(a, field), getattr(b, field))
    for old, new in zip(la.curvature.blocks, loaded.curvature.blocks, strict=True):
        assert torch.equal(old.values, new.values)
        assert torch.equal(old.to_dense(), new.to_dense())
    assert torch.equal(la.log_marginal_likelihood(), loaded.log_marginal_likelihood())
    assert torch.equal(
        la.sample(3, generator=generator(17)), loaded.sample(3, generator=generator(17))
    )
    # and through state_dict into a fresh object
    fresh = Laplace(copy.deepcopy(model), likelihood, structure="ekfac")
    fresh.load_state_dict(la.state_dict())
    assert torch.equal(fresh.predict(xt, joint_outputs=True).logit_cov, a.logit_cov)


# --------------------------------------------------------------------------------------
# 5. a one-shot iterator is refused
# --------------------------------------------------------------------------------------
def test_one_shot_generator_is_refused():
    model, x, y = _problem("mlp", "classification")
    la = Laplace(model, "classification", structure="ekfac")
    batches = ((x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N_DATA, BATCH))
    with pytest.raises(ValueError, match=r"(?s)ekfac.*more than once.*one-shot"):
        la.fit(batches)
    # nothing was consumed or fitted: the same data as a list works
    with pytest.raises(RuntimeError, match="not been fitted"):
        la.log_marginal_likelihood()
    la.fit(list(batches))
    assert la.n_data == N_DATA
