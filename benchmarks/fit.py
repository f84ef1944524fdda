"""Side-by-side fit-time benchmark: laplacefim.Laplace against its peers.

Compares, on the same trained models and the same 5,600-row loader, the time
and memory to *fit* curvature (accumulate it over the data; no decomposition)
of ``laplacefim.Laplace`` against laplace-torch 0.3 (with each of its backends),
curvlinops 3.0.1, BackPACK and ASDL, for every (subset, structure, curvature)
configuration a library supports. Workloads (see ``_workloads.py``):

* W1: MLP 64-256-256-10 (ReLU) on scikit-learn's digits;
* W2: small CNN (conv16, conv32, linear) on digits as 1x8x8 images.

Every (library, configuration) runs in its own process, forked from a fork
server that has already imported the libraries, so peak resident memory
(``ru_maxrss``) is per configuration. What exactly is timed for each library is
described in ``_runners.py``; the timing policy (probe, warm-up, median of
repeats, time cap) in ``_worker.py``.

Usage (from the repository root, in the benchmark environment)::

    .venv-bench/bin/python benchmarks/fit.py                 # full run (~20-25 min)
    .venv-bench/bin/python benchmarks/fit.py --quick         # smoke run (~2-3 min)
    .venv-bench/bin/python benchmarks/fit.py --workloads W1 --libs ours,laplace --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Under load from other processes, OpenMP's default active spin-waiting makes a
# 2-thread torch up to ~50x slower on a 2-core machine; passive waiting keeps the
# timings sane. It must be set before torch loads (the fork server and the job
# processes inherit it); an explicit setting in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _runners import CURVATURES, LIBS, STRUCTURES, SUBSETS, Config, variants
from _worker import THREADS, Job
from _workloads import (
    BATCH_SIZE,
    WORKLOADS,
    Bundle,
    build_model,
    prepare_bundle,
    save_bundle,
)

CAP_S = 120.0
QUICK_CAP_S = 10.0
REPEATS = 3
EPOCH_REPEATS = 5
KILL_MARGIN_S = 60.0  # the worker's watchdog enforces the cap; this only catches hangs
QUICK_CONFIGS = [  # one per structure, both subsets
    Config("all", "kron", "ggn"),
    Config("last_layer", "diag", "ggn"),
    Config("last_layer", "full", "ggn"),
]
DISTRIBUTIONS = (
    "laplacefim",
    "laplace-torch",
    "curvlinops-for-pytorch",
    "backpack-for-pytorch",
    "asdfghjkl",
    "torch",
    "numpy",
    "scikit-learn",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2", help="comma list of W1,W2")
    parser.add_argument("--libs", default=",".join(LIBS), help="comma list of " + ",".join(LIBS))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 GGN configs, laplace-torch default backend, 1 timed fit",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--cap",
        type=float,
        help=f"seconds per (library, config); {CAP_S:.0f}, or {QUICK_CAP_S:.0f} with --quick",
    )
    args = parser.parse_args(argv)
    if args.cap is None:
        args.cap = QUICK_CAP_S if args.quick else CAP_S
    args.workloads = _split(args.workloads, WORKLOADS, "workload")
    args.libs = _split(args.libs, LIBS, "library")
    return args


def _split(value: str, allowed: Any, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise SystemExit(
            f"unknown {what}(s): {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    return items


def configs(quick: bool) -> list[Config]:
    """All benchmarked configurations (all-weights ``full`` is skipped: too big)."""
    if quick:
        return list(QUICK_CONFIGS)
    return [
        Config(s, st, c)
        for s, st, c in itertools.product(SUBSETS, STRUCTURES, CURVATURES)
        if not (s == "all" and st == "full")
    ]


def build_jobs(args: argparse.Namespace, bundles: dict[str, Path]) -> list[Job]:
    repeats = 1 if args.quick else REPEATS
    jobs: list[Job] = []
    for workload in args.workloads:
        common = {"workload": workload, "bundle": str(bundles[workload]), "cap_s": args.cap}
        jobs.append(
            Job(
                lib="epoch",
                variant="forward+backward",
                subset=None,
                structure=None,
                curvature=None,
                repeats=EPOCH_REPEATS,
                **common,
            )
        )
        for cfg in configs(args.quick):
            for lib in args.libs:
                for variant in variants(lib, cfg, quick=args.quick):
                    jobs.append(
                        Job(lib=lib, variant=variant, repeats=repeats, **asdict(cfg), **common)
                    )
    return jobs


def run_one(ctx: Any, job: Job) -> dict[str, Any]:
    """Run ``job`` in a fresh process from the fork server; kill it if it hangs."""
    from _worker import run_job

    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_job, args=(asdict(job), sender))
    proc.start()
    sender.close()
    result: dict[str, Any] | None = None
    hung = False
    try:
        if receiver.poll(2 * job.cap_s + KILL_MARGIN_S):
            try:
                result = receiver.recv()
            except EOFError:  # the process died without reporting
                result = None
        else:
            hung = True
    finally:
        if result is None and proc.is_alive():
            proc.kill()
        proc.join()
    if result is not None:
        return result
    failure: dict[str, Any] = {"job": asdict(job), "seconds": None, "times": []}
    if hung:
        return {
            **failure,
            "status": "timeout",
            "detail": f"killed after {2 * job.cap_s + KILL_MARGIN_S:.0f} s",
        }
    return {**failure, "status": "error", "detail": f"process died, exit code {proc.exitcode}"}


def run_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    # The fork server ignores the parent's sys.path (Python 3.11), so it finds the
    # preload module through PYTHONPATH, whatever the working directory.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["_preload"])
    results = []
    for i, job in enumerate(jobs, 1):
        start = time.perf_counter()
        result = run_one(ctx, job)
        results.append(result)
        secs = result.get("seconds")
        shown = f"{secs:.3f} s" if secs is not None else result["status"]
        print(
            f"[{i}/{len(jobs)}] {job.workload} {job.subset or '-'} {job.structure or '-'} "
            f"{job.curvature or '-'} {job.lib}:{job.variant} -> {shown} "
            f"({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return results


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f}" if seconds < 100 else f"{seconds:.1f}"


def _fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _cell_time(r: dict[str, Any]) -> str:
    return _fmt_s(r["seconds"]) if r["status"] == "ok" else r["status"]


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.2f}" if num / den < 100 else f"{num / den:.0f}"


def _delta(r: dict[str, Any]) -> float | None:
    base, peak = r.get("rss_base_mb"), r.get("rss_peak_mb")
    return None if base is None or peak is None else peak - base


HEADER = (
    f"{'subset':<11}{'struct':<7}{'curvature':<17}{'library':<11}{'variant':<31}"
    f"{'time[s]':>9}{'peer/ours':>10}{'/epoch':>8}{'dRSS[MB]':>9}{'peak[MB]':>9}  note"
)


def _row(r: dict[str, Any], first: bool, ours_s: float | None, epoch_s: float | None) -> str:
    job = r["job"]
    cfg = f"{job['subset']:<11}{job['structure']:<7}{job['curvature']:<17}" if first else " " * 35
    ratio = "" if job["lib"] == "ours" else _ratio(r["seconds"], ours_s)
    note = r.get("detail", "").splitlines()[0][:90] if r.get("detail") else ""
    return (
        f"{cfg}{job['lib']:<11}{job['variant'][:30]:<31}{_cell_time(r):>9}{ratio:>10}"
        f"{_ratio(r['seconds'], epoch_s):>8}{_fmt_mb(_delta(r)):>9}"
        f"{_fmt_mb(r.get('rss_peak_mb')):>9}  {note}"
    ).rstrip()


def _config_key(job: dict[str, Any]) -> tuple[str, str, str]:
    return (job["subset"], job["structure"], job["curvature"])


def format_workload(workload: str, bundle: Bundle, results: list[dict[str, Any]]) -> str:
    """The table of one workload."""
    mine = [r for r in results if r["job"]["workload"] == workload]
    epoch = next((r for r in mine if r["job"]["lib"] == "epoch"), None)
    epoch_s = epoch["seconds"] if epoch else None
    n_params = sum(p.numel() for p in build_model(workload).parameters())
    n_head = sum(p.numel() for p in build_model(workload)[-1].parameters())
    lines = [
        f"== {workload}: {WORKLOADS[workload]}",
        f"   {len(bundle.y):,} rows, batch {BATCH_SIZE}, {n_params:,} parameters "
        f"({n_head:,} in the last layer); train acc {bundle.train_accuracy:.3f}, "
        f"held-out acc {bundle.test_accuracy:.3f}",
    ]
    if epoch:
        lines.append(
            f"   epoch (forward + CE sum + backward over all batches): "
            f"{_cell_time(epoch)} s (median of {len(epoch['times'])}), "
            f"dRSS {_fmt_mb(_delta(epoch))} MB, peak {_fmt_mb(epoch.get('rss_peak_mb'))} MB"
        )
    lines += ["", HEADER, "-" * len(HEADER)]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in mine:
        if r["job"]["lib"] != "epoch":
            groups.setdefault(_config_key(r["job"]), []).append(r)
    for rows in groups.values():
        ours = next((r for r in rows if r["job"]["lib"] == "ours"), None)
        ours_s = ours["seconds"] if ours else None
        lines += [_row(r, i == 0, ours_s, epoch_s) for i, r in enumerate(rows)]
        lines.append("")
    return "\n".join(lines)


def _fmt_load(load: tuple[float, ...]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def metadata(args: argparse.Namespace) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "python": platform.python_version(),
        "versions": versions,
        "cpu": cpu,
        "torch_threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": os.getloadavg(),
        "cap_s": args.cap,
        "repeats": 1 if args.quick else REPEATS,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # On SIGTERM, unwind like on Ctrl-C so the running job process is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    meta = metadata(args)
    print(
        f"# laplacefim fit benchmark  {meta['date']}  cpu: {meta['cpu']}  torch threads: "
        f"{THREADS}  OMP_WAIT_POLICY={meta['omp_wait_policy']}"
    )
    print("# " + "  ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    with tempfile.TemporaryDirectory(prefix="laplacefim-bench-") as tmp:
        bundles: dict[str, Bundle] = {}
        paths: dict[str, Path] = {}
        for workload in args.workloads:
            bundles[workload] = prepare_bundle(workload)
            paths[workload] = Path(tmp) / f"{workload}.pt"
            save_bundle(bundles[workload], paths[workload])
        results = run_jobs(build_jobs(args, paths))
    for workload in args.workloads:
        print()
        print(format_workload(workload, bundles[workload], results))
    total = time.perf_counter() - started
    meta["loadavg_end"] = os.getloadavg()
    print(
        f"# total wall time {total:.0f} s; load average (1/5/15 min) at start "
        f"{_fmt_load(meta['loadavg_start'])}, at end {_fmt_load(meta['loadavg_end'])}"
    )
    if args.json:
        payload = {"meta": meta, "total_s": total, "results": results}
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
