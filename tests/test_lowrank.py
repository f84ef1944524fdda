"""``structure=LowRank(rank=k)`` (top-k eigenpairs plus a diagonal remainder) against
dense float64 oracles.

* the exact GGN of ``reference.dense_ggn`` (and the empirical Fisher of
  ``reference.empirical_fisher``) and its ``torch.linalg.eigh``: eigenvalues, the
  top-k subspace (projector distance), the remainder ``D`` and the exact diagonal;
* dense formulas with ``M = D + U diag(λ) Uᵀ`` written out as a matrix for everything
  the Woodbury identity is used for: the evidence, the GLM output covariance ``J Σ Jᵀ``
  (``torch.func`` Jacobians), the pyro posterior's density and entropy (torch's
  ``MultivariateNormal``), the sampling map (replayed generator) and MacKay's
  fixed-point equations with the covariance from a dense inverse.

Tiny float64 models, local generators only.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import assert_max_close, generator
from torch import Tensor

from laplacefim import Laplace, LowRank
from laplacefim.marglik import DIAGONAL_HYPERPRIOR_STRENGTH

DTYPE = ref.DTYPE
N_DATA = 12
BATCH = 5  # uneven last batch
N_OUT = {"classification": 3, "regression": 2}
SIGMA = 0.7
RANK = 4
# Lanczos residual tolerance asked for: Ritz values then carry errors of order tol·λmax
# at worst (and the solver stops at the whole space for these tiny P anyway).
SOLVER_TOL = 1e-12

# Dense float64 brute force against the structured path: reassociation only.
RTOL = 1e-10
# Eigenvalues of an iteratively found top-k against eigh.
EIG_RTOL = 1e-8
# Spectral-norm distance of the two top-k projectors (Davis–Kahan: residual / gap).
PROJ_TOL = 1e-7
# rank = P: the whole spectrum by Lanczos on the whole space, D what rounding leaves.
FULL_RANK_RTOL = 1e-9
# Dense inverses / log-determinants of the posterior precision (condition ~1e2).
DENSE_RTOL = 1e-9
# The diagonal prior's fixed point stops at a relative change of 1e-10; it is checked with
# the covariance from a dense inverse.
MACKAY_RTOL = 1e-7
# Newton on the log prior stops at a predicted gain of 1e-10 (gradient ~1e-5), scaled by P.
STATIONARY_RTOL = 1e-4
# Whitened Monte-Carlo covariance of N_MC samples: 6 standard deviations of an entry.
N_MC = 16384
MC_ATOL = 6.0 * math.sqrt(2.0 / N_MC)


def _sigma(likelihood: str) -> float:
    return SIGMA if likelihood == "regression" else 1.0


def _problem(likelihood: str, seed: int = 0):
    g = generator(5200 + 31 * seed)
    model = ref.mlp(N_OUT[likelihood], g)  # 4-5-C with tanh
    x = torch.randn(N_DATA, 4, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, N_DATA, N_OUT[likelihood], g)
    return model, x, y


def _fit(model, x, y, likelihood, rank=RANK, *, prior=1.0, **options):
    kw = {"sigma_noise": SIGMA} if likelihood == "regression" else {}
    structure = LowRank(rank=rank, tol=SOLVER_TOL, max_passes=50)
    la = Laplace(model, likelihood, structure=structure, prior_precision=prior, **kw, **options)
    return la.fit(ref.loader(x, y, BATCH))


def _top(matrix: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def _check_top_k(block, matrix: Tensor, k: int) -> None:
    values, vectors = _top(matrix, k)
    full = torch.linalg.eigvalsh(matrix).flip(0)
    assert float(full[k - 1] - full[k]) > 1e-2 * float(full[0]), "no eigengap: test ill-posed"
    assert block.vectors.shape == (matrix.shape[0], k) and block.values.shape == (k,)
    u = block.vectors.to(DTYPE)
    assert_max_close(u.T @ u, torch.eye(k, dtype=DTYPE), RTOL)
    order = block.values.argsort(descending=True)
    assert_max_close(block.values[order], values, EIG_RTOL)
    distance = torch.linalg.matrix_norm(u @ u.T - vectors @ vectors.T, ord=2)
    assert float(distance) <= PROJ_TOL, float(distance)
    # each returned vector is an eigenvector for its value
    assert_max_close(matrix @ u, u * block.values, EIG_RTOL)


# --------------------------------------------------------------------------------------
# 1./2. the factors against eigh of the dense GGN
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_top_eigenpairs_and_remainder_of_the_ggn(likelihood):
    model, x, y = _problem(likelihood)
    la = _fit(model, x, y, likelihood)
    ggn = ref.dense_ggn(model, ref.trainable_names(model), x, likelihood, _sigma(likelihood))
    (block,) = la.curvature.blocks
    assert block.numel == ggn.shape[0]
    _check_top_k(block, ggn, RANK)
    u, lam = block.vectors, block.values
    low_rank = (u * lam) @ u.T
    expected_d = (ggn.diagonal() - low_rank.diagonal()).clamp_min(0)
    assert_max_close(block.diag, expected_d, RTOL)
    assert bool((block.diag >= 0).all())
    # the approximation keeps the exact diagonal
    assert_max_close(la.curvature.diagonal(), ggn.diagonal(), RTOL)
    assert_max_close(la.curvature.to_dense(), torch.diag(expected_d) + low_rank, RTOL)
    # and the low-rank part is the best rank-k approximation: the error is the rest
    values = torch.linalg.eigvalsh(ggn).flip(0)
    rest = torch.linalg.matrix_norm(ggn - low_rank, ord=2)
    assert_max_close(rest, values[RANK], EIG_RTOL)


def test_full_rank_reproduces_the_dense_ggn():
    model, x, y = _problem("classification", seed=1)
    ggn = ref.dense_ggn(model, ref.trainable_names(model), x, "classification")
    P = ggn.shape[0]
    la = _fit(model, x, y, "classification", rank=P)
    (block,) = la.curvature.blocks
    assert block.values.numel() == P
    assert_max_close(la.curvature.to_dense(), ggn, FULL_RANK_RTOL)
    assert float(block.diag.abs().max()) <= FULL_RANK_RTOL * float(ggn.abs().max())
    assert_max_close(la.curvature.diagonal(), ggn.diagonal(), RTOL)


# --------------------------------------------------------------------------------------
# 3. Woodbury: evidence, predictive, posterior, samples against dense formulas
# --------------------------------------------------------------------------------------
def _per_param(kind: str, la: Laplace) -> tuple[Tensor, Tensor]:
    """(prior as given to the package, the same expanded per parameter)."""
    if kind == "scalar":
        prior = torch.tensor(0.8, dtype=DTYPE)
        return prior, prior.expand(la.n_params)
    if kind == "layerwise":  # the MLP has two modules owning parameters
        prior = torch.tensor([0.5, 2.0], dtype=DTYPE)
        modules = [name.rpartition(".")[0] for name in la.parameter_names]
        index = {m: i for i, m in enumerate(dict.fromkeys(modules))}
        params = dict(la.model.named_parameters())
        expanded = torch.cat(
            [
                prior[index[m]].expand(params[n].numel())
                for n, m in zip(la.parameter_names, modules, strict=True)
            ]
        )
        return prior, expanded
    prior = 0.3 + torch.rand(la.n_params, generator=generator(77), dtype=DTYPE) * 2.0
    return prior, prior


def _dense_curvature(la: Laplace) -> Tensor:
    """``D + U diag(λ) Uᵀ`` from the block's factors, as a dense matrix."""
    (block,) = la.curvature.blocks
    return torch.diag(block.diag) + (block.vectors * block.values) @ block.vectors.T


def _dense_evidence(model, x, y, likelihood, curvature, prior, sigma=None) -> Tensor:
    """``log p(D|θ) − ½ θᵀP₀θ − ½ (log det(F + P₀) − log det P₀)``, P₀ per parameter."""
    sigma = _sigma(likelihood) if sigma is None else sigma
    theta = ref.flat_params(model, ref.trainable_names(model))
    f = ref.outputs(model, x)
    loglik = -sum(ref.nll(likelihood, f[n], y[n], sigma) for n in range(len(y)))
    precision = curvature + torch.diag(prior)
    return (
        loglik
        - 0.5 * (prior * theta.square()).sum()
        - 0.5 * (torch.linalg.slogdet(precision)[1] - prior.log().sum())
    )


@pytest.fixture(scope="module", params=["classification", "regression"])
def fitted(request):
    likelihood = request.param
    model, x, y = _problem(likelihood, seed=2)
    la = _fit(model, x, y, likelihood)
    return likelihood, model, x, y, la


PRIORS = ["scalar", "layerwise", "per_parameter"]


@pytest.mark.parametrize("prior_kind", PRIORS)
def test_evidence_matches_dense_formula(fitted, prior_kind):
    likelihood, model, x, y, la = fitted
    prior, per_param = _per_param(prior_kind, la)
    curvature = _dense_curvature(la)
    expected = _dense_evidence(model, x, y, likelihood, curvature, per_param)
    assert_max_close(la.log_marginal_likelihood(prior), expected, DENSE_RTOL)
    if likelihood == "regression":  # another noise rescales the GGN by σ_fit² / σ²
        sigma = 1.3
        scaled = curvature * SIGMA**2 / sigma**2
        expected = _dense_evidence(model, x, y, likelihood, scaled, per_param, sigma)
        assert_max_close(la.log_marginal_likelihood(prior, sigma_noise=sigma), expected, DENSE_RTOL)


@pytest.mark.parametrize("prior_kind", PRIORS)
def test_glm_output_covariance_is_j_sigma_jt(fitted, prior_kind):
    _likelihood, model, _x, _y, la = fitted
    prior, per_param = _per_param(prior_kind, la)
    la.prior_precision = prior
    precision = _dense_curvature(la) + torch.diag(per_param)
    assert_max_close(la.posterior_precision.to_dense(), precision, RTOL)
    xt = torch.randn(5, 4, generator=generator(21), dtype=DTYPE)
    J = ref.jacobian(model, ref.trainable_names(model), xt)
    expected = torch.einsum("bcp,pq,bdq->bcd", J, torch.linalg.inv(precision), J)
    assert_max_close(la.predict(xt, joint_outputs=True).logit_cov, expected, DENSE_RTOL)


@pytest.mark.parametrize("prior_kind", PRIORS)
def test_posterior_density_entropy_and_variance(fitted, prior_kind):
    _likelihood, _model, _x, _y, la = fitted
    prior, per_param = _per_param(prior_kind, la)
    la.prior_precision = prior
    precision = _dense_curvature(la) + torch.diag(per_param)
    dense = torch.distributions.MultivariateNormal(la.mean, precision_matrix=precision)
    posterior = la.posterior
    points = la.mean + torch.randn(4, la.n_params, generator=generator(22), dtype=DTYPE)
    assert_max_close(posterior.log_prob(points), dense.log_prob(points), DENSE_RTOL)
    assert_max_close(posterior.entropy(), dense.entropy(), DENSE_RTOL)
    assert_max_close(posterior.variance, torch.linalg.inv(precision).diagonal(), DENSE_RTOL)


@pytest.mark.parametrize("prior_kind", PRIORS)
def test_samples_have_the_posterior_covariance(fitted, prior_kind):
    """Samples are ``θ* + L z`` with ``z`` standard normal rows drawn from ``generator``:
    replaying the generator recovers ``L`` (least squares, residual 0) and ``L Lᵀ`` must be
    ``Σ``; a whitened Monte-Carlo check does not rely on the draw order."""
    _likelihood, _model, _x, _y, la = fitted
    prior, per_param = _per_param(prior_kind, la)
    la.prior_precision = prior
    P = la.n_params
    precision = _dense_curvature(la) + torch.diag(per_param)
    cov = torch.linalg.inv(precision)
    n = 3 * P
    samples = la.sample(n, generator=generator(23)) - la.mean
    z = torch.randn((n, P), generator=generator(23), dtype=DTYPE)
    lt = torch.linalg.lstsq(z, samples).solution
    assert_max_close(z @ lt, samples, RTOL)
    assert_max_close(lt.T @ lt, cov, DENSE_RTOL)
    many = la.sample(N_MC, generator=generator(24)) - la.mean
    white = many @ torch.linalg.cholesky(precision)
    empirical = white.T @ white / N_MC
    assert float((empirical - torch.eye(P, dtype=DTYPE)).abs().max()) <= MC_ATOL


def test_tune_prior_diagonal_is_the_fixed_point_under_its_hyperprior():
    # δₚ = (γₚ + κ) / (θₚ² + κ / cₚ), cₚ the layer-wise optimum of p's layer (4-5-C MLP)
    model, x, y = _problem("regression", seed=5)
    layers = _fit(model, x, y, "regression").tune_prior("marglik", "layerwise", tune_noise=False)
    sizes = [4 * 5 + 5, (5 + 1) * N_OUT["regression"]]
    center = layers.prior_precision.repeat_interleave(torch.tensor(sizes))
    la = _fit(model, x, y, "regression")
    result = la.tune_prior(prior_structure="diagonal", tune_noise=False, max_iter=1000)
    assert result.converged, result.n_iter
    assert torch.equal(la.sigma_noise, torch.tensor(SIGMA, dtype=la.sigma_noise.dtype))
    prior = la.prior_precision
    assert prior.shape == (la.n_params,)
    theta = ref.flat_params(model, ref.trainable_names(model))
    cov = torch.linalg.inv(_dense_curvature(la) + torch.diag(prior))
    gamma = (1.0 - prior * cov.diagonal()).clamp(0.0, 1.0)
    kappa = DIAGONAL_HYPERPRIOR_STRENGTH
    expected = (gamma + kappa) / (theta.square() + kappa / center)
    assert_max_close(prior, expected, MACKAY_RTOL)
    expected_value = _dense_evidence(model, x, y, "regression", _dense_curvature(la), prior)
    assert_max_close(result.log_marginal_likelihood, expected_value, DENSE_RTOL)


def test_tune_prior_scalar_converges_to_a_stationary_point():
    model, x, y = _problem("regression", seed=4)
    la = _fit(model, x, y, "regression")
    result = la.tune_prior(tune_noise=False)
    assert result.converged
    curvature = _dense_curvature(la)
    log_prior = result.prior_precision.to(DTYPE).log().clone().requires_grad_(True)

    def evidence(lp: Tensor) -> Tensor:
        prior = lp.exp().expand(la.n_params)
        return _dense_evidence(model, x, y, "regression", curvature, prior)

    (grad,) = torch.autograd.grad(evidence(log_prior), log_prior)
    assert float(grad.abs()) <= STATIONARY_RTOL * la.n_params, float(grad)
    for step in (-1e-2, 1e-2):
        assert float(evidence(log_prior.detach() + step)) < float(evidence(log_prior.detach()))


def test_tune_prior_and_noise_jointly_is_stationary():
    """Regression: prior and noise tuned together; the dense evidence (the GGN rescaled by
    σ_fit²/σ², the likelihood at σ) has zero gradient in both logarithms there."""
    model, x, y = _problem("regression", seed=4)
    la = _fit(model, x, y, "regression")
    result = la.tune_prior()
    assert result.converged
    assert float(result.sigma_noise) != SIGMA  # the noise moved
    curvature = _dense_curvature(la)
    start = torch.stack([result.prior_precision, result.sigma_noise]).to(DTYPE).log()
    point = start.clone().requires_grad_(True)

    def evidence(v: Tensor) -> Tensor:
        prior, sigma = v.exp()
        scaled = curvature * SIGMA**2 / sigma**2
        return _dense_evidence(model, x, y, "regression", scaled, prior.expand(la.n_params), sigma)

    (grad,) = torch.autograd.grad(evidence(point), point)
    assert float(grad.abs().max()) <= STATIONARY_RTOL * la.n_params, grad
    assert_max_close(result.log_marginal_likelihood, evidence(start), DENSE_RTOL)


# --------------------------------------------------------------------------------------
# 4. curvature kinds
# --------------------------------------------------------------------------------------
def test_mc_fisher_is_refused():
    model, x, y = _problem("classification")
    la = Laplace(model, "classification", structure=LowRank(rank=3), curvature="fisher")
    with pytest.raises(ValueError, match="ggn"):
        la.fit(ref.loader(x, y, BATCH))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_empirical_fisher_top_eigenpairs(likelihood):
    model, x, y = _problem(likelihood, seed=5)
    la = _fit(model, x, y, likelihood, curvature="empirical_fisher")
    ef = ref.empirical_fisher(
        model, ref.trainable_names(model), x, y, likelihood, _sigma(likelihood)
    )
    (block,) = la.curvature.blocks
    _check_top_k(block, ef, RANK)
    assert_max_close(la.curvature.diagonal(), ef.diagonal(), RTOL)


def test_one_shot_generator_is_refused():
    model, x, y = _problem("classification")
    la = Laplace(model, "classification", structure=LowRank(rank=3))
    batches = ((x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N_DATA, BATCH))
    with pytest.raises(ValueError, match="more than once"):
        la.fit(batches)


# --------------------------------------------------------------------------------------
# 5. persistence
# --------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, fitted):
    likelihood, model, _x, _y, la = fitted
    prior, _ = _per_param("per_parameter", la)
    la.prior_precision = prior
    path = tmp_path / "lowrank.pt"
    la.save(path)
    loaded = Laplace.load(path, model)
    assert loaded.structure == "lowrank"
    assert torch.equal(loaded.prior_precision, la.prior_precision)
    (old,), (new,) = la.curvature.blocks, loaded.curvature.blocks
    for name in ("diag", "vectors", "values"):
        assert torch.equal(getattr(old, name), getattr(new, name)), name
    xt = torch.randn(4, 4, generator=generator(25), dtype=DTYPE)
    a, b = la.predict(xt, joint_outputs=True), loaded.predict(xt, joint_outputs=True)
    assert torch.equal(a.logit_cov, b.logit_cov)
    field = "probs" if likelihood == "classification" else "mean"
    assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(la.log_marginal_likelihood(), loaded.log_marginal_likelihood())
    assert torch.equal(
        la.sample(3, generator=generator(26)), loaded.sample(3, generator=generator(26))
    )
    # the structure's options (rank, oversample, tol, max_passes) survive
    assert loaded.config.structure.options() == la.config.structure.options()
