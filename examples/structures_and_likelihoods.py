"""EKFAC, low-rank and heteroscedastic regression next to KFAC and diag.

Part 1 trains the quickstart's MLP on scikit-learn's digits and fits five structures over
all weights — ``diag``, ``kron`` (KFAC), ``ekfac`` (KFAC's eigenbasis with exactly
re-fitted eigenvalues), ``lowrank`` (top eigenpairs + exact diagonal) and, on the last
layer, ``full`` — each with its prior tuned by the evidence; it prints the fit time, the
log evidence and the test NLL of the GLM predictive.

Part 2 fits a heteroscedastic regression network (mean and log-variance per target) on
scikit-learn's diabetes data and splits its predictive variance into epistemic (the
posterior's) and aleatoric (the network's noise) parts.

Run with ``python examples/structures_and_likelihoods.py`` (about a minute on 2 cores).
Everything is seeded with local generators.
"""

from __future__ import annotations

import time

import torch
from _smoke import size
from quickstart import digits_loaders, make_mlp, train
from sklearn.datasets import load_diabetes
from torch import nn

from laplacefim import Laplace, LowRank, metrics


def compare_structures() -> None:
    train_loader, test_loader = digits_loaders()
    model = make_mlp()
    train(model, train_loader, epochs=size(20, 1))
    x_test = torch.cat([x for x, _ in test_loader])
    y_test = torch.cat([y for _, y in test_loader])
    print(f"{'structure':<22} {'fit s':>7} {'log evidence':>13} {'test NLL':>9}")
    cases = [
        ("diag", "all", "diag"),
        ("kron", "all", "kron"),
        ("ekfac", "all", "ekfac"),
        ("lowrank (k = 30)", "all", LowRank(rank=30)),
        ("full, last layer", "last_layer", "full"),
    ]
    for label, subset, structure in cases:
        start = time.perf_counter()
        la = Laplace(model, "classification", subset=subset, structure=structure)
        la.fit(train_loader)
        seconds = time.perf_counter() - start
        tuned = la.tune_prior()
        probs = la.predict(x_test).probs
        nll = metrics.nll(probs, y_test)
        evidence = float(tuned.log_marginal_likelihood)
        print(f"{label:<22} {seconds:>7.2f} {evidence:>13.1f} {nll:>9.3f}")


def heteroscedastic_regression() -> None:
    features, targets = load_diabetes(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor((targets - targets.mean()) / targets.std(), dtype=torch.float32)[:, None]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    train_idx, test_idx = order[:350], order[350:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2))  # mean, log σ²
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(size(400, 10)):
        optimizer.zero_grad()
        out = model(x[train_idx])
        mean, log_var = out[:, :1], out[:, 1:]
        loss = 0.5 * ((y[train_idx] - mean).square() / log_var.exp() + log_var).mean()
        loss.backward()
        optimizer.step()
    loader = [(x[train_idx][i : i + 50], y[train_idx][i : i + 50]) for i in range(0, 350, 50)]
    la = Laplace(model, likelihood="heteroscedastic", structure="kron").fit(loader)
    la.tune_prior()
    pred = la.predict(x[test_idx])
    nll = float(la.config.likelihood.predictive_nll(pred, y[test_idx])) / len(test_idx)
    print("\nheteroscedastic regression on diabetes (standardised targets, 92 test patients)")
    print(f"  mean epistemic variance {float(pred.epistemic_var.mean()):.4f}")
    print(f"  mean aleatoric variance {float(pred.aleatoric_var.mean()):.4f}")
    print(f"  test NLL per patient    {nll:.3f}")


if __name__ == "__main__":
    compare_structures()
    heteroscedastic_regression()
