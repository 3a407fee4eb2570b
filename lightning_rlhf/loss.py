"""The PPO objective of one micro-batch of a rollout: one forward of the policy, then the three loss terms.

``PPOModule`` calls :func:`ppo_objective` for every micro-batch of the update and only adds bookkeeping around it
(statistics, gradient accumulation, the optimizer step); ``benchmarks/ppo_iteration.py`` times the same function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_rlhf import functional as F
from lightning_rlhf.config import PPOConfig
from lightning_rlhf.models.policy import PolicyValueModel, forward_response
from lightning_rlhf.types import PolicyLossStats, Rollout, ValueLossStats


class PPOObjective(NamedTuple):
    """``loss`` is differentiable; the other terms are detached, for logging."""

    loss: Tensor
    """``policy_loss + vf_coef * value_loss - ent_coef * entropy``."""
    policy_loss: Tensor
    value_loss: Tensor
    entropy: Tensor
    """Mean entropy of the sampling distribution (``softmax(logits / temperature)``) over the real tokens."""
    tokens: Tensor
    """Real response tokens in the micro-batch: the weight of its statistics in a token mean."""
    policy: PolicyLossStats
    value: ValueLossStats


def micro_batch_weight(micro_batch: Rollout, minibatch_rows: int, minibatch_tokens: Tensor, aggregation: str) -> Tensor:
    """float32 weight of a micro-batch's loss, so the weighted micro-batch gradients add up to the minibatch's.

    ``token-mean``: the micro-batch's share of the minibatch's real tokens (``minibatch_tokens``, the per-process mean
    over processes under ``stats_scope: global``); ``seq-mean-token-mean``: its share of the rows. Always float32:
    under ``precision: bf16-true`` a tensor made without a dtype is bfloat16, and 1/3 would weigh 0.333984375.

    Args:
        micro_batch: the micro-batch.
        minibatch_rows: rows in its minibatch on this process.
        minibatch_tokens: () real response tokens of the minibatch.
        aggregation: ``ppo.aggregation``.
    """
    if aggregation == "token-mean":
        return (micro_batch.response_mask.sum() / minibatch_tokens.clamp(min=1)).float()
    device = micro_batch.response_mask.device
    return torch.tensor(len(micro_batch) / minibatch_rows, dtype=torch.float32, device=device)


def ppo_objective(model: PolicyValueModel, micro_batch: Rollout, ppo: PPOConfig, temperature: float) -> PPOObjective:
    """Clipped surrogate, value loss and entropy bonus of ``micro_batch`` under the current policy.

    Columns that are padding in every row are dropped first (:meth:`Rollout.trim_padding`); with ``ppo.packing`` the
    forward runs the rows packed, without padding positions; with ``ppo.lm_head_chunk_size`` the logits are made and
    consumed a chunk at a time. Without an entropy bonus (``ent_coef == 0``) the entropy is computed without a graph:
    it is only logged, and its backward over a full vocabulary costs several times its forward.
    """
    micro_batch = micro_batch.trim_padding()
    out = forward_response(
        model,
        micro_batch.prompt_ids,
        micro_batch.prompt_mask,
        micro_batch.response_ids,
        micro_batch.response_mask,
        temperature,
        mode="policy",
        options=ppo.forward_options,
        entropy="grad" if ppo.ent_coef > 0 else "detached",
    )
    policy_loss, policy_stats = F.policy_loss(
        out.logprobs,
        micro_batch.old_logprobs,
        micro_batch.advantages,
        micro_batch.response_mask,
        ppo.clip_coef,
        ppo.dual_clip_coef,
        ppo.aggregation,
    )
    value_loss, value_stats = F.value_loss(
        out.values,
        micro_batch.old_values,
        micro_batch.returns,
        micro_batch.response_mask,
        ppo.value_clip_coef,
        ppo.aggregation,
    )
    entropy = F.aggregate(out.entropy, micro_batch.response_mask, ppo.aggregation)
    loss = policy_loss + ppo.vf_coef * value_loss - ppo.ent_coef * entropy
    return PPOObjective(
        loss=loss,
        policy_loss=policy_loss.detach(),
        value_loss=value_loss.detach(),
        entropy=entropy.detach(),
        tokens=micro_batch.response_mask.sum(),
        policy=policy_stats,
        value=value_stats,
    )
