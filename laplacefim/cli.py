"""The ``laplacefim`` command line: ``demo``, ``evaluate``, ``serve`` and ``export``.

``demo`` trains a small MLP on scikit-learn's digits and compares MAP with three Laplace
posteriors under rotation and on out-of-distribution inputs; ``evaluate`` runs the same
evaluation for your own model, weights and data (``serve`` and ``export`` are in
:mod:`laplacefim.cli_serving`). ``demo`` and ``evaluate`` print a table (or, with
``--json``, only the JSON report) and write ``report.json`` and PNG plots into ``--out``.
Errors in the inputs end the program with exit status 1 and a message on stderr (the
traceback only with ``--debug``); usage errors exit with status 2. See ``docs/cli.md``.

Example:
    $ laplacefim demo --out demo-out
    $ laplacefim evaluate --model models.py:make_net --weights net.pt --data data.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from laplacefim import cli_serving
from laplacefim import evaluation as ev
from laplacefim import report as report_io
from laplacefim._version import __version__
from laplacefim.cli_inputs import (
    CLIError,
    add_model_arguments,
    build_model,
    load_data,
    load_ood,
    load_weights,
)
from laplacefim.options import CurvatureKind
from laplacefim.structures import STRUCTURES

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

DEFAULT_DEMO_OUT = "laplacefim-demo"
DEFAULT_EVAL_OUT = "laplacefim-eval"


# The likelihoods whose target arrays `laplacefim evaluate` knows how to check.
LIKELIHOODS_CLI = ("classification", "regression", "binary")


def _values(enum: Any) -> list[str]:
    return [member.value for member in enum]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``laplacefim`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print only the JSON report on stdout (no table)"
    )
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    parser = argparse.ArgumentParser(
        prog="laplacefim",
        description="Calibrated uncertainty for trained PyTorch models (Laplace / Fisher).",
    )
    parser.add_argument("--version", action="version", version=f"laplacefim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,evaluate,serve,export}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="MAP vs Laplace on scikit-learn's digits, under rotation and OOD",
        description=(
            "Train an MLP on scikit-learn's bundled digits (no download), fit last-layer "
            "KFAC, all-weights KFAC and all-weights diagonal Laplace posteriors with priors "
            "tuned by marginal likelihood, and compare them with MAP on the clean test "
            "split, on rotated test digits and on out-of-distribution images. Writes "
            "report.json, reliability.png and shift_curves.png into --out."
        ),
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_DEMO_OUT,
        metavar="DIR",
        help=f"output folder (default: ./{DEFAULT_DEMO_OUT})",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a tiny setting (small MLP, few epochs, data subset) for tests",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch CPU threads (default 1: the demo's matrices are small, and one thread "
        "does not oversubscribe a busy machine)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the split, initialisation, batches and OOD noise (default 0)",
    )

    evaluate = sub.add_parser(
        "evaluate",
        parents=[common],
        help="evaluate MAP vs Laplace for your own model and data",
        description=(
            "Fit a Laplace posterior to your trained model (prior tuned by marginal "
            "likelihood) and compare it with the MAP model on your test data: accuracy, "
            "NLL, ECE and Brier (classification, binary) or Gaussian NLL, CRPS, 90% "
            "coverage and RMSE (regression); OOD AUROC with --ood. The data file holds "
            "arrays X_train, y_train, X_test, y_test; the OOD file an array X."
        ),
    )
    add_model_arguments(evaluate)
    evaluate.add_argument(
        "--data", required=True, metavar="FILE.npz", help="arrays X_train, y_train, X_test, y_test"
    )
    evaluate.add_argument(
        "--ood",
        default=None,
        metavar="FILE.npz",
        help="out-of-distribution inputs: an array X (classification, binary)",
    )
    evaluate.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's own choice)",
    )
    evaluate.add_argument("--likelihood", default="classification", choices=list(LIKELIHOODS_CLI))
    evaluate.add_argument("--subset", default="all", choices=["all", "last_layer"])
    evaluate.add_argument("--structure", default="kron", choices=STRUCTURES.names)
    evaluate.add_argument("--curvature", default="ggn", choices=_values(CurvatureKind))
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=256,
        metavar="N",
        help="batch size of the curvature fit (default 256)",
    )
    evaluate.add_argument(
        "--out",
        default=DEFAULT_EVAL_OUT,
        metavar="DIR",
        help=f"output folder (default: ./{DEFAULT_EVAL_OUT})",
    )
    cli_serving.add_parsers(sub, common)
    return parser


def _write_outputs(report: dict[str, Any], out: str, plot: Any) -> None:
    """Write the plots (skipped with a warning without matplotlib) and report.json."""
    try:
        report["files"] = {"report": "report.json", **plot(out)}
    except ModuleNotFoundError as error:
        print(f"laplacefim: warning: plots skipped: {error}", file=sys.stderr)
        report["files"] = {"report": "report.json"}
    report_io.write_report(report, out)


def _emit(report: dict[str, Any], as_json: bool, out: str) -> None:
    if as_json:
        sys.stdout.write(report_io.dumps(report) + "\n")
    else:
        print(report_io.format_report(report))
        print(f"\nWrote {', '.join(report['files'].values())} to {Path(out).resolve()}")


def run_demo_command(args: argparse.Namespace) -> int:
    """``laplacefim demo``: run the digits demo, print and write its report."""
    from laplacefim.demo import DemoConfig, run_demo, write_plots

    start = time.perf_counter()
    config = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    result = run_demo(config)
    report = result.report

    def plot(out: str) -> dict[str, str]:
        return write_plots(result, out)

    _write_outputs(report, args.out, plot)
    report["timings"]["wall_s"] = time.perf_counter() - start
    report_io.write_report(report, args.out)
    _emit(report, args.json, args.out)
    return EXIT_OK


def run_evaluate_command(args: argparse.Namespace) -> int:
    """``laplacefim evaluate``: load the user's model and data, evaluate, report."""
    start = time.perf_counter()
    likelihood = args.likelihood
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}.")
    for flag, path in (("--weights", args.weights), ("--data", args.data), ("--ood", args.ood)):
        if path is not None and not Path(path).is_file():
            raise CLIError(f"{flag}: file not found: {path!r}.")
    if args.ood is not None and likelihood == "regression":
        raise CLIError(
            "--ood applies to classification and binary likelihoods, not to regression; drop --ood."
        )
    model = build_model(args.model)
    load_weights(model, args.weights, args.model)
    data = load_data(args.data, model, likelihood)
    ood = load_ood(args.ood, data) if args.ood is not None else None
    result = ev.evaluate_model(
        model,
        data,
        likelihood,
        ood,
        subset=args.subset,
        structure=args.structure,
        curvature=args.curvature,
        batch_size=args.batch_size,
    )
    report = result.report
    report["config"].update(
        {"model": args.model, "weights": args.weights, "data": args.data, "ood": args.ood}
    )

    def plot(out: str) -> dict[str, str]:
        return report_io.write_eval_plots(result, out)

    _write_outputs(report, args.out, plot)
    report["timings"]["wall_s"] = time.perf_counter() - start
    report_io.write_report(report, args.out)
    _emit(report, args.json, args.out)
    return EXIT_OK


# ----------------------------------------------------------------------------- evaluate inputs
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``laplacefim`` with ``argv`` (``sys.argv[1:]`` by default); return the exit status.

    Args:
        argv: Command-line arguments, without the program name.

    Returns:
        0 on success, 1 for an error in the inputs or the run, 2 for a usage error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 0 for --help and 2 for usage errors
        return int(exit_.code) if isinstance(exit_.code, int) else EXIT_USAGE
    if args.threads is not None:
        if args.threads < 1:
            print(
                f"laplacefim {args.command}: error: --threads must be >= 1, got {args.threads}.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        torch.set_num_threads(args.threads)
    command = {
        "demo": run_demo_command,
        "evaluate": run_evaluate_command,
        "serve": cli_serving.run_serve_command,
        "export": cli_serving.run_export_command,
    }[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("laplacefim: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        known = isinstance(error, CLIError | ValueError | TypeError | OSError)
        kind = "error" if known else f"unexpected error ({type(error).__name__})"
        print(f"laplacefim {args.command}: {kind}: {error}", file=sys.stderr)
        if not known:
            print("Run again with --debug for the traceback.", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
