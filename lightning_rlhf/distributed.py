"""What multi-process PPO needs beyond Lightning: the one home of global statistics, and FSDP2 sharding of the policy.

Global statistics are exact values over all processes, computed from summed ``(sum, count)`` pairs in one collective:
:class:`GlobalStats` for the logged metrics, :func:`global_sums` for a few scalars (the alarms), :func:`whiten` for
advantage whitening. Pure torch (no Lightning import); callers pass in the strategy's all-reduce (``reduce_sum``),
or None for this process alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf import functional as F
from lightning_rlhf.models.policy import PolicyValueModel

ReduceSum = Callable[[Tensor], Tensor]
"""Sums a tensor over all processes (the strategy's all-reduce), returning it on the caller's device."""


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
    if model.value_head is not None:
        fully_shard(model.value_head, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_value(tensor: Tensor) -> Tensor:
    """The whole value of a possibly sharded tensor: a DTensor (FSDP2) is gathered, a plain tensor returned as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


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


def global_sums(reduce_sum: ReduceSum, *values: Tensor | float) -> list[float]:
    """Sums of scalars over all processes, in one collective that every process must reach."""
    device = next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    return reduce_sum(packed).tolist()


def explained_variance(returns: Tensor, values: Tensor, mask: Tensor, reduce_sum: ReduceSum | None = None) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the True entries of ``mask`` on every process together (or on
    this one, ``reduce_sum`` None): how much of the returns the critic predicts. NaN for constant returns.

    Variances are over all entries together (population moments), from one collective of sums.
    """
    returns, residual = returns.double()[mask], (returns - values).double()[mask]
    sums = (mask.sum(), returns.sum(), returns.square().sum(), residual.sum(), residual.square().sum())
    n, r, r2, e, e2 = global_sums(reduce_sum, *sums) if reduce_sum is not None else [float(v) for v in sums]
    var_returns = r2 / n - (r / n) ** 2
    return 1.0 - (e2 / n - (e / n) ** 2) / var_returns if var_returns > 0 else math.nan


def global_moments(x: Tensor, reduce_sum: ReduceSum | None) -> tuple[float, float, float]:
    """``(count, mean, unbiased variance)`` of every entry of ``x`` on every process together (or on this one,
    ``reduce_sum`` None), from one collective of ``[count, sum, sum of squares]``; the variance is NaN below 2."""
    sums = F.moment_sums(x)
    count, total, total_sq = (sums if reduce_sum is None else reduce_sum(sums)).tolist()
    mean = total / count if count > 0 else math.nan
    var = max(total_sq - count * mean**2, 0.0) / (count - 1) if count >= 2 else math.nan
    return count, mean, var


def whiten(x: Tensor, mask: Tensor, reduce_sum: ReduceSum | None) -> Tensor | None:
    """``x`` whitened over the True entries of ``mask`` on every process together, or on this one (``reduce_sum``
    None, :func:`~lightning_rlhf.functional.masked_whiten` itself); None when they are fewer than 2 (no variance).

    Every process must call it when ``reduce_sum`` is given (one collective of ``[count, sum, sum of squares]``).
    """
    count, mean, var = global_moments(x[mask], reduce_sum)
    if count < 2:
        return None
    if reduce_sum is None:
        return F.masked_whiten(x, mask)
    return F.masked_whiten(x, mask, mean=mean, var=var)
