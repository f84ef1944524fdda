"""The HTTP server of ``laplacefim serve``: FastAPI on uvicorn (the ``serve`` extra).

Why FastAPI + uvicorn rather than LitServe: the posterior's predictive hooks the model, so
one process must own the model and the posterior and serialise calls on it; LitServe runs
its workers as separate processes behind queues, each loading its own copy, and its
batching fails a whole batch on one bad input. Here requests are validated one by one
before they are coalesced (:mod:`laplacefim.serving.batcher`), so a bad input is a 4xx for
its own request only, and FastAPI publishes the OpenAPI schema at ``/openapi.json``.

Endpoints: ``POST /v1/predict`` (``{"inputs": [...]}`` → ``{"results": [...]}``, one per
input), ``GET /v1/metadata``, ``GET /v1/stats`` (the batch sizes formed), ``GET /health``.
Every error is ``{"error": "<one line>"}`` with a 4xx (the request) or 5xx (the server).
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from laplacefim.serving.batcher import MicroBatcher
from laplacefim.serving.predictor import InputError, Predictor

Nested = float | list[Any]


class PredictRequest(BaseModel):
    """The body of ``POST /v1/predict``."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Nested | dict[str, Nested]]


class Variance(BaseModel):
    """Predictive variance per output (regression)."""

    epistemic: list[float]
    aleatoric: list[float]
    total: list[float]


class Result(BaseModel):
    """The answer for one input (see :class:`laplacefim.serving.InputResult`)."""

    prediction: int | list[float]
    probabilities: list[float] | None = None
    variance: Variance | None = None
    uncertainty: dict[str, float]
    ood_score: float
    abstain: bool | None


class PredictResponse(BaseModel):
    """The body of a successful ``POST /v1/predict``: one result per input, in order."""

    results: list[Result]


class ErrorResponse(BaseModel):
    """Every error: one line that says what was wrong."""

    error: str


class _RejectedError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return f"unknown field {where!r}; the body takes only 'inputs'."
    if first["type"] == "missing":
        return f'missing field {where!r}; send {{"inputs": [...]}}.'
    return f"{where}: {first['msg']}."


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _RejectedError(413, f"the body has {declared} bytes; the limit is {limit}.")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise _RejectedError(413, f"the body exceeds the limit of {limit} bytes.")
    return bytes(body)


def create_app(
    predictor: Predictor,
    *,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    max_inputs: int = 1024,
    max_body_bytes: int = 16 * 1024 * 1024,
) -> FastAPI:
    """The FastAPI application serving ``predictor``.

    Args:
        predictor: The predictor (it owns the model and the posterior).
        max_batch: Most inputs coalesced into one predictive call.
        max_wait_ms: Longest wait for more requests once one arrived, in milliseconds.
        max_inputs: Most inputs in one request (more: 413).
        max_body_bytes: Largest request body (more: 413).

    Returns:
        The application; run it with ``uvicorn.run(app, ...)``.
    """
    batcher = MicroBatcher(predictor.score, max_batch=max_batch, max_wait=max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything loaded so far (torch, the model, the posterior) lives as long as the
        # server: freezing it keeps the collector from rescanning it, which otherwise
        # stalls a request for 100-200 ms now and then (the p99 latency).
        gc.collect()
        gc.freeze()
        batcher.start()
        yield
        await batcher.stop()  # after uvicorn has finished the in-flight requests

    app = FastAPI(
        title="laplacefim",
        summary="Predictions with calibrated uncertainty from a Laplace posterior.",
        version=str(predictor.metadata()["version"]),
        lifespan=lifespan,
    )
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 413, 422, 500)
    }

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(request: Request) -> JSONResponse:
        """Predictions for the inputs, one result per input, in order."""
        try:
            body = await _read_body(request, max_body_bytes)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise _RejectedError(400, f"the body is not valid JSON ({error}).") from None
            try:
                parsed = PredictRequest.model_validate(payload)
            except ValidationError as error:
                raise _RejectedError(422, _validation_message(error)) from None
            if len(parsed.inputs) > max_inputs:
                raise _RejectedError(
                    413, f"{len(parsed.inputs)} inputs in one request; the limit is {max_inputs}."
                )
            try:
                x = predictor.prepare(parsed.inputs)
            except InputError as error:
                raise _RejectedError(422, str(error)) from None
        except _RejectedError as rejected:
            return _error(rejected.status, rejected.message)
        try:
            scored = await batcher.submit(x)
        except Exception as error:  # the inputs passed the checks: the fault is ours
            return _error(500, f"prediction failed: {type(error).__name__}: {error}")
        results = [r.to_dict() for r in predictor.results(scored)]
        try:
            return JSONResponse({"results": results})
        except ValueError:  # JSON has no NaN: a number we cannot stand behind
            return _error(500, "the prediction is not finite (NaN or infinite); not served.")

    @app.get("/v1/metadata")
    async def metadata() -> dict[str, Any]:
        """What is served: likelihood, posterior, prior, abstention rule, limits, version."""
        return {
            **predictor.metadata(),
            "server": {
                "max_batch": max_batch,
                "max_wait_ms": max_wait_ms,
                "max_inputs": max_inputs,
                "max_body_bytes": max_body_bytes,
            },
        }

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """The batches formed so far: how many of each size, in inputs and in requests."""
        formed = batcher.stats
        return {
            "batches": sum(formed.inputs.values()),
            "inputs_per_batch": {str(k): v for k, v in sorted(formed.inputs.items())},
            "requests_per_batch": {str(k): v for k, v in sorted(formed.requests.items())},
            "failed_batches": formed.failed_batches,
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness."""
        return {"status": "ok"}

    return app
