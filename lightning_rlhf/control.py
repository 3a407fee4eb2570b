"""Small stateful helpers of the PPO loop: KL-coefficient controllers and running reward moments.

Each carries ``state_dict()`` / ``load_state_dict()`` of plain Python numbers so a Lightning checkpoint can hold it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_rlhf.functional import moment_sums

ADAPTIVE_KL_ERROR_CLIP = 0.2
"""Ziegler et al. 2019 clip the proportional error e_t = KL / target - 1 to [-0.2, 0.2]."""


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}.")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the unchanged coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of beta toward a target KL (Ziegler et al. 2019, section 2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``: beta grows when the
    observed KL is above the target and shrinks below it, at a rate set by ``horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"kl_coef must be > 0 for the adaptive controller (it scales beta), got {init_kl_coef}.")
        if target <= 0:
            raise ValueError(f"target_kl must be > 0, got {target}.")
        if horizon <= 0:
            raise ValueError(f"kl_horizon must be > 0, got {horizon}.")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update beta from the observed (globally reduced) mean KL over ``n_steps`` samples; returns the new beta."""
        if not math.isfinite(current_kl):
            return self.value
        error = min(max(current_kl / self.target - 1.0, -ADAPTIVE_KL_ERROR_CLIP), ADAPTIVE_KL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and standard deviation of a stream of scores, in float64.

    Batches are merged with the parallel algorithm of Chan et al. (1979). To merge across processes, all-reduce
    (sum) the batch's ``(count, sum, sum of squares)`` (:func:`~lightning_rlhf.functional.moment_sums`) first and pass
    the totals to :meth:`update_from_sums`, so every rank holds the same moments.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge the batch ``x`` into the moments; returns ``(batch_mean, batch_std)``."""
        return self.update_from_sums(moment_sums(x))

    def update_from_sums(self, sums: Tensor) -> tuple[float, float]:
        """Merge a batch given as ``[count, sum, sum of squares]`` (possibly summed over ranks)."""
        n, total, total_sq = (float(v) for v in sums.cpu())
        if n < 1:
            raise ValueError("RunningMoments.update needs at least one value.")
        batch_mean = total / n
        batch_m2 = max(total_sq - n * batch_mean**2, 0.0)
        new_count = self.count + n
        delta = batch_mean - self.mean
        old_m2 = self.var * max(self.count - 1, 0)
        m2 = old_m2 + batch_m2 + delta**2 * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var = m2 / (new_count - 1) if new_count > 1 else 1.0
        self.count = int(new_count)
        batch_var = batch_m2 / (n - 1) if n > 1 else 0.0
        return batch_mean, math.sqrt(batch_var)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def normalize_scores(
    raw: Tensor, mode: str, moments: RunningMoments, reduce_sum: Callable[[Tensor], Tensor] | None, eps: float
) -> Tensor:
    """Scores standardized as ``ppo.score_norm`` says: ``none`` as they are, ``batch`` with this rollout's mean and
    standard deviation, ``running`` with ``moments`` updated by this rollout; over every process when ``reduce_sum``
    (the strategy's all-reduce) is given. ``eps`` is added to the standard deviation."""
    if mode == "none":
        return raw
    moments = RunningMoments() if mode == "batch" else moments
    sums = moment_sums(raw)
    moments.update_from_sums(sums if reduce_sum is None else reduce_sum(sums))
    return (raw - moments.mean) / (moments.std + eps)
