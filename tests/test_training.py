"""``train_marglik``: evidence-driven training against independent references.

* Bayesian linear regression: the joint optimum of the MAP objective and the evidence is
  the point scikit-learn's ``BayesianRidge`` (MacKay's evidence fixed point, closed form
  for a linear-Gaussian model) finds: same prior precision, noise and weights.
* A per-parameter prior on a model with weights the data do not determine converges and
  keeps them at their layer's prior scale.
* Two gloo ranks, each with half of every batch, give the single-process run's weights,
  hyperparameters and evidence.
* Mapping batches train exactly as pairs do; the schedule of evidence steps; bad options.
(The evidence's gradients against finite differences: ``tests/test_marglik.py``.)
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close, generator
from sklearn.linear_model import BayesianRidge
from torch import nn

from laplacefim import Laplace, train_marglik

DTYPE = torch.float64
WORLD = 2
# Adam's iterates reach the MAP to ~1e-7 relative in 300 full-batch epochs on this problem.
OPTIMUM_RTOL = 1e-5


def _linear_problem():
    g = generator(9100)
    n, d = 200, 5
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    w = torch.randn(d, generator=g, dtype=DTYPE)
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=DTYPE)
    return x, y


def test_linear_regression_recovers_bayesian_ridge():
    x, y = _linear_problem()
    ridge = BayesianRidge(
        fit_intercept=False,
        tol=1e-14,
        max_iter=100_000,
        alpha_1=0.0,
        alpha_2=0.0,
        lambda_1=0.0,
        lambda_2=0.0,
    ).fit(x.numpy(), y.numpy())
    model = nn.Linear(5, 1, bias=False, dtype=DTYPE)
    result = train_marglik(
        model,
        [(x, y[:, None])],
        "regression",
        epochs=300,
        lr=0.05,
        structure="full",
        prior_structure="scalar",
        marglik_frequency=10,
    )
    la = result.laplace
    assert_close(la.prior_precision, torch.tensor(ridge.lambda_, dtype=DTYPE), OPTIMUM_RTOL)
    assert_close(la.sigma_noise, torch.tensor(ridge.alpha_**-0.5, dtype=DTYPE), OPTIMUM_RTOL)
    assert_close(model.weight.detach()[0], torch.from_numpy(ridge.coef_), OPTIMUM_RTOL)
    # the evidence rises over training and the last record is the posterior's
    values = [h.log_marginal_likelihood for h in result.history if h.log_marginal_likelihood]
    assert values[-1] >= values[0]
    assert_close(
        torch.tensor(result.log_marginal_likelihood, dtype=DTYPE),
        la.log_marginal_likelihood().detach(),
        1e-12,
    )


def test_diagonal_prior_keeps_undetermined_weights_at_the_prior_scale():
    g = generator(9101)
    x = torch.randn(240, 4, generator=g, dtype=DTYPE)
    x[:, 3] = 0.0  # its weights get no curvature and no gradient
    y = (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    loader = [(x[i : i + 60], y[i : i + 60]) for i in range(0, 240, 60)]
    result = train_marglik(
        model,
        loader,
        epochs=30,
        lr=1e-2,
        structure="diag",
        prior_structure="diagonal",
        marglik_frequency=10,
    )
    priors = result.laplace.parameter_priors
    dead = priors["0.weight"][:, 3]
    assert bool(torch.isfinite(dead).all())
    # each undetermined weight: δ = κ / (θ² + κ / c) with c its layer's prior (it gets no
    # gradient but the decay); the plain evidence would send δ to ~1e-18
    live = priors["0.weight"][:, :3]
    assert float(dead.min()) > 0.05 * float(live.median()), (dead, live)
    assert result.laplace.parameter_names[0] == "0.weight"  # first in the flat vector
    samples = result.laplace.sample(2000, generator=generator(3))
    std = samples[:, : 8 * 4].reshape(-1, 8, 4)[:, :, 3].std(0)
    assert bool((std < 3 / dead.sqrt()).all()) and float(std.max()) < 10.0


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_prior_gradient_reaches_parameters_without_a_data_gradient():
    """Plain SGD on a parameter the loss does not use: only the prior's gradient δθ/N acts,
    so each step multiplies it by 1 − lr·δ/N (the per-parameter path; the used layer's
    values go through the fused one and are checked by the BayesianRidge test)."""
    torch.manual_seed(0)
    model = _WithUnusedLayer().double()
    start = model.unused.weight.detach().clone()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    train_marglik(
        model,
        loader,
        "classification",
        epochs=2,
        lr=0.1,
        optimizer="sgd",
        prior_precision=4.0,
        marglik_frequency=5,
        keep_best=False,
        subset=["used.weight", "used.bias"],
    )
    steps = 2 * len(loader)
    assert_close(model.unused.weight.detach(), start * (1 - 0.1 * 4.0 / 40) ** steps, 1e-12)


def test_mapping_batches_train_as_pairs_do():
    x, y = _linear_problem()
    pairs = [(x[i : i + 50], y[i : i + 50, None]) for i in range(0, 200, 50)]
    maps = [{"features": a, "target": b} for a, b in pairs]
    results = []
    for loader, options in ((pairs, {}), (maps, {"x_key": "features", "y_key": "target"})):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
        result = train_marglik(
            model, loader, "regression", epochs=4, marglik_frequency=2, **options
        )
        results.append((torch.cat([p.reshape(-1) for p in model.parameters()]), result))
    (w0, r0), (w1, r1) = results
    assert torch.equal(w0, w1)
    assert torch.equal(r0.laplace.prior_precision, r1.laplace.prior_precision)
    # evidence steps after epochs burnin + k·frequency and after the last
    assert [h.epoch for h in r0.history if h.log_marginal_likelihood is not None] == [2, 4]


def test_schedule_and_bad_options():
    x, y = _linear_problem()
    loader = [(x, y[:, None])]
    model = nn.Linear(5, 1, dtype=DTYPE)
    result = train_marglik(
        model, loader, "regression", epochs=7, burnin=2, marglik_frequency=2, val_loader=loader
    )
    steps = [h.epoch for h in result.history if h.log_marginal_likelihood is not None]
    assert steps == [4, 6, 7]
    assert [h.val_nll is not None for h in result.history] == [e in steps for e in range(1, 8)]
    with pytest.raises(ValueError, match="adam"):
        train_marglik(model, loader, "regression", epochs=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="epochs"):
        train_marglik(model, loader, "regression", epochs=0)
    with pytest.raises(ValueError, match="prior_structure"):
        train_marglik(model, loader, "regression", epochs=1, prior_structure="blockwise")


# ------------------------------------------------------------------ data-parallel
def _dp_data():
    g = generator(9102)
    x = torch.randn(16, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def _dp_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def _dp_train(loader) -> tuple[torch.Tensor, torch.Tensor, float]:
    model = _dp_model()
    result = train_marglik(
        model, loader, epochs=3, lr=0.1, optimizer="sgd", structure="kron", marglik_frequency=1
    )
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return weights, result.laplace.prior_precision, result.log_marginal_likelihood


def _dp_worker(rank: int, init_file: str, out_dir: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        torch.set_num_threads(1)
        x, y = _dp_data()
        # batches of 8 rows: rank r holds rows [8k + 4r, 8k + 4r + 4)
        loader = [(x[s : s + 4], y[s : s + 4]) for s in range(4 * rank, 16, 8)]
        torch.save(_dp_train(loader), Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_rank_training_equals_single_process_training():
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.spawn(_dp_worker, args=(init_file, folder), nprocs=WORLD, join=True)
        per_rank = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(WORLD)]
    x, y = _dp_data()
    weights, prior, evidence = _dp_train([(x[s : s + 8], y[s : s + 8]) for s in range(0, 16, 8)])
    for rank_weights, rank_prior, rank_evidence in per_rank:
        assert_close(rank_weights, weights, 1e-12)
        assert_close(rank_prior, prior, 1e-10)
        assert_close(torch.tensor(rank_evidence), torch.tensor(evidence), 1e-10)


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_restores_the_weights_and_posterior_of_the_best_evidence(keep_best):
    # a large step size makes the evidence dip at the end: its maximum is at epoch 18 of 20
    g = generator(9103)
    x = torch.randn(120, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (120,), generator=g)
    loader = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 120, 40)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE)
    result = train_marglik(
        model,
        loader,
        epochs=20,
        lr=1.0,
        structure="full",
        marglik_frequency=2,
        keep_best=keep_best,
    )
    evidence = {h.epoch: h.log_marginal_likelihood for h in result.history}
    steps = {e: v for e, v in evidence.items() if v is not None}
    best = max(steps, key=steps.__getitem__)
    assert best == 18  # the restore path is exercised
    assert result.epoch == (best if keep_best else 20)
    assert result.log_marginal_likelihood == evidence[result.epoch]
    la = result.laplace
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(la.mean, weights)  # the posterior describes the weights the model holds
    assert_close(la.prior_precision, result.history[result.epoch - 1].prior_precision, 0.0)
    value = la.log_marginal_likelihood().detach()
    assert_close(value, torch.tensor(result.log_marginal_likelihood, dtype=DTYPE), 1e-12)
    # refitting at the kept weights gives the same posterior
    refit = Laplace(model, structure="full", prior_precision=la.prior_precision).fit(loader)
    assert_close(refit.log_marginal_likelihood().detach(), value, 1e-10)
