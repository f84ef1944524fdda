"""Fit, tune and predict times of laplacefim on the W1/W2/W3 workloads, on CUDA if present.

Prints, per (subset, structure, curvature), the fit time, its ratio to one
forward+backward epoch over the same data, the prior-tuning time and the GLM predict
time for the held-out digits. Runs on the CPU when no GPU is present (for a smoke run).
Usage: python benchmarks/cuda_timing.py [--repeats 3] [--workloads W1,W2,W3]
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
from _workloads import (
    W3_ROWS,
    _shape_inputs,
    batch_size,
    build_model,
    load_digits_split,
    make_fit_data,
    train,
)

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
    X_train, X_test = _shape_inputs(workload, X_train), _shape_inputs(workload, X_test)
    if workload == "W3":  # the ResNet-18 trains and fits on its first rows (see _workloads)
        X_train, y_train = X_train[:W3_ROWS], y_train[:W3_ROWS]
    model = build_model(workload).to(device)
    train(model, X_train.to(device), y_train.to(device))
    X, y = (X_train, y_train) if workload == "W3" else make_fit_data(X_train, y_train)
    size = batch_size(workload)
    batches = list(zip(X.to(device).split(size), y.to(device).split(size), strict=True))
    x_test = X_test.to(device)

    def epoch() -> None:
        for xb, yb in batches:
            model.zero_grad()
            nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()

    epoch_s = _median(epoch, device, repeats)
    print(f"\n{workload}: one forward+backward epoch {epoch_s * 1e3:.1f} ms")
    print(" ".join(f"{h:>10}" for h in HEADER))
    for subset, structure, curvature in CONFIGS:
        la = Laplace(
            model,
            "classification",
            subset=subset,
            structure=structure,
            curvature=curvature,
            max_full_params=25_000,  # W2's last layer has 20,490
        )
        fit_s = _median(lambda la=la: la.fit(batches), device, repeats)
        _sync(device)
        start = time.perf_counter()
        la.tune_prior()  # once, from the fitted state (a second call would start tuned)
        _sync(device)
        tune_s = time.perf_counter() - start
        predict_s = _median(lambda la=la: la.predict(x_test).probs, device, repeats)
        cells = (fit_s * 1e3, fit_s / epoch_s, tune_s * 1e3, predict_s * 1e3)
        print(
            f"{subset:>10} {structure:>10} {curvature:>10} " + " ".join(f"{c:10.2f}" for c in cells)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workloads", help="comma list; default W1,W2,W3 on CUDA and W1 on the CPU (smoke run)"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}")
    default = "W1,W2,W3" if device.type == "cuda" else "W1"
    for workload in (args.workloads or default).split(","):
        time_workload(workload, device, args.repeats)


if __name__ == "__main__":
    main()
