"""Run a check on many items in worker processes, each item with a time limit that a hung check cannot break.

Checks such as sympy's equivalence tests can hang on a crafted input or crash their process. A thread cannot be
stopped and ``concurrent.futures.ProcessPoolExecutor`` cannot cancel a running task (a hung task keeps its worker, a
crashed worker breaks the whole pool), so :class:`CheckPool` keeps its own worker processes, one item at a time each:
a worker past the time limit is killed and replaced, a worker that dies is replaced, and either item gets the
caller's default. Workers start with ``spawn`` (no fork of a process that holds threads: torch, tokenizers).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass
class CheckResults:
    """What :meth:`CheckPool.map` returns."""

    values: list[Any]
    """One per item, in the items' order: the check's result, or the default for an item that failed."""
    timed_out: int
    """Items whose check ran past the time limit (their worker was killed)."""
    crashed: int
    """Items whose worker died (a crash, ``os._exit``) or whose check raised."""


READY = "ready"
"""What a worker sends once it has started (imports done), before its first item."""
STARTUP_TIMEOUT_S = 300.0
"""Seconds a worker may take to start (spawn re-imports the check's module) before the pool gives up."""


def _serve(check: Callable[[Any], Any], conn: Connection) -> None:
    """A worker's loop: say it is ready, then receive an item and send back ``(True, result)`` or ``(False, error
    text)``; stop on None."""
    conn.send(READY)
    while True:
        item = conn.recv()
        if item is None:
            return
        try:
            conn.send((True, check(item)))
        except Exception as err:  # the check's error is the item's failure, not the worker's
            conn.send((False, f"{type(err).__name__}: {err}"))


class _Worker:
    def __init__(self, context: Any, check: Callable[[Any], Any]) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(check, child), daemon=True)
        self.process.start()
        child.close()
        self.item: int | None = None  # the index of the item it is checking
        self.started = time.monotonic()  # of the process, then of its current item
        self.ready = False

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class CheckPool:
    """``num_workers`` processes that apply ``check`` to items, each within ``timeout_s`` seconds.

    Start it once (the first :meth:`map` starts it, or :meth:`start`) and :meth:`close` it at the end; workers that
    hang or die are replaced as they fail, so one bad item costs its own time limit, never the run.

    Args:
        check: a picklable function of one item (module-level, so ``spawn`` can import it).
        num_workers: worker processes (items are checked that many at a time).
        timeout_s: seconds one item may take.
    """

    def __init__(self, check: Callable[[Any], Any], num_workers: int = 2, timeout_s: float = 5.0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1.")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0.")
        self.check, self.num_workers, self.timeout_s = check, num_workers, timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a copied reward, a spawned process): the copy starts its own workers when it needs them."""
        return {"check": self.check, "num_workers": self.num_workers, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def running(self) -> bool:
        return bool(self._workers)

    def start(self) -> None:
        """Start the workers and wait until each is ready (the time limit of an item never covers a start)."""
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._context, self.check))
        while starting := [w for w in self._workers if not w.ready]:
            self._wait_for_starts(starting, STARTUP_TIMEOUT_S)

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        for worker in self._workers:
            worker.stop(kill=worker.item is not None or not worker.ready)
        self._workers = []

    def map(self, items: Sequence[Any], default: Any) -> CheckResults:
        """``check(item)`` for every item, at most ``num_workers`` at a time; ``default`` for an item that timed out,
        crashed its worker or raised."""
        self.start()
        values: list[Any] = [default] * len(items)
        timed_out = crashed = 0
        pending = list(range(len(items)))[::-1]  # popped from the end: items in order
        while pending or any(w.item is not None for w in self._workers):
            for worker in self._workers:
                if pending and worker.ready and worker.item is None:
                    worker.item, worker.started = pending.pop(), time.monotonic()
                    worker.conn.send(items[worker.item])
            busy = {w.conn: w for w in self._workers if w.item is not None}
            starting = [w for w in self._workers if not w.ready]
            deadline = min(w.started for w in busy.values()) + self.timeout_s if busy else time.monotonic()
            if starting and not busy:  # replacements starting, nothing in flight: wait for one of them
                self._wait_for_starts(starting, STARTUP_TIMEOUT_S)
                continue
            for conn in wait([*busy, *(w.conn for w in starting)], timeout=max(deadline - time.monotonic(), 0.0)):
                worker = busy.get(conn)  # type: ignore[arg-type]
                if worker is None:  # a replacement finished starting
                    self._check_start(next(w for w in starting if w.conn is conn))
                    continue
                try:
                    ok, value = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):  # the worker died with the item
                    crashed += 1
                    self._replace(worker)
                    continue
                if ok:
                    values[worker.item] = value  # type: ignore[index]
                else:
                    crashed += 1
                worker.item = None
            now = time.monotonic()
            for worker in busy.values():
                if worker.item is not None and now - worker.started >= self.timeout_s:
                    timed_out += 1
                    self._replace(worker)
        return CheckResults(values, timed_out, crashed)

    def _wait_for_starts(self, starting: list[_Worker], timeout_s: float) -> None:
        ready = wait([w.conn for w in starting], timeout=timeout_s)
        if not ready:
            raise RuntimeError(f"no check worker started within {timeout_s:.0f} s.")
        for worker in starting:
            if worker.conn in ready:
                self._check_start(worker)

    def _check_start(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            message = None
        if message != READY:  # an import error or the like: every replacement would fail the same way
            exitcode = worker.process.exitcode
            self.close()
            raise RuntimeError(f"a check worker died while starting (exit code {exitcode}); see its error above.")
        worker.ready = True

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` (hung, or dead already) and start another in its place (ready once it says so)."""
        worker.item = None  # its item is settled (the default); the old worker is never looked at again
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = _Worker(self._context, self.check)
