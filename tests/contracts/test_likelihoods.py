"""The likelihood contract, one suite over every registered likelihood.

Each likelihood gets one line in ``CASES``: the object, how to draw outputs and valid
targets, and its per-datum negative log-likelihood written here in plain torch (never
calling the package). Every number the likelihood returns is checked against a reference
derived from that NLL alone, in float64:

* the loss-Hessian square root against ``torch.func.hessian`` of the NLL in the outputs,
  or, for the heteroscedastic Gaussian, against the GGN in its natural parameters
  ``(∂η/∂f)ᵀ H_η (∂η/∂f)`` with ``η(f)`` and the NLL in ``η`` written here and
  differentiated with ``torch.func``;
* the Fisher identity ``E_y[∇ℓ ∇ℓᵀ] = middle matrix`` by enumerating the labels
  (categorical, Bernoulli) or by tensor-product Gauss–Hermite quadrature (Gaussian; the
  nodes come from the Golub–Welsch eigenproblem here, exact for the polynomial integrands);
* Monte-Carlo quantities within ``MC_Z`` standard errors, each standard error computed from
  the exact second moments of the same quadrature;
* predictive links against a Monte-Carlo integral of the mean prediction, Gaussian moments
  in closed form (a fine trapezoid rule for ``E[softplus(s)²]``);
* ``torch.distributions`` log-densities for the predictive NLL.

Adding a likelihood to :data:`laplacefim.likelihoods.LIKELIHOODS` fails
``test_cases_cover_every_registered_likelihood`` until it gets a line here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_close, generator
from torch import Tensor
from torch.func import grad, hessian, jacrev, vmap

from laplacefim.likelihoods import (
    LIKELIHOODS,
    Binary,
    Classification,
    Heteroscedastic,
    Regression,
    make_likelihood,
)
from laplacefim.options import CurvatureKind, Link

DTYPE = torch.float64
N_BATCH = 6
N_CLASSES = 3
N_TARGETS = 2  # K: regression outputs, and targets of the heteroscedastic likelihood
LOG_2PI = math.log(2 * math.pi)

# Closed-form paths against torch.func derivatives: float64 reassociation only.
EXACT_RTOL = 1e-10
EXACT_ATOL = 1e-12
# Gauss–Hermite nodes per Gaussian dimension: exact for polynomials of degree < 2·QUAD_NODES.
# The Gaussian integrands below (score outer products and their squares, NLL differences)
# are polynomials of degree <= 8 in the target.
QUAD_NODES = 6
# Monte-Carlo checks: an estimate may be off by MC_Z standard errors (each computed exactly
# from the quadrature's moments); the Gaussian tail probability of a false failure is
# ~2e-9 per entry. Every draw comes from a fixed local generator, so the tests are
# deterministic.
MC_Z = 6.0
MC_SAMPLES = 20000  # sampled labels per datum for the MC Fisher check
LINK_MC_SAMPLES = 20000  # logit samples the library draws for link="mc"
REFERENCE_MC_SAMPLES = 200000  # logit samples of the reference integral
# Probit approximations are approximations. The binary one, σ(μ/√(1 + πv/8)) for E σ(z),
# is off by at most ~0.013 for any mean and variance. The softmax generalisation uses the
# marginal variances only and has no uniform bound; on the problem below (logit variances
# <= 0.53) it is measured 0.031 off the integral at worst, so this bound is loose on
# purpose. Both tests also require the probit to beat the plug-in softmax(μ) on average.
PROBIT_BINARY_TOL = 0.015
PROBIT_SOFTMAX_TOL = 0.06
# Trapezoid rule for E[softplus(s)²], s ~ N(m, v): 4001 nodes over ±12 standard deviations
# of a smooth integrand with Gaussian tails, accurate far below this.
TRAPEZOID_RTOL = 1e-9

NO_NOISE = (1.0,)
REGRESSION_NOISES = (1.0, 0.7, (0.5, 1.3))


def _noise(value: float | tuple[float, ...]) -> Tensor:
    return torch.tensor(value, dtype=DTYPE)


# --------------------------------------------------------------------------------------
# independent per-datum negative log-likelihoods (fn (C,), yn one datum's target)
# --------------------------------------------------------------------------------------
def nll_categorical(fn: Tensor, yn: Tensor, noise: Tensor) -> Tensor:
    onehot = (torch.arange(fn.shape[0]) == yn).to(fn.dtype)
    return torch.logsumexp(fn, 0) - (fn * onehot).sum()


def nll_gaussian(fn: Tensor, yn: Tensor, noise: Tensor) -> Tensor:
    sigma = noise.expand(fn.shape[0])
    return (0.5 * ((yn - fn) / sigma).square() + sigma.log() + 0.5 * LOG_2PI).sum()


def nll_bernoulli(fn: Tensor, yn: Tensor, noise: Tensor) -> Tensor:
    z = fn[0]
    return torch.logaddexp(torch.zeros_like(z), z) - yn * z


def scale_of(raw: Tensor, parametrisation: str) -> Tensor:
    """The heteroscedastic standard deviation from the raw second half of the outputs."""
    if parametrisation == "log_var":
        return torch.exp(0.5 * raw)
    return torch.log1p(torch.exp(raw))


def nll_heteroscedastic(parametrisation: str):
    def nll(fn: Tensor, yn: Tensor, noise: Tensor) -> Tensor:
        mu, raw = fn[:N_TARGETS], fn[N_TARGETS:]
        sigma = scale_of(raw, parametrisation)
        return (0.5 * ((yn - mu) / sigma).square() + sigma.log() + 0.5 * LOG_2PI).sum()

    return nll


def natural(fn: Tensor, parametrisation: str) -> Tensor:
    """``η = (μ/σ², −1/(2σ²))`` of one datum's outputs ``(2K,)``."""
    mu, raw = fn[:N_TARGETS], fn[N_TARGETS:]
    var = scale_of(raw, parametrisation).square()
    return torch.cat([mu / var, -0.5 / var])


def nll_natural(eta: Tensor, yn: Tensor) -> Tensor:
    """The Gaussian NLL as a function of its natural parameters: ``−η·T(y) + A(η)``."""
    e1, e2 = eta[:N_TARGETS], eta[N_TARGETS:]
    log_partition = -e1.square() / (4 * e2) - 0.5 * torch.log(-2 * e2)
    return (-e1 * yn - e2 * yn.square() + log_partition + 0.5 * LOG_2PI).sum()


def natural_ggn_middle(parametrisation: str):
    """``(∂η/∂f)ᵀ H_η (∂η/∂f)`` for one datum, both factors by ``torch.func``."""

    def middle(fn: Tensor, yn: Tensor, noise: Tensor) -> Tensor:
        d_eta = jacrev(lambda g: natural(g, parametrisation))(fn)
        h_eta = hessian(lambda e: nll_natural(e, yn))(natural(fn, parametrisation))
        return d_eta.T @ h_eta @ d_eta

    return middle


# --------------------------------------------------------------------------------------
# the law of the targets under the model: (weights (B, M), labels (B, M, ...))
# --------------------------------------------------------------------------------------
def standard_normal_quadrature(n_nodes: int, dim: int) -> tuple[Tensor, Tensor]:
    """Gauss–Hermite for ``N(0, I_dim)`` by Golub–Welsch: nodes ``(n^dim, dim)``, weights."""
    off = torch.arange(1, n_nodes, dtype=DTYPE).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    weights = vectors[0].square()
    grid = torch.cartesian_prod(*[nodes] * dim).reshape(-1, dim)
    w = torch.cartesian_prod(*[weights] * dim).reshape(-1, dim).prod(-1)
    return grid, w


def gaussian_law(mean: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
    grid, w = standard_normal_quadrature(QUAD_NODES, mean.shape[1])
    labels = mean[:, None, :] + sd[:, None, :] * grid[None]
    return w.expand(mean.shape[0], -1), labels


def law_categorical(f: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    p = torch.exp(f - torch.logsumexp(f, 1, keepdim=True))
    return p, torch.arange(f.shape[1]).expand(f.shape[0], -1)


def law_bernoulli(f: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    p = 1 / (1 + torch.exp(-f[:, 0]))
    labels = torch.tensor([0.0, 1.0], dtype=DTYPE).expand(f.shape[0], -1)
    return torch.stack([1 - p, p], 1), labels


def law_gaussian(f: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    return gaussian_law(f, noise.expand(f.shape[1]).expand_as(f))


def law_heteroscedastic(parametrisation: str):
    def law(f: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        return gaussian_law(f[:, :N_TARGETS], scale_of(f[:, N_TARGETS:], parametrisation))

    return law


# --------------------------------------------------------------------------------------
# exact Gaussian predictive moments: (mean of y, epistemic var, aleatoric var)
# --------------------------------------------------------------------------------------
def moments_regression(mean: Tensor, cov: Tensor, noise: Tensor):
    return mean, cov.diagonal(dim1=-2, dim2=-1), noise.square().expand_as(mean)


def expected_softplus_square(m: Tensor, v: Tensor) -> Tensor:
    """``E[softplus(s)²]`` for ``s ~ N(m, v)`` by a fine trapezoid rule."""
    z = torch.linspace(-12.0, 12.0, 4001, dtype=DTYPE)
    s = m[..., None] + v.sqrt()[..., None] * z
    density = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    return torch.trapezoid(torch.log1p(torch.exp(s)).square() * density, z, dim=-1)


def moments_heteroscedastic(parametrisation: str):
    def moments(mean: Tensor, cov: Tensor, noise: Tensor):
        var = cov.diagonal(dim1=-2, dim2=-1)
        m, v = mean[:, N_TARGETS:], var[:, N_TARGETS:]
        if parametrisation == "log_var":  # the mean of a lognormal
            aleatoric = torch.exp(m + v / 2)
        else:
            aleatoric = expected_softplus_square(m, v)
        return mean[:, :N_TARGETS], var[:, :N_TARGETS], aleatoric

    return moments


# --------------------------------------------------------------------------------------
# predictions from given output samples (S, B, C), written out directly
# --------------------------------------------------------------------------------------
def _unbiased_cov(samples: Tensor) -> Tensor:
    return torch.stack([torch.cov(samples[:, b].T) for b in range(samples.shape[1])])


def sampled_categorical(samples: Tensor, noise: Tensor) -> dict[str, Tensor]:
    probs = torch.exp(samples - torch.logsumexp(samples, -1, keepdim=True)).mean(0)
    return {
        "probs": probs,
        "logit_mean": samples.mean(0),
        "logit_var": samples.var(0, correction=1),
        "logit_cov": _unbiased_cov(samples),
    }


def sampled_bernoulli(samples: Tensor, noise: Tensor) -> dict[str, Tensor]:
    z = samples[..., 0]
    return {
        "probs": (1 / (1 + torch.exp(-z))).mean(0),
        "logit_mean": z.mean(0),
        "logit_var": z.var(0, correction=1),
    }


def _gaussian_fields(mean: Tensor, epistemic: Tensor, aleatoric: Tensor) -> dict[str, Tensor]:
    return {
        "mean": mean,
        "epistemic_var": epistemic,
        "aleatoric_var": aleatoric,
        "var": epistemic + aleatoric,
    }


def sampled_gaussian(samples: Tensor, noise: Tensor) -> dict[str, Tensor]:
    fields = _gaussian_fields(
        samples.mean(0),
        samples.var(0, correction=1),
        noise.square().expand(samples.shape[1:]),
    )
    return {**fields, "logit_cov": _unbiased_cov(samples)}


def sampled_heteroscedastic(parametrisation: str):
    def sampled(samples: Tensor, noise: Tensor) -> dict[str, Tensor]:
        mu, raw = samples[..., :N_TARGETS], samples[..., N_TARGETS:]
        fields = _gaussian_fields(
            mu.mean(0),
            mu.var(0, correction=1),
            scale_of(raw, parametrisation).square().mean(0),
        )
        return {**fields, "logit_cov": _unbiased_cov(samples)}

    return sampled


# --------------------------------------------------------------------------------------
# predictive NLL of targets under a prediction, by torch.distributions
# --------------------------------------------------------------------------------------
def predictive_nll_categorical(prediction, y: Tensor) -> Tensor:
    return -torch.distributions.Categorical(probs=prediction.probs).log_prob(y).sum()


def predictive_nll_bernoulli(prediction, y: Tensor) -> Tensor:
    return -torch.distributions.Bernoulli(probs=prediction.probs).log_prob(y).sum()


def predictive_nll_gaussian(prediction, y: Tensor) -> Tensor:
    normal = torch.distributions.Normal(prediction.mean, prediction.var.sqrt())
    return -normal.log_prob(y).sum()


# --------------------------------------------------------------------------------------
# the case list: one line per likelihood
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """Everything the contract needs to know about one likelihood, written independently.

    Attributes:
        likelihood: The object under test.
        n_out: Model outputs per datum ``C``.
        task: ``"classification"`` or ``"regression"``.
        nll: Per-datum NLL ``(fn (C,), yn, noise) -> ()``.
        law: The model's distribution of targets as weighted labels.
        draw_targets: Valid targets ``y`` for outputs ``f``, as a user passes them.
        mean_prediction: The MAP prediction (``point_prediction``) from outputs ``(B, C)``.
        noises: Noise values to check (``1.0`` only without a noise hyperparameter).
        middle: Reference middle matrix per datum; the NLL's Hessian in ``f`` if None.
        links: Links a classification predictive accepts.
        probit_tol: How far the probit link may be from the integral (an approximation).
        moments: Exact predictive moments (regression tasks).
        sampled: The prediction from output samples, written out.
        predictive_nll: Summed NLL of targets under a prediction.
        bad_targets: ``(make y from (f, y), exception, words one of which the message has)``.
        out_of_range: Targets of the right dtype and shape whose values are invalid.
    """

    likelihood: object
    n_out: int
    task: str
    nll: Callable[[Tensor, Tensor, Tensor], Tensor]
    law: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    draw_targets: Callable[[Tensor, torch.Generator], Tensor]
    mean_prediction: Callable[[Tensor], Tensor]
    sampled: Callable[[Tensor, Tensor], dict[str, Tensor]]
    predictive_nll: Callable[[object, Tensor], Tensor]
    noises: tuple = NO_NOISE
    middle: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    links: tuple[Link, ...] = ()
    probit_tol: float = 0.0
    moments: Callable | None = None
    bad_targets: tuple = ()
    out_of_range: tuple = ()


def _softmax(f: Tensor) -> Tensor:
    return torch.exp(f - torch.logsumexp(f, -1, keepdim=True))


def _with(index: int | tuple[int, int], value: float) -> Callable[[Tensor], Tensor]:
    """Targets with one entry replaced by ``value``."""

    def make(y: Tensor) -> Tensor:
        y = y.clone()
        y[index] = value
        return y

    return make


def _float_targets(f: Tensor, g: torch.Generator) -> Tensor:
    return torch.randn(f.shape[0], N_TARGETS, generator=g, dtype=DTYPE)


def _gaussian_bad_targets() -> tuple:
    return (
        (lambda f, y: y.round().long(), TypeError, ("dtype", "floating")),
        (lambda f, y: y[:, :1], ValueError, ("shape",)),
        (lambda f, y: torch.cat([y, y], 1), ValueError, ("shape",)),
        (lambda f, y: y[:-1], ValueError, ("shape",)),
    )


def _heteroscedastic_case(parametrisation: str) -> Case:
    return Case(
        likelihood=Heteroscedastic(parametrisation=parametrisation),
        n_out=2 * N_TARGETS,
        task="regression",
        nll=nll_heteroscedastic(parametrisation),
        law=law_heteroscedastic(parametrisation),
        draw_targets=_float_targets,
        mean_prediction=lambda f: f[:, :N_TARGETS],
        sampled=sampled_heteroscedastic(parametrisation),
        predictive_nll=predictive_nll_gaussian,
        middle=natural_ggn_middle(parametrisation),
        moments=moments_heteroscedastic(parametrisation),
        bad_targets=_gaussian_bad_targets(),
        out_of_range=(
            _with((1, 0), math.nan),
            _with((2, 1), math.inf),
        ),
    )


CASES: dict[str, Case] = {
    "classification": Case(
        likelihood=Classification(),
        n_out=N_CLASSES,
        task="classification",
        nll=nll_categorical,
        law=law_categorical,
        draw_targets=lambda f, g: torch.randint(0, f.shape[1], (f.shape[0],), generator=g),
        mean_prediction=_softmax,
        sampled=sampled_categorical,
        predictive_nll=predictive_nll_categorical,
        links=(Link.PROBIT, Link.MC, Link.BRIDGE),
        probit_tol=PROBIT_SOFTMAX_TOL,
        bad_targets=(
            (lambda f, y: y.to(DTYPE), TypeError, ("label", "dtype")),
            (lambda f, y: y.bool(), TypeError, ("label", "dtype")),
            (lambda f, y: y[:, None], ValueError, ("shape",)),
            (lambda f, y: y[:-1], ValueError, ("shape",)),
        ),
        out_of_range=(
            _with(0, N_CLASSES),
            _with(3, -1),
        ),
    ),
    "regression": Case(
        likelihood=Regression(),
        n_out=N_TARGETS,
        task="regression",
        nll=nll_gaussian,
        law=law_gaussian,
        draw_targets=_float_targets,
        mean_prediction=lambda f: f,
        sampled=sampled_gaussian,
        predictive_nll=predictive_nll_gaussian,
        noises=REGRESSION_NOISES,
        moments=moments_regression,
        bad_targets=_gaussian_bad_targets(),
        out_of_range=(
            _with((0, 1), math.nan),
            _with((4, 0), -math.inf),
        ),
    ),
    "binary": Case(
        likelihood=Binary(),
        n_out=1,
        task="classification",
        nll=nll_bernoulli,
        law=law_bernoulli,
        draw_targets=lambda f, g: torch.randint(0, 2, (f.shape[0],), generator=g).to(DTYPE),
        mean_prediction=lambda f: 1 / (1 + torch.exp(-f[:, 0])),
        sampled=sampled_bernoulli,
        predictive_nll=predictive_nll_bernoulli,
        links=(Link.PROBIT, Link.MC),
        probit_tol=PROBIT_BINARY_TOL,
        bad_targets=(
            (lambda f, y: y.to(torch.complex128), TypeError, ("dtype", "target")),
            (lambda f, y: torch.stack([y, y], 1), ValueError, ("shape",)),
            (lambda f, y: y[:-1], ValueError, ("shape",)),
        ),
        out_of_range=(
            _with(0, 2.0),
            _with(5, 0.5),
            _with(1, -1.0),
        ),
    ),
    "heteroscedastic": _heteroscedastic_case("log_var"),
    "heteroscedastic-softplus": _heteroscedastic_case("softplus"),
}
NAMES = list(CASES)
CLASSIFICATION = [name for name in NAMES if CASES[name].task == "classification"]
REGRESSION = [name for name in NAMES if CASES[name].task == "regression"]


def _problem(name: str, seed: int = 0) -> tuple[Case, Tensor, Tensor, Tensor]:
    """Outputs ``f (B, C)``, raw targets and the likelihood's working targets."""
    case = CASES[name]
    g = generator(4000 + 17 * NAMES.index(name) + seed)
    f = torch.randn(N_BATCH, case.n_out, generator=g, dtype=DTYPE)
    y = case.draw_targets(f, g)
    targets = case.likelihood.targets(f, y)
    assert not bool(targets.invalid)
    return case, f, y, targets.values


def _noises(case: Case) -> list[Tensor]:
    return [_noise(v) for v in case.noises]


def reference_middle(case: Case, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
    middle = case.middle if case.middle is not None else hessian(case.nll)
    return vmap(middle, in_dims=(0, 0, None))(f, y, noise)


def label_gradients(case: Case, f: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``(B, M)`` and NLL gradients in ``f`` ``(B, M, C)`` at every label of the law."""
    weights, labels = case.law(f, noise)
    per_label = vmap(grad(case.nll), in_dims=(None, 0, None))
    return weights, vmap(per_label, in_dims=(0, 0, None))(f, labels, noise)


def fisher_by_law(case: Case, f: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``E_y[g gᵀ]`` ``(B, C, C)`` and the entrywise variance of ``g gᵀ`` under the model."""
    w, g = label_gradients(case, f, noise)
    outer = g[..., :, None] * g[..., None, :]
    mean = torch.einsum("bm,bmcd->bcd", w, outer)
    second = torch.einsum("bm,bmcd->bcd", w, outer.square())
    return mean, second - mean.square()


def columns_outer(columns: Tensor) -> Tensor:
    return torch.einsum("vbc,vbd->bcd", columns, columns)


# --------------------------------------------------------------------------------------
# the case list and the reference formulas
# --------------------------------------------------------------------------------------
def test_cases_cover_every_registered_likelihood():
    covered = {case.likelihood.name for case in CASES.values()}
    assert covered == set(LIKELIHOODS.names), (
        f"likelihoods without a contract case: {sorted(set(LIKELIHOODS.names) - covered)}; "
        "add a line to CASES in tests/contracts/test_likelihoods.py"
    )
    for case in CASES.values():
        assert isinstance(case.likelihood, LIKELIHOODS.get(case.likelihood.name))
        assert case.likelihood.task == case.task


@pytest.mark.parametrize("parametrisation", ["log_var", "softplus"])
def test_reference_natural_parametrisation_is_consistent(parametrisation):
    """The test's own formulas agree: the NLL in η at η(f) is the NLL in f, and its η-Hessian
    is ``Cov[(y, y²)]`` (by quadrature), which for the mean/log-variance outputs gives the
    textbook Fisher ``diag(1/σ², 1/2)``."""
    case, f, y, _ = _problem(
        "heteroscedastic" if parametrisation == "log_var" else "heteroscedastic-softplus"
    )
    one = _noise(1.0)
    nll_f = vmap(case.nll, in_dims=(0, 0, None))(f, y, one)
    nll_eta = vmap(nll_natural)(vmap(lambda fn: natural(fn, parametrisation))(f), y)
    assert_close(nll_eta, nll_f, EXACT_RTOL)
    # H_η = Cov[T(y)] with T(y) = (y, y²), per output, by quadrature
    weights, labels = case.law(f, one)
    stats = torch.stack([labels, labels.square()], -1)  # (B, M, K, 2)
    m1 = torch.einsum("bm,bmki->bki", weights, stats)
    m2 = torch.einsum("bm,bmki,bmkj->bkij", weights, stats, stats)
    cov_t = m2 - m1[..., :, None] * m1[..., None, :]
    eta = vmap(lambda fn: natural(fn, parametrisation))(f)
    h_eta = vmap(hessian(nll_natural))(eta, y)
    idx = torch.arange(N_TARGETS)
    for i in range(2):
        for j in range(2):
            block = h_eta[:, i * N_TARGETS + idx, j * N_TARGETS + idx]
            assert_close(block, cov_t[..., i, j], EXACT_RTOL, atol=EXACT_ATOL)
    if parametrisation == "log_var":
        sigma2 = f[:, N_TARGETS:].exp()
        closed = torch.diag_embed(torch.cat([1 / sigma2, torch.full_like(sigma2, 0.5)], 1))
        assert_close(reference_middle(case, f, y, one), closed, EXACT_RTOL)


# --------------------------------------------------------------------------------------
# curvature columns
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_hessian_sqrt_columns_square_to_the_reference_middle(name):
    case, f, y, _ = _problem(name)
    for noise in _noises(case):
        columns = case.likelihood.hessian_sqrt(f, noise)
        assert columns.ndim == 3 and columns.shape[1:] == f.shape
        assert_close(
            columns_outer(columns), reference_middle(case, f, y, noise), EXACT_RTOL, atol=EXACT_ATOL
        )


@pytest.mark.parametrize("name", NAMES)
def test_middle_matrix_is_the_fisher(name):
    """``E_y[∇ℓ ∇ℓᵀ]`` over the model's own targets equals the middle matrix (and, for the
    canonical-link likelihoods, the Hessian): the Fisher identity, by exact quadrature."""
    case, f, y, _ = _problem(name)
    for noise in _noises(case):
        fisher, _ = fisher_by_law(case, f, noise)
        assert_close(fisher, reference_middle(case, f, y, noise), EXACT_RTOL, atol=EXACT_ATOL)
        assert_close(
            columns_outer(case.likelihood.hessian_sqrt(f, noise)), fisher, EXACT_RTOL, atol=1e-12
        )


def test_heteroscedastic_loss_hessian_differs_from_its_ggn():
    """The natural-parameter GGN is not the loss Hessian in (μ, log σ²), which is indefinite
    off the mode: the columns must give the former (a guard that the oracle can fail)."""
    case, f, y, _ = _problem("heteroscedastic")
    one = _noise(1.0)
    loss_hessian = vmap(hessian(case.nll), in_dims=(0, 0, None))(f, y, one)
    assert bool((torch.linalg.eigvalsh(loss_hessian)[:, 0] < 0).any())
    middle = columns_outer(case.likelihood.hessian_sqrt(f, one))
    assert bool((torch.linalg.eigvalsh(middle) > 0).all())
    assert (middle - loss_hessian).abs().max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_gradient_at_the_true_targets(name):
    case, f, y, values = _problem(name)
    for noise in _noises(case):
        expected = vmap(grad(case.nll), in_dims=(0, 0, None))(f, y, noise)
        assert_close(
            case.likelihood.gradient(f, values, noise), expected[None], EXACT_RTOL, atol=EXACT_ATOL
        )


@pytest.mark.parametrize("name", NAMES)
def test_sampled_gradients_average_to_the_fisher(name):
    case, f, _, _ = _problem(name)
    for i, noise in enumerate(_noises(case)):
        samples = case.likelihood.sampled_gradients(f, noise, MC_SAMPLES, generator(70 + i))
        assert samples.shape == (MC_SAMPLES, *f.shape)
        fisher, variance = fisher_by_law(case, f, noise)
        err = (columns_outer(samples) - fisher).abs()
        bound = MC_Z * (variance / MC_SAMPLES).sqrt() + EXACT_ATOL
        assert bool((err <= bound).all()), (err / bound).max()
        # the labels come from the model: the score has mean zero
        score_mean = samples.sum(0) / math.sqrt(MC_SAMPLES)
        score_sd = (fisher.diagonal(dim1=-2, dim2=-1) / MC_SAMPLES).sqrt()
        assert bool((score_mean.abs() <= MC_Z * score_sd + EXACT_ATOL).all())


@pytest.mark.parametrize("name", NAMES)
def test_sampled_gradients_follow_the_generator(name):
    case, f, _, _ = _problem(name)
    noise = _noises(case)[-1]
    first = case.likelihood.sampled_gradients(f, noise, 7, generator(1))
    again = case.likelihood.sampled_gradients(f, noise, 7, generator(1))
    other = case.likelihood.sampled_gradients(f, noise, 7, generator(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", NAMES)
def test_curvature_scale_follows_the_noise(name):
    """A curvature fitted at one noise, times ``curvature_scale``, is the one at another."""
    case, f, _, values = _problem(name)
    lik = case.likelihood
    fit, new = _noise(0.7), _noise(1.6)
    if not lik.has_noise:
        lik.check_noise(_noise(1.0))
        with pytest.raises(ValueError, match="sigma_noise"):
            lik.check_noise(fit)
        for kind in CurvatureKind:
            assert float(lik.curvature_scale(kind, _noise(1.0), _noise(1.0))) == 1.0
        return
    middles = {
        CurvatureKind.GGN: lambda s: columns_outer(lik.hessian_sqrt(f, s)),
        CurvatureKind.FISHER: lambda s: columns_outer(lik.sampled_gradients(f, s, 5, generator(3))),
        CurvatureKind.EMPIRICAL_FISHER: lambda s: columns_outer(lik.gradient(f, values, s)),
    }
    for kind, middle in middles.items():
        scale = lik.curvature_scale(kind, fit, new)
        assert_close(scale * middle(fit), middle(new), EXACT_RTOL)
    # a per-output noise is part of the fitted curvature: it may not change after the fit
    per_output = _noise((0.5, 1.3))
    assert float(lik.curvature_scale(CurvatureKind.GGN, per_output, per_output)) == 1.0
    with pytest.raises(ValueError, match="per-output"):
        lik.curvature_scale(CurvatureKind.GGN, per_output, _noise((0.5, 1.2)))


# --------------------------------------------------------------------------------------
# log-likelihood from summed statistics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_log_likelihood_from_loss_stats(name):
    case, f, y, values = _problem(name)
    lik = case.likelihood
    stats = lik.loss_stats(f, values)
    halves = lik.loss_stats(f[:2], values[:2]) + lik.loss_stats(f[2:], values[2:])
    assert_close(halves, stats, EXACT_RTOL)  # sum-reducible over batches
    for noise in _noises(case):
        expected = -vmap(case.nll, in_dims=(0, 0, None))(f, y, noise).sum()
        assert_close(lik.log_likelihood(stats, N_BATCH, noise), expected, EXACT_RTOL)


# --------------------------------------------------------------------------------------
# predictives
# --------------------------------------------------------------------------------------
def _output_gaussian(case: Case, seed: int) -> tuple[Tensor, Tensor]:
    g = generator(seed)
    c = case.n_out
    mean = torch.randn(N_BATCH, c, generator=g, dtype=DTYPE)
    a = torch.randn(N_BATCH, c, c, generator=g, dtype=DTYPE)
    cov = 0.3 * a @ a.transpose(1, 2) / c + 0.05 * torch.eye(c, dtype=DTYPE)
    return mean, cov


def _reference_integral(case: Case, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """MC integral of the mean prediction under ``N(mean, cov)`` and its per-sample variance."""
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(REFERENCE_MC_SAMPLES, *mean.shape, generator=generator(99), dtype=DTYPE)
    draws = mean + torch.einsum("bcd,sbd->sbc", chol, z)
    flat = case.mean_prediction(draws.reshape(-1, mean.shape[1]))  # (S·B, C) or (S·B,)
    values = flat.reshape(REFERENCE_MC_SAMPLES, *case.mean_prediction(mean).shape)
    return values.mean(0), values.var(0)


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_predictive_links(name):
    case = CASES[name]
    lik = case.likelihood
    mean, cov = _output_gaussian(case, 11)
    var = cov.diagonal(dim1=-2, dim2=-1)
    integral, per_sample_var = _reference_integral(case, mean, cov)
    one = _noise(1.0)

    def predict(link: Link, generator=None):
        return lik.predictive(
            mean,
            cov,
            link=link,
            noise=one,
            n_samples=LINK_MC_SAMPLES,
            generator=generator,
            joint_outputs=True,
        )

    for link in case.links:
        pred = predict(link, generator(5))
        squeeze = (lambda t: t[:, 0]) if case.n_out == 1 else (lambda t: t)
        assert_close(pred.logit_mean, squeeze(mean), EXACT_RTOL)
        assert_close(pred.logit_var, squeeze(var), EXACT_RTOL)
        if case.n_out > 1:
            assert_close(pred.probs.sum(-1), torch.ones(N_BATCH, dtype=DTYPE), EXACT_RTOL)
        if link is Link.MC:
            sd = (per_sample_var * (1 / LINK_MC_SAMPLES + 1 / REFERENCE_MC_SAMPLES)).sqrt()
            assert bool(((pred.probs - integral).abs() <= MC_Z * sd).all())
            assert torch.equal(pred.probs, predict(link, generator(5)).probs)
            assert not torch.equal(pred.probs, predict(link, generator(6)).probs)
        elif link is Link.PROBIT:
            scaled = mean / torch.sqrt(1 + math.pi / 8 * var)
            assert_close(pred.probs, case.mean_prediction(scaled), EXACT_RTOL)
            error = (pred.probs - integral).abs()
            assert error.max() < case.probit_tol
            assert error.mean() < (case.mean_prediction(mean) - integral).abs().mean()
        else:
            # The Laplace bridge (Hobbhahn et al., 2022) from its published formula. It is not
            # compared with the integral: its Dirichlet mean need not tend to softmax(μ) even
            # as the variances vanish (for C > 2), so no tolerance would be principled.
            c = case.n_out
            alpha = (1 - 2 / c + mean.exp() * (-mean).exp().sum(-1, keepdim=True) / c**2) / var
            assert_close(pred.probs, alpha / alpha.sum(-1, keepdim=True), EXACT_RTOL)
    if Link.BRIDGE not in case.links:
        with pytest.raises(ValueError, match="bridge"):
            predict(Link.BRIDGE)


@pytest.mark.parametrize("name", REGRESSION)
def test_regression_predictive_moments(name):
    case = CASES[name]
    lik = case.likelihood
    mean, cov = _output_gaussian(case, 12)
    for noise in _noises(case):
        mean_y, epistemic, aleatoric = case.moments(mean, cov, noise)
        for link in Link:
            for joint in (True, False):
                pred = lik.predictive(
                    mean,
                    cov,
                    link=link,
                    noise=noise,
                    n_samples=10,
                    generator=generator(0),
                    joint_outputs=joint,
                )
                assert_close(pred.mean, mean_y, EXACT_RTOL)
                assert_close(pred.epistemic_var, epistemic, EXACT_RTOL)
                assert_close(pred.aleatoric_var, aleatoric, TRAPEZOID_RTOL)
                assert_close(pred.var, epistemic + aleatoric, TRAPEZOID_RTOL)
                if joint:
                    assert_close(pred.logit_cov, cov, EXACT_RTOL)
                else:
                    assert pred.logit_cov is None


@pytest.mark.parametrize("name", NAMES)
def test_sampled_predictive_from_given_samples(name):
    case = CASES[name]
    samples = 1.5 * torch.randn(40, N_BATCH, case.n_out, generator=generator(13), dtype=DTYPE)
    for noise in _noises(case):
        pred = case.likelihood.sampled_predictive(samples, noise=noise, joint_outputs=True)
        for field_name, expected in case.sampled(samples, noise).items():
            assert_close(getattr(pred, field_name), expected, EXACT_RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_point_prediction(name):
    case, f, _, _ = _problem(name)
    assert_close(case.likelihood.point_prediction(f), case.mean_prediction(f), EXACT_RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_predictive_nll(name):
    case, _, y, _ = _problem(name)
    lik = case.likelihood
    mean, cov = _output_gaussian(case, 14)
    for noise in _noises(case):
        for link in case.links or (Link.PROBIT,):
            pred = lik.predictive(
                mean,
                cov,
                link=link,
                noise=noise,
                n_samples=100,
                generator=generator(0),
                joint_outputs=False,
            )
            nll = lik.predictive_nll(pred, y)
            assert nll.shape == () and nll.dtype == torch.float64
            assert_close(nll, case.predictive_nll(pred, y), EXACT_RTOL)


# --------------------------------------------------------------------------------------
# KL divergence
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_kl_against_quadrature(name):
    """``KL(p₁‖p₂) = E_{y~p₁}[ℓ(f₂, y) − ℓ(f₁, y)]``, the expectation by exact quadrature
    (enumeration for discrete targets; the integrand is quadratic for Gaussian ones)."""
    case, f1, _, _ = _problem(name)
    f2 = f1 + 0.6 * torch.randn(f1.shape, generator=generator(15), dtype=DTYPE)
    lik = case.likelihood
    for noise in _noises(case):
        weights, labels = case.law(f1, noise)
        per_label = vmap(case.nll, in_dims=(None, 0, None))
        nll1 = vmap(per_label, in_dims=(0, 0, None))(f1, labels, noise)
        nll2 = vmap(per_label, in_dims=(0, 0, None))(f2, labels, noise)
        expected = (weights * (nll2 - nll1)).sum(1)
        kl = lik.kl(f1, f2, noise)
        assert kl.shape == (N_BATCH,)
        assert_close(kl, expected, EXACT_RTOL, atol=EXACT_ATOL)
        assert bool((expected > 0).all())
        assert_close(
            lik.kl(f1, f1, noise), torch.zeros(N_BATCH, dtype=DTYPE), EXACT_RTOL, atol=1e-14
        )


# --------------------------------------------------------------------------------------
# target checks and options
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_targets_of_wrong_dtype_or_shape_raise(name):
    case, f, y, _ = _problem(name)
    assert case.bad_targets, "every case lists targets of a wrong dtype or shape"
    for make, error, words in case.bad_targets:
        with pytest.raises(error) as info:
            case.likelihood.targets(f, make(f, y))
        message = str(info.value).lower()
        assert any(word in message for word in words), message


@pytest.mark.parametrize("name", NAMES)
def test_out_of_range_targets_are_flagged(name):
    case, f, y, _ = _problem(name)
    checked = case.likelihood.targets(f, y)
    assert checked.invalid.shape == () and not bool(checked.invalid)
    assert case.out_of_range, "every case lists out-of-range targets"
    for make in case.out_of_range:
        bad = make(y.clone())
        checked = case.likelihood.targets(f, bad)
        assert checked.invalid.shape == () and bool(checked.invalid), bad


@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip_through_the_registry(name):
    case, f, _, _ = _problem(name)
    lik = case.likelihood
    again = make_likelihood(lik.name, lik.options())
    assert type(again) is type(lik)
    assert again.options() == lik.options()
    assert make_likelihood(lik) is lik
    noise = _noises(case)[-1]
    assert torch.equal(again.hessian_sqrt(f, noise), lik.hessian_sqrt(f, noise))
