"""Process-global modes a block needs, put back afterwards.

- ``eval_mode``: dropout off, every submodule's own training flag restored. ``module.train(previous)`` would not do:
  it sets one flag on every submodule, and some keep a flag of their own (the frozen reference copy of full
  fine-tuning stays in eval mode while the policy trains).
- ``full_precision``: the default dtype float32 and autocast off, as outside ``training_step``. Lightning runs
  ``training_step`` under ``precision: bf16-true`` with the default dtype bfloat16 and under ``bf16-mixed`` inside
  autocast, so a reward called there would silently round ``torch.tensor([...])`` scores to bfloat16 or run a float32
  reward model in bfloat16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
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


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """The default dtype float32 and autocast off on ``device_type`` for the body; both restored afterwards."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_default_dtype(default)
