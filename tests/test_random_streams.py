"""Tests of lightning_rlhf.functional.random_streams: the hash against a plain-integer reference, keys, the draw."""

import math

import pytest
import torch

from lightning_rlhf.functional.random_streams import KEY_BITS, draw_tokens, lowbias32, response_keys, response_uniforms


def lowbias32_reference(x: int) -> int:
    """Wellons' C code with Python integers truncated to 32 bits after every multiplication."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


WORDS = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]


def test_lowbias32_matches_the_unsigned_32_bit_reference():
    got = lowbias32(torch.tensor(WORDS, dtype=torch.long)).tolist()
    assert got == [lowbias32_reference(w) for w in WORDS]
    assert got[0] == 0  # the hash fixes 0, which is why every absorbed word gets GOLDEN added first
    assert all(0 <= h < 2**32 for h in got)


def test_keys_name_each_input_and_do_not_depend_on_the_other_rows():
    index = torch.tensor([0, 1, 2, 3])
    keys = response_keys(0, 5, index)
    assert keys.dtype == torch.long
    assert bool((keys >= 0).all())
    assert bool((keys < 2**KEY_BITS).all())
    assert len(set(keys.tolist())) == 4
    assert torch.equal(response_keys(0, 5, index[[2]]), keys[[2]])  # a row's key ignores the rest of the batch
    assert torch.equal(response_keys(0, 5, index.flip(0)), keys.flip(0))
    for changed in (response_keys(1, 5, index), response_keys(0, 6, index), response_keys(0, 5, index, 1)):
        assert not set(changed.tolist()) & set(keys.tolist())
    big = response_keys(2**63 + 5, 2**40, torch.tensor([2**50]))  # every word of a 64-bit input is absorbed
    assert big.item() != response_keys(5, 2**40, torch.tensor([2**50])).item()
    with pytest.raises(ValueError, match="prompt indices >= 0"):
        response_keys(0, 0, torch.tensor([-1]))


def test_uniforms_are_uniform_on_the_unit_interval():
    # 40,000 draws (2,000 streams x 20 steps). Their mean and variance must sit within 4 standard errors of 1/2
    # and 1/12, and the Kolmogorov-Smirnov distance below its 0.1% critical value 1.95 / sqrt(n).
    u = response_uniforms(response_keys(0, 0, torch.arange(2000)), 20).flatten()
    n = u.numel()
    assert u.dtype == torch.float64
    assert bool((u >= 0).all())
    assert bool((u < 1).all())
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # Var of (U - 1/2)^2 is 1/180
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (ecdf - u.sort().values).abs().max().item() < 1.95 / math.sqrt(n)
    assert len(set(u.tolist())) == n


def test_uniforms_of_a_stream_are_its_own_whatever_the_other_rows_and_steps():
    keys = response_keys(3, 1, torch.arange(6))
    table = response_uniforms(keys, 8)
    assert table.shape == (6, 8)
    assert torch.equal(response_uniforms(keys[[4, 1]], 8), table[[4, 1]])
    assert torch.equal(response_uniforms(keys, 3), table[:, :3])


def test_draw_inverts_the_cumulative_distribution():
    # probs (0.25, 0.5, 0.25): cdf (0.25, 0.75, 1); token i when cdf[i - 1] <= u < cdf[i].
    probs = torch.tensor([[0.25, 0.5, 0.25]]).expand(6, 3)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 0.999], dtype=torch.float64)
    assert draw_tokens(probs, u).tolist() == [0, 0, 1, 1, 2, 2]
    # Unnormalized weights (1, 2, 1) scale with their total 4: u = 0.3 -> 1.2, in [1, 3).
    assert draw_tokens(torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([0.3], dtype=torch.float64)).tolist() == [1]


def test_draw_never_picks_a_token_of_probability_zero():
    below_one = 1 - 2.0**-53
    probs = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    u = torch.tensor([0.5, 0.0, below_one, below_one], dtype=torch.float64)
    assert draw_tokens(probs, u).tolist() == [2, 1, 2, 2]


def test_draws_follow_the_probabilities():
    # 30,000 draws from (0.1, 0.6, 0.3): each count within 4 binomial standard deviations of n * p.
    probs = torch.tensor([0.1, 0.6, 0.3])
    u = response_uniforms(response_keys(1, 0, torch.arange(3000)), 10).flatten()
    counts = torch.bincount(draw_tokens(probs.expand(u.numel(), 3), u), minlength=3).tolist()
    n = u.numel()
    for count, p in zip(counts, probs.tolist(), strict=True):
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p))
