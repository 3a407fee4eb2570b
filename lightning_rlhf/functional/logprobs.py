"""Log-probabilities and entropies of ``softmax(logits / temperature)`` in float32, memory-aware.

Both run in float32 whatever the logits' dtype, a chunk of rows at a time, and the backward recomputes the softmax
chunk by chunk instead of keeping it, so a ``(N, V)`` float32 copy never outlives one chunk. Divide by the same
temperature that sampled the tokens: the ratio and the KL must use the sampling distribution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGSOFTMAX_CHUNK_ELEMENTS = 2**24
"""Upper bound on the float32 elements one chunk of the vocabulary math may hold (64 MiB)."""


def _upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (bf16/fp16 are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def row_chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    """``(start, end)`` row ranges of at most ``LOGSOFTMAX_CHUNK_ELEMENTS // vocab`` rows (at least one) each."""
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
        for start, end in row_chunks(*logits.shape):
            lse[start:end] = torch.logsumexp(_upcast(logits[start:end]) / temperature, dim=-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, tokens, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(logits)
        for start, end in row_chunks(*logits.shape):
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
        for start, end in row_chunks(*logits.shape):
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
        for start, end in row_chunks(*logits.shape):
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
