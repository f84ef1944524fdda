"""One benchmark job, run in its own process: set up, time, measure peak memory.

Timing policy (all wall-clock, ``time.perf_counter``); ``cap`` is the per-job
time cap and ``B`` the number of batches:

1. *Probe* (also the warm-up of lazy initialisation): one fit over the first
   batch. If ``B x probe`` exceeds the cap, the one-batch fit is timed again,
   warm (``t1``), and a two-batch fit (``t2``) separates the per-fit constant
   from the per-batch cost: the projection becomes ``t1 + (B - 1)(t2 - t1)``.
   If the projection exceeds the cap, the job reports ``timeout`` with it. A
   watchdog stops a probe over ``k`` batches that runs past
   ``k cap / B + PROBE_SLACK_S``, and reports ``timeout`` too.
2. Otherwise: one untimed full warm-up fit if the projection is under
   ``FULL_WARMUP_S`` (above it the probe was the warm-up), then timed full fits:
   ``repeats`` of them, their median reported, but only one if the first takes
   over ``SLOW_S``, and no more than fit in the cap. The watchdog stops the
   timed fits at ``1.25 cap`` (plus ``SLOW_S`` per extra repeat).

Memory: ``ru_maxrss`` (the process's resident-set high-water mark) read once
after the model, data and library are set up (*base*) and once at the end
(*peak*); ``peak - base`` is what the fits themselves added.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from _runners import Config, Prepare, UnsupportedError, make_prepare
from _workloads import load_bundle, restore
from torch.utils.data import DataLoader, Subset

SLOW_S = 10.0
FULL_WARMUP_S = 2.0
PROBE_SLACK_S = 4.0  # room for per-fit constants (lazy set-up) in a probe's time limit
THREADS = 2


@dataclass(frozen=True)
class Job:
    """What to measure."""

    workload: str
    lib: str
    variant: str
    subset: str | None
    structure: str | None
    curvature: str | None
    bundle: str
    repeats: int
    cap_s: float

    @property
    def config(self) -> Config | None:
        if self.subset is None or self.structure is None or self.curvature is None:
            return None
        return Config(self.subset, self.structure, self.curvature)


@dataclass
class Result:
    """What was measured (``seconds`` is the median of ``times``)."""

    job: dict[str, Any]
    status: str  # ok | timeout | error | unsupported
    seconds: float | None = None
    times: list[float] = field(default_factory=list)
    probe_s: list[float] = field(default_factory=list)
    rss_base_mb: float | None = None
    rss_peak_mb: float | None = None
    detail: str = ""


def max_rss_mb() -> float:
    """Resident-set high-water mark of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Watchdog:
    """Ends the process with a ``timeout`` result when a phase runs past its limit.

    Heavy torch operations release the GIL, so the timer thread fires on time
    even while the main thread is inside one.
    """

    def __init__(self, conn: Connection, result: Result) -> None:
        self._conn = conn
        self._result = result
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float, what: str) -> None:
        self.disarm()
        self._timer = threading.Timer(
            seconds, self._fire, args=(f"{what} ran over {seconds:.0f} s",)
        )
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, detail: str) -> None:
        self._result.status = "timeout"
        self._result.detail = f"{detail} (stopped)"
        self._result.rss_peak_mb = max_rss_mb()
        self._conn.send(asdict(self._result))
        self._conn.close()
        os._exit(0)


def _time_fit(prepare: Prepare) -> float:
    fit = prepare()
    gc.collect()
    start = time.perf_counter()
    fit()
    elapsed = time.perf_counter() - start
    del fit
    gc.collect()
    return elapsed


def _head_loader(loader: DataLoader, n_batches: int) -> DataLoader:
    """A loader over the first ``n_batches`` batches only, keeping the batch size."""
    n = loader.batch_size or 1
    return DataLoader(Subset(loader.dataset, range(n * n_batches)), batch_size=n, shuffle=False)


def _probe(
    job: Job, probes: tuple[Prepare, Prepare], n_batches: int, result: Result, dog: Watchdog
) -> float:
    """Projected full-fit time (seconds) from fits over the first one and two batches."""
    one, two = probes
    per_batch = job.cap_s / n_batches
    dog.arm(per_batch + PROBE_SLACK_S, "one-batch probe")
    result.probe_s.append(_time_fit(one))
    projected = result.probe_s[0] * n_batches
    if projected > job.cap_s:
        dog.arm(per_batch + PROBE_SLACK_S, "warm one-batch probe")
        t1 = _time_fit(one)
        dog.arm(2 * per_batch + PROBE_SLACK_S, "two-batch probe")
        t2 = _time_fit(two)
        result.probe_s += [t1, t2]
        projected = t1 + (n_batches - 1) * max(t2 - t1, 0.0)
    dog.disarm()
    return projected


def _timed_runs(job: Job, prepare: Prepare, projected: float, dog: Watchdog) -> list[float]:
    """Time full fits: ``job.repeats`` of them, or one when a fit is slow."""
    dog.arm(1.25 * job.cap_s + SLOW_S * (job.repeats - 1), "fit")
    if projected < FULL_WARMUP_S:
        _time_fit(prepare)
    started = time.perf_counter()
    times = [_time_fit(prepare)]
    while len(times) < job.repeats and times[0] <= SLOW_S:
        elapsed = time.perf_counter() - started
        if elapsed + elapsed / len(times) > job.cap_s:
            break
        times.append(_time_fit(prepare))
    dog.disarm()
    return times


def measure(job: Job, conn: Connection) -> Result:
    """Run ``job`` in this process and return its result."""
    # Move everything alive now (the preloaded libraries) out of the collector's
    # reach: a full collection over them takes ~0.3 s, and each fit does two.
    gc.freeze()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, loader = restore(load_bundle(Path(job.bundle)))
    try:
        prepare = make_prepare(job.lib, job.variant, job.config, model, loader)
    except UnsupportedError as exc:
        return Result(asdict(job), "unsupported", detail=str(exc))
    probes = (
        make_prepare(job.lib, job.variant, job.config, model, _head_loader(loader, 1)),
        make_prepare(job.lib, job.variant, job.config, model, _head_loader(loader, 2)),
    )
    result = Result(asdict(job), "ok", rss_base_mb=max_rss_mb())
    dog = Watchdog(conn, result)
    projected = _probe(job, probes, len(loader), result, dog)
    if projected > job.cap_s:
        result.status = "timeout"
        result.detail = f"projected {projected:.0f} s from the first batches"
    else:
        result.times = _timed_runs(job, prepare, projected, dog)
        result.seconds = statistics.median(result.times)
        if len(result.times) < job.repeats and result.times[0] > SLOW_S:
            result.detail = "single run (slow)"
    result.rss_peak_mb = max_rss_mb()
    return result


def run_job(job: dict[str, Any], conn: Connection) -> None:
    """Process entry point: measure ``job`` and send the result dict over ``conn``."""
    try:
        result = measure(Job(**job), conn)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"[:2000]
        last = traceback.format_exc().strip().splitlines()[-1]
        if last not in detail:
            detail += f" [{last}]"
        result = Result(job, "error", rss_peak_mb=max_rss_mb(), detail=detail)
    conn.send(asdict(result))
    conn.close()
