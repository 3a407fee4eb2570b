"""How error messages list what is wrong (a few offending rows, then how many more), and how a command finds the
package's own error under what a library wrapped it in."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from pathlib import Path

MAX_ROWS_IN_MESSAGE = 8
"""Errors list at most this many offending rows."""


def list_rows(rows: Sequence[object]) -> str:
    """``"a, b, c and 4 more"``: the first :data:`MAX_ROWS_IN_MESSAGE` of ``rows``, then the count of the rest."""
    more = f" and {len(rows) - MAX_ROWS_IN_MESSAGE} more" if len(rows) > MAX_ROWS_IN_MESSAGE else ""
    return ", ".join(str(row) for row in rows[:MAX_ROWS_IN_MESSAGE]) + more


PACKAGE_DIR = Path(__file__).resolve().parent
"""The package's source directory: an error raised in a file under it is the package's own."""


def package_error(error: BaseException) -> BaseException | None:
    """The deepest ``ValueError`` / ``TypeError`` in ``error``'s chain of causes that this package raised (its
    traceback ends in a file of the package), or None."""
    found, seen, current = None, set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        if (
            isinstance(current, (ValueError, TypeError))
            and frames
            and Path(frames[-1].filename).is_relative_to(PACKAGE_DIR)
        ):
            found = current
        current = current.__cause__ or current.__context__
    return found
