"""How the fit's time and memory grow with the data, the width and the number of ranks.

Three sweeps, all GGN (exact), all weights, synthetic data (Gaussian inputs, labels the
model's own argmax), seeded random weights, batch 256:

1. **data**: N = 1,000, 10,000, 100,000 rows; MLP 64-256-256-10 (85,002 parameters);
   structures ``kron`` (KFAC) and ``diag``; laplacefim beside laplace-torch 0.3
   (``Laplace(model, "classification", subset_of_weights="all", hessian_structure=...)``,
   default backend). The time should grow linearly in N: the ``us/row`` column should
   stay flat.
2. **width**: MLP 64-h-h-10 for h = 128, 256, 512, 1024 at N = 10,000. Both the KFAC
   factors (Σ g gᵀ over N·C backpropagated columns, Σ a aᵀ over N rows) and the exact
   diagonal (Σ (g²)ᵀ(a²)) cost O(N·h²) for the h×h layer, so ``ns/(row*h^2)`` should
   level off as h grows (at small h the per-batch overheads and the 64-wide input layer
   still show).
3. **ranks**: a 2-rank gloo fit (``torch.multiprocessing`` spawn, ``file://`` init method,
   one torch thread per rank, each rank half the rows, ``la.fit(loader)`` all-reduces the
   statistics) against the 1-rank fit of the same rows (with 2 threads: the same two
   cores, and with 1 thread), with the speed-up and a check that both give the same
   curvature.

Every (library, configuration) of sweeps 1 and 2, and each 1-rank baseline, runs in its own
process forked from a fork server that imported the libraries (see ``memory.py``, whose
helpers this script shares). In it: a fit on the first batch (cold), a timed fit on that
batch again (warm) whose time × the number of batches projects the full fit; beyond the
cap (60 s) the row says ``skipped`` with the projection (and its dRSS is the probe's; a
cold first batch over 2 s that projects past 5 × the cap skips the warm one). Otherwise
the timed full fit (the median of 3 when one takes under 2 s). A process still running at
1.5 × the cap + 30 s is killed (``timeout``). ``dRSS`` is the process's peak RSS
(``getrusage``) minus its RSS once model and data were built; each process runs under an
address-space budget (``--budget-mb``), so a fit that needs more memory fails as ``OOM``.

It ends with the targets of the sweeps it ran, one ``target: ... met`` line each (see
``_targets.py``; the limits are this script's constants): ours' fit time grows at most
linearly in N (every step's exponent <= ``MAX_N_EXPONENT``) and as h^2 in the width
(<= ``MAX_WIDTH_EXPONENT``), per structure; the 2-rank curvature equals the 1-rank one
(``SAME_CURVATURE_TOL``, same ``n_data``); 2 ranks x 1 thread beat 1 rank x 1 thread.

Usage (from the repository root, in the benchmark environment)::

    nice -n 19 .venv-bench/bin/python benchmarks/scale.py --json /tmp/scale.json
    nice -n 19 .venv-bench/bin/python benchmarks/scale.py --sweeps ranks   # one sweep
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import itertools
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _targets import target_line
from memory import (  # also sets OMP_WAIT_POLICY and sys.path before torch loads
    LIB_NAMES,
    Meter,
    fmt_load,
    fnum,
    fork_server,
    header,
    maxrss_mb,
    rss_mb,
    run_job,
    table,
)

D_IN = 64
CLASSES = 10
BATCH = 256
SEED = 0
# Targets (printed at the end): ours' fit time grows at most linearly in N and as h^2 in
# the width (every step's exponent, with a little slack for noise); the 2-rank fit gives
# the 1-rank curvature and is faster than one rank with one thread.
MAX_N_EXPONENT = 1.1
MAX_WIDTH_EXPONENT = 2.2
SAME_CURVATURE_TOL = 1e-4  # largest relative difference, 2 ranks vs 1 (float32 sums)
MIN_RANK_SPEEDUP = 1.0


# ---------------------------------------------------------------- workload


def build_model(width: int) -> Any:
    """MLP 64-width-width-10 with ReLU, seeded."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(D_IN, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, CLASSES),
    ).eval()


def make_data(model: Any, n: int) -> tuple[Any, Any]:
    """``n`` Gaussian rows (seeded, the same for every library) labelled by the model."""
    import torch

    X = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        y = torch.cat([model(part).argmax(-1) for part in X.split(8192)])
    return X, y


def loader_of(X: Any, y: Any, batch: int = BATCH) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(X, y), batch_size=batch, shuffle=False)


def make_laplace(lib: str, model: Any, structure: str) -> Any:
    if lib == "ours":
        from laplacefim import Laplace

        return Laplace(model, "classification", subset="all", structure=structure)
    from laplace import Laplace as TheirLaplace

    return TheirLaplace(
        model, "classification", subset_of_weights="all", hessian_structure=structure
    )


def n_params(width: int) -> int:
    return D_IN * width + width + width * width + width + width * CLASSES + CLASSES


# ---------------------------------------------------------------- job processes


def job_fit(
    lib: str,
    structure: str,
    width: int,
    n: int,
    cap_s: float,
    budget_mb: float,
    state_path: str | None = None,
) -> dict[str, Any]:
    """Warm up, probe, and (unless the probe projects past ``cap_s``) time the full fit."""
    model = build_model(width)
    X, y = make_data(model, n)
    loader = loader_of(X, y)
    n_batches = len(loader)
    one = loader_of(X[:BATCH], y[:BATCH])
    meter = Meter(budget_mb)
    la = None
    with meter.measure() as result:
        start = time.perf_counter()
        make_laplace(lib, model, structure).fit(one)
        cold_s = time.perf_counter() - start
        projected = cold_s * n_batches
        # A cold first batch includes one-off set-up; only a slow one decides alone.
        if not (cold_s > 2.0 and projected > 5 * cap_s):
            start = time.perf_counter()
            make_laplace(lib, model, structure).fit(one)
            warm_s = time.perf_counter() - start
            projected = warm_s * n_batches
            result["warm_s"] = warm_s
        result.update(cold_s=cold_s, projected_s=projected)
        gc.collect()
        if projected > cap_s:
            result.update(
                status="skipped",
                detail=f"projected {projected:.0f} s > {cap_s:.0f} s; dRSS of the probe",
            )
        else:
            times: list[float] = []
            while True:
                la = None
                gc.collect()
                la = make_laplace(lib, model, structure)
                start = time.perf_counter()
                la.fit(loader)
                times.append(time.perf_counter() - start)
                if len(times) >= 3 or times[0] >= 2.0:
                    break
            result.update(fit_s=statistics.median(times), times=times)
    if meter.result["status"] == "ok" and state_path is not None and la is not None:
        _save_curvature(la, state_path)
    meter.result["n_batches"] = n_batches
    return meter.result


def _save_curvature(la: Any, path: str) -> None:
    import torch

    torch.save({"state": [t.clone() for t in la.curvature.state()], "n_data": la.n_data}, path)


def rank_main(rank: int, world: int, init_file: str, n: int, width: int, out_dir: str) -> None:
    """One rank of the data-parallel fit: its half of the rows, ``la.fit`` all-reduces."""
    import sympy  # noqa: F401  (as in the fork server: torch imports it lazily, ~45 MB)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        model = build_model(width)
        X, y = make_data(model, n)
        shard = slice(rank * n // world, (rank + 1) * n // world)  # contiguous, equal halves
        loader = loader_of(X[shard], y[shard])
        gc.collect()
        base = rss_mb()
        make_laplace("ours", model, "kron").fit(loader_of(X[:BATCH], y[:BATCH]), reduce=False)
        dist.barrier()
        start = time.perf_counter()
        la = make_laplace("ours", model, "kron").fit(loader)  # all-reduces inside
        seconds = time.perf_counter() - start
        dist.barrier()
        wall = time.perf_counter() - start  # until every rank has its posterior
        result = {
            "rank": rank,
            "fit_s": seconds,
            "wall_s": wall,
            "n_local": len(loader.dataset),
            "n_data": la.n_data,
            "drss_mb": maxrss_mb() - base,
        }
        if rank == 0:
            _save_curvature(la, str(Path(out_dir) / "rank0.pt"))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(n: int, width: int, world: int, cap_s: float, tmp: str) -> dict[str, Any]:
    """Spawn ``world`` gloo ranks; kill them past ``cap_s``."""
    import torch.multiprocessing as tmp_mp

    out_dir = tempfile.mkdtemp(dir=tmp)
    init_file = str(Path(out_dir) / "init")
    start = time.perf_counter()
    context = tmp_mp.start_processes(
        rank_main,
        args=(world, init_file, n, width, out_dir),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    status, detail = "ok", ""
    try:
        while not context.join(timeout=1.0):
            if time.perf_counter() - start > cap_s:
                status, detail = "timeout", f"killed after {cap_s:.0f} s"
                for proc in context.processes:
                    if proc.is_alive():
                        proc.kill()
                break
    except Exception as exc:  # a rank raised: reported
        status, detail = "error", str(exc).strip().splitlines()[-1][:200]
    ranks = []
    for r in range(world):
        path = Path(out_dir, f"rank{r}.json")
        if path.exists():
            ranks.append(json.loads(path.read_text()))
    if status == "ok" and len(ranks) != world:
        status, detail = "error", f"only {len(ranks)} of {world} ranks reported"
    return {
        "status": status,
        "detail": detail,
        "ranks": ranks,
        "fit_s": max((r["wall_s"] for r in ranks), default=None),
        "drss_mb": max((r["drss_mb"] for r in ranks), default=None),
        "state_path": str(Path(out_dir) / "rank0.pt"),
        "spawn_wall_s": time.perf_counter() - start,
    }


def compare_states(a_path: str, b_path: str) -> tuple[float, int, int]:
    """Largest relative difference of two saved curvatures, and their data counts."""
    import torch

    a, b = torch.load(a_path), torch.load(b_path)
    worst = 0.0
    for x, z in zip(a["state"], b["state"], strict=True):
        scale = float(z.abs().max()) or 1.0
        worst = max(worst, float((x - z).abs().max()) / scale)
    return worst, a["n_data"], b["n_data"]


# ---------------------------------------------------------------- orchestration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", default="data,width,ranks")
    p.add_argument("--ns", default="1000,10000,100000", help="rows for the data sweep")
    p.add_argument("--widths", default="128,256,512,1024", help="hidden widths")
    p.add_argument("--width", type=int, default=256, help="hidden width of the data sweep")
    p.add_argument("--width-n", type=int, default=10_000, help="rows for the width sweep")
    p.add_argument("--structures", default="kron,diag")
    p.add_argument("--libs", default="ours,laplace")
    p.add_argument("--rank-n", type=int, default=100_000, help="rows for the ranks sweep")
    p.add_argument("--cap", type=float, default=60.0, help="per fit [s]; projected beyond: skip")
    p.add_argument("--budget-mb", type=float, default=8 * 1024)
    p.add_argument("--rss-guard-mb", type=float, default=11 * 1024)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    libs = [lib for lib in args.libs.split(",") if lib]
    if "laplace" in libs and importlib.util.find_spec("laplace") is None:
        print("# laplace-torch is not installed here: its rows are skipped", file=sys.stderr)
        libs.remove("laplace")
    sweeps = [s for s in args.sweeps.split(",") if s]
    structures = [s for s in args.structures.split(",") if s]
    started = time.perf_counter()
    meta = header(
        "laplacefim scaling benchmark: fit time and memory vs data, width and ranks",
        "# GGN, all weights, MLP 64-h-h-10 (ReLU), synthetic rows, batch 256; each row a fresh "
        "process; time = median of 3 full fits (1 if it takes >= 2 s) after a warm-up;\n"
        f"# laplace-torch / ours skipped where a probe projects > {args.cap:.0f} s; dRSS = "
        f"peak RSS (getrusage) - RSS after model and data; address-space budget "
        f"{args.budget_mb:,.0f} MB",
    )
    ctx = fork_server(
        ["torch", "laplacefim", *(["laplace"] if "laplace" in libs else []), "memory", "scale"]
    )
    records: list[dict[str, Any]] = []

    def fit(sweep: str, lib: str, structure: str, width: int, n: int, **extra: Any) -> dict:
        print(f"[scale] {sweep} {lib} {structure} h={width} N={n:,} ...", file=sys.stderr)
        kwargs = dict(
            lib=lib,
            structure=structure,
            width=width,
            n=n,
            cap_s=args.cap,
            budget_mb=args.budget_mb,
            **extra,
        )
        res = run_job(
            ctx,
            "scale",
            "job_fit",
            kwargs,
            cap_s=1.5 * args.cap + 30,
            rss_guard_mb=args.rss_guard_mb,
        )
        res.update(sweep=sweep, lib=lib, structure=structure, width=width, n=n)
        res["params"] = n_params(width)
        records.append(res)
        print(
            f"[scale]   -> {res['status']} {fnum(res.get('fit_s'), '.2f')} s "
            f"{res.get('detail', '')}",
            file=sys.stderr,
        )
        return res

    if "data" in sweeps:
        for n in [int(v) for v in args.ns.split(",") if v]:
            for structure in structures:
                for lib in libs:
                    fit("data", lib, structure, args.width, n)
    if "width" in sweeps:
        for width in [int(v) for v in args.widths.split(",") if v]:
            for structure in structures:
                for lib in libs:
                    fit("width", lib, structure, width, args.width_n)
    dist_result: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="laplacefim-scale-") as tmp:
        if "ranks" in sweeps:
            single_path = str(Path(tmp) / "single.pt")
            one2 = fit("ranks", "ours", "kron", args.width, args.rank_n, state_path=single_path)
            one2["what"] = "1 rank, 2 threads"
            one1 = fit("ranks", "ours", "kron", args.width, args.rank_n, threads=1)
            one1["what"] = "1 rank, 1 thread"
            print(f"[scale] ranks: 2 gloo ranks x 1 thread, N={args.rank_n:,} ...", file=sys.stderr)
            dist_result = run_ranks(args.rank_n, args.width, 2, 4 * args.cap + 60, tmp)
            if dist_result["status"] == "ok" and one2["status"] == "ok":
                with contextlib.suppress(Exception):
                    diff, n_a, n_b = compare_states(dist_result["state_path"], single_path)
                    dist_result.update(max_rel_diff=diff, n_data=n_a, n_data_single=n_b)
            records.append(
                dict(
                    dist_result,
                    sweep="ranks",
                    lib="ours",
                    structure="kron",
                    width=args.width,
                    n=args.rank_n,
                    params=n_params(args.width),
                    what="2 gloo ranks x 1 thread",
                )
            )
            print(
                f"[scale]   -> {dist_result['status']} {fnum(dist_result.get('fit_s'), '.2f')} s "
                f"{dist_result.get('detail', '')}",
                file=sys.stderr,
            )
    meta["loadavg_end"] = list(os.getloadavg())
    total = time.perf_counter() - started
    print(report(records, args))
    print(
        f"# total wall time {total:.0f} s; load average at start "
        f"{fmt_load(meta['loadavg_start'])}, at end {fmt_load(meta['loadavg_end'])}"
    )
    if args.json:
        payload = {
            "meta": meta,
            "args": vars(args) | {"json": str(args.json)},
            "total_s": total,
            "results": [{k: v for k, v in r.items() if k != "traceback"} for r in records],
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"# wrote {args.json}")
    return 0


def _row(r: dict[str, Any]) -> list[str]:
    t = r.get("fit_s") if r["status"] == "ok" else None
    per_row = None if t is None else t / r["n"] * 1e6
    per_w2 = None if t is None else t / (r["n"] * r["width"] ** 2) * 1e9
    note = r.get("what", "")
    if r.get("detail"):
        note = f"{note}; {r['detail']}".strip("; ")
    return [
        f"{r['n']:,}",
        str(r["width"]),
        f"{r['params']:,}",
        r["structure"],
        LIB_NAMES[r["lib"]],
        r["status"],
        fnum(t, ".3f"),
        fnum(per_row, ".1f"),
        fnum(per_w2, ".3f"),
        fnum(r.get("drss_mb")),
        note,
    ]


HEADS = [
    "N",
    "width",
    "params",
    "struct",
    "library",
    "status",
    "time[s]",
    "us/row",
    "ns/(row*h^2)",
    "dRSS[MB]",
    "note",
]


def _growth(records: list[dict[str, Any]], key: str) -> list[str]:
    """Time ratio between consecutive sizes, per (library, structure)."""
    lines = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["lib"], r["structure"]), []).append(r)
    for (lib, structure), rows in groups.items():
        rows = sorted(rows, key=lambda r: r[key])
        steps = []
        for a, b in itertools.pairwise(rows):
            if a["status"] == b["status"] == "ok":
                steps.append(
                    f"{a[key]:,}->{b[key]:,}: x{b['fit_s'] / a['fit_s']:.1f} "
                    f"(size x{b[key] / a[key]:.0f})"
                )
        if steps:
            lines.append(f"  {LIB_NAMES[lib]:<14}{structure:<6}" + ", ".join(steps))
    return lines


def report(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out: list[str] = []
    data = [r for r in records if r["sweep"] == "data"]
    if data:
        out += ["", f"## time and memory vs N (MLP 64-{args.width}-{args.width}-10)", ""]
        out.append(table([_row(r) for r in data], HEADS))
        out += ["", "time growth per step in N (linear: the same factor as N):"]
        out += _growth(data, "n")
    width = [r for r in records if r["sweep"] == "width"]
    if width:
        out += ["", f"## time and memory vs width (N = {args.width_n:,})", ""]
        out.append(table([_row(r) for r in width], HEADS))
        out += ["", "time growth per step in width (O(N h^2): x4 per doubling once h dominates):"]
        out += _growth(width, "width")
    ranks = [r for r in records if r["sweep"] == "ranks"]
    if ranks:
        out += ["", f"## data-parallel fit (KFAC GGN, MLP 64-{args.width}-{args.width}-10)", ""]
        out.append(table([_row(r) for r in ranks], HEADS))
        by = {r.get("what"): r for r in ranks}
        two = by.get("2 gloo ranks x 1 thread")
        out.append("")
        if two is not None and two["status"] == "ok":
            for label in ("1 rank, 2 threads", "1 rank, 1 thread"):
                one = by.get(label)
                if one is not None and one["status"] == "ok":
                    out.append(
                        f"speed-up of 2 ranks x 1 thread over {label}: "
                        f"{one['fit_s'] / two['fit_s']:.2f}x"
                    )
            per_rank = ", ".join(
                f"rank {r['rank']}: fit {r['fit_s']:.2f} s on {r['n_local']:,} rows, "
                f"dRSS {r['drss_mb']:,.0f} MB"
                for r in two["ranks"]
            )
            out.append(f"  {per_rank}; time = until every rank holds the posterior")
            if "max_rel_diff" in two:
                out.append(
                    f"  2-rank curvature vs 1-rank: max relative difference "
                    f"{two['max_rel_diff']:.1e}; n_data {two['n_data']:,} vs "
                    f"{two['n_data_single']:,}"
                )
    out += ["", *targets(records, args)]
    return "\n".join(out)


def _status(record: dict[str, Any] | None) -> str:
    return "not run" if record is None else record["status"]


def _growth_target(
    records: list[dict[str, Any]], key: str, structure: str, max_exponent: float, label: str
) -> str:
    """Ours' worst time-growth exponent over consecutive sizes of ``key`` (N or width)."""
    rows = sorted(
        (r for r in records if r["lib"] == "ours" and r["structure"] == structure),
        key=lambda r: r[key],
    )
    what = f"ours {structure} fit time growth in {label}, worst step's exponent"
    limit = f"<= {max_exponent:g}"
    steps = [(a, b) for a, b in itertools.pairwise(rows) if a["status"] == b["status"] == "ok"]
    untimed = [f"{label} {r[key]:,} {r['status']}" for r in rows if r["status"] != "ok"]
    if not steps:
        why = "; ".join(["fewer than two consecutive sizes timed", *untimed])
        return target_line(what, None, limit, None, why)
    exponent, a, b = max(
        (math.log(b["fit_s"] / a["fit_s"]) / math.log(b[key] / a[key]), a, b) for a, b in steps
    )
    measured = f"{exponent:.2f} ({label} {a[key]:,}->{b[key]:,})"
    if untimed:
        measured += f"; not timed: {', '.join(untimed)}"
    return target_line(what, measured, limit, exponent <= max_exponent)


def targets(records: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The targets of the sweeps this run made, one line each."""
    lines = []
    structures = [s for s in args.structures.split(",") if s]
    sweeps = {r["sweep"] for r in records}
    for sweep, key, max_exponent, label in (
        ("data", "n", MAX_N_EXPONENT, "N"),
        ("width", "width", MAX_WIDTH_EXPONENT, "width"),
    ):
        if sweep in sweeps:
            rows = [r for r in records if r["sweep"] == sweep]
            lines += [_growth_target(rows, key, st, max_exponent, label) for st in structures]
    ranks = {r.get("what"): r for r in records if r["sweep"] == "ranks"}
    if not ranks:
        return lines
    two = ranks.get("2 gloo ranks x 1 thread")
    one1, one2 = ranks.get("1 rank, 1 thread"), ranks.get("1 rank, 2 threads")
    what = "2-rank curvature vs 1-rank, max relative difference"
    limit = f"<= {SAME_CURVATURE_TOL:.0e} and the same n_data"
    if two is None or "max_rel_diff" not in two:
        why = f"2 ranks {_status(two)}, 1 rank x 2 threads {_status(one2)}"
        lines.append(target_line(what, None, limit, None, why))
    else:
        same_n = two["n_data"] == two["n_data_single"]
        measured = (
            f"{two['max_rel_diff']:.1e}, n_data {two['n_data']:,} vs {two['n_data_single']:,}"
        )
        met = two["max_rel_diff"] <= SAME_CURVATURE_TOL and same_n
        lines.append(target_line(what, measured, limit, met))
    what = "speed-up of 2 ranks x 1 thread over 1 rank x 1 thread"
    limit = f"> {MIN_RANK_SPEEDUP:g}x"
    if two is None or one1 is None or two["status"] != "ok" or one1["status"] != "ok":
        why = f"2 ranks {_status(two)}, 1 rank x 1 thread {_status(one1)}"
        lines.append(target_line(what, None, limit, None, why))
    else:
        speedup = one1["fit_s"] / two["fit_s"]
        measured = f"{speedup:.2f}x ({one1['fit_s']:.2f} s vs {two['fit_s']:.2f} s)"
        lines.append(target_line(what, measured, limit, speedup > MIN_RANK_SPEEDUP))
    return lines


if __name__ == "__main__":
    sys.exit(main())
