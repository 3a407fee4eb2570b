"""How error messages list what is wrong: a few offending rows, then how many more."""

from __future__ import annotations

from collections.abc import Sequence

MAX_ROWS_IN_MESSAGE = 8
"""Errors list at most this many offending rows."""


def list_rows(rows: Sequence[object]) -> str:
    """``"a, b, c and 4 more"``: the first :data:`MAX_ROWS_IN_MESSAGE` of ``rows``, then the count of the rest."""
    more = f" and {len(rows) - MAX_ROWS_IN_MESSAGE} more" if len(rows) > MAX_ROWS_IN_MESSAGE else ""
    return ", ".join(str(row) for row in rows[:MAX_ROWS_IN_MESSAGE]) + more
