"""One random stream per response: counter-based random numbers and the sampling draw that reads them.

Every sampled response owns a stream named by ``(seed, iteration, prompt index, sample number)``: its ``key``. The
uniform number that draws its token at step ``t`` is a hash of ``(key, t)``, so a response's tokens depend on its key
and its logits only: not on the process that samples it, the other rows of its batch, which rows already finished, or
the number of devices. Processes sample different responses because their prompts differ; one process with a batch of
2B and two processes with B each sample the same responses; a resumed run samples what the uninterrupted one would
have, without any random state. The same key can seed a request of an engine that takes per-request seeds.

The hash is ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2020: a full-avalanche bijection of 32-bit
words, bias 0.17), computed on int64 tensors holding 32-bit words, with multiplications split into 16-bit halves so
no product leaves int64; words are absorbed one at a time, ``state = lowbias32(state ^ lowbias32(word + GOLDEN))``.
A uniform takes 53 bits from two such hashes (as NumPy's ``random_sample``), and a token is drawn by inverting the
cumulative distribution in float64 (the textbook inverse-transform method), which selects each token with exactly its
probability up to that rounding and never a token of probability 0.

Pure torch, no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
"""The low 32 bits."""
GOLDEN = 0x9E3779B9
"""2^32 / golden ratio: added to every absorbed word (and the initial state), so a word of 0 does not hash to 0."""
KEY_BITS = 62
"""Keys are non-negative int64 values below ``2 ** KEY_BITS``."""
_LANE_KEY_LOW, _LANE_KEY_HIGH, _LANE_UNIFORM_HIGH, _LANE_UNIFORM_LOW = 0, 1, 2, 3


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in [0, 2**32), in two 16-bit halves so no product overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def lowbias32(x: Tensor) -> Tensor:
    """Wellons' ``lowbias32`` hash of each 32-bit word of ``x`` (int64 in [0, 2**32)); a bijection of 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _words(value: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 32-bit words of non-negative int64 ``value``."""
    return value & MASK32, (value >> 32) & MASK32


def _absorb(words: list[Tensor]) -> Tensor:
    """Hash a sequence of 32-bit word tensors (broadcast together) into one 32-bit word per element."""
    state = torch.full_like(words[0], GOLDEN)
    for word in words:
        state = lowbias32(state ^ lowbias32((word + GOLDEN) & MASK32))
    return state


def response_keys(seed: int, iteration: int, prompt_index: Tensor, sample_index: Tensor | int = 0) -> Tensor:
    """(B,) int64 keys, one per response: the name of its random stream.

    Args:
        seed: the run's seed (any int; reduced modulo ``2**64``).
        iteration: the PPO iteration (``trainer.global_step``), >= 0.
        prompt_index: (B,) long, each prompt's index in the dataset (the same whatever process samples it), >= 0.
        sample_index: (B,) long or an int: which of a prompt's samples this is.
    Returns:
        (B,) int64 in [0, 2**KEY_BITS), on ``prompt_index``'s device.
    """
    if iteration < 0 or bool((prompt_index < 0).any()):
        raise ValueError(
            f"response_keys needs iteration >= 0 and prompt indices >= 0, got {iteration} and {prompt_index}."
        )
    index = prompt_index.long()
    seed_word = seed % 2**64
    constants = [seed_word & MASK32, seed_word >> 32, iteration & MASK32, (iteration >> 32) & MASK32]
    words = [torch.full_like(index, c) for c in constants]
    sample = torch.as_tensor(sample_index, dtype=torch.long, device=index.device).expand_as(index)
    words += [*_words(index), *_words(sample)]
    low = _absorb([*words, torch.full_like(index, _LANE_KEY_LOW)])
    high = _absorb([*words, torch.full_like(index, _LANE_KEY_HIGH)])
    return ((high & ((1 << (KEY_BITS - 32)) - 1)) << 32) | low


def response_uniforms(keys: Tensor, num_steps: int) -> Tensor:
    """(B, num_steps) float64 uniforms in [0, 1): entry ``[b, t]`` draws response b's token at step t.

    53 bits each: ``(high >> 5) * 2**26 + (low >> 6)`` over ``2**53``, from two hashes of ``(key, t)``. Computed for
    every step at once, so a decode step only reads a column.
    """
    if keys.dim() != 1:
        raise ValueError(f"keys must be (B,), got shape {tuple(keys.shape)}.")
    steps = torch.arange(num_steps, dtype=torch.long, device=keys.device)[None, :]  # (1, S)
    key_low, key_high = (w[:, None].expand(-1, num_steps) for w in _words(keys.long()))  # (B, S) each
    words = [key_low, key_high, steps.expand_as(key_low)]
    high = _absorb([*words, torch.full_like(key_low, _LANE_UNIFORM_HIGH)])
    low = _absorb([*words, torch.full_like(key_low, _LANE_UNIFORM_LOW)])
    return ((high >> 5) * 2**26 + (low >> 6)).double() / 2**53


def draw_tokens(probs: Tensor, uniforms: Tensor) -> Tensor:
    """(A,) long: for each row of ``probs`` (A, V), the token whose cumulative-probability interval holds its uniform.

    Token i is drawn when ``cdf[i - 1] <= u * cdf[V - 1] < cdf[i]`` (cumulative sums in float64; scaled by the total,
    so unnormalized weights work too): each token with its probability, never one of probability 0.

    Args:
        probs: (A, V) non-negative probabilities (or weights) per row, any float dtype; each row has a positive entry.
        uniforms: (A,) in [0, 1).
    """
    cdf = probs.double().cumsum(-1)  # (A, V)
    total = cdf[:, -1]
    # Strictly below the total even where u * total rounds up to it, so the interval found has a positive width.
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(uniforms.to(cdf.device, torch.float64) * total, below_total)
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
