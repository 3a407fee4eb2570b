"""Step 4 of the PPO loop: advantages (and value targets) of a scored, reward-shaped rollout, by estimator.

``ppo.advantage_estimator`` picks one (README "Advantage estimators" has the table with sources):

- ``gae``: GAE over the per-token rewards with the critic's values (:func:`~lightning_rlhf.functional.gae`), whitened
  when ``ppo.whiten_advantages``; the returns are the value targets.
- ``reinforce_plus_plus``: discounted token returns of the per-token rewards, no critic
  (:func:`~lightning_rlhf.functional.discounted_returns`), always whitened (Hu 2025).
- ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_plus_plus_baseline``: one number per response, its summed per-token
  reward, against its group's (:mod:`lightning_rlhf.functional.advantages`), on every one of its tokens; only
  REINFORCE++-baseline is whitened afterwards.

Group statistics are per group, and a group is always on one process; whitening and GRPO's ``batch`` std are over
every process under ``ppo.stats_scope: global``, over this one under ``local``. Whitening uses the trained tokens
only (``Rollout.trained_mask``), so responses left out of the loss do not shift it.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

from torch import Tensor

from lightning_rlhf import functional as F
from lightning_rlhf.config import PPOConfig
from lightning_rlhf.distributed import ReduceSum, global_moments, whiten
from lightning_rlhf.types import Rollout


class Advantages(NamedTuple):
    """What step 4 adds to the rollout."""

    advantages: Tensor
    """(B, T) float32, 0 where ``response_mask`` is False."""
    returns: Tensor | None
    """(B, T) float32: the critic's targets (``gae``) or the discounted returns (``reinforce_plus_plus``); None for
    the group estimators."""


def estimate_advantages(rollout: Rollout, ppo: PPOConfig, reduce_sum: ReduceSum | None) -> Advantages:
    """Advantages of ``rollout`` (with ``rewards`` set) as ``ppo.advantage_estimator`` says.

    Args:
        rollout: the rollout after reward shaping (``rewards``; ``old_values`` for ``gae``; ``group_index`` for the
            group estimators).
        ppo: the estimator and its options.
        reduce_sum: the strategy's all-reduce for statistics over every process, or None for this process alone (the
            caller passes None under ``stats_scope: local``). Every process must call this when it is given.
    """
    mask, estimator = rollout.response_mask, ppo.advantage_estimator
    if estimator == "gae":
        if rollout.old_values is None:
            raise ValueError("advantage_estimator 'gae' needs the critic's values; this rollout has none.")
        advantages, returns = F.gae(rollout.rewards, rollout.old_values, mask, ppo.gamma, ppo.gae_lambda)
        if ppo.whiten_advantages:
            advantages = whiten_or_keep(advantages, rollout.trained_mask, reduce_sum, ppo.stats_scope)
        return Advantages(advantages, returns)
    if estimator == "reinforce_plus_plus":
        returns = F.discounted_returns(rollout.rewards, mask, ppo.gamma)
        return Advantages(whiten_or_keep(returns, rollout.trained_mask, reduce_sum, ppo.stats_scope), returns)
    if rollout.group_index is None:
        raise ValueError(f"advantage_estimator {estimator!r} needs the rollout's group_index.")
    sequence_returns = F.masked_sum(rollout.rewards, mask, dim=-1)  # the score, plus -kl_coef * KL in the reward
    if estimator in ("grpo", "dr_grpo"):
        std_norm = "none" if estimator == "dr_grpo" else ppo.group_std_norm
        batch_std = math.sqrt(global_moments(sequence_returns, reduce_sum)[2]) if std_norm == "batch" else None
        advantages = F.grpo_advantages(sequence_returns, rollout.group_index, std_norm, batch_std)
    elif estimator == "rloo":
        advantages = F.rloo_advantages(sequence_returns, rollout.group_index)
    else:  # reinforce_plus_plus_baseline
        centered = sequence_returns - F.group_mean(sequence_returns, rollout.group_index)
        per_token = F.broadcast_to_tokens(centered, mask)
        return Advantages(whiten_or_keep(per_token, rollout.trained_mask, reduce_sum, ppo.stats_scope), None)
    return Advantages(F.broadcast_to_tokens(advantages, mask), None)


def whiten_or_keep(x: Tensor, mask: Tensor, reduce_sum: ReduceSum | None, stats_scope: str) -> Tensor:
    """``x`` whitened over the True entries of ``mask`` (:func:`~lightning_rlhf.distributed.whiten`), or, with fewer
    than 2 of them (a per-device batch of one 1-token response under ``local``: no variance), ``x`` as it is, with a
    warning."""
    whitened = whiten(x, mask, reduce_sum)
    if whitened is None:
        warnings.warn(
            "Advantage whitening skipped for this rollout: it has fewer than 2 response tokens in the loss "
            f"(model.ppo.stats_scope={stats_scope!r}), so no variance to divide by. Raise "
            "data.batch_size or use model.ppo.stats_scope global.",
            RuntimeWarning,
            stacklevel=3,
        )
        return x
    return whitened
