"""Micro-batching for the reward server: concurrent score requests merged into one reward call, one call at a time,
each request answered with exactly its own scores.

A reward model wants big batches, while trainers send theirs concurrently and of any size. :class:`MicroBatcher`
queues the requests and runs one reward call after another in a single worker thread (rewards are not assumed
thread-safe, and the event loop stays free to take requests meanwhile):

- **What shares a call** (:func:`next_call`): the oldest waiting request, and after it, in order, every waiting
  request with the same field names whose responses still fit in ``max_batch_size``. Fields are concatenated per
  name, so requests with different field names never share a call. The oldest request always goes next: none
  starves.
- **When a call starts**: when the requests of the oldest one's kind fill ``max_batch_size``, or ``max_wait_s``
  after the oldest one arrived. Requests that waited while the previous call ran are past their wait already and go
  at once, merged: under load the batches grow by themselves; ``max_wait_s`` only matters when the worker is idle.
- **Errors**: when a merged call raises, each of its requests is scored again alone, so a request that breaks the
  reward gets its own error and the others their scores (at the cost of one call per request of the failed batch).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

ScoreFn = Callable[[list[str], list[str], dict[str, list[Any]]], list[float]]
"""``(prompts, responses, fields) -> scores``, one float per response: what the worker thread runs."""


@dataclass
class ScoreRequest:
    """One request waiting to be scored."""

    prompts: list[str]
    responses: list[str]
    fields: dict[str, list[Any]]
    answer: asyncio.Future[list[float]]
    """Resolved with the request's scores, or with the error its reward call raised."""
    arrived: float
    """``loop.time()`` when it was queued."""

    @property
    def kind(self) -> frozenset[str]:
        """Its field names: only requests of one kind share a reward call."""
        return frozenset(self.fields)


def next_call(pending: deque[ScoreRequest], max_batch_size: int) -> list[ScoreRequest]:
    """Remove and return the requests of the next reward call: the oldest, then every later one of its kind whose
    responses still fit in ``max_batch_size`` responses in all (a request too big to fit is left for a later call).

    Example: waiting sizes and field names ``[3 {a}, 2 {b}, 4 {a}, 2 {a}]`` with ``max_batch_size=6`` give the call
    ``[3 {a}, 2 {a}]`` (3 + 4 > 6, 3 + 2 = 5) and leave ``[2 {b}, 4 {a}]``.
    """
    first = pending.popleft()
    call, size, kept = [first], len(first.responses), deque()
    while pending:
        request = pending.popleft()
        if request.kind == first.kind and size + len(request.responses) <= max_batch_size:
            call.append(request)
            size += len(request.responses)
        else:
            kept.append(request)
    pending.extend(kept)
    return call


def merge(requests: Sequence[ScoreRequest]) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    """The requests' prompts, responses and fields (per name) concatenated in order; all of one kind."""
    prompts = [p for r in requests for p in r.prompts]
    responses = [x for r in requests for x in r.responses]
    fields = {name: [v for r in requests for v in r.fields[name]] for name in requests[0].fields}
    return prompts, responses, fields


class MicroBatcher:
    """Scores requests with ``score_fn`` in one worker thread, merging concurrent ones (see the module docstring).

    Args:
        score_fn: ``(prompts, responses, fields) -> scores``; may raise, the error reaches the requests it scored.
        max_batch_size: most responses in one call; a single request must not hold more.
        max_wait_s: how long the oldest request waits for others to join its call while the worker is idle.
        merge: False scores every request in a call of its own (still one call at a time).
    """

    def __init__(self, score_fn: ScoreFn, max_batch_size: int, max_wait_s: float, merge: bool = True) -> None:
        self.score_fn = score_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.merge = merge
        self.calls = 0
        """Reward calls made so far."""
        self.worker: ThreadPoolExecutor | None = None
        self._pending: deque[ScoreRequest] = deque()
        self._wake = asyncio.Event()  # made again by start(): an event belongs to the loop that first waits on it
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker thread and the loop that feeds it; call from the event loop that will serve requests
        (again after :meth:`stop` to serve once more)."""
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the worker thread, after the call in flight: for the reward's setup and teardown."""
        if self.worker is None:
            raise RuntimeError("MicroBatcher is not started; call start() first.")
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def stop(self) -> None:
        """Stop feeding the worker, cancel the requests still waiting, and shut the worker thread down once the call
        in flight (and anything queued with :meth:`run_in_worker`) has finished."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            self._pending.popleft().answer.cancel()
        if self.worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.shutdown)
        self.worker = self._task = None

    async def score(self, prompts: list[str], responses: list[str], fields: dict[str, list[Any]]) -> list[float]:
        """The scores of one request (at most ``max_batch_size`` responses), once its call has run.

        Raises:
            Exception: whatever ``score_fn`` raised on this request.
        """
        if self._task is None or self._task.done():
            raise RuntimeError("MicroBatcher is not running; call start() in the serving event loop first.")
        loop = asyncio.get_running_loop()
        request = ScoreRequest(prompts, responses, fields, loop.create_future(), loop.time())
        self._pending.append(request)
        self._wake.set()
        return await request.answer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait(None)
            if self.merge:
                oldest = self._pending[0]
                while not self._full(oldest) and (left := oldest.arrived + self.max_wait_s - loop.time()) > 0:
                    await self._wait(left)
                call = next_call(self._pending, self.max_batch_size)
            else:
                call = [self._pending.popleft()]
            call = [r for r in call if not r.answer.done()]  # a client that went away needs no scores
            try:
                await self._score(call)
            except asyncio.CancelledError:  # stopped mid-call: nobody else will answer these
                for request in call:
                    request.answer.cancel()
                raise

    async def _wait(self, timeout: float | None) -> None:
        """Until a request arrives or ``timeout`` seconds pass."""
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _full(self, oldest: ScoreRequest) -> bool:
        """Whether the waiting requests of ``oldest``'s kind fill a call."""
        return sum(len(r.responses) for r in self._pending if r.kind == oldest.kind) >= self.max_batch_size

    async def _score(self, call: list[ScoreRequest]) -> None:
        """One reward call for ``call``, each request answered with its slice; on an error, each scored alone."""
        if not call:
            return
        try:
            scores = await self._call(*merge(call))
        except Exception as err:
            if len(call) == 1:
                self._answer(call[0], error=err)
                return
            for request in call:
                await self._score([request])
            return
        start = 0
        for request in call:
            self._answer(request, scores[start : start + len(request.responses)])
            start += len(request.responses)

    async def _call(self, prompts: list[str], responses: list[str], fields: dict[str, list[Any]]) -> list[float]:
        self.calls += 1
        scores = await self.run_in_worker(self.score_fn, prompts, responses, fields)
        if len(scores) != len(responses):  # score_fn is meant to check this; a wrong slice would cross requests
            raise RuntimeError(f"the reward returned {len(scores)} scores for {len(responses)} responses.")
        return scores

    @staticmethod
    def _answer(request: ScoreRequest, scores: list[float] | None = None, error: BaseException | None = None) -> None:
        if request.answer.done():  # cancelled: its client went away
            return
        if error is not None:
            request.answer.set_exception(error)
        else:
            request.answer.set_result(scores)
