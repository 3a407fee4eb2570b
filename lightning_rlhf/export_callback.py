"""Deprecated alias of :mod:`lightning_rlhf.callbacks.artifacts`, where ``ExportCallback`` moved; removed in 0.3."""

from lightning_rlhf.callbacks.artifacts import EXPORT_SUBDIR, ExportCallback  # noqa: F401
from lightning_rlhf.compat import warn_moved

warn_moved(__name__, "lightning_rlhf.callbacks.artifacts")
