"""What multi-process PPO needs beyond Lightning: global statistics, FSDP2 sharding of the policy, random states.

Pure torch (no Lightning import); ``PPOModule`` passes in the strategy's all-reduce where one is needed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf.models import PolicyValueModel


def fully_shard_policy(model: PolicyValueModel, mesh: Any) -> None:
    """FSDP2: one unit per decoder layer of the policy (and of a full-fine-tuning reference), then the root.

    Embeddings, final norm and ``lm_head`` stay in the root unit, so tied input/output embeddings (Qwen2, Gemma) remain
    tied; the value head is a unit of its own.
    """
    from torch.distributed.fsdp import fully_shard

    for lm in (model.lm, model.ref_lm):
        if lm is None:
            continue
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        layer_types = set(getattr(base, "_no_split_modules", None) or ())
        layers = [m for m in base.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise ValueError(
                f"cannot shard {type(base).__name__} with fsdp2: its _no_split_modules names no decoder layer class."
            )
        for layer in layers:
            fully_shard(layer, mesh=mesh)
    # FSDP2 needs one dtype among a unit's trainable parameters: the value head is always float32, the LM's weights
    # may be bfloat16 (policy.dtype), so the head is a unit of its own.
    fully_shard(model.value_head, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_value(tensor: Tensor) -> Tensor:
    """The whole value of a possibly sharded tensor: a DTensor (FSDP2) is gathered, a plain tensor returned as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def get_rng_state(shuffle_generator: torch.Generator) -> dict[str, Any]:
    """This process's random states as plain tensors and lists (loadable with ``weights_only=True``)."""
    version, mt_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "shuffle": shuffle_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], shuffle_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    shuffle_generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GlobalStats:
    """Accumulates (sum, count) pairs and reduces them across processes in one collective."""

    def __init__(self) -> None:
        self._sums: dict[str, list[Tensor | float]] = {}

    def add(self, name: str, total: Tensor | float, count: Tensor | float = 1.0) -> None:
        """Add ``total`` (a sum over ``count`` observations); tensors stay on their device until :meth:`reduce`."""
        total = total.detach().double() if isinstance(total, Tensor) else float(total)
        count = count.detach().double() if isinstance(count, Tensor) else float(count)
        entry = self._sums.setdefault(name, [0.0, 0.0])
        entry[0], entry[1] = entry[0] + total, entry[1] + count

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor], device: torch.device) -> dict[str, float]:
        names = list(self._sums)
        if not names:
            return {}
        as_tensor = [torch.as_tensor(v, dtype=torch.float64, device=device) for n in names for v in self._sums[n]]
        packed = reduce_sum(torch.stack(as_tensor).view(len(names), 2)).cpu()
        return {n: float(packed[i, 0] / packed[i, 1]) if packed[i, 1] > 0 else math.nan for i, n in enumerate(names)}
