"""Prior tuning and GLM prediction, laplacefim beside laplace-torch 0.3, in one run.

For the W1 MLP and the W2 CNN of ``_workloads.py`` (5,600 fit rows, batch 128; 397
held-out digits to predict) and every (subset, structure) both libraries support with the
exact GGN, prints per library: fit, tune (marginal likelihood) and predict (GLM probit)
times, the tuned prior precision, the log marginal likelihood reached, test NLL and
accuracy; the time ratios; and, at the same prior precision (1.0, before tuning) for the
full and diagonal GGN posteriors, the largest difference of the predicted probabilities.

Each laplace-torch phase is capped at ``--cap`` seconds (120 by default), as in
``fit.py``: a probe (the fit on the first batch, then on the first two; one of the 100
tuning steps; the prediction of the first 8 inputs) projects the phase's full time, and a
phase projected past the cap is not run: its time is the projection, shown with ``~``.
A phase that runs is stopped at 1.25 x the cap (shown as ``>`` that bound). After a fit
projected past the cap, tuning and prediction run on the two-batch fit (their times do
not depend on the number of rows), but its prior, evidence and NLL are not comparable and
are not shown; after a prediction projected past the cap, the probabilities are compared
on the probe's inputs only. laplacefim's own phases are not capped.

Targets (the limits are this script's; printed at the end as ``target: ... met``):
laplacefim's fit + tune + predict time is below laplace-torch's on every configuration;
at the same prior precision, the probabilities of the exact posteriors (last-layer
diagonal and full, all-weights diagonal) agree to within ``AGREE_TOL``; and on those, the
tuned log marginal likelihood is at least laplace-torch's (within ``LML_SLACK`` nats).

Run in the benchmark environment (``bash benchmarks/setup_bench_env.sh``):
``.venv-bench/bin/python benchmarks/predict_tune.py [--workloads W1,W2] [--quick] [--cap S]``.
laplace-torch tunes with its default 100 Adam steps (``optimize_prior_precision``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from _targets import report
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
CAP_S = 120.0  # per laplace-torch phase, as fit.py's per-job cap
STOP_FACTOR = 1.25  # a phase that runs is stopped at this multiple of the cap
TUNE_STEPS = 100  # laplace-torch's default number of Adam steps
PROBE_STEPS = 1
PROBE_INPUTS = 8
AGREE_TOL = 1e-3  # max |p_ours - p_laplace| at the same prior, exact posteriors
LML_SLACK = 0.01  # nats: tuned log ML at least laplace-torch's, exact posteriors


@dataclass(frozen=True)
class Timing:
    """A phase's seconds: measured (``mark=""``), projected (``"~"``) or a lower bound (``">"``)."""

    seconds: float
    mark: str = ""

    def __str__(self) -> str:
        return f"{self.mark}{self.seconds:.3f}"


class CapReachedError(Exception):
    """A capped phase ran past its limit."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`CapReachedError` in the main thread once ``seconds`` have passed.

    Python runs the handler between bytecodes, so a phase stops at the next Python-level
    step (a batch, an Adam step) after the limit, not inside a single torch call.
    """

    def fire(signum: int, frame: Any) -> None:
        raise CapReachedError

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
        "fit": Timing(fit_s),
        "tune": Timing(tune_s),
        "predict": Timing(predict_s),
        "prior": float(tuned.prior_precision),
        "lml": float(tuned.log_marginal_likelihood),
        "nll": nll,
        "acc": acc,
        "same_prior": same_prior,
        "iters": tuned.n_iter,
        "notes": [],
    }


def _head(loader: DataLoader, n_batches: int) -> DataLoader:
    """A loader over the first ``n_batches`` batches only, keeping the batch size."""
    if n_batches >= len(loader):
        return loader
    n = loader.batch_size or 1
    return DataLoader(Subset(loader.dataset, range(n * n_batches)), batch_size=n, shuffle=False)


def capped(run: Callable[[int], Any], k: int, n: int, cap: float) -> tuple[Any, Timing]:
    """Time ``run(n)``, unless probes project it past ``cap`` (``fit.py``'s policy).

    ``run(m)`` does the first ``m`` units of a phase (batches, Adam steps, inputs) and
    returns its output. A cold ``run(k)`` probes; if ``n / k`` times its time passes the
    cap, a warm ``run(k)`` and ``run(2k)`` separate the per-call constant from the
    per-unit cost. Projected past the cap, the phase is not run; a probe that runs past
    the cap, or a full run past ``STOP_FACTOR`` times it, is stopped.

    Returns:
        The output of ``run(n)``, or of the last probe when the phase was not run or was
        stopped (``None`` when a probe was), and the timing: measured, projected (``~``)
        or a lower bound (``>``).
    """
    out: Any = None
    try:
        with deadline(cap):
            out, t = timed(lambda: run(k))
        projected = t * n / k
        if projected > cap and 2 * k < n:
            with deadline(cap):
                _, t1 = timed(lambda: run(k))
            with deadline(cap):
                out, t2 = timed(lambda: run(2 * k))
            projected = t1 + (n / k - 1) * max(t2 - t1, 0.0)
    except CapReachedError:
        return out, Timing(cap, ">")
    if projected > cap:
        return out, Timing(projected, "~")
    try:
        with deadline(STOP_FACTOR * cap):
            full, t = timed(lambda: run(n))
        return full, Timing(t)
    except CapReachedError:
        return out, Timing(STOP_FACTOR * cap, ">")


def peer(
    model: nn.Module,
    loader: DataLoader,
    x: torch.Tensor,
    y: torch.Tensor,
    subset: str,
    structure: str,
    cap: float,
) -> dict[str, Any]:
    """laplace-torch's fit, tuning and prediction, each capped (see :func:`capped`)."""
    from laplace import Laplace as PeerLaplace

    model = copy.deepcopy(model)  # a stopped phase may leave hooks behind: not on ours' model

    def fit(n_batches: int) -> Any:
        la = PeerLaplace(
            model, "classification", subset_of_weights=subset, hessian_structure=structure
        )
        la.fit(_head(loader, n_batches))
        return la

    def tune(n_steps: int) -> None:
        la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=n_steps)

    def predict(n_inputs: int) -> torch.Tensor:
        la.prior_precision = la.prior_precision  # drops the cached posterior scale
        with torch.no_grad():
            return la(x[:n_inputs], pred_type="glm", link_approx="probit")

    notes: list[str] = []
    la, fit_t = capped(fit, 1, len(loader), cap)
    result: dict[str, Any] = {"fit": fit_t, "tune": None, "predict": None, "same_prior": None}
    result.update(prior=None, lml=None, nll=None, acc=None, iters=TUNE_STEPS, notes=notes)
    if la is None:
        notes.append("fit probe stopped at the cap: nothing to tune or predict")
        return result
    comparable = not fit_t.mark
    if not comparable:
        notes.append("fit past the cap: tuned and predicted on the probe's fit (first batches)")
    same_prior, first = capped(predict, PROBE_INPUTS, len(x), cap)  # at prior 1.0
    result["same_prior"] = same_prior
    if first.mark and same_prior is not None:
        notes.append(f"probabilities compared on the first {len(same_prior)} inputs")
    result["tune"] = capped(tune, PROBE_STEPS, TUNE_STEPS, cap)[1]
    if result["tune"].mark:
        notes.append("tuning past the cap: prior not tuned")
        comparable = False
    probs, result["predict"] = capped(predict, PROBE_INPUTS, len(x), cap)
    if comparable:
        result.update(
            prior=float(la.prior_precision.mean()), lml=float(la.log_marginal_likelihood())
        )
        if not result["predict"].mark:
            result["nll"], result["acc"] = scores(probs, y)
    return result


def _total(r: dict[str, Any]) -> Timing | None:
    parts = [r["fit"], r["tune"], r["predict"]]
    if any(p is None for p in parts):
        return None
    marks = {p.mark for p in parts} - {""}
    return Timing(sum(p.seconds for p in parts), ">" if ">" in marks else "~" if marks else "")


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return f"{'-':>8}"
    if isinstance(value, Timing):
        return f"{value!s:>8}"
    return format(value, fmt)


def _ratio(a: Timing | None, b: Timing | None) -> str:
    """``b / a`` (laplace-torch over ours), marked when ``b`` is projected or a bound."""
    if a is None or b is None:
        return "-"
    return f"{b.mark or a.mark}{b.seconds / a.seconds:.1f}x"


def run(workload: str, quick: bool, cap: float) -> list[dict[str, Any]]:
    """Measure every configuration of ``workload``; return one record per configuration."""
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
    records = []
    for subset, structure in CONFIGS[:2] if quick else CONFIGS:
        rows = {"ours": ours(model, loader, x_test, y_test, subset, structure)}
        try:
            rows["laplace"] = peer(model, loader, x_test, y_test, subset, structure, cap)
        except Exception as error:  # report and go on: a peer's failure is a result
            print(
                f"{subset:>10} {structure:>6} laplace-torch failed: {type(error).__name__}: {error}"
            )
        for lib, r in rows.items():
            cells = [_cell(r[k], "8.3f") for k in ("fit", "tune", "predict")]
            cells += [_cell(_total(r), "8.3f"), _cell(r["prior"], "8.3g"), f"{r['iters']:8d}"]
            cells += [_cell(r[k], "8.3f") for k in ("lml", "nll", "acc")]
            note = f"  ({'; '.join(r['notes'])})" if r["notes"] else ""
            print(f"{subset:>10} {structure:>6} {lib:>8} " + " ".join(cells) + note)
        record: dict[str, Any] = {"workload": workload, "config": (subset, structure)}
        if "laplace" in rows:
            a, b = rows["ours"], rows["laplace"]
            line = "  ".join(f"{k} {_ratio(a[k], b[k])}" for k in ("fit", "tune", "predict"))
            total_a, total_b = _total(a), _total(b)
            lml = None if b["lml"] is None else a["lml"] - b["lml"]
            gap, diff = "", None
            if (subset, structure) in EXACT and b["same_prior"] is not None:
                theirs = b["same_prior"].double()
                mine = a["same_prior"][: len(theirs)].double()
                diff = float((mine - theirs).abs().max())
                gap = f"  | same prior 1.0: max |p_ours - p_laplace| = {diff:.2e}"
                if len(theirs) < len(a["same_prior"]):
                    gap += f" (first {len(theirs)} inputs)"
            shown = "-" if lml is None else f"{lml:+.2f}"
            print(
                f"{'':>10} {'':>6} {'speedup':>8} {line}  total {_ratio(total_a, total_b)}"
                f"  lml ours-laplace {shown}{gap}"
            )
            if total_a is not None and total_b is not None:
                record["total"] = Timing(total_b.seconds / total_a.seconds, total_b.mark)
            record.update(lml_gap=lml, prob_diff=diff)
        records.append(record)
    return records


def _name(record: dict[str, Any]) -> str:
    return "/".join(record["config"])


def print_targets(workloads: list[str], records: list[dict[str, Any]]) -> None:
    """This script's targets, one line each, from the records of this run."""
    print("\n# targets: ~ = a laplace-torch phase projected past the cap, > = stopped at it")
    for workload in workloads:
        mine = [r for r in records if r["workload"] == workload]
        timed_rows = [r for r in mine if "total" in r]
        what = f"{workload} fit+tune+predict faster than laplace-torch on every configuration"
        if not timed_rows:
            why = "laplace-torch failed or was stopped on every configuration"
            report(what, None, "> 1x", None, why)
        else:
            worst = min(timed_rows, key=lambda r: r["total"].seconds)
            slower = sum(r["total"].seconds <= 1 for r in timed_rows)
            total = worst["total"]
            measured = f"{total.mark}{total.seconds:.1f}x ({_name(worst)})"
            if slower:
                measured += f"; {slower} not faster"
            missing = len(mine) - len(timed_rows)
            what += f" ({len(timed_rows)} of {len(mine)}), worst laplace-torch/ours"
            if slower or not missing:
                report(what, measured, "> 1x", slower == 0)
            else:
                why = f"{missing} without a laplace-torch total (failed, or a probe stopped)"
                report(what, measured, "> 1x", None, why)
        exact = [r for r in mine if r.get("prob_diff") is not None]
        why = "laplace-torch failed or was stopped on every exact posterior"
        limit = f"<= {AGREE_TOL:.0e}"
        what = f"{workload} same-prior max |p_ours - p_laplace|, exact posteriors"
        if not exact:
            report(what, None, limit, None, why)
        else:
            worst = max(exact, key=lambda r: r["prob_diff"])
            what += f" [{', '.join(_name(r) for r in exact)}]"
            measured = f"{worst['prob_diff']:.1e} ({_name(worst)})"
            report(what, measured, limit, worst["prob_diff"] <= AGREE_TOL)
        what = f"{workload} tuned log ML ours - laplace-torch, exact posteriors"
        limit = f">= -{LML_SLACK:g} nats"
        gaps = [r for r in mine if r["config"] in EXACT and r.get("lml_gap") is not None]
        if not gaps:
            report(what, None, limit, None, why + " (or not tuned within the cap)")
        else:
            worst = min(gaps, key=lambda r: r["lml_gap"])
            what += f" [{', '.join(_name(r) for r in gaps)}]"
            measured = f"{worst['lml_gap']:+.2f} ({_name(worst)})"
            report(what, measured, limit, worst["lml_gap"] >= -LML_SLACK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--cap", type=float, default=CAP_S, help="seconds per laplace-torch phase (projected)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, 2 threads, load average {os.getloadavg()[0]:.2f}, "
        f"laplace-torch phases capped at {args.cap:.0f} s"
    )
    workloads = args.workloads.split(",")
    records = []
    for workload in workloads:
        records += run(workload, args.quick, args.cap)
    print_targets(workloads, records)


if __name__ == "__main__":
    main()
