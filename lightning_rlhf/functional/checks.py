"""Argument checks of the pure math: masks are bool (True = real token), shapes agree, a choice is one of many."""

from __future__ import annotations

import torch
from torch import Tensor


def check_mask(mask: Tensor, name: str = "response_mask") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``mask`` is a bool tensor."""
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = real token), got dtype {mask.dtype}.")


def check_same_shape(**tensors: Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor whose shape differs from the first one's."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; they must match."
            )


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(repr(c) for c in choices)}.")
