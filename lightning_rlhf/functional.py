"""Pure tensor math of RLHF with PPO.

Every function takes tensors and plain numbers, returns new tensors, never writes into its inputs, never logs and
never calls ``backward``. Shapes and mask polarity follow :mod:`lightning_rlhf.types`: per-token tensors are ``(B, T)``
and ``response_mask`` is True for a real response token.

Where this departs from, or chooses between, the references:

- **Empty selections.** ``masked_mean`` over an all-False mask (or an all-False row with ``dim``) is 0, so a
  minibatch without real tokens adds neither loss nor gradient. ``masked_var`` and ``masked_whiten`` need at least two
  real entries (one with ``unbiased=False``) and raise ``ValueError`` otherwise: a variance of nothing has no value.
- **Where the score lands.** On the last real token of each response (its stop token, or the last token when the
  response was truncated), as in Ziegler et al. 2019 and InstructGPT. TRL 0.29 puts it one position later.
- **Clip fraction.** The fraction of real tokens whose clipped term is the larger (active) loss term, i.e. whose
  gradient the clip zeroes (OpenAI baselines / TRL). cleanrl counts ``|r - 1| > clip_coef`` instead, which also counts
  tokens whose unclipped term is active.
- **Value loss.** ``0.5 * max((V - R)^2, (V_clip - R)^2)`` when clipped (PPO2 / TRL / cleanrl), plain
  ``0.5 * (V - R)^2`` otherwise (the seed's ``value_loss``).
- **Aggregation.** ``token-mean``: mean over every real token of the batch (PPO2, cleanrl, verl's default).
  ``seq-mean-token-mean``: mean over tokens in each sequence, then mean over sequences (verl; weights short and
  long responses equally).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_rlhf.types import PolicyLossStats, PreferenceLossStats, SFTLossStats, ValueLossStats

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token-mean", "seq-mean-token-mean"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean")

WHITEN_EPS = 1e-8
"""Added to the variance before the square root in ``masked_whiten`` (as TRL, torchtune, cleanrl)."""
K3_LOG_RATIO_CLAMP = 20.0
"""``kl_penalty("k3")`` clamps the log-ratio to [-20, 20] before ``exp`` (verl ``low_var_kl``): below about -88 the
float32 ``exp`` overflows to inf."""
K3_CLAMP = 10.0
"""``kl_penalty("k3")`` caps the per-token estimate at 10 nats (verl ``low_var_kl``), so one token the policy made far
less likely than the reference cannot dominate a response's reward."""
LOGSOFTMAX_CHUNK_ELEMENTS = 2**24
"""Upper bound on the float32 elements one chunk of the vocabulary math may hold (64 MiB)."""


# ----------------------------------------------------------------------------------------------------------- checks
def _check_mask(mask: Tensor, name: str = "response_mask") -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = real token), got dtype {mask.dtype}.")


def _check_same_shape(**tensors: Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; they must match."
            )


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(repr(c) for c in choices)}.")


# ------------------------------------------------------------------------------------------------- masked statistics
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is True; masked-out entries (even NaN or inf) are ignored."""
    _check_mask(mask, "mask")
    _check_same_shape(x=x, mask=mask)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is True.

    Args:
        x: values, any shape.
        mask: bool, same shape as ``x``; True = include.
        dim: reduce over this dimension only; None reduces over everything.
    Returns:
        A scalar (``dim=None``) or ``x`` reduced over ``dim``. An empty selection gives 0.
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over entries where ``mask`` is True (Bessel-corrected when ``unbiased``).

    Raises:
        ValueError: fewer than two real entries (one when ``unbiased=False``).
    """
    _check_mask(mask, "mask")
    count = int(mask.sum())
    needed = 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"mask selects {count} entries; masked_var(unbiased={unbiased}) needs at least {needed}.")
    mean = masked_mean(x, mask)
    # Zero masked-out deviations before squaring: a NaN/inf there would reach the gradient as 0 * 2 * (NaN - mean).
    sq_dev = masked_sum(torch.where(mask, x - mean, 0.0) ** 2, mask)
    return sq_dev / (count - 1 if unbiased else count)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, mean: float | None = None, var: float | None = None
) -> Tensor:
    """Normalize ``x`` to unit variance (and zero mean if ``shift_mean``) over the entries where ``mask`` is True.

    Uses the unbiased variance plus ``WHITEN_EPS``. With ``shift_mean=False`` the mean is added back, so only the
    scale changes (TRL's ``whiten(shift_mean=False)``). Entries where ``mask`` is False are 0 in the result.

    Args:
        x: values, any shape.
        mask: bool, same shape; True = include.
        shift_mean: subtract the mean (True) or only rescale (False).
        mean: precomputed mean to use instead of ``masked_mean(x, mask)`` (e.g. reduced across processes).
        var: precomputed unbiased variance to use instead of ``masked_var(x, mask)``; pass both or neither.
    """
    if (mean is None) != (var is None):
        raise ValueError("masked_whiten: pass both mean and var, or neither.")
    if mean is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        _check_mask(mask, "mask")
        mean, var = (
            torch.as_tensor(mean, dtype=x.dtype, device=x.device),
            torch.as_tensor(var, dtype=x.dtype, device=x.device),
        )
    whitened = torch.where(mask, x - mean, 0.0) * torch.rsqrt(var + WHITEN_EPS)  # masked NaN/inf: see masked_var
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over real tokens (cleanrl ``explained_var``).

    Returns NaN when the returns have zero variance (nothing to explain) or fewer than two real tokens exist.
    """
    _check_same_shape(values=values, returns=returns, mask=mask)
    # No host read of the token count (a device sync per call on GPU): the count test happens on the device.
    count = mask.sum()
    var_returns, var_residual = _sample_var(returns, mask, count), _sample_var(returns - values, mask, count)
    explained = 1 - var_residual / var_returns.masked_fill(var_returns == 0, 1.0)
    return torch.where((count >= 2) & (var_returns > 0), explained, float("nan"))


def _sample_var(x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """Bessel-corrected variance over ``mask`` without checking ``count`` (garbage, but finite, below 2 entries)."""
    sq_dev = masked_sum(torch.where(mask, x - masked_mean(x, mask), 0.0) ** 2, mask)
    return sq_dev / (count - 1).clamp(min=1)


# ------------------------------------------------------------------------------------------- logprobs and entropy
def _upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (bf16/fp16 are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _row_chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    step = max(1, LOGSOFTMAX_CHUNK_ELEMENTS // max(vocab, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _TokenLogprob(torch.autograd.Function):
    """log softmax(logits / temperature)[token], chunked over rows; saves only the input logits and the log-normalizer.

    The float32 softmax is recomputed chunk by chunk in backward instead of being kept alive, so a ``(N, V)`` float32
    copy never outlives one chunk (the gradient itself is returned in the logits' dtype).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:  # (N, V), (N,) -> (N,)
        lse = torch.empty(logits.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        picked = _upcast(logits.gather(-1, tokens[:, None]).squeeze(-1)) / temperature
        for start, end in _row_chunks(*logits.shape):
            lse[start:end] = torch.logsumexp(_upcast(logits[start:end]) / temperature, dim=-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, tokens, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(logits)
        for start, end in _row_chunks(*logits.shape):
            probs = torch.exp(_upcast(logits[start:end]) / t - lse[start:end, None])
            g = -probs * _upcast(grad_out[start:end, None])
            g.scatter_add_(-1, tokens[start:end, None], _upcast(grad_out[start:end, None]))
            grad[start:end] = (g / t).to(logits.dtype)
        return grad, None, None


class _Entropy(torch.autograd.Function):
    """Entropy of softmax(logits / temperature), chunked over rows, recomputing the float32 softmax in backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float) -> Tensor:  # (N, V) -> (N,)
        out = torch.empty(logits.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        for start, end in _row_chunks(*logits.shape):
            z = _upcast(logits[start:end]) / temperature
            logp = torch.log_softmax(z, dim=-1)
            out[start:end] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (logits,) = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(logits)
        for start, end in _row_chunks(*logits.shape):
            z = _upcast(logits[start:end]) / t
            logp = torch.log_softmax(z, dim=-1)
            p = logp.exp()
            # dH/dz_i = -p_i * (log p_i + H) = -p_i * (z_i - E_p[z]); chain rule through z = logits / t.
            entropy = -(p * logp).sum(-1, keepdim=True)
            g = -p * (logp + entropy) * _upcast(grad_out[start:end, None])
            grad[start:end] = (g / t).to(logits.dtype)
        return grad, None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    The log-softmax runs in float32 whatever the logits' dtype, and the backward recomputes it chunk by chunk, so no
    full-vocabulary float32 copy is kept for the backward pass. Divide by the same temperature that sampled the tokens
    (the ratio and the KL must use the sampling distribution).

    Args:
        logits: (B, T, V) unnormalized scores, any float dtype.
        tokens: (B, T) long token ids.
        temperature: the sampling temperature, > 0.
    Returns:
        (B, T) log-probabilities in float32 (float64 for float64 logits).
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but logits has {tuple(logits.shape)}; expected (B, T)."
        )
    flat = _TokenLogprob.apply(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), float(temperature))
    return flat.view(tokens.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, in float32 and memory-aware as above.

    Args:
        logits: (B, T, V) unnormalized scores.
        temperature: > 0.
    Returns:
        (B, T) entropies in nats, float32 (float64 for float64 logits).
    """
    _check_temperature(temperature)
    flat = _Entropy.apply(logits.reshape(-1, logits.shape[-1]), float(temperature))
    return flat.view(logits.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------- KL
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
    _check_choice(estimator, KL_ESTIMATORS, "kl_estimator")
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
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
    _check_mask(response_mask)
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
    _check_mask(response_mask)
    _check_same_shape(kl=kl, response_mask=response_mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected ({kl.shape[0]},), one per response.")
    last = last_token_index(response_mask)
    at_last = torch.nn.functional.one_hot(last, kl.shape[-1]).bool()
    rewards = -kl_coef * kl.float() + torch.where(at_last, scores.float()[:, None], 0.0)
    return torch.where(response_mask, rewards, 0.0)


# ---------------------------------------------------------------------------------------------------------- advantages
def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, eq. 16) over response tokens.

    The seed's per-sequence recursion, batched: ``delta_t = r_t + gamma * V_{t+1} - V_t``,
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
    _check_mask(response_mask)
    _check_same_shape(rewards=rewards, values=values, response_mask=response_mask)
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


# ------------------------------------------------------------------------------------------------------------- losses
def aggregate(loss_per_token: Tensor, response_mask: Tensor, aggregation: Aggregation = "token-mean") -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar over real tokens.

    ``token-mean`` averages over every real token of the batch; ``seq-mean-token-mean`` averages each sequence's tokens,
    then the sequences that have any real token.
    """
    _check_choice(aggregation, AGGREGATIONS, "aggregation")
    if aggregation == "token-mean":
        return masked_mean(loss_per_token, response_mask)
    per_seq = masked_mean(loss_per_token, response_mask, dim=-1)
    return masked_mean(per_seq, response_mask.any(dim=-1))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_coef: float,
    dual_clip_coef: float | None = None,
    aggregation: Aggregation = "token-mean",
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), negated for minimization.

    Per token, ``max(-A * r, -A * clip(r, 1 - clip_coef, 1 + clip_coef))`` with ``r = exp(logprobs - old_logprobs)``.
    With ``dual_clip_coef = c > 1`` (Ye et al. 2020), tokens with ``A < 0`` are further capped at ``-A * c`` so a huge
    ratio on a bad action cannot dominate the batch.

    Args:
        logprobs: (B, T) log pi of the taken tokens under the current policy (carries the gradient).
        old_logprobs: (B, T) log pi_old from the rollout.
        advantages: (B, T) advantages.
        response_mask: (B, T) bool, True for real response tokens.
        clip_coef: epsilon of the clip.
        dual_clip_coef: c of the dual clip, > 1, or None for no dual clip.
        aggregation: "token-mean" or "seq-mean-token-mean".
    Returns:
        (loss, stats): the scalar loss and a :class:`PolicyLossStats` of detached scalars.
    """
    _check_mask(response_mask)
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask)
    _check_choice(aggregation, AGGREGATIONS, "aggregation")
    if dual_clip_coef is not None and not dual_clip_coef > 1.0:
        raise ValueError(f"dual_clip_coef must be > 1 (e.g. 3.0) or None, got {dual_clip_coef}.")
    # Masked-out log-ratios are set to 0 so a NaN/inf there cannot reach the gradient (0 * exp(NaN) = NaN).
    log_ratio = torch.where(response_mask, logprobs.float() - old_logprobs.float(), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    per_token = torch.maximum(unclipped, clipped)
    dual_capped = torch.zeros_like(response_mask)
    if dual_clip_coef is not None:
        cap = -advantages * dual_clip_coef
        dual_capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual_capped, cap, per_token)
    loss = aggregate(per_token, response_mask, aggregation)
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
        aggregation: "token-mean" or "seq-mean-token-mean".
    Returns:
        (loss, stats): the scalar loss and a :class:`ValueLossStats` of detached scalars.
    """
    _check_mask(response_mask)
    _check_same_shape(values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    _check_choice(aggregation, AGGREGATIONS, "aggregation")
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
    loss = 0.5 * aggregate(per_token, response_mask, aggregation)
    with torch.no_grad():
        stats = ValueLossStats(
            clipfrac=masked_mean(clip_active.float(), response_mask),
            explained_var=explained_variance(values.detach().float(), returns.float(), response_mask),
            value_mean=masked_mean(values.detach().float(), response_mask),
        )
    return loss, stats


# ---------------------------------------------------------------------------------------------- SFT and reward model
def sft_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, SFTLossStats]:
    """Next-token negative log-likelihood of the trained tokens only (the response), token-mean over the batch.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; a token counts when ``loss_mask`` is True at its own position,
    so prompt and padding tokens add neither loss nor gradient, whatever their logits (TRL ``completion_only_loss``).
    The same as :func:`sft_token_loss` on the logits at the predicting positions.

    Args:
        logits: (B, L, V) unnormalized scores of the causal LM over the whole sequence, any float dtype.
        input_ids: (B, L) long token ids, prompt then response then padding.
        loss_mask: (B, L) bool, True for a token whose prediction is trained (a response token). Position 0 must be
            False: nothing predicts the first token.
    Returns:
        (loss, stats): the scalar mean NLL (0 when no token is trained) and an :class:`SFTLossStats`.
    """
    _check_mask(loss_mask, "loss_mask")
    _check_same_shape(input_ids=input_ids, loss_mask=loss_mask)
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} but input_ids has {tuple(input_ids.shape)}.")
    predicts = sft_predicting_positions(loss_mask)  # (B, L - 1): position t predicts trained token t + 1
    return sft_token_loss(logits[:, :-1][predicts], input_ids[:, 1:][predicts])


def sft_predicting_positions(loss_mask: Tensor) -> Tensor:
    """(B, L - 1) bool: True at position t when token t + 1 is trained, i.e. where the SFT loss reads logits.

    Args:
        loss_mask: (B, L) bool, True for a trained token; position 0 must be False (nothing predicts it).
    """
    _check_mask(loss_mask, "loss_mask")
    if loss_mask[:, 0].any():
        raise ValueError("loss_mask[:, 0] must be False: the first token of a sequence has no prediction to train.")
    return loss_mask[:, 1:]


def sft_token_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, SFTLossStats]:
    """Mean negative log-likelihood of ``targets`` under ``logits`` already gathered at the N trained predictions.

    With the logits of only these positions (``lm_head`` run on N rows instead of B x L), a large vocabulary costs
    no memory or time for prompt and padding positions. The same as :func:`sft_loss_from_terms` of
    :func:`sft_token_terms`, which a chunked ``lm_head`` computes a chunk at a time.

    Args:
        logits: (N, V) unnormalized scores, one row per trained token, any float dtype.
        targets: (N,) long, the token each row must predict.
    Returns:
        (loss, stats): the scalar mean NLL in float32 (0 when N = 0) and an :class:`SFTLossStats`.
    """
    return sft_loss_from_terms(*sft_token_terms(logits, targets))


def sft_token_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token terms of the SFT loss: ``(logprobs, correct)``, each (N,) float32; ``correct`` is 1 where the
    argmax of a row of ``logits`` (N, V) is its target (N,), without a graph."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"Expected logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).float()
    return logprobs_from_logits(logits, targets), correct


def sft_loss_from_terms(logprobs: Tensor, correct: Tensor) -> tuple[Tensor, SFTLossStats]:
    """The SFT loss and its stats from :func:`sft_token_terms`' (N,) outputs: mean NLL (0 when N = 0)."""
    _check_same_shape(logprobs=logprobs, correct=correct)
    count = max(logprobs.shape[0], 1)  # a shape, not a host read
    loss = -logprobs.sum() / count
    stats = SFTLossStats(
        token_accuracy=correct.detach().sum() / count,
        num_tokens=torch.tensor(logprobs.shape[0], device=logprobs.device),
    )
    return loss, stats


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, PreferenceLossStats]:
    """Pairwise reward-model loss ``-log sigmoid(r_chosen - r_rejected - margin)``, mean over pairs.

    Bradley and Terry 1952; Ouyang et al. 2022 (InstructGPT) eq. 1 without the 1/C(K, 2) grouping; the margin is
    Touvron et al. 2023 (Llama 2) eq. 2: a pair labelled "much better" must be separated by at least ``margin`` before
    its loss becomes small. Computed as ``softplus(-(diff - margin))``, which is exact for large differences.

    Args:
        chosen_scores: (B,) scalar rewards of the preferred responses (carry the gradient).
        rejected_scores: (B,) scalar rewards of the rejected responses.
        margin: (B,) per-pair target margins, one float for every pair, or None (0).
    Returns:
        (loss, stats): the scalar loss and a :class:`PreferenceLossStats` (accuracy and mean margin ignore ``margin``).
    """
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    if chosen_scores.dim() != 1 or chosen_scores.numel() == 0:
        raise ValueError(f"scores must be 1-D with at least one pair, (B,); got shape {tuple(chosen_scores.shape)}.")
    diff = chosen_scores.float() - rejected_scores.float()  # (B,)
    if isinstance(margin, Tensor):
        _check_same_shape(chosen_scores=chosen_scores, margin=margin)
        logits = diff - margin.float()
    else:
        logits = diff if margin is None else diff - float(margin)
    loss = torch.nn.functional.softplus(-logits).mean()  # = -log sigmoid(logits)
    with torch.no_grad():
        stats = PreferenceLossStats(
            accuracy=(diff > 0).float().mean(),
            margin=diff.mean(),
            chosen_score=chosen_scores.float().mean(),
            rejected_score=rejected_scores.float().mean(),
        )
    return loss, stats
