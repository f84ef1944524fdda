"""Fisher-geometry benchmark: top GGN eigenvalues and traces, against curvlinops.

On the W1 workload (MLP 64-256-256-10 on digits, 85,002 parameters, 5,600 fit rows in
batches of 128; see ``_workloads.py``), in one run:

* top-10 GGN eigenvalues: ``laplacefim.geometry.top_eigenvalues`` (block Lanczos, one
  data pass per block of 10 GGN-vector products) against curvlinops'
  ``GGNLinearOperator`` driven by ``scipy.sparse.linalg.eigsh`` (ARPACK), both with the
  relative tolerance ``TOL``, and the largest relative difference of their eigenvalues;
* GGN trace: our exact trace (the diagonal through the ``C`` loss-Hessian columns) and
  our Hutchinson estimate against curvlinops' ``hutchinson_trace`` with the same number
  of probes;
* the overhead of a ``FisherMonitor`` (probe batch of 64 rows, ``every=50``) on training
  the W1 MLP as in ``_workloads.train`` (Adam, batch 64, 220 steps), in its exact mode
  and in its one-pass Hutchinson mode.

Times are wall-clock seconds and multiples of one training-style epoch (forward,
summed cross-entropy, backward over the fit loader). Torch uses 2 threads.

Targets, printed at the end as ``target: ... met`` (the limits are this script's): our
top-10 eigenvalues converge and agree with curvlinops' to within ``TOL`` (the tolerance
both run at), and come faster; our Hutchinson trace is faster than curvlinops' with the
same number of probes; our exact trace is faster than our Hutchinson estimate (as
``docs/geometry.md`` says). The monitor's overhead is printed, with no target.

Usage::

    .venv/bin/python benchmarks/geometry.py            # ~3-4 minutes
    .venv/bin/python benchmarks/geometry.py --skip-curvlinops
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _targets import report
from _workloads import (
    SEED,
    TRAIN_BATCH,
    TRAIN_EPOCHS,
    TRAIN_LR,
    build_model,
    load_digits_split,
    prepare_bundle,
    restore,
)
from torch import nn

from laplacefim.geometry import top_eigenvalues, trace
from laplacefim.monitor import FisherMonitor

K = 10
TOL = 1e-3
N_PROBES = 20
MONITOR_EVERY = 50
MONITOR_REPEATS = 3
PROBE_ROWS = 64
EIG_STEPS = 3
N_MONITOR_PROBES = 2


def epoch_time(model: nn.Module, loader) -> float:
    """Median of 3 forward+backward epochs with summed cross-entropy."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for x, y in loader:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        times.append(time.perf_counter() - start)
    model.zero_grad()
    return statistics.median(times)


def ours_eigen(model, loader):
    start = time.perf_counter()
    eig = top_eigenvalues(
        model, loader, "classification", k=K, tol=TOL, generator=torch.Generator().manual_seed(0)
    )
    return time.perf_counter() - start, eig


def curvlinops_eigen(model, loader, n_data):
    import numpy as np
    from curvlinops import GGNLinearOperator
    from scipy.sparse.linalg import eigsh

    start = time.perf_counter()
    op = GGNLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        list(model.parameters()),
        loader,
        check_deterministic=False,
        num_data=n_data,
    )
    scipy_op = op.to_scipy(np.float32)
    counter = {"n": 0}
    matvec = scipy_op.matvec

    def counted(v):
        counter["n"] += 1
        return matvec(v)

    from scipy.sparse.linalg import LinearOperator

    wrapped = LinearOperator(scipy_op.shape, matvec=counted, dtype=np.float32)
    values = eigsh(wrapped, k=K, which="LA", tol=TOL, return_eigenvectors=False)
    elapsed = time.perf_counter() - start
    return elapsed, torch.tensor(np.sort(values)[::-1].copy()), counter["n"], op


def train_with(monitor: FisherMonitor | None) -> float:
    """Train W1 as ``_workloads.train`` does; return the wall time of the loop."""
    torch.manual_seed(SEED)
    X, y, _, _ = load_digits_split()
    model = build_model("W1")
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    start = time.perf_counter()
    for _ in range(TRAIN_EPOCHS):
        for idx in torch.randperm(len(y), generator=gen).split(TRAIN_BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
            if monitor is not None:
                monitor.step(model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-curvlinops", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("preparing W1 (training the MLP) ...", file=sys.stderr)
    bundle = prepare_bundle("W1")
    model, loader = restore(bundle)
    n_params = sum(p.numel() for p in model.parameters())
    epoch = epoch_time(model, loader)
    print(
        f"W1: MLP 64-256-256-10, P = {n_params:,}, N = {len(bundle.y):,} (batch 128), "
        f"epoch (fwd+bwd) = {epoch:.3f} s, torch {torch.__version__}, 2 threads"
    )
    print(f"\n== top-{K} GGN eigenvalues (tol {TOL:g}) ==")
    ours_eigen(model, [next(iter(loader))])  # warm-up
    t_ours, eig = ours_eigen(model, loader)
    print(
        f"laplacefim top_eigenvalues : {t_ours:8.2f} s  {t_ours / epoch:8.1f} epochs  "
        f"{eig.n_products} products ({eig.n_products // K} passes), converged={eig.converged}"
    )
    print("  eigenvalues:", " ".join(f"{v:.1f}" for v in eig.eigenvalues.tolist()))
    op, t_cl, rel, t_clh = None, None, None, None
    if not args.skip_curvlinops:
        t_cl, values, n_mv, op = curvlinops_eigen(model, loader, len(bundle.y))
        rel = ((values - eig.eigenvalues.double()).abs() / values.abs()).max()
        print(
            f"curvlinops GGN + eigsh     : {t_cl:8.2f} s  {t_cl / epoch:8.1f} epochs  "
            f"{n_mv} products; curvlinops/ours = {t_cl / t_ours:.1f}x"
        )
        print("  eigenvalues:", " ".join(f"{v:.1f}" for v in values.tolist()))
        print(f"  max relative difference of the eigenvalues: {float(rel):.2e}")

    print("\n== GGN trace ==")
    start = time.perf_counter()
    exact = trace(model, loader, "classification")
    t_exact = time.perf_counter() - start
    print(
        f"laplacefim exact trace     : {t_exact:8.2f} s  {t_exact / epoch:8.1f} epochs  "
        f"trace = {float(exact.estimate):.2f}"
    )
    start = time.perf_counter()
    est = trace(
        model,
        loader,
        "classification",
        n_probes=N_PROBES,
        generator=torch.Generator().manual_seed(1),
    )
    t_h = time.perf_counter() - start
    print(
        f"laplacefim Hutchinson ({N_PROBES:d}) : {t_h:8.2f} s  {t_h / epoch:8.1f} epochs  "
        f"{float(est.estimate):.2f} ± {float(est.standard_error):.2f} "
        f"(error {float((est.estimate - exact.estimate) / est.standard_error):+.2f} SE)"
    )
    if op is not None:
        from curvlinops import hutchinson_trace

        start = time.perf_counter()
        value = hutchinson_trace(op, N_PROBES)
        t_clh = time.perf_counter() - start
        print(
            f"curvlinops hutchinson ({N_PROBES:d}) : {t_clh:8.2f} s  {t_clh / epoch:8.1f} epochs  "
            f"{float(value):.2f}; curvlinops/ours = {t_clh / t_h:.1f}x (vs our exact: "
            f"{t_clh / t_exact:.1f}x)"
        )

    print(
        f"\n== FisherMonitor overhead (training W1 as _workloads.train, every={MONITOR_EVERY}) =="
    )
    X, y, _, _ = load_digits_split()
    probe = (X[:PROBE_ROWS], y[:PROBE_ROWS])
    train_with(None)  # warm-up
    configs = {
        f"exact diagonal + {EIG_STEPS} Lanczos steps": {"n_probes": None, "eig_steps": EIG_STEPS},
        f"default: Hutchinson, {N_MONITOR_PROBES} probes, one pass": {"n_probes": N_MONITOR_PROBES},
    }
    for label, options in configs.items():
        plain, monitored = [], []
        for _ in range(MONITOR_REPEATS):
            plain.append(train_with(None))
            monitor = FisherMonitor(
                "classification",
                probe,
                every=MONITOR_EVERY,
                generator=torch.Generator().manual_seed(0),
                **options,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # early-training jumps
                monitored.append(train_with(monitor))
        t_plain, t_mon = statistics.median(plain), statistics.median(monitored)
        per_record = statistics.median(r.seconds for r in monitor.records)
        last = monitor.records[-1]
        print(
            f"{label:38s}: training {t_plain:.3f} s, with monitor {t_mon:.3f} s "
            f"({len(monitor.records)} records of {per_record * 1e3:.1f} ms): overhead "
            f"{100 * (t_mon / t_plain - 1):+.1f} %"
        )
        print(
            f"{'':38s}  last record (step {last.step}): trace {last.trace:.1f}, top eigenvalue "
            f"{last.top_eigenvalue:.1f}, effective dimension (alpha=1) "
            f"{last.effective_dimension:.1f}"
        )
    print(f"\nload average: {os.getloadavg()}")

    print("\n# targets")
    skipped = "--skip-curvlinops" if args.skip_curvlinops else "curvlinops not run"
    what = f"top-{K} eigenvalues converged, max relative difference to curvlinops'"
    limit = f"<= {TOL:g}"
    if rel is None:
        report(what, None, limit, None, skipped)
    else:
        measured = f"{float(rel):.1e} (converged={eig.converged})"
        report(what, measured, limit, bool(eig.converged) and float(rel) <= TOL)
    what = f"top-{K} eigenvalues time curvlinops GGN + eigsh / ours"
    if t_cl is None:
        report(what, None, "> 1x", None, skipped)
    else:
        report(
            what, f"{t_cl / t_ours:.2f}x ({t_cl:.2f} s vs {t_ours:.2f} s)", "> 1x", t_cl > t_ours
        )
    what = f"Hutchinson trace ({N_PROBES} probes) time curvlinops / ours"
    if t_clh is None:
        report(what, None, "> 1x", None, skipped)
    else:
        report(what, f"{t_clh / t_h:.2f}x ({t_clh:.2f} s vs {t_h:.2f} s)", "> 1x", t_clh > t_h)
    what = f"exact trace time / our Hutchinson ({N_PROBES} probes)"
    report(what, f"{t_exact / t_h:.2f} ({t_exact:.2f} s vs {t_h:.2f} s)", "< 1", t_exact < t_h)


if __name__ == "__main__":
    main()
