"""``laplacefim serve`` and ``laplacefim export``: the command-line side of
:mod:`laplacefim.serving` (see ``docs/serving.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from laplacefim.cli_inputs import CLIError, add_model_arguments, build_model, load_weights
from laplacefim.inputs import ModelIO
from laplacefim.laplace import Laplace
from laplacefim.likelihoods import LIKELIHOODS


def _model_arguments(parser: argparse.ArgumentParser, laplace_required: bool) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--laplace",
        required=laplace_required,
        default=None,
        metavar="LA.pt",
        help="the posterior written by la.save (with its abstention rule, if calibrated)"
        + ("" if laplace_required else "; without it the MAP network is served"),
    )
    parser.add_argument(
        "--x-key", default=None, help="for mapping batches: the key of the inputs (as at fit)"
    )
    parser.add_argument(
        "--call-kwargs", action="store_true", help="call model(**inputs) for mapping inputs"
    )
    parser.add_argument(
        "--output-key", default=None, help="picks the output tensor (e.g. 'logits')"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the model runs (default cpu; e.g. cuda)"
    )


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``serve`` and ``export`` subcommands."""
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="serve predictions with uncertainty over HTTP (extra 'serve')",
        description=(
            "Serve a model and its Laplace posterior over HTTP: POST /v1/predict with "
            '{"inputs": [...]}, GET /v1/metadata, GET /v1/stats, GET /health, OpenAPI at '
            "/openapi.json. Concurrent requests are coalesced into batched predictive calls. "
            "Needs the 'serve' extra: pip install 'laplacefim[serve]'."
        ),
    )
    _model_arguments(serve, laplace_required=False)
    serve.add_argument(
        "--likelihood",
        default=None,
        choices=LIKELIHOODS.names,
        help="without --laplace: the likelihood of the MAP network's outputs",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--max-batch", type=int, default=64, metavar="N", help="inputs per batch (default 64)"
    )
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="longest wait for more requests to batch (default 5)",
    )
    serve.add_argument(
        "--max-inputs", type=int, default=1024, metavar="N", help="inputs per request (1024)"
    )
    serve.add_argument(
        "--max-body-mb", type=float, default=16.0, metavar="MB", help="body size limit (16)"
    )
    serve.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads")

    export = sub.add_parser(
        "export",
        parents=[common],
        help="export the predictive as a torch.export program",
        description=(
            "Write the posterior predictive as a self-contained torch.export program "
            "(torch.export.load(path).module()(x) returns probs / mean and variances) that "
            "runs without laplacefim. --example holds at least two example inputs: an array "
            "X, or, for models that take mappings, one array per key."
        ),
    )
    _model_arguments(export, laplace_required=True)
    export.add_argument(
        "--example", required=True, metavar="X.npz", help="example inputs (array X, or keys)"
    )
    export.add_argument("--out", required=True, metavar="P.pt2", help="the program to write")
    export.add_argument(
        "--method",
        default="glm",
        choices=["glm", "nn"],
        help="glm: probit GLM (last-layer posteriors); nn: fixed weight samples",
    )
    export.add_argument("--n-samples", type=int, default=32, help="weight samples for nn")
    export.add_argument("--seed", type=int, default=0, help="seed of the weight samples")
    export.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads")


def _load(args: argparse.Namespace) -> tuple[nn.Module, Laplace | None]:
    for flag, path in (("--weights", args.weights), ("--laplace", args.laplace)):
        if path is not None and not Path(path).is_file():
            raise CLIError(f"{flag}: file not found: {path!r}.")
    model = build_model(args.model)
    load_weights(model, args.weights, args.model)
    model.to(args.device)
    if args.laplace is None:
        return model, None
    la = Laplace.load(
        args.laplace,
        model,
        map_location=args.device,
        x_key=args.x_key,
        call_kwargs=args.call_kwargs,
        output_key=args.output_key,
    )
    return model, la


def run_serve_command(args: argparse.Namespace) -> int:
    """``laplacefim serve``: load, build the app, run uvicorn until interrupted."""
    try:
        import uvicorn

        from laplacefim.serving.server import create_app
    except ModuleNotFoundError as error:
        raise CLIError(
            f"laplacefim serve needs the 'serve' extra ({error}); install it with "
            "pip install 'laplacefim[serve]'."
        ) from None
    from laplacefim.serving import Predictor

    for flag, value in (("--max-batch", args.max_batch), ("--max-inputs", args.max_inputs)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}.")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        raise CLIError("--max-wait-ms must be >= 0 and --max-body-mb > 0.")
    model, la = _load(args)
    if la is None and args.likelihood is None:
        raise CLIError("without --laplace, pass --likelihood (the MAP network's outputs).")
    io = ModelIO(args.x_key, None, args.call_kwargs, args.output_key)
    predictor = Predictor(model, la, batch_size=args.max_batch, likelihood=args.likelihood, io=io)
    app = create_app(
        predictor,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_inputs=args.max_inputs,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _example(path: str, model: nn.Module, device: str) -> object:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:
        raise CLIError(f"--example {path}: cannot read it as an .npz archive ({error}).") from None
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)

    def tensor(array: np.ndarray) -> torch.Tensor:
        value = torch.from_numpy(array)
        if value.dtype.is_floating_point and dtype is not None:
            value = value.to(dtype)
        return value.to(device)

    if list(arrays) == ["X"]:
        return tensor(arrays["X"])
    if not arrays:
        raise CLIError(f"--example {path}: the archive holds no arrays.")
    return {key: tensor(array) for key, array in arrays.items()}


def run_export_command(args: argparse.Namespace) -> int:
    """``laplacefim export``: load, export the predictive, say where it went."""
    model, la = _load(args)
    if la is None:  # --laplace is required by the parser
        raise CLIError("--laplace is required.")
    example = _example(args.example, model, args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    la.export(args.out, example, method=args.method, n_samples=args.n_samples, generator=generator)
    print(f"Wrote {Path(args.out).resolve()} ({args.method} predictive of {la!r}).")
    return 0
