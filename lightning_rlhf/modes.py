"""``eval_mode``: run a block with dropout off, every submodule's own training flag put back afterwards.

``module.train(previous)`` would not do: it sets one flag on every submodule, and some keep a flag of their own (the
frozen reference copy of full fine-tuning stays in eval mode while the policy trains).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule of ``module`` in eval mode for the body; each one's training flag restored afterwards."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes.items():
            submodule.training = training
