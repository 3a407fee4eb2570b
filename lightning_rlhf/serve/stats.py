"""Counts and latencies of the reward server's score requests: totals and recent percentiles for the health
endpoint, and a log line every ``log_every_s`` seconds with traffic."""

from __future__ import annotations

import logging
import math
import time
from collections import deque

logger = logging.getLogger(__name__)

LATENCY_WINDOW = 1024
"""Health reports the latency percentiles of this many most recent score requests."""


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of non-empty ``values``: the smallest value with at least ``q``% of them
    at or below it (p50 of 10, 20, 30, 40 is 20; p95 is 40)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def latency_ms(seconds: list[float] | deque[float]) -> dict[str, float] | None:
    """``{"p50": ms, "p95": ms}`` of request latencies in seconds, to the microsecond; None without any."""
    if not seconds:
        return None
    values = list(seconds)
    return {f"p{q}": round(1000 * percentile(values, q), 3) for q in (50, 95)}


class RequestStats:
    """Counts and latencies of score requests: totals for health, a log line every ``log_every_s`` with traffic."""

    COUNTS = ("requests", "responses", "errors")

    def __init__(self, log_every_s: float) -> None:
        self.log_every_s = log_every_s
        self.totals = dict.fromkeys(self.COUNTS, 0)
        self.recent: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._interval = dict.fromkeys(self.COUNTS, 0)
        self._interval_latencies: list[float] = []
        self._interval_calls = 0
        self._logged_at = time.monotonic()

    def record(self, responses: int, seconds: float, failed: bool, reward_calls: int) -> None:
        """One answered score request; ``reward_calls`` is the batcher's running total."""
        for counts in (self.totals, self._interval):
            counts["requests"] += 1
            counts["responses"] += responses
            counts["errors"] += failed
        self.recent.append(seconds)
        self._interval_latencies.append(seconds)
        now = time.monotonic()
        if now - self._logged_at >= self.log_every_s:
            p = latency_ms(self._interval_latencies)
            logger.info(
                "%d requests (%d responses, %d reward calls, %d errors) in %.1f s; latency p50 %.1f ms, p95 %.1f ms",
                *(self._interval[k] for k in ("requests", "responses")),
                reward_calls - self._interval_calls,
                self._interval["errors"],
                now - self._logged_at,
                p["p50"],
                p["p95"],
            )
            self._interval = dict.fromkeys(self.COUNTS, 0)
            self._interval_latencies, self._interval_calls, self._logged_at = [], reward_calls, now
