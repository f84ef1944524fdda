"""Side-by-side fit-time benchmark: laplacefim.Laplace against its peers.

Compares, on the same trained models and the same 5,600-row loader, the time
and memory to *fit* curvature (accumulate it over the data; no decomposition)
of ``laplacefim.Laplace`` against laplace-torch 0.3 (with each of its backends),
curvlinops 3.0.1, BackPACK and ASDL, for every (subset, structure, curvature)
configuration a library supports. Workloads (see ``_workloads.py``):

* W1: MLP 64-256-256-10 (ReLU) on scikit-learn's digits;
* W2: small CNN (conv16, conv32, linear) on digits as 1x8x8 images;
* W3 (only when asked for, ``--workloads W3``): ResNet-18 on digits as tinted 3x32x32
  images, 256 rows in batches of 64.

Every (library, configuration) runs in its own process, forked from a fork
server that has already imported the libraries, so peak resident memory
(``ru_maxrss``) is per configuration. What exactly is timed for each library is
described in ``_runners.py``; the timing policy (probe, warm-up, median of
repeats, time cap) in ``_worker.py``.

At the end it prints issue 14's targets, one ``target: <what> <measured> vs <limit>:
met`` line each (``not met``, or ``not measured (<why>)`` for what this run left out),
from this run's numbers: faster than every peer on every shared configuration, and
with no more extra memory than the lowest peer's, per workload; last-layer diagonal and
KFAC fits within ``LAST_LAYER_MAX_EPOCHS`` epochs; last-layer KFAC at least
``LAST_LAYER_KFAC_MIN_SPEEDUP`` times faster than laplace-torch's default on W1 and W2;
and, on a workload W3 where it exists, the all-weights KFAC and diagonal fits within
``W3_FISHER_MAX_EPOCHS`` epochs (MC Fisher) and ``W3_GGN_MAX_EPOCHS_PER_CLASS`` C
epochs (exact GGN, C classes). A fit projected past the cap counts with its projection.

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
import re
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
from _targets import report
from _worker import THREADS, Job
from _workloads import (
    WORKLOADS,
    Bundle,
    batch_size,
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
# Issue 14's targets (see print_targets).
LAST_LAYER_MAX_EPOCHS = 0.6  # last-layer diag and KFAC, every curvature
LAPLACE_DEFAULT = "CurvlinopsGGN [default]"  # laplace-torch's default backend (GGN)
LAST_LAYER_KFAC_MIN_SPEEDUP = 10.0  # over laplace-torch's default, on W1 and W2
W3_FISHER_MAX_EPOCHS = 2.0  # all-weights MC-Fisher KFAC and diagonal
W3_GGN_MAX_EPOCHS_PER_CLASS = 0.7  # all-weights exact-GGN KFAC and diagonal: 0.7 C epochs
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
    parser.add_argument("--workloads", default="W1,W2", help="comma list of W1,W2,W3")
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
        f"   {len(bundle.y):,} rows, batch {batch_size(workload)}, {n_params:,} parameters "
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


# ---------------------------------------------------------------- targets

_PROJECTED = re.compile(r"projected (\d+(?:\.\d+)?) s")
Timed = tuple[float, str]  # seconds, and "" (measured), "~" (projected) or ">" (lower bound)


def _seconds(r: dict[str, Any] | None) -> Timed | None:
    """A row's fit time: measured, projected past the cap, or at least the cap if stopped.

    A fit whose first batches project past the cap is not run; the worker reports the
    projection (``timeout``, "projected N s from the first batches"), which stands in
    for its time. A probe or fit stopped by the watchdog, or a killed process, ran at
    least the cap: that is a lower bound. Errors and unsupported rows have no time.
    """
    if r is None:
        return None
    if r["status"] == "ok" and r["seconds"] is not None:
        return r["seconds"], ""
    if r["status"] != "timeout":
        return None
    found = _PROJECTED.search(r.get("detail", ""))
    if found:
        return float(found.group(1)), "~"
    return float(r["job"]["cap_s"]), ">"


def _fmt_t(t: Timed) -> str:
    return f"{t[1]}{_fmt_s(t[0])} s"


def _fmt_x(x: float) -> str:
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def _who(r: dict[str, Any]) -> str:
    return f"{r['job']['lib']}:{r['job']['variant']}"


def _groups(
    results: list[dict[str, Any]], workload: str
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r["job"]["workload"] == workload and r["job"]["lib"] != "epoch":
            groups.setdefault(_config_key(r["job"]), []).append(r)
    return groups


def _ours(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["job"]["lib"] == "ours"), None)


def _target_faster(workload: str, groups: dict, absent: str | None) -> None:
    """Faster than every peer on every configuration both measured."""
    what, limit = f"{workload} fit faster than every peer on every shared row", "> 1x"
    worst: tuple[float, str] | None = None
    n_rows = n_slower = 0
    failed: list[str] = []  # configurations a peer fitted and we did not
    for key, rows in groups.items():
        ours = _ours(rows)
        mine = _seconds(ours)
        peers = [(r, _seconds(r)) for r in rows if r["job"]["lib"] != "ours"]
        timed = [(r, t) for r, t in peers if t is not None]
        if ours is not None and mine is None and timed:
            failed.append(f"{'/'.join(key)} ours {ours['status']}")
        if mine is None or not timed:
            continue
        n_rows += 1
        r, t = min(timed, key=lambda p: p[1][0])
        ratio = t[0] / mine[0]
        n_slower += ratio <= 1
        if worst is None or ratio < worst[0]:
            mark = "~" if mine[1] or t[1] else ""
            text = f"{mark}{_fmt_x(ratio)} ({'/'.join(key)}: {_who(r)} {_fmt_t(t)}, ours {_fmt_t(mine)})"
            worst = (ratio, text)
    _report_rows(
        what,
        "worst peer/ours",
        limit,
        None if worst is None else worst[1],
        (n_rows, n_slower, "not faster"),
        failed,
        absent or "no configuration with ours and a peer timed",
    )


def _target_memory(workload: str, groups: dict, absent: str | None) -> None:
    """Peak extra memory (dRSS) no higher than the lowest peer's, on each row."""
    what, limit = f"{workload} fit dRSS no higher than the lowest peer's on each row", "<= 0 MB"
    worst: tuple[float, str] | None = None
    n_rows = n_higher = 0
    failed: list[str] = []  # configurations a peer completed and we did not
    for key, rows in groups.items():
        ours = _ours(rows)
        mine = _delta(ours) if ours is not None and ours["status"] == "ok" else None
        # a peer that timed out or failed stopped early: its dRSS is not a full fit's
        peers = [
            (r, _delta(r))
            for r in rows
            if r["job"]["lib"] != "ours" and r["status"] == "ok" and _delta(r) is not None
        ]
        if ours is not None and mine is None and peers:
            failed.append(f"{'/'.join(key)} ours {ours['status']}")
        if mine is None or not peers:
            continue
        n_rows += 1
        r, low = min(peers, key=lambda p: p[1])
        excess = mine - low
        n_higher += excess > 0
        if worst is None or excess > worst[0]:
            text = f"{excess:+.1f} MB ({'/'.join(key)}: ours {mine:.1f} MB, {_who(r)} {low:.1f} MB)"
            worst = (excess, text)
    _report_rows(
        what,
        "worst ours - lowest peer",
        limit,
        None if worst is None else worst[1],
        (n_rows, n_higher, "higher"),
        failed,
        absent or "no configuration with ours and a completed peer",
    )


def _report_rows(
    what: str,
    worst_name: str,
    limit: str,
    worst: str | None,
    counts: tuple[int, int, str],
    failed: list[str],
    why_none: str,
) -> None:
    """One per-row target: the worst row's text, how many of the ``n_rows`` rows missed
    (``counts``: rows, misses, what a miss is), and the rows ours failed where a peer did
    not; not measured (``why_none``) when no row had both."""
    if worst is None:
        report(what, None, limit, None, "; ".join([why_none, *failed]))
        return
    n_rows, n_missed, missed = counts
    measured = worst + (f"; {n_missed} of {n_rows} rows {missed}" if n_missed else "")
    measured += "".join(f"; {f}" for f in failed)
    met = n_missed == 0 and not failed
    report(f"{what} ({n_rows} rows), {worst_name}", measured, limit, met)


def _target_epochs(
    what: str,
    rows: list[dict[str, Any] | None],
    epoch_s: float | None,
    max_epochs: float,
    limit: str,
    why: str,
) -> None:
    """The slowest of our ``rows`` in epochs, against ``max_epochs``."""
    present = [r for r in rows if r is not None]
    if not present or epoch_s is None:
        report(what, None, limit, None, why if not present else "epoch time not measured")
        return
    failed = [r for r in present if _seconds(r) is None]
    if failed:
        why = f"ours {failed[0]['status']} on {failed[0]['job']['curvature']}"
        report(what, None, limit, None, why)
        return
    timed = [(r, t) for r in present if (t := _seconds(r)) is not None]
    r, t = max(timed, key=lambda p: p[1][0])
    epochs = t[0] / epoch_s
    curvatures = "/".join(p["job"]["curvature"] for p in present)
    measured = f"{t[1]}{epochs:.2f} epochs ({r['job']['curvature']}: {_fmt_t(t)}; epoch {_fmt_s(epoch_s)} s)"
    report(f"{what} [{curvatures}], slowest", measured, limit, epochs <= max_epochs)


def _n_classes(workload: str, bundle: Bundle | None) -> int | None:
    """The number of classes: the last Linear layer's outputs, or the labels' range."""
    linear = [m for m in build_model(workload).modules() if isinstance(m, torch.nn.Linear)]
    if linear:
        return linear[-1].out_features
    return int(bundle.y.max()) + 1 if bundle is not None else None


def print_targets(
    args: argparse.Namespace, bundles: dict[str, Bundle], results: list[dict[str, Any]]
) -> None:
    """Issue 14's fit targets, one line each, from this run's results.

    ``~`` marks a time projected from the first batches (the fit would pass the cap),
    ``>`` a lower bound (stopped at the cap). Workloads not run, and configurations this
    run left out (``--quick``, ``--libs``), print ``not measured`` with the reason.
    """
    print(
        "\n# targets (issue 14): ~ = involves a time projected from the first batches past "
        "the cap (or, with >, stopped at the cap: a lower bound)"
    )
    for workload in WORKLOADS:
        absent = None if workload in args.workloads else f"{workload} not in --workloads"
        groups = _groups(results, workload)
        epoch = next(
            (r for r in results if r["job"]["workload"] == workload and r["job"]["lib"] == "epoch"),
            None,
        )
        epoch_s = epoch["seconds"] if epoch and epoch["status"] == "ok" else None
        _target_faster(workload, groups, absent)
        _target_memory(workload, groups, absent)
        skipped = absent or (
            "ours not in --libs"
            if "ours" not in args.libs
            else "not in --quick's configurations"
            if args.quick
            else "not run"
        )
        for structure, label in (("diag", "diagonal"), ("kron", "KFAC")):
            rows = [_ours(groups.get(("last_layer", structure, c), [])) for c in CURVATURES]
            _target_epochs(
                f"{workload} last-layer {label} fit",
                rows,
                epoch_s,
                LAST_LAYER_MAX_EPOCHS,
                f"<= {LAST_LAYER_MAX_EPOCHS:g} epochs",
                f"last_layer {structure}: {skipped}",
            )
        if workload in ("W1", "W2"):
            rows = groups.get(("last_layer", "kron", "ggn"), [])
            peer = next(
                (
                    r
                    for r in rows
                    if r["job"]["lib"] == "laplace" and r["job"]["variant"] == LAPLACE_DEFAULT
                ),
                None,
            )
            mine, theirs = _seconds(_ours(rows)), _seconds(peer)
            what = f"{workload} last-layer KFAC (GGN) fit, laplace-torch {LAPLACE_DEFAULT} / ours"
            limit = f">= {LAST_LAYER_KFAC_MIN_SPEEDUP:g}x"
            if mine is None or theirs is None:
                missing = "ours" if mine is None else "laplace-torch's default"
                why = absent or (skipped if not rows else f"{missing} not timed")
                report(what, None, limit, None, why)
            else:
                ratio = theirs[0] / mine[0]
                mark = "~" if mine[1] or theirs[1] else ""
                measured = f"{mark}{_fmt_x(ratio)} ({_fmt_t(theirs)} vs {_fmt_t(mine)})"
                report(what, measured, limit, ratio >= LAST_LAYER_KFAC_MIN_SPEEDUP)
        if workload == "W3":
            n_classes = _n_classes(workload, bundles.get(workload))
            for curvature, label in (("fisher", "MC-Fisher"), ("ggn", "exact-GGN")):
                if curvature == "fisher":
                    max_epochs = W3_FISHER_MAX_EPOCHS
                    limit = f"<= {max_epochs:g} epochs"
                elif n_classes is not None:
                    max_epochs = W3_GGN_MAX_EPOCHS_PER_CLASS * n_classes
                    limit = f"<= {W3_GGN_MAX_EPOCHS_PER_CLASS:g} C = {max_epochs:g} epochs (C = {n_classes})"
                else:
                    max_epochs, limit = float("nan"), f"<= {W3_GGN_MAX_EPOCHS_PER_CLASS:g} C epochs"
                for structure, name in (("kron", "KFAC"), ("diag", "diagonal")):
                    rows = [_ours(groups.get(("all", structure, curvature), []))]
                    _target_epochs(
                        f"W3 all-weights {label} {name} fit",
                        rows,
                        epoch_s,
                        max_epochs,
                        limit,
                        f"all {structure} {curvature}: {skipped}",
                    )


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
    print_targets(args, bundles, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
