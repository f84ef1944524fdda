"""Agreement with curvlinops 3.0.1 (an external oracle) for the full GGN and for KFAC.

Conventions of curvlinops 3.0.1 that make the comparison exact (read from its
``kfac.py``/``ggn.py``):

* loss functions: ``CrossEntropyLoss(reduction="sum")`` <-> "classification";
  ``BCEWithLogitsLoss(reduction="sum")`` with targets shaped like the output (B, 1)
  <-> "binary" (targets (B,)); ``MSELoss(reduction="sum")`` is sum (y - f)^2, i.e.
  the Gaussian NLL with sigma^2 = 1/2, so it matches "regression" with
  ``sigma_noise = 1/sqrt(2)`` (its MC labels are drawn as f + sqrt(1/2) * eps, too).
* ``KFACLinearOperator(..., fisher_type="type-2" | "empirical" | "mc",
  kfac_approx="expand", separate_weight_and_bias=True)`` with a "sum" loss uses
  A = sum_{n,t} a a^T / (N_data * T) and G = sum_{n,t,v} g g^T (/ mc_samples),
  block = kron(G, A) for weights, G for biases; T = number of weight-sharing
  positions of the layer's input (output locations for Conv2d).  This is exactly
  laplacefim's kron(G, A_sum) / n with n = N_data * T rows.
* ``KFACLinearOperator`` only supports Linear and Conv2d modules.
"""

from __future__ import annotations

import copy
import math

import pytest
import reference as ref
import torch
from helpers import assert_max_close
from torch import nn

curvlinops = pytest.importorskip("curvlinops")

N_DATA = 10
BATCH = 4
REG_SIGMA = 1.0 / math.sqrt(2.0)
RTOL = 1e-10

LOSSES = {
    "classification": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "regression": lambda: nn.MSELoss(reduction="sum"),
    "binary": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}
N_OUT = {"classification": 3, "regression": 2, "binary": 1}


class SeqNet(nn.Module):
    """Linear on (B, T, d) inputs (weight sharing over T), then a flattening head."""

    def __init__(self, c):
        super().__init__()
        self.inner = nn.Linear(3, 4, dtype=ref.DTYPE)
        self.head = nn.Linear(4 * 2, c, dtype=ref.DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).flatten(1))


def _model(arch: str, c: int, g: torch.Generator):
    if arch == "mlp":
        return ref.mlp(c, g), torch.randn(N_DATA, 4, generator=g, dtype=ref.DTYPE)
    if arch == "seq":
        return ref.init_(SeqNet(c), g), torch.randn(N_DATA, 2, 3, generator=g, dtype=ref.DTYPE)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2, padding=1, dtype=ref.DTYPE),
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2, dtype=ref.DTYPE),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, c, dtype=ref.DTYPE),
    )
    return ref.init_(model, g, 0.6), torch.randn(N_DATA, 1, 3, 3, generator=g, dtype=ref.DTYPE)


def _setup(arch, likelihood, seed=0):
    g = torch.Generator()
    g.manual_seed(300 + seed)
    c = N_OUT[likelihood]
    model, x = _model(arch, c, g)
    y = ref.targets(likelihood, N_DATA, c, g)
    y_cl = y.unsqueeze(-1) if likelihood == "binary" else y  # curvlinops: target like output
    data = [(x[i : i + BATCH], y_cl[i : i + BATCH]) for i in range(0, N_DATA, BATCH)]
    sigma = REG_SIGMA if likelihood == "regression" else 1.0
    return model, x, y, data, sigma


def _dense(op, P):
    return op @ torch.eye(P, dtype=ref.DTYPE)


def _kfac(model, likelihood, data, fisher_type, **kw):
    return curvlinops.KFACLinearOperator(
        model,
        LOSSES[likelihood](),
        [p for p in model.parameters() if p.requires_grad],
        data,
        fisher_type=fisher_type,
        kfac_approx="expand",
        separate_weight_and_bias=True,
        check_deterministic=False,
        **kw,
    )


# --------------------------------------------------------------------------- #
# the reference itself agrees with curvlinops (no laplacefim needed)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("likelihood", list(LOSSES))
def test_reference_ggn_matches_curvlinops(likelihood):
    model, x, y, data, sigma = _setup("mlp", likelihood)
    names = ref.trainable_names(model)
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    ggn = curvlinops.GGNLinearOperator(model, LOSSES[likelihood](), params, data)
    assert_max_close(ref.dense_ggn(model, names, x, likelihood, sigma), _dense(ggn, P), RTOL)
    ef = curvlinops.EFLinearOperator(model, LOSSES[likelihood](), params, data)
    assert_max_close(
        ref.empirical_fisher(model, names, x, y, likelihood, sigma), _dense(ef, P), RTOL
    )


@pytest.mark.parametrize("arch", ["mlp", "seq", "cnn"])
@pytest.mark.parametrize("likelihood", list(LOSSES))
def test_reference_kfac_matches_curvlinops(arch, likelihood):
    model, x, y, data, sigma = _setup(arch, likelihood)
    names = ref.trainable_names(model)
    P = ref.flat_params(model, names).numel()
    cr = ref.CurvatureReference(model, names, x, likelihood, sigma)
    assert_max_close(cr.ggn("kron"), _dense(_kfac(model, likelihood, data, "type-2"), P), RTOL)
    assert_max_close(cr.ef(y, "kron"), _dense(_kfac(model, likelihood, data, "empirical"), P), RTOL)


def test_curvlinops_mc_kfac_expectation_is_ggn_kfac():
    """curvlinops' MC KFAC (mc_samples labels per datum) averages to the exact KFAC:
    checked entrywise within 6 exact standard deviations of the MC estimator."""
    model, x, _y, data, sigma = _setup("mlp", "classification")
    names = ref.trainable_names(model)
    P = ref.flat_params(model, names).numel()
    k = 400
    cr = ref.CurvatureReference(model, names, x, "classification", sigma)
    mc = _dense(_kfac(model, "classification", data, "mc", mc_samples=k), P)
    expected = cr.ggn("kron")
    sd = cr.mc_fisher_variance("kron", k).sqrt()
    assert ((mc - expected).abs() <= 6 * sd + 1e-10 * expected.abs().max()).all()


# --------------------------------------------------------------------------- #
# laplacefim agrees with curvlinops
# --------------------------------------------------------------------------- #
def _laplace(model, likelihood, structure, kind, sigma, x, y):
    laplacefim = pytest.importorskip("laplacefim")
    la = laplacefim.Laplace(
        copy.deepcopy(model),
        likelihood=likelihood,
        structure=structure,
        curvature=kind,
        prior_precision=0.0,
        **({"sigma_noise": sigma} if likelihood == "regression" else {}),
    )
    la.fit(ref.loader(x, y, BATCH), progress=False)
    return la.posterior_precision.to_dense().detach().to(ref.DTYPE)


@pytest.mark.parametrize("likelihood", list(LOSSES))
def test_laplacefim_full_ggn_matches_curvlinops(likelihood):
    model, x, y, data, sigma = _setup("mlp", likelihood, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    ggn = _dense(curvlinops.GGNLinearOperator(model, LOSSES[likelihood](), params, data), P)
    assert_max_close(_laplace(model, likelihood, "full", "ggn", sigma, x, y), ggn, RTOL)
    assert_max_close(
        _laplace(model, likelihood, "diag", "ggn", sigma, x, y), torch.diag(ggn.diagonal()), RTOL
    )


@pytest.mark.parametrize("arch", ["mlp", "seq", "cnn"])
@pytest.mark.parametrize("likelihood", list(LOSSES))
def test_laplacefim_kfac_matches_curvlinops(arch, likelihood):
    model, x, y, data, sigma = _setup(arch, likelihood, seed=2)
    P = sum(p.numel() for p in model.parameters())
    for kind, fisher_type in (("ggn", "type-2"), ("empirical_fisher", "empirical")):
        expected = _dense(_kfac(model, likelihood, data, fisher_type), P)
        assert_max_close(_laplace(model, likelihood, "kron", kind, sigma, x, y), expected, RTOL)
