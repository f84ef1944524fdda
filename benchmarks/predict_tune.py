"""Prior tuning and GLM prediction, laplacefim beside laplace-torch 0.3, in one run.

For the W1 MLP and the W2 CNN of ``_workloads.py`` (5,600 fit rows, batch 128; 397
held-out digits to predict) and every (subset, structure) both libraries support with the
exact GGN, prints per library: fit, tune (marginal likelihood) and predict (GLM probit)
times, the tuned prior precision, the log marginal likelihood reached, test NLL and
accuracy; the time ratios; and, at the same prior precision (1.0, before tuning) for the
full and diagonal GGN posteriors, the largest difference of the predicted probabilities.

Run in the benchmark environment (``bash benchmarks/setup_bench_env.sh``):
``.venv-bench/bin/python benchmarks/predict_tune.py [--workloads W1,W2] [--quick]``.
laplace-torch tunes with its default 100 Adam steps (``optimize_prior_precision``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from _workloads import build_model, load_digits_split, make_fit_data, train

from laplacefim import Laplace

CONFIGS = [
    ("last_layer", "diag"),
    ("last_layer", "kron"),
    ("last_layer", "full"),
    ("all", "diag"),
    ("all", "kron"),
]
EXACT = {("last_layer", "diag"), ("last_layer", "full"), ("all", "diag")}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def scores(probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    nll = -probs.gather(1, y[:, None]).clamp_min(1e-12).log().mean()
    return float(nll), float((probs.argmax(-1) == y).float().mean())


def ours(
    model: nn.Module,
    loader: DataLoader,
    x: torch.Tensor,
    y: torch.Tensor,
    subset: str,
    structure: str,
) -> dict[str, Any]:
    la = Laplace(model, "classification", subset=subset, structure=structure)
    _, fit_s = timed(lambda: la.fit(loader))
    same_prior = la.predict(x).probs
    tuned, tune_s = timed(la.tune_prior)
    probs, predict_s = timed(lambda: la.predict(x).probs)
    nll, acc = scores(probs, y)
    return {
        "fit": fit_s,
        "tune": tune_s,
        "predict": predict_s,
        "prior": float(tuned.prior_precision),
        "lml": float(tuned.log_marginal_likelihood),
        "nll": nll,
        "acc": acc,
        "same_prior": same_prior,
        "iters": tuned.n_iter,
    }


def peer(
    model: nn.Module,
    loader: DataLoader,
    x: torch.Tensor,
    y: torch.Tensor,
    subset: str,
    structure: str,
) -> dict[str, Any]:
    from laplace import Laplace as PeerLaplace

    la = PeerLaplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    _, fit_s = timed(lambda: la.fit(loader))
    with torch.no_grad():
        same_prior = la(x, pred_type="glm", link_approx="probit")
    _, tune_s = timed(lambda: la.optimize_prior_precision(pred_type="glm", method="marglik"))
    with torch.no_grad():
        probs, predict_s = timed(lambda: la(x, pred_type="glm", link_approx="probit"))
        lml = float(la.log_marginal_likelihood())
    nll, acc = scores(probs, y)
    return {
        "fit": fit_s,
        "tune": tune_s,
        "predict": predict_s,
        "prior": float(la.prior_precision.mean()),
        "lml": lml,
        "nll": nll,
        "acc": acc,
        "same_prior": same_prior,
        "iters": 100,
    }


def run(workload: str, quick: bool) -> None:
    X_train, y_train, X_test, y_test = load_digits_split()
    shape = (-1, 1, 8, 8) if workload == "W2" else (-1, 64)
    model = build_model(workload)
    train(model, X_train.reshape(shape), y_train)
    X, y = make_fit_data(X_train.reshape(shape), y_train)
    loader = DataLoader(TensorDataset(X, y), batch_size=128)
    x_test = X_test.reshape(shape)
    print(f"\n== {workload}: fit on {len(y)} rows, predict {len(y_test)} held-out digits")
    names = ("fit s", "tune s", "pred s", "total", "prior", "iters", "log ML", "NLL", "acc")
    print(f"{'subset':>10} {'struct':>6} {'lib':>8} " + " ".join(f"{n:>8}" for n in names))
    for subset, structure in CONFIGS[:2] if quick else CONFIGS:
        rows = {"ours": ours(model, loader, x_test, y_test, subset, structure)}
        try:
            rows["laplace"] = peer(model, loader, x_test, y_test, subset, structure)
        except Exception as error:  # report and go on: a peer's failure is a result
            print(
                f"{subset:>10} {structure:>6} laplace-torch failed: {type(error).__name__}: {error}"
            )
        for lib, r in rows.items():
            total = r["fit"] + r["tune"] + r["predict"]
            cells = (r["fit"], r["tune"], r["predict"], total, r["prior"], r["iters"])
            tail = (r["lml"], r["nll"], r["acc"])
            print(
                f"{subset:>10} {structure:>6} {lib:>8} "
                + " ".join(f"{c:8.3f}" for c in cells[:4])
                + f" {cells[4]:8.3g} {cells[5]:8d} "
                + " ".join(f"{c:8.3f}" for c in tail)
            )
        if "laplace" in rows:
            a, b = rows["ours"], rows["laplace"]
            ratios = {k: b[k] / a[k] for k in ("fit", "tune", "predict")}
            total = (b["fit"] + b["tune"] + b["predict"]) / (a["fit"] + a["tune"] + a["predict"])
            line = "  ".join(f"{k} {v:6.1f}x" for k, v in ratios.items())
            gap = ""
            if (subset, structure) in EXACT:
                diff = float((a["same_prior"].double() - b["same_prior"].double()).abs().max())
                gap = f"  | same prior 1.0: max |p_ours - p_laplace| = {diff:.2e}"
            print(
                f"{'':>10} {'':>6} {'speedup':>8} {line}  total {total:6.1f}x  lml ours-laplace {a['lml'] - b['lml']:+.2f}{gap}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads, load average {os.getloadavg()[0]:.2f}")
    for workload in args.workloads.split(","):
        run(workload, args.quick)


if __name__ == "__main__":
    main()
