"""The structure contract: every registered structure's decomposition agrees with its own
dense matrix for every operation the evidence, predictives and sampling use.

For each case in ``helpers.STRUCTURE_CASES`` (which must cover the registry), a fit on a
small MLP and a small CNN (LayerNorm and a raw parameter included) is decomposed; each
block's posterior precision ``P = s·F_b + diag(prior)`` is compared with the dense block
``F_b`` (``block.to_dense()``): the prior shift, log-determinant, solves, quadratic forms,
the covariance of samples (exactly: sampling is linear in the normal draws), the covariance
diagonal, eigenvalues and bounds. Sums over batches do not depend on the batch split.
Each structure's curvature against an independent oracle is tested in its own file
(``test_curvature_contract.py``, ``test_ekfac.py``, ``test_lowrank.py``).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from helpers import STRUCTURE_CASES, assert_close, generator
from torch import nn

from laplacefim import Laplace
from laplacefim.structures import STRUCTURES

DTYPE = torch.float64
RTOL = 1e-9  # float64 linear algebra on matrices of condition number up to ~1e4


class SmallCNN(nn.Module):
    """Conv2d → tanh → LayerNorm → Linear, plus a raw parameter on the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, dtype=DTYPE)
        self.norm = nn.LayerNorm(12, dtype=DTYPE)
        self.fc = nn.Linear(12, 3, dtype=DTYPE)
        self.shift = nn.Parameter(torch.zeros(3, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.tanh(self.conv(x)).flatten(1))) + self.shift


def _problem(arch: str):
    g = generator(71)
    if arch == "mlp":
        model, x = ref.mlp(3, g), torch.randn(11, 4, generator=g, dtype=DTYPE)
    else:
        model = ref.init_(SmallCNN(), g, 0.6)
        x = torch.randn(11, 1, 4, 5, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (11,), generator=g)
    return model, x, y


def test_case_list_covers_the_registry():
    assert set(STRUCTURE_CASES) == set(STRUCTURES.names)


def _blocks(la: Laplace, prior: torch.Tensor):
    """Each block's dense curvature, its precision at ``prior`` and that prior."""
    scale = la.posterior_precision.scale
    per_param = la.posterior_precision.prior
    out, start = [], 0
    for block, decomposition in zip(la.curvature.blocks, la.curvature.decompose(), strict=True):
        block_prior = prior if prior.ndim == 0 else per_param[start : start + block.numel]
        start += block.numel
        precision = decomposition.with_prior(torch.tensor(scale, dtype=DTYPE), block_prior)
        out.append((block, decomposition, precision, block_prior))
    return out


@pytest.mark.parametrize("prior_kind", ["scalar", "per_parameter"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_decomposition_matches_its_dense_block(structure, arch, prior_kind):
    model, x, y = _problem(arch)
    g = generator(5)
    n_params = sum(p.numel() for p in model.parameters())
    prior = (
        torch.tensor(0.7, dtype=DTYPE)
        if prior_kind == "scalar"
        else 0.3 + torch.rand(n_params, generator=g, dtype=DTYPE)
    )
    la = Laplace(
        model, structure=STRUCTURE_CASES[structure], prior_precision=prior, temperature=0.8
    ).fit(ref.loader(x, y, 4))
    scale = la.posterior_precision.scale
    try:
        blocks = _blocks(la, prior)
    except ValueError as error:  # a Kronecker basis cannot absorb a per-parameter prior
        assert prior_kind == "per_parameter" and "kron" in str(error)
        return
    for block, decomposition, precision, block_prior in blocks:
        dense_f = block.to_dense()
        p = dense_f.shape[0]
        expected = scale * dense_f + torch.diag(block_prior.expand(p))
        covariance = torch.linalg.inv(expected)
        v = torch.randn(3, p, generator=g, dtype=DTYPE)
        assert_close(precision.to_dense(), expected, RTOL)
        assert_close(block.diagonal(), dense_f.diagonal(), RTOL)
        assert_close(precision.logdet(), torch.linalg.slogdet(expected)[1], RTOL)
        assert_close(precision.solve(v), v @ covariance, RTOL)
        assert_close(precision.quad(v), torch.einsum("np,pq,nq->n", v, expected, v), RTOL)
        assert_close(precision.covariance_diagonal(), covariance.diagonal(), RTOL)
        assert_close(precision.covariance(), covariance, RTOL)
        # sampling is linear in the normal draws: its covariance is exact
        draws = precision.sample(torch.eye(p, dtype=DTYPE))
        assert_close(draws.T @ draws, covariance, RTOL)
        eigenvalues = torch.linalg.eigvalsh(dense_f)
        assert_close(decomposition.eigenvalues().sort().values, eigenvalues, RTOL)
        low, high = precision.eigenvalue_range()
        true = torch.linalg.eigvalsh(expected)
        assert float(low) <= float(true[0]) * (1 + RTOL) + RTOL
        assert float(high) >= float(true[-1]) * (1 - RTOL) - RTOL


@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_state_does_not_depend_on_the_batch_split(structure):
    model, x, y = _problem("cnn")
    dense = [
        Laplace(model, structure=STRUCTURE_CASES[structure])
        .fit(ref.loader(x, y, size))
        .curvature.to_dense()
        for size in (1, 4, 11)
    ]
    assert_close(dense[0], dense[2], RTOL)
    assert_close(dense[1], dense[2], RTOL)


@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_blocks_cover_the_parameters_in_order(structure):
    model, x, y = _problem("cnn")
    la = Laplace(model, structure=STRUCTURE_CASES[structure]).fit(ref.loader(x, y, 4))
    names = [name for block in la.curvature.blocks for name in block.names]
    assert list(dict.fromkeys(names)) == ref.trainable_names(model)
    assert la.curvature.numel == la.n_params == sum(la.curvature.sizes)
    assert la.curvature.to_dense().shape == (la.n_params, la.n_params)
