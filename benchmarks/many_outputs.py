"""Many outputs: a last-layer KFAC posterior with 100 to 3,100 classes (and 1,000 regression
outputs), beside laplace-torch on the same cases.

Model: ``Linear(64, 512), ReLU, Linear(512, C)`` with seeded random weights; Gaussian
inputs; labels the model's own argmax (regression: its outputs plus N(0, 0.1²) noise). Per
library and case, in a fresh process each:

* ``fit`` on ``N`` rows (batch 256): ours ``Laplace(model, likelihood, subset="last_layer",
  structure="kron").fit(loader)``; laplace-torch 0.3 ``Laplace(model, likelihood,
  subset_of_weights="last_layer", hessian_structure="kron").fit(loader)`` (its default
  backend);
* ``tune``: ours ``la.tune_prior()`` (scalar prior, evidence); laplace-torch
  ``la.optimize_prior_precision(method="marglik")``;
* ``predict`` ``N`` inputs (GLM, probit for classification): ours ``la.predict(x)``;
  laplace-torch ``la(x, pred_type="glm", link_approx="probit")`` in batches of 32 (its GLM
  predictive forms the ``(B, C, P)`` Jacobian: 5 GB for a batch of 256 at C = 100).

Memory: the process's peak resident set (``ru_maxrss``) minus its resident set once the
model and data are in memory. Each process runs under an address-space limit of that
base plus ``--budget-mb`` (default 8 GiB), so an allocation beyond it fails (``OOM``), and
under a wall-clock cap ``--cap`` seconds (``timeout``).

Targets (issue 14): with 512 features and 3,100 classes, last-layer KFAC fit on 10,000
rows + tuning + predicting 10,000 inputs within 60 s and 4 GB; fits cost O(N·C²) and
predictions O(B·C²): the measured growth exponent of fit and predict time from C = 1,000
to C = 3,100 at most 2.3 (2 plus room for fixed costs and timing noise).

Usage (repository root, benchmark environment)::

    OMP_WAIT_POLICY=PASSIVE .venv-bench/bin/python benchmarks/many_outputs.py
    OMP_WAIT_POLICY=PASSIVE .venv-bench/bin/python benchmarks/many_outputs.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any

from _targets import target_line

FEATURES = 512
D_IN = 64
BATCH = 256
PEER_PREDICT_BATCH = 32
SEED = 0
TARGET_SECONDS = 60.0
TARGET_GB = 4.0
MAX_EXPONENT = 2.3


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _vsize() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _problem(likelihood: str, n_out: int, n: int) -> tuple[Any, Any, Any]:
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(SEED)
    model = nn.Sequential(nn.Linear(D_IN, FEATURES), nn.ReLU(), nn.Linear(FEATURES, n_out))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        x = torch.randn(n, D_IN, generator=gen)
        f = model(x)
        if likelihood == "classification":
            y = f.argmax(-1)
        else:
            y = f + 0.1 * torch.randn(f.shape, generator=gen)
    return model, x, y


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    model, x, y = _problem(spec["likelihood"], spec["n_out"], spec["n"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False
    )
    if spec["lib"] == "ours":
        import laplacefim  # noqa: F401
    else:
        import laplace  # noqa: F401
    base = _rss_mb()
    limit = _vsize() + spec["budget_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    times: dict[str, float] = {}
    try:
        if spec["lib"] == "ours":
            _run_ours(spec, model, x, loader, times)
        else:
            _run_laplace(spec, model, x, loader, times)
        status = "ok"
    except (MemoryError, RuntimeError) as error:
        text = str(error)
        if isinstance(error, MemoryError) or "alloc" in text.lower() or "memory" in text.lower():
            status = "OOM"
        else:
            status = f"error: {text.splitlines()[0][:80]}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**spec, "status": status, "times": times, "peak_mb": peak - base}


def _timed(times: dict[str, float], name: str, fn: Any) -> Any:
    start = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - start
    print(json.dumps({"partial": times}), flush=True)  # kept if a later phase times out
    return out


def _run_ours(spec: dict[str, Any], model: Any, x: Any, loader: Any, times: dict) -> None:
    import torch

    import laplacefim

    la = laplacefim.Laplace(
        model, likelihood=spec["likelihood"], subset="last_layer", structure="kron"
    )
    _timed(times, "fit", lambda: la.fit(loader))
    _timed(times, "tune", la.tune_prior)
    with torch.no_grad():
        _timed(times, "predict", lambda: la.predict(x, chunk_size=BATCH))


def _run_laplace(spec: dict[str, Any], model: Any, x: Any, loader: Any, times: dict) -> None:
    import laplace
    import torch

    la = laplace.Laplace(
        model, spec["likelihood"], subset_of_weights="last_layer", hessian_structure="kron"
    )
    _timed(times, "fit", lambda: la.fit(loader))
    _timed(times, "tune", lambda: la.optimize_prior_precision(method="marglik"))

    def predict() -> None:
        with torch.no_grad():
            for chunk in x.split(PEER_PREDICT_BATCH):
                if spec["likelihood"] == "classification":
                    la(chunk, pred_type="glm", link_approx="probit")
                else:
                    la(chunk, pred_type="glm")

    _timed(times, "predict", predict)


def _measure(spec: dict[str, Any], cap: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired as timeout:
        out = timeout.stdout or ""
        text = out.decode() if isinstance(out, bytes) else out
        return {**spec, "status": f"timeout (> {cap:.0f} s)", "times": _partial(text)}
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"lib"')]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:80]
        status = "OOM" if "MemoryError" in done.stderr or "alloc" in tail else f"error: {tail}"
        return {**spec, "status": status, "times": _partial(done.stdout)}
    return json.loads(lines[-1])


def _partial(stdout: str) -> dict[str, float]:
    """The phases a worker finished before it was stopped (their times still count)."""
    found = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"partial"')]
    return found[-1]["partial"] if found else {}


def _row(result: dict[str, Any]) -> str:
    t = result["times"]
    cells = [f"{t[k]:8.2f}" if k in t else f"{'-':>8}" for k in ("fit", "tune", "predict")]
    total = f"{sum(t.values()):8.2f}" if len(t) == 3 else f"{'-':>8}"
    peak = f"{result['peak_mb']:8.0f}" if result.get("peak_mb") is not None else f"{'-':>8}"
    case = f"{result['likelihood'][:5]} C={result['n_out']} N={result['n']}"
    return f"{case:24} {result['lib']:8} {' '.join(cells)} {total} {peak}  {result['status']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="C up to 1,000, N = 2,000")
    parser.add_argument("--libs", default="ours,laplace")
    parser.add_argument("--cap", type=float, default=300.0, help="seconds per process")
    parser.add_argument("--budget-mb", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    if args.quick:
        cases = [("classification", c, 2_000) for c in (100, 400, 1_000)]
        cases.append(("regression", 1_000, 2_000))
    else:
        cases = [("classification", c, 10_000) for c in (100, 400, 1_000, 3_100)]
        cases.append(("regression", 1_000, 10_000))
    libs = args.libs.split(",")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(
        f"# many outputs: {FEATURES} features, batch {BATCH}, {args.threads} threads, "
        f"load average {' '.join(load)} at start; cap {args.cap:.0f} s, "
        f"budget {args.budget_mb} MB per process"
    )
    print(
        f"{'case':24} {'library':8} {'fit s':>8} {'tune s':>8} {'pred s':>8} {'total s':>8} "
        f"{'peak MB':>8}  status"
    )
    results = []
    for likelihood, n_out, n in cases:
        for lib in libs:
            spec = {
                "lib": lib,
                "likelihood": likelihood,
                "n_out": n_out,
                "n": n,
                "threads": args.threads,
                "budget_mb": args.budget_mb,
            }
            print(f"  running {lib} {likelihood} C={n_out} N={n} ...", file=sys.stderr)
            result = _measure(spec, args.cap)
            results.append(result)
            print(_row(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "results": results}, f, indent=1)
    _targets(results, quick=args.quick)


def _targets(results: list[dict[str, Any]], quick: bool) -> None:
    ours = {
        (r["likelihood"], r["n_out"]): r
        for r in results
        if r["lib"] == "ours" and r["status"] == "ok"
    }
    lines = []
    head = ours.get(("classification", 3_100))
    what = "C=3100 last-layer KFAC fit + tune + predict (10,000 rows)"
    limit = f"<= {TARGET_SECONDS:.0f} s and <= {TARGET_GB:.0f} GB"
    if head is None:
        lines.append(target_line(what, None, limit, None, "--quick" if quick else "not run"))
    else:
        total = sum(head["times"].values())
        gb = head["peak_mb"] / 1024
        met = total <= TARGET_SECONDS and gb <= TARGET_GB
        lines.append(target_line(what, f"{total:.1f} s, {gb:.2f} GB", limit, met))
    high = 3_100 if head is not None else 1_000
    low = 1_000 if head is not None else 400
    a, b = ours.get(("classification", low)), ours.get(("classification", high))
    for phase in ("fit", "predict"):
        what = f"{phase} time growth exponent C={low}->{high}"
        limit = f"<= {MAX_EXPONENT} (O(C^2))"
        if a is None or b is None:
            lines.append(target_line(what, None, limit, None, "a case did not run"))
            continue
        exponent = math.log(b["times"][phase] / a["times"][phase]) / math.log(high / low)
        lines.append(target_line(what, f"{exponent:.2f}", limit, exponent <= MAX_EXPONENT))
    peers = {(r["likelihood"], r["n_out"]): r for r in results if r["lib"] == "laplace"}
    for key, mine in sorted(ours.items()):
        peer = peers.get(key)
        if peer is None:
            continue
        if peer["status"] == "ok":
            ratio = sum(peer["times"].values()) / sum(mine["times"].values())
            lines.append(f"{key[0]} C={key[1]}: laplace-torch / ours total time {ratio:.1f}x")
        else:
            done = ", ".join(f"{k} {v:.1f} s" for k, v in peer["times"].items())
            lines.append(
                f"{key[0]} C={key[1]}: laplace-torch {peer['status']}"
                + (f" after {done}" if done else "")
                + f"; ours {sum(mine['times'].values()):.1f} s"
            )
        if "fit" in peer["times"]:
            ratio = peer["times"]["fit"] / mine["times"]["fit"]
            lines.append(f"{key[0]} C={key[1]}: laplace-torch / ours fit time {ratio:.1f}x")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
