"""Deprecated alias of :mod:`lightning_rlhf.data`, where SFT and preference data moved; removed in version 0.3."""

from lightning_rlhf.compat import warn_moved
from lightning_rlhf.data.examples import *  # noqa: F403
from lightning_rlhf.data.preferences import *  # noqa: F403
from lightning_rlhf.data.sft import *  # noqa: F403

warn_moved(__name__, "lightning_rlhf.data")
