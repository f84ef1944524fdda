"""Coalescing concurrent requests into batched predictive calls (asyncio).

Requests wait in a queue; the batcher takes the first, then adds the ones that arrive
within ``max_wait`` seconds while the batch holds at most ``max_batch`` inputs, and runs
the predictor once on all of them in a worker thread (the event loop keeps accepting).
Requests whose inputs cannot be stacked with the batch's (other shapes or keys) start the
next batch; a request larger than ``max_batch`` runs alone. An exception fails only the
requests of its batch: the batch's requests are then run one by one, so that only
the requests whose own inputs fail get the error.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from laplacefim.inputs import batch_size
from laplacefim.serving.scores import BatchScores


def stack_key(x: object) -> tuple[object, ...]:
    """What inputs must share to be stacked: per tensor, its shape less the batch and dtype."""
    if isinstance(x, Tensor):
        return (tuple(x.shape[1:]), x.dtype)
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in x.items())
    raise TypeError(f"inputs must be a tensor or a mapping of tensors, got {type(x).__name__}.")


def concatenate(parts: list[object]) -> object:
    """Stacked inputs (tensors, or mappings of tensors with the same keys)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return torch.cat(parts)  # type: ignore[arg-type]


def rows(scored: BatchScores, start: int, stop: int) -> BatchScores:
    """The rows ``start:stop`` of a batch's scores."""

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[start:stop]

    return BatchScores(
        prediction=scored.prediction[start:stop],
        probabilities=cut(scored.probabilities),
        epistemic_var=cut(scored.epistemic_var),
        aleatoric_var=cut(scored.aleatoric_var),
        scores={k: v[start:stop] for k, v in scored.scores.items()},
        ood_score=scored.ood_score[start:stop],
    )


@dataclass
class _Request:
    x: object
    n: int
    key: tuple[object, ...]
    future: asyncio.Future[BatchScores]


@dataclass
class BatchStats:
    """What the batcher formed: batch sizes in inputs and in requests, and failures."""

    inputs: Counter[int] = field(default_factory=Counter)
    requests: Counter[int] = field(default_factory=Counter)
    failed_batches: int = 0


class MicroBatcher:
    """Runs ``score`` on coalesced requests; see the module docstring.

    Args:
        score: Batched inputs to their scores (called in one worker thread).
        max_batch: Most inputs in one batch.
        max_wait: Longest wait, in seconds, for more requests once one arrived.
    """

    def __init__(
        self, score: Callable[[object], BatchScores], *, max_batch: int, max_wait: float
    ) -> None:
        self.score = score
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="laplacefim")
        self._task: asyncio.Task[None] | None = None
        self._carried: _Request | None = None
        self._closed = False

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        """Finish the queued requests, then stop (later submissions raise)."""
        self._closed = True
        await self._queue.put(None)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, x: object) -> BatchScores:
        """Queue prepared inputs and wait for their scores.

        Raises:
            RuntimeError: After :meth:`stop`, or when the batching loop has ended.
        """
        if self._closed or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running (the server is shutting down).")
        future: asyncio.Future[BatchScores] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(x, batch_size(x), stack_key(x), future))
        return await future

    def _ended(self, task: asyncio.Task[None]) -> None:
        """When the loop ends (stopped, or by a fault), fail whatever still waits."""
        self._closed = True
        error = RuntimeError("the batcher stopped before answering this request.")
        pending: list[_Request | None] = [self._carried]
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for request in pending:
            if request is not None and not request.future.done():
                request.future.set_exception(error)

    async def _next(self, timeout: float | None) -> _Request | None:
        if self._carried is not None:
            request, self._carried = self._carried, None
            return request
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    def _take_nowait(self) -> _Request | None:
        """The carried or next queued request, without waiting (None when there is none)."""
        if self._carried is not None:
            request, self._carried = self._carried, None
            return request
        return None if self._queue.empty() else self._queue.get_nowait()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first is None:  # stopping: answer what was queued behind the sentinel
                await self._drain()
                return
            batch, total = [first], first.n
            deadline = loop.time() + self.max_wait
            stopping = False
            while total < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    request = await self._next(remaining)
                except asyncio.TimeoutError:
                    break
                if request is None:
                    stopping = True
                    break
                if request.key != first.key or total + request.n > self.max_batch:
                    self._carried = request
                    break
                batch.append(request)
                total += request.n
            await self._run(batch, total)
            if stopping:
                await self._drain()
                return

    async def _drain(self) -> None:
        """Run every request still carried or queued, one by one."""
        while (request := self._take_nowait()) is not None or not self._queue.empty():
            if request is not None:
                await self._run([request], request.n)

    async def _run(self, batch: list[_Request], total: int) -> None:
        loop = asyncio.get_running_loop()
        self.stats.inputs[total] += 1
        self.stats.requests[len(batch)] += 1
        try:
            x = concatenate([request.x for request in batch])
            scored = await loop.run_in_executor(self._executor, self.score, x)
        except Exception as error:  # fails this batch's requests only
            self.stats.failed_batches += 1
            if len(batch) > 1:  # run them one by one: only the culprits fail
                for request in batch:
                    await self._run([request], request.n)
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        start = 0
        for request in batch:
            if not request.future.done():
                request.future.set_result(rows(scored, start, start + request.n))
            start += request.n
