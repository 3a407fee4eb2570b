"""Deprecated alias of :mod:`lightning_rlhf.models.packing`, where this module moved; removed in lightning-rlhf 0.3."""

from lightning_rlhf.compat import warn_moved
from lightning_rlhf.models.packing import *  # noqa: F403

warn_moved(__name__, "lightning_rlhf.models.packing")
