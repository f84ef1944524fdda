"""Heteroscedastic regression end to end through ``Laplace``, against dense references.

The model outputs ``(B, 2K)``: ``K`` means, then ``K`` log-variances (``"log_var"``) or
softplus scales (``"softplus"``). The curvature the package promises is the GGN of the
Gaussian in its natural parameters ``η = (μ/σ², −1/(2σ²))``:
``G = Σₙ J_ηₙᵀ H_η J_ηₙ`` with ``J_η`` the Jacobian of ``η(f(xₙ; θ))`` in ``θ`` and ``H_η``
the Hessian of the NLL as a function of ``η``. Both are computed here with ``torch.func``
from ``η(f)`` and the NLL written out in this file (nothing from the package's likelihood),
on a tiny float64 MLP (4 → 5 → tanh → 2K), 12 data rows in batches of 5.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import assert_close, generator
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

from laplacefim import Heteroscedastic, Laplace

DTYPE = torch.float64
K = 2  # targets; the model has 2K outputs
N_DATA = 12
BATCH = 5
LOG_2PI = math.log(2 * math.pi)
PARAMETRISATIONS = ["log_var", "softplus"]

# Dense torch.func reference against the package's batched column backpropagation and its
# structured blocks: float64 reassociation only.
EXACT_RTOL = 1e-10
# Gauss–Hermite nodes per target dimension, exact for polynomials of degree < 2·QUAD_NODES;
# the MC-Fisher variance below integrates polynomials of degree 8 in the targets.
QUAD_NODES = 6
# MC Fisher: with k labels per datum every entry is an average of k iid terms per datum, so
# its variance is exactly Σₙ Varₙ/k (Varₙ by the quadrature above). The test requires the
# predicted relative RMS error √(Σᵢⱼ Varᵢⱼ)/‖G‖ to be below MC_RTOL/4, so the tolerance is
# at least four RMS errors away from the expectation.
FISHER_SAMPLES = 2000
MC_RTOL = 0.1
# Weight-sampling predictive on a linear model: each moment within MC_Z standard errors.
NN_SAMPLES = 20000
MC_Z = 6.0
# Prior tuning: Newton on log δ stops when the predicted gain is below 1e-10, so the
# gradient of the evidence in log δ is ~√(2·1e-10·curvature) there; allow it relative to P.
TUNE_GRAD_TOL = 1e-4
# Trapezoid rule for E[softplus(s)^p] (4001 nodes over ±12 sd of a smooth integrand).
TRAPEZOID_RTOL = 1e-9


# --------------------------------------------------------------------------------------
# the Gaussian written out: scale, NLL in the outputs, natural parameters, NLL in η
# --------------------------------------------------------------------------------------
def scale_of(raw: Tensor, parametrisation: str) -> Tensor:
    if parametrisation == "log_var":
        return torch.exp(0.5 * raw)
    return torch.log1p(torch.exp(raw))


def nll(fn: Tensor, yn: Tensor, parametrisation: str) -> Tensor:
    """NLL of one datum: outputs ``(2K,)``, target ``(K,)``."""
    mu, sigma = fn[:K], scale_of(fn[K:], parametrisation)
    return (0.5 * ((yn - mu) / sigma).square() + sigma.log() + 0.5 * LOG_2PI).sum()


def natural(fn: Tensor, parametrisation: str) -> Tensor:
    var = scale_of(fn[K:], parametrisation).square()
    return torch.cat([fn[:K] / var, -0.5 / var])


def nll_natural(eta: Tensor, yn: Tensor) -> Tensor:
    """``−η·(y, y²) + A(η)`` with the Gaussian log-partition ``A``."""
    e1, e2 = eta[:K], eta[K:]
    return (
        -e1 * yn - e2 * yn.square() - e1.square() / (4 * e2) - 0.5 * torch.log(-2 * e2)
    ).sum() + 0.5 * K * LOG_2PI


def expected_softplus_power(m: Tensor, v: Tensor, power: int) -> Tensor:
    """``E[softplus(s)^power]`` for ``s ~ N(m, v)`` by a fine trapezoid rule."""
    z = torch.linspace(-12.0, 12.0, 4001, dtype=DTYPE)
    s = m[..., None] + v.sqrt()[..., None] * z
    density = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    return torch.trapezoid(torch.log1p(torch.exp(s)) ** power * density, z, dim=-1)


def standard_normal_quadrature(n_nodes: int, dim: int) -> tuple[Tensor, Tensor]:
    """Gauss–Hermite for ``N(0, I_dim)`` by Golub–Welsch: nodes ``(n^dim, dim)``, weights."""
    off = torch.arange(1, n_nodes, dtype=DTYPE).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    grid = torch.cartesian_prod(*[nodes] * dim).reshape(-1, dim)
    weights = torch.cartesian_prod(*[vectors[0].square()] * dim).reshape(-1, dim).prod(-1)
    return grid, weights


# --------------------------------------------------------------------------------------
# problems and the dense reference
# --------------------------------------------------------------------------------------
def _problem(seed: int = 0, model: nn.Module | None = None):
    g = generator(500 + seed)
    model = ref.mlp(2 * K, g) if model is None else ref.init_(model, g)
    d_in = next(model.parameters()).shape[1]
    x = torch.randn(N_DATA, d_in, generator=g, dtype=DTYPE)
    y = torch.randn(N_DATA, K, generator=g, dtype=DTYPE)
    return model, x, y


def _fit(model, x, y, parametrisation, **options) -> Laplace:
    options.setdefault("structure", "full")
    options.setdefault("prior_precision", 0.0)
    generator = options.pop("generator", None)
    la = Laplace(model, Heteroscedastic(parametrisation=parametrisation), **options)
    return la.fit(ref.loader(x, y, BATCH), generator=generator)


class Dense:
    """Jacobians, natural-parameter GGN, NLL and evidence of a model on data, by brute force."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, parametrisation: str):
        self.p = parametrisation
        self.x, self.y = x, y
        names = ref.trainable_names(model)
        self.forward = ref.functional(model, names)
        self.theta = ref.flat_params(model, names)
        self.n_params = self.theta.numel()

        def eta_of(theta: Tensor, xn: Tensor) -> Tensor:
            return natural(self.forward(theta, xn[None])[0], parametrisation)

        self.J_eta = vmap(jacrev(eta_of), in_dims=(None, 0))(self.theta, x)  # (N, 2K, P)
        eta = vmap(eta_of, in_dims=(None, 0))(self.theta, x)
        self.H_eta = vmap(hessian(nll_natural))(eta, y)  # (N, 2K, 2K)
        self.ggn = torch.einsum("nep,nef,nfq->pq", self.J_eta, self.H_eta, self.J_eta)

    def total_nll(self, theta: Tensor) -> Tensor:
        out = self.forward(theta, self.x)
        return vmap(nll, in_dims=(0, 0, None))(out, self.y, self.p).sum()

    def evidence(self, prior: Tensor) -> Tensor:
        precision = self.ggn + prior * torch.eye(self.n_params, dtype=DTYPE)
        return (
            -self.total_nll(self.theta)
            - 0.5 * prior * self.theta.square().sum()
            - 0.5 * (torch.linalg.slogdet(precision)[1] - self.n_params * prior.log())
        )


# --------------------------------------------------------------------------------------
# 1. the fitted curvature is the natural-parameter GGN
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_full_curvature_is_the_natural_parameter_ggn(parametrisation):
    model, x, y = _problem()
    dense = Dense(model, x, y, parametrisation)
    la = _fit(model, x, y, parametrisation)
    assert_close(la.curvature.to_dense(), dense.ggn, EXACT_RTOL)
    assert_close(la.posterior_precision.to_dense(), dense.ggn, EXACT_RTOL)  # prior 0, temperature 1


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_diag_and_kron_structures_match_the_dense_ggn(parametrisation):
    model, x, y = _problem()
    dense = Dense(model, x, y, parametrisation)
    diag = _fit(model, x, y, parametrisation, structure="diag")
    assert_close(diag.curvature.to_dense(), torch.diag(dense.ggn.diagonal()), EXACT_RTOL)

    kron = _fit(model, x, y, parametrisation, structure="kron").curvature.to_dense()
    names = ref.trainable_names(model)
    slices = ref.param_slices(model, names)
    for name in ("0.bias", "2.bias"):  # a bias block of KFAC is its exact GGN block
        s = slices[name]
        assert_close(kron[s, s], dense.ggn[s, s], EXACT_RTOL)
    # the weight blocks: Kronecker factors from the natural-GGN middle matrices in the outputs
    cr = ref.CurvatureReference(model, names, x, "regression")
    d_eta = vmap(jacrev(lambda fn: natural(fn, parametrisation)))(cr.f)
    middle = torch.einsum("nep,nef,nfq->npq", d_eta, dense.H_eta, d_eta)
    assert_close(cr.curvature(middle, "full"), dense.ggn, EXACT_RTOL)  # the same GGN, two routes
    assert_close(kron, cr.curvature(middle, "kron"), EXACT_RTOL)


def test_one_datum_through_a_linear_layer_kron_blocks_are_exact():
    model, x, y = _problem(model=nn.Linear(3, 2 * K, dtype=DTYPE))
    dense = Dense(model, x[:1], y[:1], "log_var")
    kron = _fit(model, x[:1], y[:1], "log_var", structure="kron").curvature.to_dense()
    slices = ref.param_slices(model, ref.trainable_names(model))
    for s in slices.values():  # weight and bias blocks exact; KFAC has no cross blocks
        assert_close(kron[s, s], dense.ggn[s, s], EXACT_RTOL)
    w, b = slices["weight"], slices["bias"]
    assert not kron[w, b].any() and dense.ggn[w, b].abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# 2. PSD, unlike the Hessian
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_curvature_is_psd_where_the_hessian_is_indefinite(parametrisation):
    model, x, y = _problem()
    dense = Dense(model, x, y, parametrisation)
    hess = torch.func.hessian(dense.total_nll)(dense.theta)
    hess_eigs = torch.linalg.eigvalsh(hess)
    assert hess_eigs[0] < -1e-2 * hess_eigs[-1], "the NLL's Hessian should be indefinite here"
    eigs = torch.linalg.eigvalsh(_fit(model, x, y, parametrisation).curvature.to_dense())
    assert eigs[0] >= -1e-12 * eigs[-1], eigs[:3]


# --------------------------------------------------------------------------------------
# 3. the predictive on a linear model, in closed form
# --------------------------------------------------------------------------------------
def _linear_problem(parametrisation: str):
    d_in = 3
    model, x, y = _problem(seed=3, model=nn.Linear(d_in, 2 * K, dtype=DTYPE))
    la = _fit(model, x, y, parametrisation, prior_precision=0.5)
    x_test = torch.randn(5, d_in, generator=generator(31), dtype=DTYPE)
    # J of W x + b for (W row-major, b): rows e_c ⊗ xᵀ, then the identity
    eye = torch.eye(2 * K, dtype=DTYPE)
    J = torch.stack([torch.cat([torch.kron(eye, xb[None]), eye], 1) for xb in x_test])
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    cov = J @ sigma @ J.transpose(1, 2)
    with torch.no_grad():
        f = model(x_test)
    return la, x_test, f, cov


def _aleatoric(m: Tensor, v: Tensor, parametrisation: str) -> tuple[Tensor, Tensor]:
    """``E[σ²]`` and ``Var[σ²]`` for the raw output ``~ N(m, v)``."""
    if parametrisation == "log_var":  # σ² is lognormal
        mean = torch.exp(m + v / 2)
        return mean, (torch.exp(v) - 1) * mean.square()
    mean = expected_softplus_power(m, v, 2)
    return mean, expected_softplus_power(m, v, 4) - mean.square()


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_glm_predictive_on_a_linear_model(parametrisation):
    la, x_test, f, cov = _linear_problem(parametrisation)
    var = cov.diagonal(dim1=-2, dim2=-1)
    pred = la.predict(x_test, joint_outputs=True)
    aleatoric, _ = _aleatoric(f[:, K:], var[:, K:], parametrisation)
    assert_close(pred.mean, f[:, :K], EXACT_RTOL)
    assert_close(pred.epistemic_var, var[:, :K], EXACT_RTOL)
    assert_close(pred.aleatoric_var, aleatoric, TRAPEZOID_RTOL)
    assert_close(pred.var, var[:, :K] + aleatoric, TRAPEZOID_RTOL)
    assert_close(pred.logit_cov, cov, EXACT_RTOL)


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_weight_sampling_predictive_on_a_linear_model(parametrisation):
    """For a linear model sampled outputs are exactly ``N(f, J Σ Jᵀ)``: the sampling
    predictive's moments are within ``MC_Z`` standard errors of the closed forms."""
    la, x_test, f, cov = _linear_problem(parametrisation)
    var = cov.diagonal(dim1=-2, dim2=-1)
    pred = la.predict(x_test, method="nn", n_samples=NN_SAMPLES, generator=generator(32))
    aleatoric, aleatoric_var = _aleatoric(f[:, K:], var[:, K:], parametrisation)
    s = NN_SAMPLES
    checks = [
        (pred.mean, f[:, :K], (var[:, :K] / s).sqrt()),
        (pred.epistemic_var, var[:, :K], var[:, :K] * math.sqrt(2 / (s - 1))),
        (pred.aleatoric_var, aleatoric, (aleatoric_var / s).sqrt()),
    ]
    for actual, expected, sd in checks:
        assert bool(((actual - expected).abs() <= MC_Z * sd).all()), (actual - expected) / sd


# --------------------------------------------------------------------------------------
# 4 and 5. the evidence and prior tuning
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_evidence_equals_the_dense_formula(parametrisation):
    model, x, y = _problem()
    dense = Dense(model, x, y, parametrisation)
    la = _fit(model, x, y, parametrisation)
    assert_close(la.log_likelihood, -dense.total_nll(dense.theta), EXACT_RTOL)
    for prior in (0.3, 2.0):
        prior = torch.tensor(prior, dtype=DTYPE)
        assert_close(la.log_marginal_likelihood(prior), dense.evidence(prior), EXACT_RTOL)


@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_tune_prior_finds_the_stationary_point(parametrisation):
    model, x, y = _problem()
    dense = Dense(model, x, y, parametrisation)
    la = _fit(model, x, y, parametrisation, prior_precision=1.0)
    result = la.tune_prior()
    assert result.converged
    prior = la.prior_precision.to(DTYPE)
    assert_close(result.prior_precision.to(DTYPE), prior, EXACT_RTOL)
    # dE/d log δ = P/2 − ½ δ‖θ‖² − ½ Σᵢ δ/(λᵢ + δ) over the eigenvalues λ of G
    eigs = torch.linalg.eigvalsh(dense.ggn)
    slope = 0.5 * (
        dense.n_params - prior * dense.theta.square().sum() - (prior / (eigs + prior)).sum()
    )
    assert slope.abs() < TUNE_GRAD_TOL * dense.n_params, slope
    log_prior = prior.log().requires_grad_()
    (autograd_slope,) = torch.autograd.grad(dense.evidence(log_prior.exp()), log_prior)
    assert_close(autograd_slope, slope, 1e-6, atol=1e-8)
    value = dense.evidence(prior)
    assert_close(result.log_marginal_likelihood, value, EXACT_RTOL)
    for factor in (0.9, 1.1):  # a maximum, not just a stationary point
        assert dense.evidence(prior * factor) < value


# --------------------------------------------------------------------------------------
# 6. persistence keeps the parametrisation
# --------------------------------------------------------------------------------------
def test_save_load_keeps_the_softplus_parametrisation(tmp_path):
    model, x, y = _problem()
    la = _fit(model, x, y, "softplus", structure="kron", prior_precision=1.0)
    path = tmp_path / "softplus.pt"
    la.save(path)
    loaded = Laplace.load(path, model)
    assert loaded.state_dict()["options"]["likelihood_options"] == {"parametrisation": "softplus"}
    x_test = torch.randn(4, 4, generator=generator(60), dtype=DTYPE)
    before, after = la.predict(x_test), loaded.predict(x_test)
    for name in ("mean", "epistemic_var", "aleatoric_var", "var"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name
    # the check can fail: the same outputs read as log-variances predict other noise
    log_var = _fit(model, x, y, "log_var", structure="kron", prior_precision=1.0)
    assert not torch.allclose(log_var.predict(x_test).aleatoric_var, after.aleatoric_var)
    with pytest.raises(ValueError, match="likelihood_options"):
        log_var.load_state_dict(la.state_dict())


# --------------------------------------------------------------------------------------
# 7. the MC Fisher approaches the GGN
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parametrisation", PARAMETRISATIONS)
def test_mc_fisher_approaches_the_ggn(parametrisation):
    model, x, y = _problem()
    dense = Dense(model, x, y, parametrisation)
    # exact variance of the estimator: per datum, the law of u uᵀ with u = J_fᵀ ∇_f ℓ(ỹ)
    J_f = ref.jacobian(model, ref.trainable_names(model), x)  # (N, 2K, P)
    with torch.no_grad():
        f = model(x)
    grid, weights = standard_normal_quadrature(QUAD_NODES, K)
    labels = f[:, None, :K] + scale_of(f[:, None, K:], parametrisation) * grid  # (N, M, K)
    score = torch.func.grad(nll)
    r = vmap(vmap(score, in_dims=(None, 0, None)), in_dims=(0, 0, None))(f, labels, parametrisation)
    u = torch.einsum("nep,nme->nmp", J_f, r)
    outer = u[..., :, None] * u[..., None, :]
    mean = torch.einsum("m,nmpq->pq", weights, outer)
    variance = (
        torch.einsum("m,nmpq->npq", weights, outer.square())
        - torch.einsum("m,nmpq->npq", weights, outer).square()
    ).sum(0) / FISHER_SAMPLES
    assert_close(mean, dense.ggn, EXACT_RTOL)  # the Fisher identity, through the network
    norm = torch.linalg.matrix_norm(dense.ggn)
    predicted_rms = variance.sum().sqrt() / norm
    assert predicted_rms < MC_RTOL / 4, predicted_rms

    la = _fit(
        model,
        x,
        y,
        parametrisation,
        curvature="fisher",
        fisher_samples=FISHER_SAMPLES,
        generator=generator(70),
    )
    error = torch.linalg.matrix_norm(la.curvature.to_dense() - dense.ggn) / norm
    assert error < MC_RTOL, (error, predicted_rms)
