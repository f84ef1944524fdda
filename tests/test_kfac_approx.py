"""``kfac_approx="expand"`` and ``"reduce"`` (Eschenhagen et al., 2023) for weights shared
over positions, against independent oracles.

* curvlinops 3.0.1's ``KFACLinearOperator(kfac_approx=...)`` (a pinned peer library) with
  the exact GGN (``fisher_type="type-2"``, no Monte Carlo) and a "sum" loss: for
  "reduce" it sums the output gradients and averages the inputs over the positions of
  each datum, ``G = Σₙ (Σₜ gₙₜ)(Σₜ gₙₜ)ᵀ``, ``A = Σₙ āₙ āₙᵀ / N``, block ``G ⊗ A`` —
  laplacefim's ``(G ⊗ A_sum) / N``;
* a dense brute force for "reduce" written out here for a Linear on (B, T, d) inputs:
  per-datum Jacobians of the outputs w.r.t. the layer's output at every position by
  ``torch.func``, the loss Hessian by ``torch.func.hessian`` (``reference.py``);
* the limit T = 1, where both flavours are the same matrix.

Tiny float64 models, local generators only.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import assert_max_close, generator
from torch import Tensor, nn
from torch.func import jacrev, vmap

from laplacefim import Laplace

DTYPE = ref.DTYPE
N_DATA = 10
BATCH = 4  # uneven last batch
T_POS = 3
N_OUT = {"classification": 3, "regression": 2, "binary": 1}
LIKELIHOODS = list(N_OUT)
APPROX = ["expand", "reduce"]
# curvlinops' MSELoss(reduction="sum") is the Gaussian NLL with σ² = 1/2.
CL_SIGMA = 1.0 / math.sqrt(2.0)
SIGMA = 0.7  # for the brute force, a noise != 1 so that a missing 1/σ² shows

# Dense float64 brute force / curvlinops against the structured path: reassociation only.
RTOL = 1e-10
# Both flavours at T = 1: the same sums, at most reassociated.
SAME_RTOL = 1e-13
# At T > 1 the flavours differ by O(1) relative amounts; anything above this fraction
# shows the option reaches the factors.
DIFFERENT = 1e-3

LOSSES = {
    "classification": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "regression": lambda: nn.MSELoss(reduction="sum"),
    "binary": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}


# --------------------------------------------------------------------------------------
# models: ``inner`` is the Linear shared over T positions, ``rest`` maps its output on
# (B, T, 4) to the model's output and mixes the positions
# --------------------------------------------------------------------------------------
class SeqFlat(nn.Module):
    """Linear on (B, T, 3), tanh, flatten over positions, Linear head."""

    def __init__(self, c: int, t: int = T_POS) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4, dtype=DTYPE)
        self.head = nn.Linear(4 * t, c, dtype=DTYPE)

    def rest(self, h: Tensor) -> Tensor:
        return self.head(torch.tanh(h).flatten(-2))

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.inner(x))


class SeqMean(nn.Module):
    """Linear on (B, T, 3), tanh, mean over positions, Linear head."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4, dtype=DTYPE)
        self.head = nn.Linear(4, c, dtype=DTYPE)

    def rest(self, h: Tensor) -> Tensor:
        return self.head(torch.tanh(h).mean(-2))

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.inner(x))


def _cnn(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 2, padding=1, dtype=DTYPE),  # 16 positions
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2, dtype=DTYPE),  # 4 positions
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, c, dtype=DTYPE),
    )


def _cnn_one_position(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, dtype=DTYPE),  # a 3x3 kernel on 3x3 inputs: one position
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3, c, dtype=DTYPE),
    )


def _problem(arch: str, likelihood: str, seed: int = 0, t: int = T_POS):
    g = generator(6300 + 13 * seed)
    c = N_OUT[likelihood]
    if arch == "seq_flat":
        model = ref.init_(SeqFlat(c, t), g)
        x = torch.randn(N_DATA, t, 3, generator=g, dtype=DTYPE)
    elif arch == "seq_mean":
        model = ref.init_(SeqMean(c), g)
        x = torch.randn(N_DATA, t, 3, generator=g, dtype=DTYPE)
    elif arch == "cnn":
        model = ref.init_(_cnn(c), g, 0.6)
        x = torch.randn(N_DATA, 1, 3, 3, generator=g, dtype=DTYPE)
    else:
        model = ref.init_(_cnn_one_position(c), g, 0.6)
        x = torch.randn(N_DATA, 1, 3, 3, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, N_DATA, c, g)
    return model, x, y


def _fit(model, x, y, likelihood, approx, sigma) -> Tensor:
    kw = {"sigma_noise": sigma} if likelihood == "regression" else {}
    la = Laplace(model, likelihood, structure="kron", kfac_approx=approx, prior_precision=0.0, **kw)
    la.fit(ref.loader(x, y, BATCH))
    return la.curvature.to_dense().detach()


def _curvlinops(model, x, y, likelihood, approx) -> Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    y_cl = y.unsqueeze(-1) if likelihood == "binary" else y  # targets shaped like outputs
    data = [(x[i : i + BATCH], y_cl[i : i + BATCH]) for i in range(0, N_DATA, BATCH)]
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(
        model,
        LOSSES[likelihood](),
        params,
        data,
        fisher_type="type-2",
        kfac_approx=approx,
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    return op @ torch.eye(sum(p.numel() for p in params), dtype=DTYPE)


# --------------------------------------------------------------------------------------
# against curvlinops, both flavours
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("approx", APPROX)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["seq_flat", "seq_mean", "cnn"])
def test_matches_curvlinops(arch, likelihood, approx):
    pytest.importorskip("curvlinops")
    model, x, y = _problem(arch, likelihood)
    expected = _curvlinops(model, x, y, likelihood, approx)
    assert_max_close(_fit(model, x, y, likelihood, approx, CL_SIGMA), expected, RTOL)


@pytest.mark.parametrize("arch", ["seq_flat", "cnn"])
def test_reduce_matches_curvlinops_for_the_empirical_fisher(arch):
    """The flavour acts on whatever is backpropagated: the true-label gradients too."""
    curvlinops = pytest.importorskip("curvlinops")
    model, x, y = _problem(arch, "classification", seed=3)
    data = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N_DATA, BATCH)]
    params = list(model.parameters())
    op = curvlinops.KFACLinearOperator(
        model,
        LOSSES["classification"](),
        params,
        data,
        fisher_type="empirical",
        kfac_approx="reduce",
        check_deterministic=False,
    )
    expected = op @ torch.eye(sum(p.numel() for p in params), dtype=DTYPE)
    la = Laplace(
        model,
        "classification",
        curvature="empirical_fisher",
        kfac_approx="reduce",
        prior_precision=0.0,
    ).fit(ref.loader(x, y, BATCH))
    assert_max_close(la.curvature.to_dense(), expected, RTOL)


# --------------------------------------------------------------------------------------
# an independent dense brute force for "reduce" on a Linear over sequences
# --------------------------------------------------------------------------------------
def _reduce_inner_blocks(model, x, likelihood, sigma) -> tuple[Tensor, Tensor]:
    """(weight block, bias block) of KFAC-reduce for ``model.inner``, by brute force:
    gₙ = Σₜ gₙₜ, aₙ = meanₜ aₙₜ, A = Σₙ aₙaₙᵀ, G = Σₙ Σ_v g gᵀ = Σₙ Jₙᵀ Λₙ Jₙ with
    Jₙ = Σₜ ∂f(xₙ)/∂hₙₜ; weight block (G ⊗ A)/N, bias block G."""
    with torch.no_grad():
        h = model.inner(x)  # (N, T, 4); the inner layer's input is x itself
    J = vmap(jacrev(model.rest))(h).detach()  # (N, C, T, 4)
    J_sum = J.sum(2)  # (N, C, 4)
    lam = ref.loss_hessian_outputs(likelihood, ref.outputs(model, x), sigma)  # (N, C, C)
    G = torch.einsum("nco,ncd,ndp->op", J_sum, lam, J_sum).contiguous()
    a = x.mean(1)  # (N, 3)
    A = a.T @ a
    return torch.kron(G, A) / x.shape[0], G


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["seq_flat", "seq_mean"])
def test_reduce_matches_dense_brute_force(arch, likelihood):
    model, x, y = _problem(arch, likelihood, seed=1)
    sigma = SIGMA if likelihood == "regression" else 1.0
    names = ref.trainable_names(model)
    assert names[:2] == ["inner.weight", "inner.bias"]
    weight, bias = _reduce_inner_blocks(model, x, likelihood, sigma)
    # the head sees one position per datum: its blocks are the (expand) reference's
    expected = ref.CurvatureReference(model, names, x, likelihood, sigma).ggn("kron")
    nw, nb = weight.shape[0], bias.shape[0]
    expected[: nw + nb, : nw + nb] = torch.block_diag(weight, bias)
    reduce = _fit(model, x, y, likelihood, "reduce", sigma)
    assert_max_close(reduce, expected, RTOL)
    # the bias block of "reduce" is the exact GGN's (a bias gradient is Σₜ gₙₜ)
    ggn = ref.dense_ggn(model, names, x, likelihood, sigma)
    assert_max_close(reduce[nw : nw + nb, nw : nw + nb], ggn[nw : nw + nb, nw : nw + nb], RTOL)
    # and "expand" is a different matrix on the shared weight
    expand = _fit(model, x, y, likelihood, "expand", sigma)
    gap = float((expand[:nw, :nw] - reduce[:nw, :nw]).abs().max())
    assert gap > DIFFERENT * float(reduce[:nw, :nw].abs().max())


# --------------------------------------------------------------------------------------
# T = 1: the flavours coincide
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("arch", ["seq_flat", "seq_mean", "cnn_one_position"])
def test_flavours_coincide_at_one_position(arch, likelihood):
    model, x, y = _problem(arch, likelihood, seed=2, t=1)
    sigma = SIGMA if likelihood == "regression" else 1.0
    expand = _fit(model, x, y, likelihood, "expand", sigma)
    reduce = _fit(model, x, y, likelihood, "reduce", sigma)
    assert_max_close(reduce, expand, SAME_RTOL)
    # both are the brute-force KFAC
    names = ref.trainable_names(model)
    assert_max_close(
        expand, ref.CurvatureReference(model, names, x, likelihood, sigma).ggn("kron"), RTOL
    )


def test_unknown_flavour_is_refused():
    model, _x, _y = _problem("seq_flat", "classification")
    with pytest.raises(ValueError, match=r"(?s)kfac_approx.*expand.*reduce"):
        Laplace(model, "classification", kfac_approx="average")
