"""The PPO objective of one micro-batch of a rollout: one forward of the policy, then the loss terms.

``PPOModule`` calls :func:`ppo_objective` for every micro-batch of the update and only adds bookkeeping around it
(statistics, gradient accumulation, the optimizer step); ``benchmarks/ppo_iteration.py`` times the same function.
Every term is over the micro-batch's *trained* tokens (:attr:`~lightning_rlhf.types.Rollout.trained_mask`: the
responses ``loss_mask`` keeps), aggregated as ``ppo.aggregation`` says.
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
    """``policy_loss + vf_coef * value_loss - ent_coef * entropy + kl_coef * kl_loss`` (the terms that apply)."""
    policy_loss: Tensor
    value_loss: Tensor | None
    """None without a critic."""
    entropy: Tensor
    """Mean entropy of the sampling distribution (``softmax(logits / temperature)``) over the trained tokens, whatever
    the aggregation (the bonus in ``loss`` is aggregated like the other terms)."""
    kl_loss: Tensor | None
    """The aggregated KL of the current policy to the reference (``ppo.kl_placement: loss``); None otherwise."""
    tokens: Tensor
    """Trained response tokens in the micro-batch: the weight of its token statistics in a token mean."""
    units: Tensor
    """What the loss terms average over in the micro-batch (:func:`loss_units`): their weight in the minibatch's
    loss, so the logged loss is the minibatch's whatever the micro-batches or processes."""
    policy: PolicyLossStats
    value: ValueLossStats | None
    """None without a critic."""


def loss_units(rollout: Rollout, aggregation: str) -> Tensor:
    """() what ``aggregation`` averages over in ``rollout``: its trained tokens (``token-mean``) or its responses with
    a trained token (the sequence means)."""
    trained = rollout.trained_mask
    return trained.sum() if aggregation == "token-mean" else trained.any(-1).sum()


def micro_batch_weight(micro_batch: Rollout, minibatch_units: Tensor, aggregation: str) -> Tensor:
    """float32 weight of a micro-batch's loss, so the weighted micro-batch gradients add up to the minibatch's.

    Every aggregation is a mean, over tokens or over responses (:func:`loss_units`); the micro-batch's weight is its
    share of the minibatch's units, ``minibatch_units`` (the per-process mean over processes under
    ``stats_scope: global``, as data-parallel gradients are averaged over processes), so the result does not depend on
    how the minibatch is cut into micro-batches or spread over processes, also when ``loss_mask`` leaves rows out.
    Always float32: under ``precision: bf16-true`` a tensor made without a dtype is bfloat16, and 1/3 would weigh
    0.333984375.
    """
    return (loss_units(micro_batch, aggregation) / minibatch_units.clamp(min=1)).float()


def ppo_objective(
    model: PolicyValueModel,
    micro_batch: Rollout,
    ppo: PPOConfig,
    temperature: float,
    kl_coef: float = 0.0,
    norm_length: int | None = None,
    train_policy: bool = True,
) -> PPOObjective:
    """Clipped surrogate, value loss, entropy bonus and (``kl_placement: loss``) KL term of ``micro_batch``.

    Columns that are padding in every row are dropped first (:meth:`Rollout.trim_padding`); with ``ppo.packing`` the
    forward runs the rows packed, without padding positions; with ``ppo.lm_head_chunk_size`` the logits are made and
    consumed a chunk at a time. Without an entropy bonus (``ent_coef == 0``) the entropy is computed without a graph:
    it is only logged, and its backward over a full vocabulary costs several times its forward.

    Args:
        model: the policy (with or without a value head).
        micro_batch: rows of a rollout with advantages (and returns, with a critic); its ``is_weights``, when set,
            weight the per-token policy loss (``ppo.rollout_correction``).
        ppo: the loss settings.
        temperature: the sampling temperature.
        kl_coef: beta of the KL term (``ppo.kl_placement: loss`` only; the KL controller's current value).
        norm_length: the constant of ``seq-mean-token-sum-norm`` (``generation.max_new_tokens``).
        train_policy: False during the critic warm-up: the loss is the value term alone.
    """
    micro_batch = micro_batch.trim_padding()
    mask = micro_batch.trained_mask
    out = forward_response(
        model,
        micro_batch.prompt_ids,
        micro_batch.prompt_mask,
        micro_batch.response_ids,
        micro_batch.response_mask,
        temperature,
        mode="policy",
        options=ppo.forward_options,
        entropy="grad" if ppo.ent_coef > 0 and train_policy else "detached",
    )
    policy_loss, policy_stats = F.policy_loss(
        out.logprobs,
        micro_batch.old_logprobs,
        micro_batch.advantages,
        mask,
        ppo.clip_coef,
        ppo.dual_clip_coef,
        ppo.aggregation,
        ppo.clip_coef_high,
        norm_length,
        token_weights=micro_batch.is_weights,
    )
    value_loss = value_stats = None
    if out.values is not None:
        value_loss, value_stats = F.value_loss(
            out.values,
            micro_batch.old_values,
            micro_batch.returns,
            mask,
            ppo.value_clip_coef,
            ppo.aggregation,
            norm_length,
        )
    entropy_bonus = F.aggregate(out.entropy, mask, ppo.aggregation, norm_length)
    kl_loss = None
    if ppo.kl_placement == "loss":
        kl = F.kl_penalty(out.logprobs, micro_batch.ref_logprobs, ppo.kl_estimator)
        kl_loss = F.aggregate(torch.where(mask, kl, 0.0), mask, ppo.aggregation, norm_length)
    # The critic warm-up trains the value term alone (the module drops every gradient but the value head's).
    loss = policy_loss if train_policy else torch.zeros((), device=mask.device)
    if value_loss is not None:
        loss = loss + ppo.vf_coef * value_loss
    if train_policy:
        loss = loss - ppo.ent_coef * entropy_bonus
        if kl_loss is not None:
            loss = loss + kl_coef * kl_loss
    return PPOObjective(
        loss=loss,
        policy_loss=policy_loss.detach(),
        value_loss=None if value_loss is None else value_loss.detach(),
        entropy=F.aggregate(out.entropy.detach(), mask, "token-mean"),
        kl_loss=None if kl_loss is None else kl_loss.detach(),
        tokens=mask.sum(),
        units=loss_units(micro_batch, ppo.aggregation),
        policy=policy_stats,
        value=value_stats,
    )
