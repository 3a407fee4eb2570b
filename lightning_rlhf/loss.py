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
from lightning_rlhf.models import PolicyValueModel
from lightning_rlhf.rollout import forward_response
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


def micro_batch_weight(part: Rollout, minibatch_rows: int, minibatch_tokens: Tensor, aggregation: str) -> Tensor:
    """float32 weight of a micro-batch's loss, so the weighted micro-batch gradients add up to the minibatch's.

    ``token-mean``: the micro-batch's share of the minibatch's real tokens (``minibatch_tokens``, the per-process mean
    over processes under ``stats_scope: global``); ``seq-mean-token-mean``: its share of the rows. Always float32:
    under ``precision: bf16-true`` a tensor made without a dtype is bfloat16, and 1/3 would weigh 0.333984375.

    Args:
        part: the micro-batch.
        minibatch_rows: rows in its minibatch on this process.
        minibatch_tokens: () real response tokens of the minibatch.
        aggregation: ``ppo.aggregation``.
    """
    if aggregation == "token-mean":
        return (part.response_mask.sum() / minibatch_tokens.clamp(min=1)).float()
    return torch.tensor(len(part) / minibatch_rows, dtype=torch.float32, device=part.response_mask.device)


def ppo_objective(model: PolicyValueModel, part: Rollout, ppo: PPOConfig, temperature: float) -> PPOObjective:
    """Clipped surrogate, value loss and entropy bonus of ``part`` under the current policy.

    Columns that are padding in every row of ``part`` are dropped first (:meth:`Rollout.trim_padding`); with
    ``ppo.packing`` the forward runs the rows packed, without padding positions; with ``ppo.lm_head_chunk_size`` the
    logits are made and consumed a chunk at a time. Without an entropy bonus (``ent_coef == 0``) the entropy is
    computed without a graph: it is only logged, and its backward over a full vocabulary costs about 3x its forward
    (0.5 s per minibatch at 152k tokens).
    """
    part = part.trim_padding()
    out = forward_response(
        model,
        part.prompt_ids,
        part.prompt_mask,
        part.response_ids,
        part.response_mask,
        temperature,
        mode="policy",
        packing=ppo.packing,
        entropy="grad" if ppo.ent_coef > 0 else "detached",
        lm_head_chunk_size=ppo.lm_head_chunk_size,
    )
    policy_loss, policy_stats = F.policy_loss(
        out.logprobs,
        part.old_logprobs,
        part.advantages,
        part.response_mask,
        ppo.clip_coef,
        ppo.dual_clip_coef,
        ppo.aggregation,
    )
    value_loss, value_stats = F.value_loss(
        out.values, part.old_values, part.returns, part.response_mask, ppo.value_clip_coef, ppo.aggregation
    )
    entropy = F.aggregate(out.entropy, part.response_mask, ppo.aggregation)
    loss = policy_loss + ppo.vf_coef * value_loss - ppo.ent_coef * entropy
    return PPOObjective(
        loss=loss,
        policy_loss=policy_loss.detach(),
        value_loss=value_loss.detach(),
        entropy=entropy.detach(),
        tokens=part.response_mask.sum(),
        policy=policy_stats,
        value=value_stats,
    )
