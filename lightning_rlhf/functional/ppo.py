"""The PPO math of RLHF: the KL penalty, per-token rewards, GAE, the clipped policy loss, the value loss and the
rollout-correction weights.

Every function takes tensors and plain numbers, returns new tensors, never writes into its inputs, never logs and
never calls ``backward``. Shapes and mask polarity follow :mod:`lightning_rlhf.types`: per-token tensors are ``(B, T)``
and ``response_mask`` is True for a real response token.

Where this departs from, or chooses between, the references:

- **Where the score lands.** On the last real token of each response (its stop token, or the last token when the
  response was truncated), as in Ziegler et al. 2019 and InstructGPT. TRL 0.29 puts it one position later.
- **Clip fraction.** The fraction of real tokens whose clipped term is the larger (active) loss term, i.e. whose
  gradient the clip zeroes (OpenAI baselines / TRL). cleanrl counts ``|r - 1| > clip_coef`` instead, which also counts
  tokens whose unclipped term is active.
- **Value loss.** ``0.5 * max((V - R)^2, (V_clip - R)^2)`` when clipped (PPO2 / TRL / cleanrl), plain
  ``0.5 * (V - R)^2`` otherwise (the textbook reference's ``value_loss``).
- **Aggregation** (verl's ``agg_loss`` names). ``token-mean``: mean over every real token of the batch (PPO2, cleanrl,
  verl's default, DAPO). ``seq-mean-token-mean``: mean over tokens in each sequence, then over sequences (GRPO as
  published; weights short and long responses equally). ``seq-mean-token-sum``: each sequence's token sum, mean over
  sequences. ``seq-mean-token-sum-norm``: each sequence's token sum divided by a constant ``norm_length`` (the longest
  response, ``generation.max_new_tokens``), mean over sequences (Dr. GRPO, Liu et al. 2025: no length normalisation);
  verl divides the sum over sequences by the constant and leaves the mean over sequences to its micro-batch scaling.
  Sequences without a real token are left out of every sequence mean.
- **Rollout correction** (:func:`rollout_correction_weights`). The importance weights are of the trainer's rollout
  policy ``pi_old`` (its own recomputed ``old_logprobs``) over the sampling engine's distribution, detached, and
  multiply the per-token policy loss after the clip (TRL ``per_token_loss * importance_sampling_ratio``, verl
  ``pg_losses * rollout_is_weights``); the PPO ratio stays ``pi / pi_old``. ``token_tis`` truncates the token weight at
  the cap (Yao et al. 2025; verl ``rollout_is: token``, TRL ``token_truncate``); ``seq_mis`` keeps a response's
  sequence weight up to the cap and drops the whole response past it rather than truncating its weight (Liu et al.
  2025; TRL ``sequence_mask``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_rlhf.functional.checks import check_choice, check_mask, check_same_shape
from lightning_rlhf.functional.stats import explained_variance, masked_mean, masked_sum
from lightning_rlhf.types import PolicyLossStats, ValueLossStats

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
RolloutCorrection = Literal["none", "token_tis", "seq_mis"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
ROLLOUT_CORRECTIONS: tuple[str, ...] = ("none", "token_tis", "seq_mis")
"""Modes of :func:`rollout_correction_weights` (``ppo.rollout_correction``)."""
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SEQUENCE_AGGREGATIONS: tuple[str, ...] = AGGREGATIONS[1:]
"""The aggregations that average over sequences (every one but ``token-mean``)."""
K3_LOG_RATIO_CLAMP = 20.0
"""``kl_penalty("k3")`` clamps the log-ratio to [-20, 20] before ``exp`` (verl ``low_var_kl``): below about -88 the
float32 ``exp`` overflows to inf."""
K3_CLAMP = 10.0
"""``kl_penalty("k3")`` caps the per-token estimate at 10 nats (verl ``low_var_kl``), so one token the policy made far
less likely than the reference cannot dominate a response's reward."""


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probabilities of tokens sampled from pi (Schulman 2020).

    With ``log_ratio = logprobs - ref_logprobs``:

    - ``"k1"``: ``log_ratio``. Unbiased; single samples can be negative.
    - ``"k2"``: ``0.5 * log_ratio ** 2``. Always >= 0, low variance, biased (exact to second order).
    - ``"k3"``: ``exp(-log_ratio) - 1 + log_ratio``. Unbiased and always >= 0 (the control-variate estimator). As
      in verl's ``low_var_kl``, ``log_ratio`` is clamped to ``[-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP]`` before the
      ``exp`` (float32 overflows below about -88) and the estimate is capped at ``K3_CLAMP``.

    Args:
        logprobs: (B, T) log pi of the sampled tokens.
        ref_logprobs: (B, T) log pi_ref of the same tokens.
        estimator: "k1", "k2" or "k3".
    Returns:
        (B, T) per-token KL estimates (not masked).
    """
    check_choice(estimator, KL_ESTIMATORS, "kl_estimator")
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    log_ratio = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.expm1(-log_ratio) + log_ratio).clamp(max=K3_CLAMP)


def last_token_index(response_mask: Tensor) -> Tensor:
    """(B,) index of the last True entry of each row of ``response_mask``.

    Raises:
        ValueError: a row has no real token.
    """
    check_mask(response_mask)
    if not bool(response_mask.any(dim=-1).all()):
        raise ValueError("response_mask has a row with no True entry; every response needs at least one real token.")
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
    return torch.where(response_mask, positions, -1).amax(dim=-1)


def token_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every real token, plus the sequence score on the last real token.

    The score lands on the last real token (the stop token, or the last sampled token of a truncated response)
    because that is the action after which the whole response exists and can be judged (Ziegler et al. 2019;
    InstructGPT). The KL term is a per-action penalty, so every real token pays it.

    Args:
        scores: (B,) sequence-level scores.
        kl: (B, T) per-token KL estimates.
        response_mask: (B, T) bool, True for a real response token.
        kl_coef: beta, the KL penalty coefficient.
    Returns:
        (B, T) float32 rewards, 0 where ``response_mask`` is False.
    """
    check_mask(response_mask)
    check_same_shape(kl=kl, response_mask=response_mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected ({kl.shape[0]},), one per response.")
    last = last_token_index(response_mask)
    at_last = torch.nn.functional.one_hot(last, kl.shape[-1]).bool()
    rewards = -kl_coef * kl.float() + torch.where(at_last, scores.float()[:, None], 0.0)
    return torch.where(response_mask, rewards, 0.0)


def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, eq. 16) over response tokens.

    The textbook reference's per-sequence recursion (rlhf_ppo.md), batched: ``delta_t = r_t + gamma * V_{t+1} - V_t``,
    ``A_t = delta_t + gamma * gae_lambda * A_{t+1}``, with ``V`` and ``A`` after the last real token taken as 0 (the
    episode ends with the response).

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) V(s_t) from the rollout critic.
        response_mask: (B, T) bool, True for real response tokens (a right-padded prefix of each row).
        gamma: discount factor.
        gae_lambda: GAE lambda.
    Returns:
        (advantages, returns), each (B, T) float32, 0 where the mask is False. Not whitened.
    """
    check_mask(response_mask)
    check_same_shape(rewards=rewards, values=values, response_mask=response_mask)
    zero = torch.zeros((), dtype=torch.float32, device=rewards.device)
    r = torch.where(response_mask, rewards.float(), zero)
    v = torch.where(response_mask, values.float(), zero)
    last_gae = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    reversed_advantages = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        last_gae = torch.where(response_mask[:, t], delta + gamma * gae_lambda * last_gae, zero)
        next_value = v[:, t]
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = torch.where(response_mask, advantages + v, zero)
    return advantages, returns


def discounted_returns(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """(B, T) float32 discounted returns ``G_t = r_t + gamma * G_{t+1}`` over each response's real tokens, 0 after
    them: REINFORCE++'s token returns (Hu 2025, eq. 4; verl ``compute_reinforce_plus_plus_outcome_advantage``).

    The same recursion as :func:`gae` with no critic and ``gae_lambda = 1`` (every ``V`` 0), which computes it.
    """
    return gae(rewards, torch.zeros_like(rewards, dtype=torch.float32), response_mask, gamma, 1.0)[0]


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, penalty: float) -> Tensor:
    """(B,) float32 soft over-long punishment of DAPO (Yu et al. 2025, eq. 13), added to the score.

    0 for a response of at most ``max_length - buffer`` tokens, then falling linearly to ``-penalty`` at
    ``max_length``: ``-penalty * (length - (max_length - buffer)) / buffer`` (verl's ``overlong_buffer``,
    ``penalty_factor``). Responses are never longer than ``max_length`` here (``generation.max_new_tokens``).

    Args:
        lengths: (B,) response lengths in tokens (the stop token included).
        max_length: the longest possible response.
        buffer: the last ``buffer`` tokens before ``max_length`` in which the penalty grows, 1 <= buffer <= max_length.
        penalty: the penalty at ``max_length``, >= 0.
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong buffer must be in [1, max_length={max_length}], got {buffer}.")
    exceed = (lengths.float() - (max_length - buffer)).clamp(min=0.0)
    return -penalty * exceed / buffer


def aggregate(
    loss_per_token: Tensor,
    response_mask: Tensor,
    aggregation: Aggregation = "token-mean",
    norm_length: int | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar over real tokens (see the module docstring for each aggregation).

    ``norm_length`` is the constant of ``seq-mean-token-sum-norm`` (required there, ignored otherwise).
    """
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    if aggregation == "token-mean":
        return masked_mean(loss_per_token, response_mask)
    has_tokens = response_mask.any(dim=-1)
    if aggregation == "seq-mean-token-mean":
        return masked_mean(masked_mean(loss_per_token, response_mask, dim=-1), has_tokens)
    per_seq = masked_sum(loss_per_token, response_mask, dim=-1)
    if aggregation == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length < 1:
            raise ValueError(f"aggregation 'seq-mean-token-sum-norm' needs norm_length >= 1, got {norm_length}.")
        per_seq = per_seq / norm_length
    return masked_mean(per_seq, has_tokens)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_coef: float,
    dual_clip_coef: float | None = None,
    aggregation: Aggregation = "token-mean",
    clip_coef_high: float | None = None,
    norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), negated for minimization.

    Per token, ``max(-A * r, -A * clip(r, 1 - clip_coef, 1 + clip_coef_high))`` with
    ``r = exp(logprobs - old_logprobs)``; ``clip_coef_high`` None is ``clip_coef`` (the symmetric clip), a larger one
    is DAPO's clip-higher (Yu et al. 2025, eq. 10: more room for raising unlikely tokens). With
    ``dual_clip_coef = c > 1`` (Ye et al. 2020), tokens with ``A < 0`` are further capped at ``-A * c`` so a huge
    ratio on a bad action cannot dominate the batch. With ``token_weights`` (the rollout correction,
    :func:`rollout_correction_weights`) each token's loss, after both clips, is multiplied by its weight before the
    aggregation; the weights are constants (detached) and the stats stay unweighted.

    Args:
        logprobs: (B, T) log pi of the taken tokens under the current policy (carries the gradient).
        old_logprobs: (B, T) log pi_old from the rollout.
        advantages: (B, T) advantages.
        response_mask: (B, T) bool, True for real response tokens.
        clip_coef: epsilon of the clip.
        dual_clip_coef: c of the dual clip, > 1, or None for no dual clip.
        aggregation: one of :data:`AGGREGATIONS` (:func:`aggregate`).
        clip_coef_high: upper epsilon of the clip, > 0, or None for ``clip_coef``.
        norm_length: the constant of ``seq-mean-token-sum-norm``.
        token_weights: (B, T) per-token weights of the loss, or None for every weight 1.
    Returns:
        (loss, stats): the scalar loss and a :class:`PolicyLossStats` of detached scalars.
    """
    check_mask(response_mask)
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask)
    if token_weights is not None:
        check_same_shape(response_mask=response_mask, token_weights=token_weights)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    if dual_clip_coef is not None and not dual_clip_coef > 1.0:
        raise ValueError(f"dual_clip_coef must be > 1 (e.g. 3.0) or None, got {dual_clip_coef}.")
    if clip_coef_high is not None and not clip_coef_high > 0:
        raise ValueError(f"clip_coef_high must be > 0 (e.g. 0.28) or None, got {clip_coef_high}.")
    # Masked-out log-ratios are set to 0 so a NaN/inf there cannot reach the gradient (0 * exp(NaN) = NaN).
    log_ratio = torch.where(response_mask, logprobs.float() - old_logprobs.float(), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_coef if clip_coef_high is None else clip_coef_high
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual_capped = torch.zeros_like(response_mask)
    if dual_clip_coef is not None:
        cap = -advantages * dual_clip_coef
        dual_capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual_capped, cap, per_token)
    if token_weights is not None:
        # Masked-out weights are set to 0 so a NaN there cannot reach the gradient of the real tokens' terms.
        per_token = per_token * torch.where(response_mask, token_weights.detach().float(), 0.0)
    loss = aggregate(per_token, response_mask, aggregation, norm_length)
    with torch.no_grad():
        masked_ratio = torch.where(response_mask, ratio, torch.zeros((), device=ratio.device))
        stats = PolicyLossStats(
            clipfrac=masked_mean((clipped > unclipped).float(), response_mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask),
            approx_kl_k1=masked_mean(-log_ratio, response_mask),
            ratio_mean=masked_mean(ratio, response_mask),
            ratio_max=masked_ratio.max(),
            dual_clipfrac=masked_mean(dual_capped.float(), response_mask),
        )
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    value_clip_coef: float | None = None,
    aggregation: Aggregation = "token-mean",
    norm_length: int | None = None,
) -> tuple[Tensor, ValueLossStats]:
    """Value-function loss ``0.5 * (V - R)^2``, optionally clipped around the rollout values (PPO2).

    With ``value_clip_coef = c``: ``V_clip = old_values + clip(V - old_values, -c, c)`` and the per-token loss is
    ``0.5 * max((V - R)^2, (V_clip - R)^2)``.

    Args:
        values: (B, T) current value predictions (carry the gradient).
        old_values: (B, T) value predictions of the rollout critic.
        returns: (B, T) value targets.
        response_mask: (B, T) bool, True for real response tokens.
        value_clip_coef: clip range, or None for the unclipped loss.
        aggregation: one of :data:`AGGREGATIONS` (:func:`aggregate`).
        norm_length: the constant of ``seq-mean-token-sum-norm``.
    Returns:
        (loss, stats): the scalar loss and a :class:`ValueLossStats` of detached scalars.
    """
    check_mask(response_mask)
    check_same_shape(values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    # Masked-out entries are set to 0 so a NaN/inf there cannot reach the gradient (0 * 2 * (NaN - R) = NaN).
    values, old_values, returns = (torch.where(response_mask, v.float(), 0.0) for v in (values, old_values, returns))
    unclipped = (values.float() - returns.float()).square()
    clip_active = torch.zeros_like(response_mask)
    if value_clip_coef is None:
        per_token = unclipped
    else:
        v_clipped = old_values.float() + (values.float() - old_values.float()).clamp(-value_clip_coef, value_clip_coef)
        clipped = (v_clipped - returns.float()).square()
        clip_active = clipped > unclipped
        per_token = torch.maximum(unclipped, clipped)
    loss = 0.5 * aggregate(per_token, response_mask, aggregation, norm_length)
    with torch.no_grad():
        stats = ValueLossStats(
            clipfrac=masked_mean(clip_active.float(), response_mask),
            explained_var=explained_variance(values.detach().float(), returns.float(), response_mask),
            value_mean=masked_mean(values.detach().float(), response_mask),
        )
    return loss, stats


def rollout_correction_weights(
    old_logprobs: Tensor,
    engine_logprobs: Tensor,
    response_mask: Tensor,
    mode: RolloutCorrection,
    cap: float,
) -> Tensor:
    """(B, T) importance weights of the trainer's rollout policy over the sampling engine (``ppo.rollout_correction``).

    A separate engine (vLLM) samples from ``pi_engine``, whose logprobs differ slightly from the trainer's ``pi_old``
    of the same weights (other kernels, precision, batching). With ``log_ratio_t = old_logprobs_t - engine_logprobs_t``
    over real tokens:

    - ``"token_tis"``: truncated importance sampling, ``w_t = min(exp(log_ratio_t), cap)`` (Yao et al. 2025, "Your
      Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl ``rollout_is: token``, TRL
      ``vllm_importance_sampling_mode="token_truncate"``).
    - ``"seq_mis"``: masked importance sampling over the sequence, ``rho_b = exp(sum_t log_ratio_t)``; every real token
      of response b weighs ``rho_b`` if ``rho_b <= cap``, else 0, which drops the response from the policy loss (Liu
      et al. 2025, "When Speed Kills Stability"; TRL ``"sequence_mask"``). The cap is compared in log space, so a
      ``rho_b`` that overflows float32 is dropped, not NaN.
    - ``"none"``: 1 on every real token (callers may equally leave ``Rollout.is_weights`` None).

    Both logprobs must be of the same (temperature-scaled) distribution. Computed without gradient.

    Args:
        old_logprobs: (B, T) log pi_old of the sampled tokens, the trainer's forward.
        engine_logprobs: (B, T) log pi_engine of the same tokens, the sampling engine's forward.
        response_mask: (B, T) bool, True for real response tokens.
        mode: one of :data:`ROLLOUT_CORRECTIONS`.
        cap: the cap C of the weights, > 0.
    Returns:
        (B, T) float32 weights, 0 where ``response_mask`` is False.
    """
    check_choice(mode, ROLLOUT_CORRECTIONS, "rollout_correction")
    if not cap > 0:
        raise ValueError(f"rollout_correction_cap must be > 0 (e.g. 2.0), got {cap}.")
    check_mask(response_mask)
    check_same_shape(old_logprobs=old_logprobs, engine_logprobs=engine_logprobs, response_mask=response_mask)
    with torch.no_grad():
        if mode == "none":
            return response_mask.float()
        # Masked-out log-ratios are set to 0 before exp and the sum, so a NaN/inf there cannot reach a weight.
        log_ratio = torch.where(response_mask, old_logprobs.float() - engine_logprobs.float(), 0.0)
        if mode == "token_tis":
            weights = torch.exp(log_ratio).clamp(max=cap)
        else:
            log_rho = log_ratio.sum(dim=-1, keepdim=True)  # (B, 1)
            weights = torch.where(log_rho <= math.log(cap), torch.exp(log_rho), 0.0).expand_as(log_ratio)
        return torch.where(response_mask, weights, 0.0)
