"""Deprecated import paths: modules that moved keep a re-exporting alias for one minor release."""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """Warn (``DeprecationWarning``) that module ``old`` moved to ``new``; called by the alias module when imported."""
    warnings.warn(
        f"{old} moved to {new}; import from there (the alias {old} will be removed in lightning-rlhf 0.3).",
        DeprecationWarning,
        stacklevel=3,
    )
