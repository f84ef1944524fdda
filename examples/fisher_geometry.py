"""Fisher geometry of a small MLP on scikit-learn's digits.

Trains an MLP 64-64-10 (4,810 parameters) on 1,400 digits, then shows

* the GGN (= Fisher) spectrum by stochastic Lanczos quadrature (``spectrum.png``) and its
  top eigenvalues beside the Hessian's, with the Hessian's most negative eigenvalues
  (``fisher_vs_hessian.png``);
* the effective dimension against the parameter count, for KFAC and the full GGN, at the
  marginal-likelihood-tuned prior (and MacKay's fixed point ``α‖θ‖² = γ``);
* the Fisher distance against the exact KL divergence of the predictions along a random
  and along the top eigen-direction (``distance_vs_kl.png``);
* per-layer shares of the trace and the most Fisher-sensitive inputs.

Usage::

    python examples/fisher_geometry.py --out fisher_out
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _smoke import size
from torch import nn

from laplacefim import Laplace
from laplacefim.geometry import (
    effective_dimension,
    fisher_distance,
    layer_sensitivity,
    plot_spectral_density,
    predictive_kl,
    spectral_density,
    structure_eigenvalues,
    top_eigenvalues,
    trace,
)


def digits(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    index = torch.randperm(len(y), generator=generator)[: size(1400, 200)]
    return x[index], y[index]


def train(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> nn.Module:
    hidden = size(64, 8)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    with torch.no_grad():  # seeded initialisation without touching the global seed
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / p.shape[-1]) ** 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(size(40, 1)):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fisher_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(0)
    x, y = digits(gen)
    model = train(x, y, gen).double()  # float64 keeps the tiny KLs of short steps exact
    x = x.double()
    loader = [(x[i : i + 200], y[i : i + 200]) for i in range(0, len(y), 200)]
    n_params = sum(p.numel() for p in model.parameters())
    accuracy = (model(x).argmax(1) == y).float().mean()
    width = model[0].out_features
    print(f"MLP 64-{width}-10 on {len(y)} digits: P = {n_params}, train accuracy {accuracy:.3f}")
    start = time.perf_counter()

    # -- spectra -------------------------------------------------------------------
    ggn = top_eigenvalues(model, loader, "classification", k=10, generator=gen)
    hess = top_eigenvalues(model, loader, "classification", k=10, matrix="hessian", generator=gen)
    low = top_eigenvalues(
        model, loader, "classification", k=3, matrix="hessian", which="smallest", generator=gen
    )
    print("top-10 GGN eigenvalues    :", " ".join(f"{v:8.2f}" for v in ggn.eigenvalues.tolist()))
    print("top-10 Hessian eigenvalues:", " ".join(f"{v:8.2f}" for v in hess.eigenvalues.tolist()))
    print("most negative Hessian     :", " ".join(f"{v:8.3f}" for v in low.eigenvalues.tolist()))
    overlap = (ggn.eigenvectors[0] @ hess.eigenvectors[0]).abs()
    print(f"|cos| between the top GGN and top Hessian eigenvectors: {overlap:.4f}")
    exact = trace(model, loader, "classification")
    hutch = trace(model, loader, "classification", n_probes=size(100, 5), generator=gen)
    print(
        f"GGN trace: exact {exact.estimate:.2f}, Hutchinson (100 probes) "
        f"{hutch.estimate:.2f} ± {hutch.standard_error:.2f}; top-10 share "
        f"{ggn.eigenvalues.sum() / exact.estimate:.1%}"
    )
    sd = spectral_density(model, loader, "classification", n_probes=3, n_steps=40, generator=gen)
    plot_spectral_density(sd, args.out / "spectrum.png", title="GGN spectral density (SLQ)")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, 11), ggn.eigenvalues.numpy(), "o-", label="GGN (Fisher)")
    ax.plot(range(1, 11), hess.eigenvalues.numpy(), "s--", label="Hessian")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fisher_vs_hessian.png", dpi=120)
    plt.close(fig)

    # -- effective dimension -------------------------------------------------------
    for structure in ("kron", "full"):
        la = Laplace(model, "classification", structure=structure).fit(loader)
        la.tune_prior()
        alpha = float(la.prior_precision)
        gamma = float(effective_dimension(la))
        balance = alpha * float(la.mean.square().sum())
        top = structure_eigenvalues(la)[:3].tolist()
        print(
            f"{structure:4s}: tuned prior alpha = {alpha:.3f}, effective dimension "
            f"gamma = {gamma:.1f} of P = {n_params} ({gamma / n_params:.1%}); "
            f"alpha*|theta|^2 = {balance:.1f}; "
            f"top structure eigenvalues {', '.join(f'{v:.1f}' for v in top)}"
        )

    # -- distance against KL -------------------------------------------------------
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    random = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    directions = {"random": random / random.norm(), "top eigenvector": ggn.eigenvectors[0]}
    steps = torch.logspace(-3, 0, size(7, 2))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, d in directions.items():
        ratios = []
        for step in steps.tolist():
            delta = step * d
            kl = predictive_kl(model, loader, "classification", theta, theta + delta)
            half = 0.5 * fisher_distance(model, loader, "classification", theta, theta + delta)
            ratios.append(float(half / kl))
        ax.semilogx(steps.numpy(), ratios, "o-", label=name)
        print(
            f"½δᵀFδ / KL along the {name}: "
            + ", ".join(f"{s:.0e}: {r:.4f}" for s, r in zip(steps.tolist(), ratios, strict=True))
        )
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("step length ‖δ‖")
    ax.set_ylabel("½ δᵀFδ / KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "distance_vs_kl.png", dpi=120)
    plt.close(fig)

    # -- sensitivity ---------------------------------------------------------------
    sens = layer_sensitivity(model, loader, "classification", k=3, step=0.1, generator=gen)
    shares = ", ".join(
        f"{n} {s:.1%}" for n, s in zip(sens.names, sens.layer_shares.tolist(), strict=True)
    )
    print(f"trace shares per parameter tensor: {shares}")
    print(
        "KL for a step of 0.1 along the top-3 directions:",
        ", ".join(f"{v:.3f}" for v in sens.direction_kl.tolist()),
        "(½·0.01·λ:",
        ", ".join(f"{v:.3f}" for v in (0.005 * sens.directions.eigenvalues).tolist()) + ")",
    )
    worst = sens.datum_traces.topk(5)
    print(
        "most Fisher-sensitive inputs (index: tr JᵀΛJ):",
        ", ".join(
            f"{i}: {v:.2f}"
            for i, v in zip(worst.indices.tolist(), worst.values.tolist(), strict=True)
        ),
        f"(median {sens.datum_traces.median():.3f})",
    )
    print(f"geometry computations took {time.perf_counter() - start:.1f} s; figures in {args.out}/")


if __name__ == "__main__":
    main()
