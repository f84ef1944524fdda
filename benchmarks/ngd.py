"""Natural-gradient fine-tuning benchmark: epochs, steps and wall time to a target NLL.

Both workloads of ``_workloads.py`` (W1: MLP 64-256-256-10; W2: conv16-conv32-linear CNN)
start from the same partly trained checkpoint: a seeded initialisation followed by one
epoch of plain SGD (lr 0.05, batch 64) on the 1,400 training digits. From there each
optimizer fine-tunes on mean cross-entropy with batch 64, visiting the data in the same
seeded order, and the validation NLL on the 397 held-out digits is measured every quarter
epoch (evaluation time is not counted in the wall time).

Target: the validation NLL that Adam with lr 1e-3 (the workloads' training setting)
reaches after 10 epochs from the checkpoint. It is measured first, in the same run, so it
is reachable by construction for that Adam run; every other run stops when it gets
there, or at its epoch/time cap. Issue 14's target, printed per workload as a ``target:``
line: NGD-KFAC gets there in no more wall time than the fastest SGD or Adam run.

Optimizers: SGD with momentum 0.9 and Adam, each over a grid of four learning rates
(the best of the grid is reported first, all runs are listed); ``laplacefim``'s
``NaturalGradient`` with KFAC and with diagonal curvature (``curvature="fisher"``: MC
labels, one extra backward) at a couple of (lr, damping) settings; and ASDL's K-FAC
(``KfacGradientMaker``, MC Fisher, plain SGD on its preconditioned gradient) if
``.venv-bench`` has it, run there in a subprocess (skipped otherwise). An NGD setting reads
``lr λ kl update/decompose``: learning rate, damping, KL clip and the two intervals.

Usage (repository root)::

    .venv/bin/python benchmarks/ngd.py            # full run, capped at about 8 minutes
    .venv/bin/python benchmarks/ngd.py --quick    # smoke run, under a minute
    .venv/bin/python benchmarks/ngd.py --workloads W1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see fit.py: sane timings under load
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _targets import target_line
from _workloads import TRAIN_BATCH, _shape_inputs, build_model, load_digits_split
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
THREADS = 2
WARM_LR = 0.05  # the one epoch of SGD that makes the checkpoint
REF_LR = 1e-3  # Adam at the workloads' training lr defines the target ...
REF_EPOCHS = 10  # ... after this many epochs
EVALS_PER_EPOCH = 4
MAX_EPOCHS = 15  # cap for every other run
RUN_CAP_S = 25.0  # wall-time cap per run (training time only)
TOTAL_CAP_S = 460.0  # stop starting new runs after this (~8 minutes with overhead)

SGD_LRS = (0.01, 0.03, 0.1, 0.3)
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
# (lr, damping λ, kl_clip, update_interval, decompose_interval). The solve is
# (F̄ + λ/N) d = g with F̄ per datum and N = 1,400, so λ = 1.4 is a per-datum shift 1e-3.
# The KL clip (as in kfac-pytorch) bounds lr² dᵀg; without it a damping small enough to
# let the curvature act makes the first steps, taken on one batch's statistics, too long.
NGD_KFAC = (
    (0.3, 1.4, 1e-2, 1, 10),
    (0.3, 1.4, 1e-2, 2, 40),
    (0.3, 0.14, 1e-3, 4, 40),
    (0.3, 1.4, 1e-2, 10, 100),  # amortised: statistics every 10 steps, eigenbases every 100
)
NGD_DIAG = ((0.3, 1.4, 1e-3, 1, 10), (0.3, 1.4, 1e-2, 1, 10))
ASDL_KFAC = ((0.1, 0.1), (0.3, 0.1))  # (lr, damping as ASDL adds it; 1e-3 gave NaN)
ASDL_INTERVAL = 10


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    workload: str
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor

    @property
    def n(self) -> int:
        return len(self.y)


def load(workload: str) -> Data:
    x, y, x_val, y_val = load_digits_split()
    return Data(workload, _shape_inputs(workload, x), y, _shape_inputs(workload, x_val), y_val)


def batches(data: Data, epoch: int) -> list[Tensor]:
    """Index batches of one epoch: the same seeded order for every optimizer."""
    gen = torch.Generator().manual_seed(SEED + 1000 + epoch)
    return list(torch.randperm(data.n, generator=gen).split(TRAIN_BATCH))


def checkpoint(workload: str, data: Data) -> dict[str, Tensor]:
    """Seeded initialisation plus one epoch of plain SGD; the global RNG is restored."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = build_model(workload)
    opt = torch.optim.SGD(model.parameters(), lr=WARM_LR)
    for idx in batches(data, -1):
        opt.zero_grad()
        F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(data.x_val)
        nll = F.cross_entropy(logits, data.y_val).item()
        acc = (logits.argmax(-1) == data.y_val).float().mean().item()
    return nll, acc


# --------------------------------------------------------------------------- one run
@dataclass
class Result:
    method: str
    setting: str
    epochs_to_target: float | None = None
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    epochs_run: float = 0.0
    seconds_run: float = 0.0
    final_nll: float = math.nan
    final_acc: float = math.nan
    best_nll: float = math.inf
    curve: list[tuple[float, float]] = field(default_factory=list)
    note: str = ""


Stepper = Callable[[Tensor, Tensor], None]


def run(
    name: str,
    setting: str,
    make: Callable[[nn.Module, Data], Stepper],
    workload: str,
    data: Data,
    state: dict[str, Tensor],
    target: float | None,
    max_epochs: int,
    cap_s: float,
) -> Result:
    """Train from the checkpoint until the validation NLL is <= target (or a cap)."""
    model = build_model(workload)
    model.load_state_dict(state)
    model.train()
    step_fn = make(model, data)
    result = Result(name, setting)
    steps, seconds = 0, 0.0
    per_epoch = math.ceil(data.n / TRAIN_BATCH)
    every = max(1, per_epoch // EVALS_PER_EPOCH)
    done = False
    for epoch in range(max_epochs):
        for i, idx in enumerate(batches(data, epoch)):
            start = time.perf_counter()
            step_fn(data.x[idx], data.y[idx])
            seconds += time.perf_counter() - start
            steps += 1
            if (i + 1) % every == 0 or i + 1 == per_epoch:
                nll, acc = evaluate(model, data)
                position = epoch + (i + 1) / per_epoch
                result.curve.append((round(position, 3), nll))
                result.final_nll, result.final_acc = nll, acc
                result.best_nll = min(result.best_nll, nll)
                if not math.isfinite(nll):
                    result.note = "diverged"
                    done = True
                elif target is not None and nll <= target and result.steps_to_target is None:
                    result.epochs_to_target = position
                    result.steps_to_target = steps
                    result.seconds_to_target = seconds
                    done = True
                if seconds > cap_s:
                    result.note = result.note or f"time cap {cap_s:.0f}s"
                    done = True
            if done:
                break
        result.epochs_run = epoch + (i + 1) / per_epoch
        if done:
            break
    result.seconds_run = seconds
    return result


# --------------------------------------------------------------------------- optimizers
def plain(kind: str, lr: float) -> Callable[[nn.Module, Data], Stepper]:
    def make(model: nn.Module, data: Data) -> Stepper:
        if kind == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=lr)

        def step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    return make


def natural(
    structure: str, lr: float, damping: float, kl_clip: float, update: int, decompose: int
) -> Callable[[nn.Module, Data], Stepper]:
    from laplacefim.optim import NaturalGradient

    def make(model: nn.Module, data: Data) -> Stepper:
        ngd = NaturalGradient(
            model,
            "classification",
            n_data=data.n,
            structure=structure,
            curvature="fisher",
            damping=damping,
            lr=lr,
            kl_clip=kl_clip,
            update_interval=update,
            decompose_interval=decompose,
        )
        gen = torch.Generator().manual_seed(SEED + 7)

        def step(x: Tensor, y: Tensor) -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            ngd.step(x, y, generator=gen)

        return step

    return make


# --------------------------------------------------------------------------- ASDL
def asdl_worker(workload: str, target: float, settings: str, max_epochs: int, cap: float) -> None:
    """Runs inside .venv-bench: ASDL K-FAC from the same checkpoint; prints JSON lines."""
    from asdl import KfacGradientMaker, PreconditioningConfig

    # ASDL brackets its work in NVTX ranges, which a CPU-only torch refuses; make them no-ops.
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None

    data = load(workload)
    state = checkpoint(workload, data)
    for lr, damping in json.loads(settings):

        def make(model: nn.Module, data: Data, lr: float = lr, damping: float = damping) -> Stepper:
            config = PreconditioningConfig(
                data_size=TRAIN_BATCH,
                damping=damping,
                preconditioner_upd_interval=ASDL_INTERVAL,
                curvature_upd_interval=1,
                ema_decay=0.05,  # ASDL weighs the *new* statistics by ema_decay
            )
            maker = KfacGradientMaker(model, config, fisher_type="fisher_mc")
            opt = torch.optim.SGD(model.parameters(), lr=lr)

            def step(x: Tensor, y: Tensor) -> None:
                opt.zero_grad(set_to_none=True)
                dummy = maker.setup_model_call(model, x)
                maker.setup_loss_call(F.cross_entropy, dummy, y)
                maker.forward_and_backward()
                opt.step()

            return step

        try:
            result = run(
                "asdl-kfac",
                f"lr={lr:g} damping={damping:g}",
                make,
                workload,
                data,
                state,
                target,
                max_epochs,
                cap,
            )
        except Exception as err:  # report, do not crash the whole benchmark
            first = str(err).splitlines()[0][:80]
            result = Result("asdl-kfac", f"lr={lr:g} damping={damping:g}", note=f"error: {first}")
        print(json.dumps(asdict(result)), flush=True)


def asdl_runs(
    workload: str, target: float, settings: tuple, max_epochs: int, cap: float, budget: float
) -> list[Result]:
    python = ROOT / ".venv-bench" / "bin" / "python"
    if not python.exists():
        return [Result("asdl-kfac", "-", note="skipped: no .venv-bench")]
    probe = subprocess.run(
        [str(python), "-c", "import asdl; from asdl import KfacGradientMaker"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return [Result("asdl-kfac", "-", note="skipped: asdl does not import in .venv-bench")]
    command = [
        str(python),
        __file__,
        "--asdl-worker",
        workload,
        "--target",
        repr(target),
        "--settings",
        json.dumps(settings),
        "--max-epochs",
        str(max_epochs),
        "--cap",
        str(cap),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=budget, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        return [Result("asdl-kfac", "-", note=f"skipped: over its {budget:.0f}s budget")]
    results = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            results.append(Result(**json.loads(line)))
    if not results:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [Result("asdl-kfac", "-", note=f"skipped: {tail[:100]}")]
    return results


# --------------------------------------------------------------------------- report
def fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0].rstrip("df") or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    head = (
        f"{'method':<12} {'setting':<30} {'epochs':>7} {'steps':>6} {'wall s':>7} "
        f"{'run ep':>7} {'run s':>6} {'final NLL':>9} {'best NLL':>9} {'acc':>6}  note"
    )
    lines = [
        "all runs (epochs/steps/wall s: to the target; run ep/run s: the whole run)",
        head,
        "-" * len(head),
    ]
    for r in results:
        lines.append(
            f"{r.method:<12} {r.setting:<30} {fmt(r.epochs_to_target, '7.2f')} "
            f"{fmt(r.steps_to_target, '6d')} {fmt(r.seconds_to_target, '7.2f')} "
            f"{r.epochs_run:7.2f} {r.seconds_run:6.2f} {r.final_nll:9.4f} {r.best_nll:9.4f} "
            f"{r.final_acc:6.3f}  {r.note}"
        )
    return "\n".join(lines)


def best(results: list[Result], method: str) -> Result | None:
    """The run of ``method`` that got to the target in the least wall time."""
    mine = [r for r in results if r.method == method]
    hit = [r for r in mine if r.seconds_to_target is not None]
    if hit:
        return min(hit, key=lambda r: r.seconds_to_target)  # type: ignore[arg-type, return-value]
    return min(mine, key=lambda r: r.best_nll) if mine else None


def summary(results: list[Result], workload: str) -> str:
    """Per method: the run with the fewest epochs to the target and the fastest one."""
    methods = ("sgd", "adam", "ngd-kfac", "ngd-diag", "asdl-kfac")
    fewest: dict[str, Result] = {}
    fastest: dict[str, Result] = {}
    for method in methods:
        hit = [r for r in results if r.method == method and r.epochs_to_target is not None]
        if hit:
            fewest[method] = min(hit, key=lambda r: (r.epochs_to_target, r.seconds_to_target))
            fastest[method] = min(hit, key=lambda r: r.seconds_to_target)
    lines = [f"{'method':<10} {'fewest epochs (setting)':<44} {'fastest wall s (setting)':<44}"]
    for method in methods:
        if method not in fewest:
            if any(r.method == method for r in results):
                lines.append(f"{method:<10} target not reached")
            continue
        e, t = fewest[method], fastest[method]
        epochs = f"{e.epochs_to_target:.2f} ep, {e.steps_to_target} st ({e.setting})"
        seconds = f"{t.seconds_to_target:.2f} s ({t.setting})"
        lines.append(f"{method:<10} {epochs:<44} {seconds:<44}")
    plain = [fastest[o] for o in ("sgd", "adam") if o in fastest]
    best_plain = min(plain, key=lambda r: r.seconds_to_target) if plain else None  # type: ignore[arg-type, return-value]
    for ngd in ("ngd-kfac", "ngd-diag"):
        if ngd not in fewest:
            lines.append(f"{ngd}: did not reach the target")
            continue
        others = [fewest[o].epochs_to_target for o in ("sgd", "adam") if o in fewest]
        fewer = all(fewest[ngd].epochs_to_target < o for o in others)  # type: ignore[operator]
        lines.append(f"{ngd}: fewer epochs than the best SGD and Adam: {'yes' if fewer else 'NO'}")
    ngd = fastest.get("ngd-kfac")
    what = f"{workload} NGD-KFAC wall time to the target NLL"
    if ngd is None or best_plain is None:
        why = "NGD-KFAC did not reach the target" if ngd is None else "no SGD/Adam run did"
        lines.append(target_line(what, None, "<= the best of SGD and Adam", None, why))
    else:
        limit = (
            f"<= {best_plain.seconds_to_target:.2f} s ({best_plain.method} {best_plain.setting})"
        )
        met = ngd.seconds_to_target <= best_plain.seconds_to_target  # type: ignore[operator]
        lines.append(target_line(what, f"{ngd.seconds_to_target:.2f} s", limit, met))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--quick", action="store_true", help="smoke run: one setting each")
    parser.add_argument("--no-asdl", action="store_true")
    parser.add_argument("--asdl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--max-epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.asdl_worker:
        asdl_worker(args.asdl_worker, args.target, args.settings, args.max_epochs, args.cap)
        return

    quick = args.quick
    ref_epochs = 2 if quick else REF_EPOCHS
    max_epochs = 3 if quick else MAX_EPOCHS
    cap = 5.0 if quick else RUN_CAP_S
    grids = {
        "sgd": SGD_LRS[2:3] if quick else SGD_LRS,
        "adam": ADAM_LRS[1:2] if quick else ADAM_LRS,
        "ngd-kfac": NGD_KFAC[:1] if quick else NGD_KFAC,
        "ngd-diag": NGD_DIAG[:1] if quick else NGD_DIAG,
        "asdl": ASDL_KFAC[:1] if quick else ASDL_KFAC,
    }
    workloads = args.workloads.split(",")
    total_start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
        + (" [--quick]" if quick else "")
    )
    for workload in workloads:
        data = load(workload)
        state = checkpoint(workload, data)
        model = build_model(workload)
        model.load_state_dict(state)
        nll0, acc0 = evaluate(model, data)
        print(
            f"\n=== {workload}: {sum(p.numel() for p in model.parameters()):,} parameters; "
            f"checkpoint (1 epoch SGD lr {WARM_LR}): val NLL {nll0:.4f}, acc {acc0:.3f}"
        )
        reference = run(
            "adam",
            f"lr={REF_LR:g}",
            plain("adam", REF_LR),
            workload,
            data,
            state,
            None,
            ref_epochs,
            10 * cap,
        )
        target = reference.final_nll
        print(
            f"target: val NLL {target:.4f} = Adam lr {REF_LR:g} after {ref_epochs} epochs "
            f"(its best on the way: {reference.best_nll:.4f}); caps: {max_epochs} epochs, "
            f"{cap:.0f}s per run",
            flush=True,
        )
        results: list[Result] = []
        plans: list[tuple[str, str, Callable[[nn.Module, Data], Stepper]]] = []
        plans += [("sgd", f"lr={lr:g} mom=0.9", plain("sgd", lr)) for lr in grids["sgd"]]
        plans += [("adam", f"lr={lr:g}", plain("adam", lr)) for lr in grids["adam"]]
        plans += [
            ("ngd-kfac", f"lr={lr:g} λ={d:g} kl={k:g} {u}/{i}", natural("kron", lr, d, k, u, i))
            for lr, d, k, u, i in grids["ngd-kfac"]
        ]
        plans += [
            ("ngd-diag", f"lr={lr:g} λ={d:g} kl={k:g} {u}/{i}", natural("diag", lr, d, k, u, i))
            for lr, d, k, u, i in grids["ngd-diag"]
        ]
        share = TOTAL_CAP_S / len(workloads)
        for name, setting, make in plans:
            elapsed = time.perf_counter() - total_start
            if elapsed > share * (workloads.index(workload) + 1):
                results.append(Result(name, setting, note="skipped: total time cap"))
                continue
            result = run(name, setting, make, workload, data, state, target, max_epochs, cap)
            results.append(result)
            print(f"  {name:<9} {setting:<30} done", file=sys.stderr, flush=True)
        if not args.no_asdl:
            remaining = share * (workloads.index(workload) + 1) - (
                time.perf_counter() - total_start
            )
            if remaining > 15:
                results += asdl_runs(
                    workload, target, grids["asdl"], max_epochs, cap, remaining + 20
                )
            else:
                results.append(Result("asdl-kfac", "-", note="skipped: total time cap"))
        print(table(results))
        print(summary(results, workload), flush=True)
    print(f"\ntotal wall time {time.perf_counter() - total_start:.0f}s")


if __name__ == "__main__":
    main()
