"""Fit, tune and predict times of laplacefim on the W1/W2 workloads, on CUDA if present.

Prints, per (subset, structure, curvature), the fit time, its ratio to one
forward+backward epoch over the same data, the prior-tuning time and the GLM predict
time for the held-out digits. Runs on the CPU when no GPU is present (for a smoke run).
Usage: python benchmarks/cuda_timing.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _workloads import build_model, load_digits_split, make_fit_data, train

from laplacefim import Laplace

CONFIGS = [
    ("last_layer", "diag", "ggn"),
    ("last_layer", "kron", "ggn"),
    ("last_layer", "full", "ggn"),
    ("all", "diag", "ggn"),
    ("all", "diag", "fisher"),
    ("all", "kron", "ggn"),
    ("all", "kron", "fisher"),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


HEADER = ("subset", "structure", "curvature", "fit ms", "fit/epoch", "tune ms", "predict ms")


def time_workload(workload: str, device: torch.device, repeats: int) -> None:
    """Train the workload's model, then time fit, tune and predict for every config."""
    X_train, y_train, X_test, _ = load_digits_split()
    shape = (-1, 1, 8, 8) if workload == "W2" else (-1, 64)
    model = build_model(workload)
    train(model, X_train.reshape(shape), y_train)
    model = model.to(device)
    X, y = make_fit_data(X_train, y_train)
    batches = [
        (xb.reshape(shape), yb)
        for xb, yb in zip(X.to(device).split(128), y.to(device).split(128), strict=True)
    ]
    x_test = X_test.to(device).reshape(shape)

    def epoch() -> None:
        for xb, yb in batches:
            model.zero_grad()
            nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()

    epoch_s = _median(epoch, device, repeats)
    print(f"\n{workload}: one forward+backward epoch {epoch_s * 1e3:.1f} ms")
    print(" ".join(f"{h:>10}" for h in HEADER))
    for subset, structure, curvature in CONFIGS:
        la = Laplace(
            model, "classification", subset=subset, structure=structure, curvature=curvature
        )
        fit_s = _median(lambda la=la: la.fit(batches), device, repeats)
        tune_s = _median(lambda la=la: (la.fit(batches), la.tune_prior()), device, 1) - fit_s
        predict_s = _median(lambda la=la: la.predict(x_test).probs, device, repeats)
        cells = (fit_s * 1e3, fit_s / epoch_s, tune_s * 1e3, predict_s * 1e3)
        print(
            f"{subset:>10} {structure:>10} {curvature:>10} " + " ".join(f"{c:10.2f}" for c in cells)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}")
    for workload in ("W1", "W2"):
        time_workload(workload, device, args.repeats)


if __name__ == "__main__":
    main()
