"""Peak memory of an all-weights KFAC posterior on a 10.5M-parameter MLP, beside laplace-torch.

Model: MLP 1024-2048-2048-2048-10 with ReLU (10,512,394 parameters), seeded random
weights; synthetic Gaussian inputs, labels the model's own argmax. For each library
(laplacefim, laplace-torch 0.3) and each curvature (exact GGN, Monte-Carlo Fisher with one
sample) it measures:

(a) ``fit`` on 2,048 rows (batch 256): ``Laplace(model, "classification",
    structure="kron", curvature=...).fit(loader)`` against laplace-torch's
    ``Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")``
    (default backend CurvlinopsGGN; ``backend_kwargs={"stochastic": True}`` for the MC
    Fisher) and its ``fit(loader)``;
(b) the GLM probit predictive on 10,000 inputs: ours ``la.predict(x, chunk_size=256)``,
    laplace-torch ``la(x, pred_type="glm", link_approx="probit")`` in its default
    batching (all inputs at once). Where that fails, smaller batches of inputs show
    where it breaks (``--ladder``).

Every measurement runs in its own fresh process, forked from a fork server that has
imported torch and the libraries but run nothing. The predict processes load the
posterior their library's fit process saved (``la.save`` / ``la.state_dict()``), so
their peak is the predictive's alone: building the posterior from the saved statistics
(the eigendecomposition) and predicting.

Memory: ``dRSS = peak − base``, where ``peak`` is the process's ``ru_maxrss``
(``resource.getrusage``) at the end and ``base`` its resident set size
(``/proc/self/statm``) once the model, the data (and the saved statistics) are in
memory. Each measured phase runs under an address-space limit of ``base`` virtual size
+ ``--budget-mb`` (10 GiB by default), so an allocation beyond it fails the way it would
on a machine with that much free memory, and is reported as ``OOM`` with the size torch
asked for; the parent also kills a process whose resident set passes ``--rss-guard-mb``.
A process that runs past its cap is killed and reported as ``timeout``.

It ends with the targets, one ``target: <what> <measured> vs <limit>: met`` line each
(see ``_targets.py``): per curvature, ours' fit dRSS at most ``FIT_MAX_RATIO`` of
laplace-torch's (a laplace-torch OOM counts as more than the budget); and ours predicting
all inputs where laplace-torch's default batching runs out of memory (``not measured``
where it does not, e.g. at smoke sizes).

Usage (from the repository root, in the benchmark environment)::

    nice -n 19 .venv-bench/bin/python benchmarks/memory.py --json /tmp/memory.json
    nice -n 19 .venv-bench/bin/python benchmarks/memory.py --width 256 --n-predict 500  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from _targets import target_line

# Passive OpenMP waiting: with active spin-waiting a 2-thread torch on this shared 2-core
# machine runs many times slower whenever another process is busy (an eigendecomposition
# of a 2048² factor: 23 s instead of 3 s). It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The repository root goes first: .venv-bench's editable install of laplacefim resolves it
# as an empty namespace package when imported from outside the repository root.
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

THREADS = 2
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20

# ---------------------------------------------------------------- memory helpers


def rss_mb() -> float:
    """Resident set size now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE / MB


def vm_bytes() -> int:
    """Virtual size now."""
    return int(Path("/proc/self/statm").read_text().split()[0]) * PAGE


def maxrss_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "not enough memory" in text)
    )


def oom_detail(exc: BaseException) -> str:
    text = str(exc)
    marker = "you tried to allocate "
    if marker in text:
        nbytes = int(text.split(marker, 1)[1].split(" ", 1)[0])
        return f"allocation of {nbytes / 2**30:,.1f} GiB refused"
    return text.splitlines()[0][:120] if text else type(exc).__name__


class Meter:
    """Measures one phase: ``dRSS = ru_maxrss(end) − RSS(start)``, under a memory budget."""

    def __init__(self, budget_mb: float | None) -> None:
        self.budget_mb = budget_mb
        self.result: dict[str, Any] = {}

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        gc.collect()
        base = rss_mb()
        self.result.update(rss_base_mb=base, maxrss_at_base_mb=maxrss_mb())
        if self.budget_mb is not None:
            limit = vm_bytes() + int(self.budget_mb * MB)
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        start = time.perf_counter()
        self.result["status"] = "ok"
        try:
            yield self.result
        except Exception as exc:  # reported
            if is_oom(exc):
                self.result.update(status="OOM", detail=oom_detail(exc))
            else:
                self.result.update(
                    status="error",
                    detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                    traceback=traceback.format_exc(limit=6),
                )
        finally:
            self.result["seconds"] = time.perf_counter() - start
            peak = maxrss_mb()
            self.result.update(rss_peak_mb=peak, drss_mb=peak - base)
            if self.budget_mb is not None:
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, hard))


# ---------------------------------------------------------------- job processes


def _child(conn: Any, module: str, func: str, kwargs: dict[str, Any]) -> None:
    """Entry point of a job process: run ``module.func(**kwargs)``, send back its dict."""
    import torch

    torch.set_num_threads(kwargs.pop("threads", THREADS))
    try:
        result = getattr(importlib.import_module(module), func)(**kwargs)
    except Exception as exc:  # reported
        result = {
            "status": "OOM" if is_oom(exc) else "error",
            "detail": oom_detail(exc) if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:200],
            "traceback": traceback.format_exc(limit=6),
        }
    conn.send(result)
    conn.close()


def _rss_of(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fork_server(preload: list[str]) -> Any:
    """A forkserver context whose server has imported ``preload`` (and nothing has run)."""
    # The fork server ignores the parent's sys.path (Python 3.11): PYTHONPATH carries the
    # benchmark folder and the repository root (see the sys.path note at the top).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), str(HERE), os.environ.get("PYTHONPATH")])
    )
    ctx = mp.get_context("forkserver")
    # torch imports sympy lazily, on the first torch.func/vmap call: ~45 MB charged to
    # whichever library calls it first in a process. Preloaded, no fit pays for it.
    ctx.set_forkserver_preload(["sympy", *preload])
    return ctx


def run_job(
    ctx: Any,
    module: str,
    func: str,
    kwargs: dict[str, Any],
    *,
    cap_s: float,
    rss_guard_mb: float,
) -> dict[str, Any]:
    """Run ``module.func(**kwargs)`` in a fresh process; kill it past ``cap_s`` or the guard."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, module, func, kwargs), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    max_seen = 0.0
    result: dict[str, Any] | None = None
    killed: str | None = None
    while True:
        if parent.poll(0.2):
            try:
                result = parent.recv()
            except EOFError:
                result = None
            break
        if not proc.is_alive():
            break
        rss = _rss_of(proc.pid)
        max_seen = max(max_seen, rss)
        if rss > rss_guard_mb:
            killed = f"OOM: killed at {rss:,.0f} MB resident (guard {rss_guard_mb:,.0f} MB)"
            break
        if time.perf_counter() - start > cap_s:
            killed = f"timeout: killed after {cap_s:.0f} s"
            break
    if killed is not None:
        proc.kill()
    proc.join(10)
    wall = time.perf_counter() - start
    if result is None:
        status = killed.split(":", 1)[0] if killed else "error"
        detail = killed or f"process died, exit code {proc.exitcode}"
        result = {"status": status, "detail": detail, "seconds": wall, "rss_seen_mb": max_seen}
    result["wall_s"] = wall
    return result


def bar_progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- workload

CLASSES = 10


def build_model(d_in: int, width: int, depth: int) -> Any:
    """MLP ``d_in → width (×depth) → 10`` with ReLU, seeded."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    sizes = [d_in] + [width] * depth
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], CLASSES))
    return nn.Sequential(*layers).eval()


def inputs(n: int, d_in: int, seed: int) -> Any:
    import torch

    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def fit_loader(model: Any, n: int, d_in: int, batch: int) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    X = inputs(n, d_in, seed=1)
    with torch.no_grad():
        y = torch.cat([model(part).argmax(-1) for part in X.split(1024)])
    return DataLoader(TensorDataset(X, y), batch_size=batch, shuffle=False)


def make_ours(model: Any, curvature: str) -> Any:
    from laplacefim import Laplace

    return Laplace(model, "classification", subset="all", structure="kron", curvature=curvature)


def make_theirs(model: Any, curvature: str) -> Any:
    from laplace import Laplace

    kwargs = {"backend_kwargs": {"stochastic": True}} if curvature == "fisher" else {}
    return Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron", **kwargs
    )


def job_fit(
    lib: str,
    curvature: str,
    d_in: int,
    width: int,
    depth: int,
    n_fit: int,
    batch: int,
    state_path: str,
    budget_mb: float,
) -> dict[str, Any]:
    """Fit one posterior, measure it, save its statistics for the predict job."""
    import torch

    model = build_model(d_in, width, depth)
    loader = fit_loader(model, n_fit, d_in, batch)
    meter = Meter(budget_mb)
    with meter.measure():
        if lib == "ours":
            la = make_ours(model, curvature)
            la.fit(loader, generator=torch.Generator().manual_seed(0))
        else:
            torch.manual_seed(0)  # curvlinops draws the MC labels from the global generator
            la = make_theirs(model, curvature)
            la.fit(loader)
    if meter.result["status"] == "ok":
        if lib == "ours":
            la.save(state_path)
        else:
            torch.save(la.state_dict(), state_path)
    meter.result["n_params"] = sum(p.numel() for p in model.parameters())
    return meter.result


def job_predict(
    lib: str,
    curvature: str,
    d_in: int,
    width: int,
    depth: int,
    n_inputs: int,
    chunk_size: int,
    state_path: str,
    budget_mb: float,
    n_check: int = 8,
) -> dict[str, Any]:
    """Build the posterior from saved statistics and run the GLM probit predictive."""
    import torch

    model = build_model(d_in, width, depth)
    x = inputs(n_inputs, d_in, seed=2)
    state = torch.load(state_path, weights_only=lib == "ours")
    meter = Meter(budget_mb)
    with meter.measure() as result:
        if lib == "ours":
            la = make_ours(model, curvature)
            la.load_state_dict(state)
            del state
            probs = la.predict(x, "glm", "probit", chunk_size=chunk_size).probs
        else:
            la = make_theirs(model, curvature)
            la.load_state_dict(state)  # decomposes the Kronecker factors
            del state
            t0 = time.perf_counter()
            probs = la(x, pred_type="glm", link_approx="probit")
            result["call_s"] = time.perf_counter() - t0
        assert probs.shape == (n_inputs, CLASSES), probs.shape
        result["finite"] = bool(torch.isfinite(probs).all())
        result["probs_head"] = probs[:n_check].tolist()
    return meter.result


def _reset_peak() -> None:
    """Reset this process's resident-set high-water mark (``ru_maxrss``/``VmHWM``) to now."""
    Path("/proc/self/clear_refs").write_text("5")


def job_ladder(
    curvature: str,
    d_in: int,
    width: int,
    depth: int,
    n_inputs: int,
    sizes: list[int],
    state_path: str,
    budget_mb: float,
    cap_s: float,
    n_check: int = 8,
) -> dict[str, Any]:
    """laplace-torch's GLM probit predictive at several batch sizes, in one process.

    The posterior is built once from the saved statistics (``load_state_dict``, which
    decomposes the Kronecker factors). Then, each after a reset of the peak resident set:
    one input (its memory and time per input), all ``n_inputs`` in one call (its default
    batching), the sizes whose Jacobian ``(B, C, P)`` cannot fit the budget (they fail at
    once), and the remaining sizes, ascending, unless one input's time projects past
    ``cap_s`` (reported as ``timeout`` with the projection, not run).
    """
    import torch

    model = build_model(d_in, width, depth)
    x = inputs(n_inputs, d_in, seed=2)
    state = torch.load(state_path, weights_only=False)
    n_params = sum(p.numel() for p in model.parameters())
    attempts: list[dict[str, Any]] = []
    meter = Meter(budget_mb)
    with meter.measure():
        la = make_theirs(model, curvature)
        la.load_state_dict(state)  # decomposes the Kronecker factors
    del state
    build = dict(meter.result, n=0, what="load_state_dict (decomposition)")
    if build["status"] != "ok":
        return {"build": build, "attempts": attempts}

    def attempt(b: int, what: str) -> dict[str, Any]:
        gc.collect()
        _reset_peak()
        m = Meter(budget_mb)
        with m.measure() as result:
            probs = la(x[:b], pred_type="glm", link_approx="probit")
            result["finite"] = bool(torch.isfinite(probs).all())
            result["probs_head"] = probs[:n_check].tolist()
            del probs
        m.result.update(n=b, what=what)
        attempts.append(m.result)
        return m.result

    def jacobian_mb(b: int) -> float:
        return b * CLASSES * n_params * 4 / MB

    one = attempt(1, "one input")  # first, so that no failed call's leftovers count
    attempt(n_inputs, "default batching: all inputs in one call")
    rest = sorted({s for s in sizes if 1 < s < n_inputs}, reverse=True)
    too_big = [s for s in rest if 2 * jacobian_mb(s) > budget_mb]
    for b in too_big:
        attempt(b, "B inputs in one call")
    for b in sorted(set(rest) - set(too_big)):
        if one["status"] == "ok" and one["seconds"] * b > cap_s:
            attempts.append(
                {
                    "n": b,
                    "what": "B inputs in one call",
                    "status": "timeout",
                    "detail": f"not run: one input took {one['seconds']:.1f} s, so {b} inputs "
                    f"project to {one['seconds'] * b:.0f} s > cap {cap_s:.0f} s",
                }
            )
            continue
        attempt(b, "B inputs in one call")
    return {"build": build, "attempts": attempts}


# ---------------------------------------------------------------- orchestration

DISTRIBUTIONS = ("torch", "laplace-torch", "curvlinops-for-pytorch", "laplacefim")
LIB_NAMES = {"ours": "laplacefim", "laplace": "laplace-torch"}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def cpu_name() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )


def fmt_load(load: tuple[float, float, float] | list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


def header(title: str, extra: str = "") -> dict[str, Any]:
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "versions": versions(),
        "loadavg_start": list(os.getloadavg()),
    }
    print(f"# {title}  {meta['date']}")
    print(
        f"# cpu: {meta['cpu']} ({meta['cores']} cores)  torch threads {THREADS}  "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}  python {meta['python']}"
    )
    print("# " + "  ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(
        f"# load average (1/5/15 min) at start: {fmt_load(meta['loadavg_start'])} "
        f"(other jobs share this machine; timings are noisy)"
    )
    if extra:
        print(extra)
    return meta


def table(rows: list[list[str]], heads: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def fnum(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--depth", type=int, default=3, help="hidden layers")
    p.add_argument("--n-fit", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n-predict", type=int, default=10_000)
    p.add_argument("--chunk-size", type=int, default=256, help="ours: la.predict(chunk_size=)")
    p.add_argument("--curvatures", default="ggn,fisher")
    p.add_argument(
        "--predict-curvatures",
        default="ggn",
        help="posteriors whose predictive is measured (the MC-Fisher posterior has the same "
        "blocks and shapes as the GGN one, so its predictive runs the same code)",
    )
    p.add_argument("--libs", default="ours,laplace")
    p.add_argument(
        "--ladder",
        default="1000,100,10",
        help="smaller batches of inputs for laplace-torch's predictive after a failure",
    )
    p.add_argument("--cap", type=float, default=180.0, help="laplace-torch cap per process [s]")
    p.add_argument("--ours-cap", type=float, default=480.0, help="ours cap per process [s]")
    p.add_argument("--budget-mb", type=float, default=10 * 1024)
    p.add_argument("--rss-guard-mb", type=float, default=12 * 1024)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    libs = [lib for lib in args.libs.split(",") if lib]
    if "laplace" in libs and importlib.util.find_spec("laplace") is None:
        print("# laplace-torch is not installed here: its rows are skipped", file=sys.stderr)
        libs.remove("laplace")
    curvatures = [c for c in args.curvatures.split(",") if c]
    predict_curvatures = [c for c in args.predict_curvatures.split(",") if c in curvatures]
    started = time.perf_counter()
    model = build_model(args.d_in, args.width, args.depth)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    arch = "-".join(map(str, [args.d_in] + [args.width] * args.depth + [CLASSES]))
    meta = header(
        "laplacefim memory benchmark: all-weights KFAC posterior",
        f"# model: MLP {arch} (ReLU), {n_params:,} parameters, random seeded weights; fit on "
        f"{args.n_fit:,} synthetic rows (batch {args.batch}); GLM probit predictive on "
        f"{args.n_predict:,} inputs\n"
        f"# each row: a fresh process; dRSS = peak RSS (getrusage) - RSS after model and data "
        f"(and, for predict, the saved statistics) are loaded; budget {args.budget_mb:,.0f} MB "
        f"of address space above that, RSS guard {args.rss_guard_mb:,.0f} MB",
    )
    cfg = dict(d_in=args.d_in, width=args.width, depth=args.depth)
    ctx = fork_server(["torch", "laplacefim", *(["laplace"] if "laplace" in libs else [])])
    records: list[dict[str, Any]] = []

    def run(kind: str, lib: str, curvature: str, n: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        cap = args.ours_cap if lib == "ours" else args.cap
        if kind == "job_ladder":  # decomposition, several calls and one input's time
            cap = 2 * args.cap
        bar_progress(f"[memory] {kind} {lib} {curvature} n={n:,} ...")
        res = run_job(ctx, "memory", kind, kwargs, cap_s=cap, rss_guard_mb=args.rss_guard_mb)
        res.update(phase=kind.removeprefix("job_"), lib=lib, curvature=curvature, n=n)
        records.append(res)
        bar_progress(
            f"[memory]   -> {res.get('status', 'done')} {fnum(res.get('wall_s'), '.1f')} s, dRSS "
            f"{fnum(res.get('drss_mb'))} MB {res.get('detail', '')}"
        )
        return res

    with tempfile.TemporaryDirectory(prefix="laplacefim-memory-") as tmp:
        states = {}
        for curvature in curvatures:
            for lib in libs:
                path = str(Path(tmp) / f"{lib}-{curvature}.pt")
                res = run(
                    "job_fit",
                    lib,
                    curvature,
                    args.n_fit,
                    dict(
                        lib=lib,
                        curvature=curvature,
                        n_fit=args.n_fit,
                        batch=args.batch,
                        state_path=path,
                        budget_mb=args.budget_mb,
                        **cfg,
                    ),
                )
                if res["status"] == "ok":
                    states[lib, curvature] = path
        for curvature in predict_curvatures:
            for lib in libs:
                if (lib, curvature) not in states:
                    continue
                state = states[lib, curvature]
                if lib == "ours":
                    kwargs = dict(
                        lib=lib,
                        curvature=curvature,
                        n_inputs=args.n_predict,
                        chunk_size=args.chunk_size,
                        state_path=state,
                        budget_mb=args.budget_mb,
                        **cfg,
                    )
                    res = run("job_predict", lib, curvature, args.n_predict, kwargs)
                    res["what"] = f"build posterior + predict, chunk_size={args.chunk_size}"
                    continue
                sizes = [int(s) for s in args.ladder.split(",") if s]
                kwargs = dict(
                    curvature=curvature,
                    n_inputs=args.n_predict,
                    sizes=sizes,
                    state_path=state,
                    budget_mb=args.budget_mb,
                    cap_s=args.cap,
                    **cfg,
                )
                res = run("job_ladder", lib, curvature, args.n_predict, kwargs)
                if "build" not in res:  # the process failed or was killed
                    res["phase"] = "predict"
                    continue
                records.remove(res)
                build = res["build"]
                records.append(dict(build, phase="build", lib=lib, curvature=curvature))
                for att in res["attempts"]:
                    if "rss_peak_mb" in att:
                        att["drss_call_mb"] = att["drss_mb"]
                        att["drss_mb"] = att["rss_peak_mb"] - build["rss_base_mb"]
                    records.append(dict(att, phase="predict", lib=lib, curvature=curvature))
    meta["loadavg_end"] = list(os.getloadavg())
    total = time.perf_counter() - started
    print(report(records, n_params, args))
    print(
        f"# total wall time {total:.0f} s; load average at start "
        f"{fmt_load(meta['loadavg_start'])}, at end {fmt_load(meta['loadavg_end'])}"
    )
    if args.json:
        for r in records:
            r.pop("traceback", None)
        payload = {
            "meta": meta,
            "args": vars(args) | {"json": str(args.json)},
            "n_params": n_params,
            "total_s": total,
            "results": records,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"# wrote {args.json}")
    return 0


def report(records: list[dict[str, Any]], n_params: int, args: argparse.Namespace) -> str:
    rows = []
    for r in records:
        note = r.get("what", "")
        if r["phase"] == "predict" and r["lib"] == "laplace":
            need = r["n"] * CLASSES * n_params * 4 / 2**30
            note = f"{note}; Jacobian (B,C,P) float32 = {need:,.1f} GiB"
        if r.get("detail"):
            note = f"{note}; {r['detail']}"
        if r.get("finite") is False:
            note = f"{note}; NON-FINITE probabilities"
        peak = r.get("rss_peak_mb")
        rows.append(
            [
                r["phase"],
                LIB_NAMES[r["lib"]],
                r["curvature"],
                f"{r['n']:,}" if r["n"] else "-",
                r["status"],
                fnum(r.get("seconds"), ".1f"),
                fnum(r.get("drss_mb")),
                fnum(peak)
                if peak is not None
                else f"(>{fnum(r['rss_seen_mb'])})"
                if r.get("rss_seen_mb")
                else "-",
                note.strip("; "),
            ]
        )
    heads = [
        "phase",
        "library",
        "curvature",
        "rows/inputs",
        "status",
        "time[s]",
        "dRSS[MB]",
        "peak[MB]",
        "note",
    ]
    lines = [
        "",
        table(rows, heads),
        "",
        "dRSS: peak RSS minus the RSS once model and data (for predict: and the saved "
        "statistics) were loaded; for laplace-torch's predict rows it is counted from that same "
        "base, so it includes its decomposed posterior (the 'build' row), as ours' predict row "
        "includes ours. ours' predict time includes the decomposition; laplace-torch's "
        "predict times do not (see its build row).",
        "",
    ]
    by = {(r["phase"], r["lib"], r["curvature"], r["n"]): r for r in records}
    sized = f"{n_params / 1e6:.1f}M parameters"
    targets: list[str] = []
    for curvature in [c for c in args.curvatures.split(",") if c]:
        ours = by.get(("fit", "ours", curvature, args.n_fit))
        theirs = by.get(("fit", "laplace", curvature, args.n_fit))
        targets.append(_fit_target(curvature, ours, theirs, sized, args))
        if ours and theirs and ours["status"] == theirs["status"] == "ok":
            lines.append(
                f"fit {curvature}: time laplace-torch/ours = "
                f"{theirs['seconds'] / ours['seconds']:.1f}x"
            )
    for curvature in [c for c in args.predict_curvatures.split(",") if c]:
        ours = by.get(("predict", "ours", curvature, args.n_predict))
        full = by.get(("predict", "laplace", curvature, args.n_predict))
        targets.append(_predict_target(curvature, ours, full, sized, args))
        if ours is None:
            continue
        text = (
            f"predict {curvature}, {args.n_predict:,} inputs: ours {ours['status']} (dRSS "
            f"{fnum(ours.get('drss_mb'))} MB, {fnum(ours.get('seconds'), '.1f')} s)"
        )
        if full is not None:
            text += f"; laplace-torch {full['status']} ({full.get('detail', '')})"
            if full["status"] == "ok" and ours["status"] == "ok":
                ratio = ours["drss_mb"] / full["drss_mb"]
                text += f"; dRSS ours/laplace-torch {ratio:.2f}"
        lines.append(text)
        small = [
            r
            for r in records
            if r["phase"] == "predict"
            and r["lib"] == "laplace"
            and r["curvature"] == curvature
            and r["status"] == "ok"
        ]
        for r in small:
            per_input = r["seconds"] / r["n"]
            line = (
                f"  laplace-torch succeeds with {r['n']:,} input(s): dRSS {r['drss_mb']:,.0f} MB "
                f"({r['drss_mb'] / ours['drss_mb']:.1f}x ours for {args.n_predict:,}); "
                f"{per_input:.2f} s per input -> {duration(per_input * args.n_predict)} "
                f"for {args.n_predict:,} inputs at this batch size"
            )
            if ours.get("probs_head") and r.get("probs_head"):
                k = min(len(ours["probs_head"]), len(r["probs_head"]))
                diff = max(
                    abs(a - b)
                    for ra, rb in zip(ours["probs_head"][:k], r["probs_head"][:k], strict=True)
                    for a, b in zip(ra, rb, strict=True)
                )
                line += f"; max |p_ours - p_laplace| over its {k} input(s): {diff:.1e}"
            lines.append(line)
    return "\n".join([*lines, "", *targets])


FIT_MAX_RATIO = 0.5  # target: ours' fit dRSS at most half of laplace-torch's


def _fit_target(
    curvature: str,
    ours: dict[str, Any] | None,
    theirs: dict[str, Any] | None,
    sized: str,
    args: argparse.Namespace,
) -> str:
    """Fit: ours' extra memory at most half of laplace-torch's (an OOM of theirs: > budget)."""
    what = f"fit {curvature} ({sized}, {args.n_fit:,} rows) dRSS ours/laplace-torch"
    limit = f"<= {FIT_MAX_RATIO:.2f}"
    if ours is None or theirs is None:
        return target_line(what, None, limit, None, "a library was not run (--libs)")
    if ours["status"] == "OOM":
        return target_line(what, f"ours OOM ({ours.get('detail', '')})", limit, False)
    if ours["status"] != "ok":
        return target_line(what, None, limit, None, f"ours {ours['status']}")
    if theirs["status"] == "OOM":  # it needed more than the budget
        ratio = ours["drss_mb"] / args.budget_mb
        measured = (
            f"< {ratio:.2f} (ours {ours['drss_mb']:,.0f} MB; laplace-torch OOM, "
            f"> {args.budget_mb:,.0f} MB)"
        )
        return target_line(what, measured, limit, ratio <= FIT_MAX_RATIO)
    if theirs["status"] != "ok":
        return target_line(what, None, limit, None, f"laplace-torch {theirs['status']}")
    ratio = ours["drss_mb"] / theirs["drss_mb"]
    measured = f"{ratio:.2f} ({ours['drss_mb']:,.0f} vs {theirs['drss_mb']:,.0f} MB)"
    return target_line(what, measured, limit, ratio <= FIT_MAX_RATIO)


def _predict_target(
    curvature: str,
    ours: dict[str, Any] | None,
    theirs: dict[str, Any] | None,
    sized: str,
    args: argparse.Namespace,
) -> str:
    """Predict: ours succeeds on all inputs where laplace-torch's default batching is OOM."""
    what = f"predict {curvature} ({sized}) {args.n_predict:,} inputs"
    limit = "ours ok where laplace-torch OOM"
    if ours is None:
        return target_line(what, None, limit, None, "ours' fit failed or was not run")
    ok = ours["status"] == "ok" and ours.get("finite", False)
    measured = f"ours {ours['status']}" + (
        f" ({fnum(ours.get('drss_mb'))} MB, {fnum(ours.get('seconds'), '.1f')} s)" if ok else ""
    )
    if not ok:
        if ours["status"] == "ok":
            measured += ", non-finite probabilities"
        return target_line(what, measured, limit, False)
    if theirs is None:
        return target_line(what, measured, limit, None, "laplace-torch not run")
    measured += f", laplace-torch {theirs['status']}"
    if theirs["status"] != "OOM":
        why = f"laplace-torch did not run out of memory at this size: {theirs['status']}"
        return target_line(what, measured, limit, None, why)
    return target_line(what, measured, limit, True)


if __name__ == "__main__":
    sys.exit(main())
