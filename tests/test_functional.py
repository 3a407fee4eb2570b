"""Tests of ``lightning_rlhf.functional``: hand-worked values, the seed's numpy reference, properties, bad input.

Every ``assert_close`` runs at its default tolerances; the expected numbers are derived by hand in the comment beside
them. Per-token tensors are (B, T) and ``response_mask`` is True for a real token, as in ``lightning_rlhf.types``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from seed_reference import PPOBuffer
from seed_reference import ppo_loss as seed_ppo_loss
from seed_reference import value_loss as seed_value_loss
from torch.testing import assert_close

from lightning_rlhf import functional as fn

T_ = True
F_ = False
LN2 = math.log(2.0)


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)


def _mask(*rows) -> torch.Tensor:
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.bool)


def _right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


# ================================================================================================ masked statistics
def test_masked_mean_hand_worked():
    x = _t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = _mask([T_, F_, T_], [F_, F_, T_])
    # all: (1 + 3 + 6) / 3
    assert_close(fn.masked_mean(x, mask), torch.tensor(10.0 / 3.0))
    # rows: (1 + 3) / 2 = 2; 6 / 1 = 6
    assert_close(fn.masked_mean(x, mask, dim=-1), _t([2.0, 6.0]))
    # columns: 1 / 1; nothing selected -> 0 (documented); (3 + 6) / 2 = 4.5
    assert_close(fn.masked_mean(x, mask, dim=0), _t([1.0, 0.0, 4.5]))


def test_masked_sum_hand_worked():
    x = _t([1.0, float("nan")], [float("inf"), 5.0])
    mask = _mask([T_, F_], [F_, T_])
    # 1 + 5; the NaN and inf are masked out
    assert_close(fn.masked_sum(x, mask), torch.tensor(6.0))
    assert_close(fn.masked_sum(x, mask, dim=-1), _t([1.0, 5.0]))


def test_masked_mean_empty_selection_is_zero_with_zero_grad():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")]], requires_grad=True)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mean = fn.masked_mean(x, mask)
    assert_close(mean, torch.tensor(0.0))
    mean.backward()
    assert_close(x.grad, torch.zeros(2, 2))
    # An empty row with dim: 0 for that row, the other row's mean (1 + 2) / 2 = 1.5.
    row_mask = _mask([T_, T_], [F_, F_])
    assert_close(fn.masked_mean(x.detach(), row_mask, dim=-1), _t([1.5, 0.0]))


def test_masked_var_hand_worked():
    x = _t([1.0, 2.0, 3.0, 100.0])
    mask = _mask([T_, T_, T_, F_])
    # mean 2; squared deviations 1 + 0 + 1 = 2; unbiased 2 / (3 - 1) = 1, biased 2 / 3
    assert_close(fn.masked_var(x, mask), torch.tensor(1.0))
    assert_close(fn.masked_var(x, mask, unbiased=False), torch.tensor(2.0 / 3.0))


@pytest.mark.parametrize(
    ("selected", "unbiased", "raises"),
    [(0, True, True), (1, True, True), (2, True, False), (0, False, True), (1, False, False)],
)
def test_masked_var_needs_enough_entries(selected: int, unbiased: bool, raises: bool):
    x = _t([1.0, 3.0, 5.0])
    mask = torch.arange(3) < selected
    if raises:
        with pytest.raises(ValueError, match=r"masked_var.*needs at least"):
            fn.masked_var(x, mask, unbiased=unbiased)
    else:
        # two entries (1, 3): mean 2, squared deviations 1 + 1 = 2, unbiased 2 / 1; one entry, biased: 0 / 1
        assert_close(fn.masked_var(x, mask, unbiased=unbiased), torch.tensor(2.0 if selected == 2 else 0.0))


def test_masked_whiten_hand_worked():
    x = _t([[1.0, 2.0, 3.0, 100.0]])
    mask = _mask([[T_, T_, T_, F_]])
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8) = [-1, 0, 1] (1e-8 is far below float32 resolution here);
    # the padded position is 0
    assert_close(fn.masked_whiten(x, mask), _t([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False adds the mean 2 back: [-1, 0, 1] + 2 = [1, 2, 3]; the padded position is still 0
    assert_close(fn.masked_whiten(x, mask, shift_mean=False), _t([[1.0, 2.0, 3.0, 0.0]]))
    # A wider spread: x = [0, 4], mean 2, unbiased var (4 + 4) / 1 = 8 -> (x - 2) / sqrt(8) = -+0.70710677;
    # without the shift: 2 -+ 0.70710677 = [1.2928932, 2.7071068]
    y, ymask = _t([[0.0, 4.0]]), _mask([[T_, T_]])
    assert_close(fn.masked_whiten(y, ymask), _t([[-0.70710677, 0.70710677]]))
    assert_close(fn.masked_whiten(y, ymask, shift_mean=False), _t([[1.2928932, 2.7071068]]))


@pytest.mark.parametrize("selected", [0, 1])
def test_masked_whiten_raises_without_two_entries(selected: int):
    mask = torch.arange(3) < selected
    with pytest.raises(ValueError, match="mask selects"):
        fn.masked_whiten(_t([1.0, 2.0, 3.0]), mask)


def test_explained_variance_hand_worked():
    returns = _t([[1.0, 2.0, 3.0, 7.0]])
    values = _t([[1.0, 2.0, 2.0, -9.0]])
    mask = _mask([[T_, T_, T_, F_]])
    # Var(returns) over [1, 2, 3] = 1 (unbiased); returns - values = [0, 0, 1], mean 1/3,
    # squared deviations 1/9 + 1/9 + 4/9 = 2/3, unbiased 1/3 -> 1 - (1/3) / 1 = 2/3
    assert_close(fn.explained_variance(values, returns, mask), torch.tensor(2.0 / 3.0))
    # values == returns explains everything: 1 - 0 / 1 = 1
    assert_close(fn.explained_variance(returns, returns, mask), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("values", "returns", "mask"),
    [
        ([[1.0, 2.0, 3.0]], [[1.0, 1.0, 1.0]], [[T_, T_, T_]]),  # constant returns, values off: documented NaN
        ([[1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0]], [[T_, T_, T_]]),  # constant returns, values exact: 0 / 0
        ([[1.0, 2.0, 3.0]], [[4.0, 5.0, 9.0]], [[T_, F_, F_]]),  # one real token: no variance at all
    ],
)
def test_explained_variance_is_nan_when_undefined(values, returns, mask):
    assert torch.isnan(fn.explained_variance(_t(values), _t(returns), _mask(mask)))


# ===================================================================================== logprobs and entropy
def test_logprobs_from_logits_hand_worked_with_temperature():
    logits = _t([[[0.0, 2 * LN2, 0.0], [0.0, 2 * LN2, 0.0]]])  # (1, 2, 3)
    tokens = torch.tensor([[1, 0]])
    # temperature 2: z = [0, ln 2, 0] -> softmax [1/4, 1/2, 1/4]; log(1/2) = -0.6931472, log(1/4) = -1.3862944
    assert_close(fn.logprobs_from_logits(logits, tokens, temperature=2.0), _t([[-0.6931472, -1.3862944]]))
    # temperature 1: z = [0, 2 ln 2, 0] -> exp: [1, 4, 1] / 6; log(4/6) = -0.4054651, log(1/6) = -1.7917595
    assert_close(fn.logprobs_from_logits(logits, tokens), _t([[-0.4054651, -1.7917595]]))


def test_entropy_from_logits_hand_worked_with_temperature():
    logits = _t([[[0.0, 2 * LN2, 0.0]]])
    # temperature 2: p = [1/4, 1/2, 1/4]; H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2 = 1.0397208
    assert_close(fn.entropy_from_logits(logits, temperature=2.0), _t([[1.0397208]]))
    # temperature 1: p = [1/6, 2/3, 1/6]; H = (1/3) ln 6 + (2/3) ln 1.5 = 0.5972532 + 0.2703101 = 0.8675633
    assert_close(fn.entropy_from_logits(logits), _t([[0.8675633]]))


@pytest.mark.parametrize(("vocab", "temperature"), [(2, 1.0), (5, 0.3), (50257, 1.7)])
def test_entropy_of_uniform_logits_is_log_vocab(vocab: int, temperature: float):
    logits = torch.full((2, 1, vocab), 3.25)
    # softmax of equal logits is 1/V at any temperature, H = ln V (ln 2 = 0.6931, ln 5 = 1.6094, ln 50257 = 10.8249)
    assert_close(fn.entropy_from_logits(logits, temperature), torch.full((2, 1), math.log(vocab)))


def _naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def _naive_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _random_logits(seed: int, shape=(2, 4, 5), dtype=torch.float32, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, tokens


TINY_CHUNK = 15
"""With a vocabulary of 5, 15 elements is 3 rows a chunk: 8 rows run as chunks of 3, 3 and 2."""


@pytest.fixture(params=["default-chunk", "tiny-chunk"])
def chunking(request, monkeypatch):
    if request.param == "tiny-chunk":
        monkeypatch.setattr(fn.logprobs, "LOGSOFTMAX_CHUNK_ELEMENTS", TINY_CHUNK)
        assert fn.row_chunks(8, 5) == [(0, 3), (3, 6), (6, 8)]
    return request.param


@pytest.mark.usefixtures("chunking")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_and_entropy_gradcheck_float64(temperature: float):
    logits, tokens = _random_logits(0, dtype=torch.float64)
    logits.requires_grad_(True)
    # tighter than gradcheck's defaults (atol 1e-5, rtol 1e-3): float64 central differences are good to ~1e-9 here
    tight = {"atol": 1e-8, "rtol": 1e-6}
    assert torch.autograd.gradcheck(lambda x: fn.logprobs_from_logits(x, tokens, temperature), (logits,), **tight)
    assert torch.autograd.gradcheck(lambda x: fn.entropy_from_logits(x, temperature), (logits,), **tight)


@pytest.mark.usefixtures("chunking")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_logprob_and_entropy_match_naive_log_softmax_float32(temperature: float, seed: int):
    logits, tokens = _random_logits(seed)
    grad_out = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed + 100))
    ours, naive = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)

    lp, lp_naive = fn.logprobs_from_logits(ours, tokens, temperature), _naive_logprobs(naive, tokens, temperature)
    assert lp.dtype == torch.float32
    assert_close(lp, lp_naive)
    (lp * grad_out).sum().backward()
    (lp_naive * grad_out).sum().backward()
    assert_close(ours.grad, naive.grad)

    ours.grad, naive.grad = None, None
    ent, ent_naive = fn.entropy_from_logits(ours, temperature), _naive_entropy(naive, temperature)
    assert_close(ent, ent_naive)
    (ent * grad_out).sum().backward()
    (ent_naive * grad_out).sum().backward()
    assert_close(ours.grad, naive.grad)


def test_bf16_logits_give_float32_results_close_to_the_float32_computation():
    logits, tokens = _random_logits(3, shape=(2, 4, 50), dtype=torch.bfloat16, scale=5.0)
    upcast = logits.float()  # the same numbers, exactly representable in float32
    ours = logits.clone().requires_grad_(True)
    ref = upcast.clone().requires_grad_(True)

    lp, ent = fn.logprobs_from_logits(ours, tokens, 0.8), fn.entropy_from_logits(ours, 0.8)
    assert lp.dtype == torch.float32
    assert ent.dtype == torch.float32
    assert torch.isfinite(lp).all()
    assert torch.isfinite(ent).all()
    lp_ref, ent_ref = _naive_logprobs(ref, tokens, 0.8), _naive_entropy(ref, 0.8)
    assert_close(lp, lp_ref)
    assert_close(ent, ent_ref)

    # one backward at a time: a bf16 sum of two separately rounded gradients would be compared with one rounding
    for out, out_ref in [(lp, lp_ref), (ent, ent_ref)]:
        ours.grad, ref.grad = None, None
        out.sum().backward()
        out_ref.sum().backward()
        assert ours.grad.dtype == torch.bfloat16
        assert_close(ours.grad, ref.grad.to(torch.bfloat16))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(temperature: float):
    logits, tokens = _random_logits(0)
    with pytest.raises(ValueError, match="temperature"):
        fn.logprobs_from_logits(logits, tokens, temperature)
    with pytest.raises(ValueError, match="temperature"):
        fn.entropy_from_logits(logits, temperature)


# ====================================================================================================== KL penalty
def test_kl_penalty_hand_worked():
    logprobs, ref = _t([[0.5, -0.5, -2.0]]), _t([[0.0, 0.0, -2.0]])
    # log ratio [0.5, -0.5, 0]
    assert_close(fn.kl_penalty(logprobs, ref, "k1"), _t([[0.5, -0.5, 0.0]]))
    # 0.5 * lr^2 = [0.125, 0.125, 0]
    assert_close(fn.kl_penalty(logprobs, ref, "k2"), _t([[0.125, 0.125, 0.0]]))
    # exp(-lr) - 1 + lr: e^-0.5 - 0.5 = 0.6065307 - 0.5 = 0.1065307; e^0.5 - 1.5 = 1.6487213 - 1.5 = 0.1487213; 0
    assert_close(fn.kl_penalty(logprobs, ref, "k3"), _t([[0.1065307, 0.1487213, 0.0]]))


def test_k3_clamps_the_log_ratio_and_caps_the_estimate():
    # log ratio (policy - ref) [-100, -2, 30, 1]: -100 is clamped to -20 before exp (exp(100) is inf in float32)
    # and e^20 - 21 = 4.85e8 capped at 10; -2: e^2 - 3 = 4.3890561; 30 -> 20: e^-20 - 1 + 20 = 19.0000000 -> 10;
    # 1: e^-1 - 1 + 1 = 0.3678794.
    logprobs, ref = _t([[-100.0, -2.0, 0.0, 0.0]]), _t([[0.0, 0.0, -30.0, -1.0]])
    kl = fn.kl_penalty(logprobs, ref, "k3")
    assert_close(kl, _t([[10.0, 4.3890561, 10.0, 0.3678794]]))
    assert torch.isfinite(fn.kl_penalty(_t([[-1e4]]), _t([[0.0]]), "k3")).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_zero_for_equal_logprobs(estimator: str):
    logprobs = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)) * 4 - 3
    assert_close(fn.kl_penalty(logprobs, logprobs.clone(), estimator), torch.zeros(3, 7))


@pytest.mark.parametrize("estimator", ["k2", "k3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k2_k3_are_nonnegative(estimator: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    logprobs, ref = torch.randn(16, 64, generator=g) * 3, torch.randn(16, 64, generator=g) * 3
    logprobs[0, :8] = ref[0, :8] + torch.tensor([1e-6, -1e-6, 1e-4, -1e-4, 1e-2, -1e-2, 20.0, -20.0])
    assert (fn.kl_penalty(logprobs, ref, estimator) >= 0).all()


# ======================================================================================= score and token rewards
def test_last_token_index_hand_worked():
    mask = _mask([T_, T_, T_, T_], [T_, T_, F_, F_], [T_, F_, F_, F_])
    assert torch.equal(fn.last_token_index(mask), torch.tensor([3, 1, 0]))


def test_token_rewards_hand_worked():
    scores = _t([1.0, 2.0])
    kl = _t([0.1, 0.2, 0.3], [0.4, 0.5, 9.9])
    mask = _mask([T_, T_, T_], [T_, T_, F_])
    # -0.5 * kl on every real token, the score on the last real token, 0 on padding:
    # row 0: [-0.05, -0.1, -0.15 + 1 = 0.85]; row 1: [-0.2, -0.25 + 2 = 1.75, 0]
    expected = _t([-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0])
    assert_close(fn.token_rewards(scores, kl, mask, kl_coef=0.5), expected)
    # kl_coef 0: only the score, on the last real token
    assert_close(fn.token_rewards(scores, kl, mask, kl_coef=0.0), _t([0.0, 0.0, 1.0], [0.0, 2.0, 0.0]))


def test_row_without_real_token_raises():
    mask = _mask([T_, F_], [F_, F_])
    with pytest.raises(ValueError, match="no True entry"):
        fn.last_token_index(mask)
    with pytest.raises(ValueError, match="no True entry"):
        fn.token_rewards(_t([1.0, 2.0]), torch.zeros(2, 2), mask, kl_coef=0.1)


# ============================================================================================================== GAE
def test_gae_hand_worked_zero_values():
    rewards, values, mask = _t([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), _mask([[T_, T_, T_]])
    # gamma * lambda = 0.45: A_2 = 1; A_1 = 0 + 0.45 * 1 = 0.45; A_0 = 0.45 * 0.45 = 0.2025. Returns = A + V = A.
    advantages, returns = fn.gae(rewards, values, mask, gamma=0.9, gae_lambda=0.5)
    assert_close(advantages, _t([[0.2025, 0.45, 1.0]]))
    assert_close(returns, _t([[0.2025, 0.45, 1.0]]))


def test_gae_hand_worked_nonzero_values_and_padded_row():
    rewards = _t([1.0, 0.0, 2.0], [1.0, 2.0, 7.0])
    values = _t([0.5, 1.0, 0.5], [0.5, 1.0, 3.0])
    mask = _mask([T_, T_, T_], [T_, T_, F_])
    advantages, returns = fn.gae(rewards, values, mask, gamma=0.9, gae_lambda=0.5)
    # row 0, gamma * lambda = 0.45, V after the end = 0:
    #   t=2: delta = 2 + 0.9 * 0 - 0.5 = 1.5;        A = 1.5
    #   t=1: delta = 0 + 0.9 * 0.5 - 1.0 = -0.55;    A = -0.55 + 0.45 * 1.5 = 0.125
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4;      A = 1.4 + 0.45 * 0.125 = 1.45625
    # row 1, the padded t=2 (reward 7, value 3) is ignored: the episode ends at t=1
    #   t=1: delta = 2 + 0.9 * 0 - 1.0 = 1.0;        A = 1.0
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4;      A = 1.4 + 0.45 * 1.0 = 1.85
    assert_close(advantages, _t([1.45625, 0.125, 1.5], [1.85, 1.0, 0.0]))
    # returns = A + V: [1.95625, 1.125, 2.0], [2.35, 2.0, 0 (padding)]
    assert_close(returns, _t([1.95625, 1.125, 2.0], [2.35, 2.0, 0.0]))


def _random_rollout_tensors(seed: int, batch: int = 5, width: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    lengths[0] = width  # one full row
    lengths[1] = 1  # one single-token row
    mask = torch.arange(width)[None, :] < lengths[:, None]
    garbage = torch.randn(batch, width, generator=g) * 1e3  # what padding holds must not matter

    def field(scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.where(mask, torch.randn(batch, width, generator=g) * scale + shift, garbage)

    return g, lengths.tolist(), mask, field


def test_discounted_returns_hand_worked():
    # gamma 0.5: row 0 rewards [1, 2, 4] -> [1 + 0.5 * (2 + 0.5 * 4), 2 + 0.5 * 4, 4] = [3, 4, 4];
    # row 1 [8, 9 (padding)] -> [8, 0]: the padded reward never reaches the real token
    rewards, mask = _t([1.0, 2.0, 4.0], [8.0, 9.0, 0.0]), _mask([T_, T_, T_], [T_, F_, F_])
    assert_close(fn.discounted_returns(rewards, mask, 0.5), _t([3.0, 4.0, 4.0], [8.0, 0.0, 0.0]))


def test_overlong_penalty_hand_worked():
    # max 10, buffer 4: no penalty up to 6 tokens, then -penalty * (length - 6) / 4
    lengths = torch.tensor([3, 6, 7, 9, 10])
    assert_close(fn.overlong_penalty(lengths, 10, 4, 1.0), _t([0.0, 0.0, -0.25, -0.75, -1.0]))
    assert_close(fn.overlong_penalty(lengths, 10, 4, 2.0), _t([0.0, 0.0, -0.5, -1.5, -2.0]))
    with pytest.raises(ValueError, match=r"overlong buffer must be in \[1, max_length=10\], got 11"):
        fn.overlong_penalty(lengths, 10, 11, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gae_matches_seed_reference_per_sequence(seed: int):
    g, lengths, mask, field = _random_rollout_tensors(seed)
    rewards, values = field(), field()
    gamma, gae_lambda = 0.5 + 0.5 * torch.rand((), generator=g).item(), torch.rand((), generator=g).item()
    advantages, returns = fn.gae(rewards, values, mask, gamma, gae_lambda)
    for b, length in enumerate(lengths):
        buffer = PPOBuffer(rewards[b, :length].double().numpy(), values[b, :length].double().numpy(), gamma, gae_lambda)
        ref_adv, ref_ret = buffer.compute_advantages(last_value=0)
        assert_close(advantages[b, :length], torch.from_numpy(ref_adv).float())
        assert_close(returns[b, :length], torch.from_numpy(ref_ret).float())
    assert (advantages[~mask] == 0).all()
    assert (returns[~mask] == 0).all()


# ============================================================================================================ losses
def test_policy_loss_single_token_hand_worked():
    mask, old = _mask([[T_]]), _t([[0.0]])
    # ratio e^{log 1.5} = 1.5, clip 0.2 -> clipped ratio 1.2.
    # A = +1: max(-1 * 1.5, -1 * 1.2) = -1.2 (the clip is active)
    loss, stats = fn.policy_loss(_t([[math.log(1.5)]]), old, _t([[1.0]]), mask, clip_coef=0.2)
    assert_close(loss, torch.tensor(-1.2))
    assert_close(stats.clipfrac, torch.tensor(1.0))
    # A = -1: max(1 * 1.5, 1 * 1.2) = 1.5 (unclipped term active: a bad action made likelier is never clipped)
    loss, stats = fn.policy_loss(_t([[math.log(1.5)]]), old, _t([[-1.0]]), mask, clip_coef=0.2)
    assert_close(loss, torch.tensor(1.5))
    assert_close(stats.clipfrac, torch.tensor(0.0))
    # New logprob 1.5 itself: ratio e^1.5 = 4.4816891. A = +1: -min(4.48, 1.2) = -1.2; A = -1: max(4.48, 1.2) = 4.48
    loss, _ = fn.policy_loss(_t([[1.5]]), old, _t([[1.0]]), mask, clip_coef=0.2)
    assert_close(loss, torch.tensor(-1.2))
    loss, _ = fn.policy_loss(_t([[1.5]]), old, _t([[-1.0]]), mask, clip_coef=0.2)
    assert_close(loss, torch.tensor(4.4816891))


def test_policy_loss_hand_worked_batch_stats_and_gradient():
    ratios = [1.5, 1.5, 1.1, 0.5, 9.0]
    logprobs = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 5)
    advantages = _t([[1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = _mask([[T_, T_, T_, T_, F_]])  # the last token is padding
    loss, stats = fn.policy_loss(logprobs, old, advantages, mask, clip_coef=0.2)
    # per token, max(-A r, -A clip(r, 0.8, 1.2)):
    #   r 1.5, A  1: max(-1.5, -1.2) = -1.2   clipped term active
    #   r 1.5, A -1: max( 1.5,  1.2) =  1.5
    #   r 1.1, A  2: max(-2.2, -2.2) = -2.2   equal terms, not counted as clipped
    #   r 0.5, A -1: max( 0.5,  0.8) =  0.8   clipped term active
    # token-mean: (-1.2 + 1.5 - 2.2 + 0.8) / 4 = -1.1 / 4 = -0.275
    assert_close(loss, torch.tensor(-0.275))
    assert_close(stats.clipfrac, torch.tensor(0.5))  # 2 of 4
    assert_close(stats.ratio_mean, torch.tensor(1.15))  # (1.5 + 1.5 + 1.1 + 0.5) / 4
    assert_close(stats.ratio_max, torch.tensor(1.5))  # the padded ratio 9 is ignored
    # k1: mean(-log r) = -(2 ln 1.5 + ln 1.1 + ln 0.5) / 4 = -(0.8109302 + 0.0953102 - 0.6931472) / 4 = -0.0532733
    assert_close(stats.approx_kl_k1, torch.tensor(-0.0532733))
    # k3: mean(r - 1 - ln r) = (2 * 0.0945349 + 0.0046898 + 0.1931472) / 4 = 0.3869068 / 4 = 0.0967267
    assert_close(stats.approx_kl, torch.tensor(0.0967267))
    assert_close(stats.dual_clipfrac, torch.tensor(0.0))
    # d loss / d logprob = -A r / 4 where the unclipped term is active, exactly 0 where the clip is:
    #   [0, -(-1)(1.5)/4 = 0.375, -(2)(1.1)/4 = -0.55, 0, 0 (padding)]
    loss.backward()
    assert_close(logprobs.grad, _t([[0.0, 0.375, -0.55, 0.0, 0.0]]))


def test_policy_loss_dual_clip_hand_worked():
    logprobs = torch.tensor([[1.5, math.log(2.0), 1.5]], requires_grad=True)
    advantages = _t([[-1.0, -1.0, 1.0]])
    mask = _mask([[T_, T_, T_]])
    loss, stats = fn.policy_loss(logprobs, torch.zeros(1, 3), advantages, mask, clip_coef=0.2, dual_clip_coef=3.0)
    # r e^1.5 = 4.48, A -1: max(4.48, 1.2) = 4.48 > -A * 3 = 3 -> capped at 3
    # r 2,       A -1: max(2, 1.2) = 2 < 3 -> 2
    # r 4.48,    A +1: max(-4.48, -1.2) = -1.2 (dual clip only touches A < 0)
    # mean (3 + 2 - 1.2) / 3 = 3.8 / 3 = 1.2666667
    assert_close(loss, torch.tensor(3.8 / 3.0))
    assert_close(stats.dual_clipfrac, torch.tensor(1.0 / 3.0))
    assert_close(stats.clipfrac, torch.tensor(1.0 / 3.0))  # only the third token's clipped term is active
    loss.backward()
    # capped and clipped tokens get no gradient; the middle one gets -A r / 3 = 2 / 3
    assert_close(logprobs.grad, _t([[0.0, 2.0 / 3.0, 0.0]]))


def test_clip_higher_widens_only_the_upper_side_of_the_clip():
    # ratio e^0.25 = 1.2840254 and A = 1: symmetric clip 0.2 -> loss -1.2 (clipped); clip_coef_high 0.28 -> -1.28;
    # ratio e^-0.25 = 0.7788008 and A = -1: the lower side stays 1 - 0.2 = 0.8 -> loss 0.8 either way
    logprobs, old = _t([[0.25], [-0.25]]), _t([[0.0], [0.0]])
    advantages, mask = _t([[1.0], [-1.0]]), _mask([[T_], [T_]])
    symmetric, stats = fn.policy_loss(logprobs, old, advantages, mask, 0.2, aggregation="seq-mean-token-sum")
    higher, high_stats = fn.policy_loss(logprobs, old, advantages, mask, 0.2, None, "seq-mean-token-sum", 0.28)
    assert_close(symmetric, torch.tensor((-1.2 + 0.8) / 2))
    assert_close(higher, torch.tensor((-1.28 + 0.8) / 2))
    assert_close(stats.clipfrac, torch.tensor(1.0))
    assert_close(high_stats.clipfrac, torch.tensor(1.0))
    with pytest.raises(ValueError, match="clip_coef_high must be > 0"):
        fn.policy_loss(logprobs, old, advantages, mask, 0.2, clip_coef_high=0.0)


def test_policy_loss_token_weights_scale_each_clipped_token_loss_and_leave_the_stats():
    # The ratios and advantages of test_policy_loss_hand_worked_batch_stats_and_gradient: per-token losses after the
    # clip [-1.2, 1.5, -2.2, 0.8] (the fifth token is padding, its weight NaN). Weights [0.5, 2, 1, 0] (TRL
    # per_token_loss * importance_sampling_ratio, verl pg_losses * rollout_is_weights):
    #   token-mean (-0.6 + 3.0 - 2.2 + 0.0) / 4 = 0.2 / 4 = 0.05
    ratios = [1.5, 1.5, 1.1, 0.5, 9.0]
    logprobs = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 5)
    advantages = _t([[1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = _mask([[T_, T_, T_, T_, F_]])
    weights = _t([[0.5, 2.0, 1.0, 0.0, float("nan")]])
    loss, stats = fn.policy_loss(logprobs, old, advantages, mask, clip_coef=0.2, token_weights=weights)
    assert_close(loss, torch.tensor(0.05))
    assert_close(stats.clipfrac, torch.tensor(0.5))  # unweighted: 2 of 4, as without weights
    assert_close(stats.ratio_mean, torch.tensor(1.15))
    # the gradient is the weight times the unweighted one, -A r / 4 on unclipped tokens:
    #   [0, 2 * 0.375 = 0.75, 1 * -0.55 = -0.55, 0, 0]
    loss.backward()
    assert_close(logprobs.grad, _t([[0.0, 0.75, -0.55, 0.0, 0.0]]))


def test_policy_loss_token_weights_apply_after_the_dual_clip():
    # test_policy_loss_dual_clip_hand_worked's per-token losses [3 (capped from 4.48), 2, -1.2], weights [0.5, 1, 2]:
    # mean (1.5 + 2 - 2.4) / 3 = 1.1 / 3. Weighting before the cap would keep 0.5 * 4.48 = 2.24 < 3 instead.
    logprobs = _t([[1.5, math.log(2.0), 1.5]])
    advantages, mask = _t([[-1.0, -1.0, 1.0]]), _mask([[T_, T_, T_]])
    weights = _t([[0.5, 1.0, 2.0]])
    loss, stats = fn.policy_loss(logprobs, torch.zeros(1, 3), advantages, mask, 0.2, 3.0, token_weights=weights)
    assert_close(loss, torch.tensor(1.1 / 3.0))
    assert_close(stats.dual_clipfrac, torch.tensor(1.0 / 3.0))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_with_no_or_unit_token_weights_is_the_unweighted_loss_exactly(aggregation: str):
    old = _per_token(3, 0.5, -2.0)
    logprobs, advantages = old + _per_token(8, 0.5), _per_token(9)
    args = (logprobs, old, advantages, MASK, 0.2, 3.0, aggregation, 0.28, 5)
    plain, plain_stats = fn.policy_loss(*args)
    for weights in (None, torch.ones(MASK.shape)):
        loss, stats = fn.policy_loss(*args, token_weights=weights)
        assert torch.equal(loss, plain)
        for value, expected in zip(stats, plain_stats, strict=True):
            assert torch.equal(value, expected)


def test_rollout_correction_token_tis_hand_worked():
    # Yao et al. 2025 (verl rollout_is: token, TRL token_truncate): w_t = min(exp(old_t - engine_t), cap).
    # log-ratios [-1 - (-1.5), -2 - (-1)] = [0.5, -1]; the third token is padding (its engine logprob NaN).
    old = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    engine = _t([[-1.5, -1.0, float("nan")]])
    mask = _mask([[T_, T_, F_]])
    # cap 2: [min(e^0.5 = 1.6487213, 2), e^-1 = 0.3678794, 0]
    weights = fn.rollout_correction_weights(old, engine, mask, "token_tis", 2.0)
    assert_close(weights, _t([[1.6487213, 0.3678794, 0.0]]))
    assert weights.dtype == torch.float32
    assert not weights.requires_grad
    # cap 1.5: [min(1.6487213, 1.5) = 1.5, 0.3678794, 0]
    assert_close(fn.rollout_correction_weights(old, engine, mask, "token_tis", 1.5), _t([[1.5, 0.3678794, 0.0]]))
    # "none": 1 on real tokens
    assert_close(fn.rollout_correction_weights(old, engine, mask, "none", 2.0), _t([[1.0, 1.0, 0.0]]))


def test_rollout_correction_seq_mis_hand_worked():
    # Liu et al. 2025 (TRL sequence_mask): rho_b = exp(sum of old - engine over real tokens); a response's real tokens
    # weigh rho_b if rho_b <= cap, else 0.
    old = _t([[-1.0, -2.0], [-1.0, -0.2], [-1.0, float("nan")]])
    engine = _t([[-1.5, -1.0], [-1.5, -1.0], [-1.2, -3.0]])
    mask = _mask([[T_, T_], [T_, T_], [T_, F_]])
    # row 0: 0.5 - 1.0 = -0.5 -> e^-0.5 = 0.6065307 <= 2, kept
    # row 1: 0.5 + 0.8 = 1.3 -> e^1.3 = 3.6692967 > 2, dropped
    # row 2: 0.2 (the padding NaN left out) -> e^0.2 = 1.2214028, on its one real token
    weights = fn.rollout_correction_weights(old, engine, mask, "seq_mis", 2.0)
    assert_close(weights, _t([[0.6065307, 0.6065307], [0.0, 0.0], [1.2214028, 0.0]]))
    # cap 4 keeps row 1 at 3.6692967; cap 0.5 drops row 0 (0.6065307 > 0.5) as well
    weights = fn.rollout_correction_weights(old, engine, mask, "seq_mis", 4.0)
    assert_close(weights, _t([[0.6065307, 0.6065307], [3.6692967, 3.6692967], [1.2214028, 0.0]]))
    weights = fn.rollout_correction_weights(old, engine, mask, "seq_mis", 0.5)
    assert_close(weights, _t([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    # a sequence log-ratio of 200 overflows exp in float32: dropped, not inf or NaN
    huge = fn.rollout_correction_weights(_t([[100.0, 100.0]]), _t([[0.0, 0.0]]), _mask([[T_, T_]]), "seq_mis", 2.0)
    assert_close(huge, _t([[0.0, 0.0]]))


@pytest.mark.parametrize("dual_clip_coef", [1.0, 0.5, -3.0])
def test_policy_loss_rejects_dual_clip_coef_not_above_one(dual_clip_coef: float):
    mask = _mask([[T_]])
    with pytest.raises(ValueError, match="dual_clip_coef"):
        fn.policy_loss(_t([[0.0]]), _t([[0.0]]), _t([[1.0]]), mask, clip_coef=0.2, dual_clip_coef=dual_clip_coef)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_gradient_is_exactly_zero_on_clipped_tokens_only(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(6, 20, generator=g) - 2
    logprobs = (old + torch.randn(6, 20, generator=g) * 0.4).requires_grad_(True)
    advantages = torch.randn(6, 20, generator=g)
    mask = torch.ones(6, 20, dtype=torch.bool)
    loss, stats = fn.policy_loss(logprobs, old, advantages, mask, clip_coef=0.2)
    loss.backward()
    ratio = (logprobs.detach() - old).exp()
    clipped = ((advantages > 0) & (ratio > 1.2)) | ((advantages < 0) & (ratio < 0.8))
    assert clipped.any()
    assert (~clipped).any()
    assert (logprobs.grad[clipped] == 0).all()
    assert (logprobs.grad[~clipped] != 0).all()
    assert_close(stats.clipfrac, clipped.float().mean())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_policy_loss_matches_seed_ppo_loss_per_sequence(seed: int):
    g, lengths, mask, field = _random_rollout_tensors(seed)
    old = field(scale=0.5, shift=-2.0)
    logprobs = torch.where(mask, old + torch.randn(old.shape, generator=g) * 0.3, field())
    advantages = field()
    clip_coef = 0.1 + 0.2 * torch.rand((), generator=g).item()
    seed_losses = []
    for b, length in enumerate(lengths):
        row = (logprobs[b, :length], old[b, :length], advantages[b, :length])
        seed_losses.append(seed_ppo_loss(*(x.double().numpy() for x in row), clip_ratio=clip_coef))
        only_row_b = mask & (torch.arange(len(lengths)) == b)[:, None]
        loss, _ = fn.policy_loss(logprobs, old, advantages, only_row_b, clip_coef)
        assert_close(loss, torch.tensor(seed_losses[-1], dtype=torch.float32))
    # over the whole batch: the mean of the sequence losses, or the token-weighted mean of them
    per_seq = torch.tensor(seed_losses, dtype=torch.float64)
    weights = torch.tensor(lengths, dtype=torch.float64)
    loss, _ = fn.policy_loss(logprobs, old, advantages, mask, clip_coef, aggregation="seq-mean-token-mean")
    assert_close(loss, per_seq.mean().float())
    loss, _ = fn.policy_loss(logprobs, old, advantages, mask, clip_coef, aggregation="token-mean")
    assert_close(loss, ((per_seq * weights).sum() / weights.sum()).float())


def test_value_loss_hand_worked():
    values = torch.tensor([[1.0, 2.0, 0.0, 1.0, 5.0]], requires_grad=True)
    old_values = _t([[0.5, 2.5, 0.0, 0.5, 0.0]])
    returns = _t([[2.0, 1.0, 0.5, 0.0, 0.0]])
    mask = _mask([[T_, T_, T_, T_, F_]])
    # unclipped squared errors (V - R)^2 = [1, 1, 0.25, 1]; 0.5 * mean = 0.5 * 3.25 / 4 = 0.40625
    loss, stats = fn.value_loss(values, old_values, returns, mask)
    assert_close(loss, torch.tensor(0.40625))
    assert_close(stats.clipfrac, torch.tensor(0.0))
    assert_close(stats.value_mean, torch.tensor(1.0))  # (1 + 2 + 0 + 1) / 4
    # returns - values = [1, -1, 0.5, -1]: mean -0.125, squared deviations 3.1875; returns [2, 1, 0.5, 0]: mean 0.875,
    # squared deviations 2.1875 (both / 3 unbiased, which cancels) -> 1 - 3.1875 / 2.1875 = -16/35 = -0.4571429
    assert_close(stats.explained_var, torch.tensor(-16.0 / 35.0))
    # clip 0.2: V_clip = old + clip(V - old, -0.2, 0.2) = [0.7, 2.3, 0.0, 0.7]
    # (V_clip - R)^2 = [1.69, 1.69, 0.25, 0.49]; max with the unclipped [1, 1, 0.25, 1] = [1.69, 1.69, 0.25, 1]
    # (clipped active on the first two, a tie on the third) -> 0.5 * 4.63 / 4 = 0.57875, clipfrac 2 / 4
    loss, stats = fn.value_loss(values, old_values, returns, mask, value_clip_coef=0.2)
    assert_close(loss, torch.tensor(0.57875))
    assert_close(stats.clipfrac, torch.tensor(0.5))
    loss.backward()
    # d/dV: 0 where the clipped term is active (V_clip is constant in V there), (V - R) / 4 elsewhere: the tie on
    # token 3 has V - R = -0.5 -> -0.125, token 4 has V - R = 1 -> 0.25, padding 0
    assert_close(values.grad, _t([[0.0, 0.0, -0.125, 0.25, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_value_loss_matches_seed_value_loss_per_sequence(seed: int):
    _, lengths, mask, field = _random_rollout_tensors(seed)
    values, old_values, returns = field(), field(), field(scale=2.0)
    seed_losses = []
    for b, length in enumerate(lengths):
        seed_losses.append(seed_value_loss(values[b, :length].double().numpy(), returns[b, :length].double().numpy()))
        only_row_b = mask & (torch.arange(len(lengths)) == b)[:, None]
        loss, _ = fn.value_loss(values, old_values, returns, only_row_b)
        assert_close(loss, torch.tensor(seed_losses[-1], dtype=torch.float32))
    loss, _ = fn.value_loss(values, old_values, returns, mask, aggregation="seq-mean-token-mean")
    assert_close(loss, torch.tensor(np.mean(seed_losses), dtype=torch.float32))


# ======================================================================================================= aggregation
def test_aggregation_hand_worked_on_rows_of_different_lengths():
    per_token = _t([1.0, 2.0, 3.0], [10.0, 99.0, 99.0])
    mask = _mask([T_, T_, T_], [T_, F_, F_])
    # token-mean: (1 + 2 + 3 + 10) / 4 = 4; seq-mean-token-mean: ((1 + 2 + 3) / 3 + 10 / 1) / 2 = (2 + 10) / 2 = 6
    assert_close(fn.aggregate(per_token, mask, "token-mean"), torch.tensor(4.0))
    assert_close(fn.aggregate(per_token, mask, "seq-mean-token-mean"), torch.tensor(6.0))
    # the same through policy_loss: ratio 1 makes each token's loss -A
    zeros = torch.zeros(2, 3)
    assert_close(fn.policy_loss(zeros, zeros, -per_token, mask, 0.2, aggregation="token-mean")[0], torch.tensor(4.0))
    loss, _ = fn.policy_loss(zeros, zeros, -per_token, mask, 0.2, aggregation="seq-mean-token-mean")
    assert_close(loss, torch.tensor(6.0))
    # and through value_loss: squared errors [1, 4, 9], [16]; token-mean 0.5 * 30 / 4 = 3.75;
    # seq-mean-token-mean 0.5 * (14 / 3 + 16) / 2 = 31 / 6 = 5.1666667
    errors = _t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0])
    assert_close(fn.value_loss(errors, zeros, zeros, mask, aggregation="token-mean")[0], torch.tensor(3.75))
    loss, _ = fn.value_loss(errors, zeros, zeros, mask, aggregation="seq-mean-token-mean")
    assert_close(loss, torch.tensor(31.0 / 6.0))


def test_token_sum_aggregations_hand_worked():
    per_token = _t([1.0, 2.0, 3.0], [10.0, 99.0, 99.0])
    mask = _mask([T_, T_, T_], [T_, F_, F_])
    # seq-mean-token-sum: (6 + 10) / 2 = 8; seq-mean-token-sum-norm with 4: (6 / 4 + 10 / 4) / 2 = 2
    assert_close(fn.aggregate(per_token, mask, "seq-mean-token-sum"), torch.tensor(8.0))
    assert_close(fn.aggregate(per_token, mask, "seq-mean-token-sum-norm", norm_length=4), torch.tensor(2.0))
    zeros = torch.zeros(2, 3)
    loss, _ = fn.policy_loss(zeros, zeros, -per_token, mask, 0.2, aggregation="seq-mean-token-sum-norm", norm_length=4)
    assert_close(loss, torch.tensor(2.0))
    # value loss: squared errors [1, 4, 9], [16]: 0.5 * (14 + 16) / 2 = 7.5, and over 5 per sequence 1.5
    errors = _t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0])
    assert_close(fn.value_loss(errors, zeros, zeros, mask, aggregation="seq-mean-token-sum")[0], torch.tensor(7.5))
    loss, _ = fn.value_loss(errors, zeros, zeros, mask, None, "seq-mean-token-sum-norm", norm_length=5)
    assert_close(loss, torch.tensor(1.5))
    # rows without a real token are not in the mean over sequences
    assert_close(fn.aggregate(per_token, _mask([T_, T_, F_], [F_, F_, F_]), "seq-mean-token-sum"), torch.tensor(3.0))


def test_token_sum_norm_needs_its_constant():
    with pytest.raises(ValueError, match="'seq-mean-token-sum-norm' needs norm_length >= 1, got None"):
        fn.aggregate(_t([[1.0]]), _mask([[T_]]), "seq-mean-token-sum-norm")


def test_seq_mean_token_mean_skips_rows_without_real_tokens():
    per_token = _t([1.0, 2.0], [50.0, 60.0])
    mask = _mask([T_, T_], [F_, F_])
    # only row 0 counts: (1 + 2) / 2 = 1.5, not (1.5 + 0) / 2
    assert_close(fn.aggregate(per_token, mask, "seq-mean-token-mean"), torch.tensor(1.5))


# ============================================================================================== shared properties
MASK = _right_padded_mask([5, 3, 1], 5)
"""(3, 5): a full row, a half row, a single-token row."""


def _per_token(seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(MASK.shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _cases() -> dict[str, tuple[dict[str, torch.Tensor], Callable]]:
    """name -> (inputs, call(**inputs) -> tensor or nested tuples of tensors); ``mask`` is always ``MASK``."""
    logits, tokens = _random_logits(7, shape=(3, 5, 6))
    old = _per_token(3, 0.5, -2.0)
    return {
        "masked_sum": ({"x": _per_token(0)}, lambda x: (fn.masked_sum(x, MASK), fn.masked_sum(x, MASK, dim=-1))),
        "masked_mean": ({"x": _per_token(0)}, lambda x: (fn.masked_mean(x, MASK), fn.masked_mean(x, MASK, dim=-1))),
        "masked_var": ({"x": _per_token(0)}, lambda x: (fn.masked_var(x, MASK), fn.masked_var(x, MASK, False))),
        "masked_whiten": (
            {"x": _per_token(0)},
            lambda x: (fn.masked_whiten(x, MASK), fn.masked_whiten(x, MASK, False)),
        ),
        "explained_variance": (
            {"values": _per_token(1), "returns": _per_token(2)},
            lambda values, returns: fn.explained_variance(values, returns, MASK),
        ),
        "aggregate": (
            {"x": _per_token(0)},
            lambda x: tuple(fn.aggregate(x, MASK, mode, norm_length=5) for mode in fn.AGGREGATIONS),
        ),
        "discounted_returns": (
            {"rewards": _per_token(5)},
            lambda rewards: fn.discounted_returns(rewards, MASK, gamma=0.9),
        ),
        "token_rewards": (
            {"scores": torch.tensor([1.0, -2.0, 0.5]), "kl": _per_token(4)},
            lambda scores, kl: fn.token_rewards(scores, kl, MASK, kl_coef=0.1),
        ),
        "gae": (
            {"rewards": _per_token(5), "values": _per_token(6)},
            lambda rewards, values: fn.gae(rewards, values, MASK, gamma=0.99, gae_lambda=0.95),
        ),
        "policy_loss": (
            {
                "logprobs": old + _per_token(8, 0.5),
                "old_logprobs": old,
                "advantages": _per_token(9),
                "token_weights": _per_token(13).abs(),
            },
            lambda logprobs, old_logprobs, advantages, token_weights: (
                fn.policy_loss(logprobs, old_logprobs, advantages, MASK, clip_coef=0.2),
                fn.policy_loss(logprobs, old_logprobs, advantages, MASK, 0.2, 3.0, "seq-mean-token-mean"),
                fn.policy_loss(logprobs, old_logprobs, advantages, MASK, 0.2, None, "seq-mean-token-sum-norm", 0.28, 5),
                fn.policy_loss(logprobs, old_logprobs, advantages, MASK, 0.2, 3.0, token_weights=token_weights),
            ),
        ),
        "rollout_correction_weights": (
            {"old_logprobs": old, "engine_logprobs": old + _per_token(14, 0.3)},
            lambda old_logprobs, engine_logprobs: tuple(
                fn.rollout_correction_weights(old_logprobs, engine_logprobs, MASK, mode, 1.2)
                for mode in fn.ROLLOUT_CORRECTIONS
            ),
        ),
        "value_loss": (
            {"values": _per_token(10), "old_values": _per_token(11), "returns": _per_token(12)},
            lambda values, old_values, returns: (
                fn.value_loss(values, old_values, returns, MASK),
                fn.value_loss(values, old_values, returns, MASK, 0.2, "seq-mean-token-mean"),
            ),
        ),
        "kl_penalty": (
            {"logprobs": old + _per_token(8, 0.5), "ref_logprobs": old},
            lambda logprobs, ref_logprobs: tuple(fn.kl_penalty(logprobs, ref_logprobs, k) for k in fn.KL_ESTIMATORS),
        ),
        "last_token_index": ({"response_mask": MASK.clone()}, fn.last_token_index),
        "logprobs_from_logits": (
            {"logits": logits, "tokens": tokens},
            lambda logits, tokens: fn.logprobs_from_logits(logits, tokens, temperature=0.7),
        ),
        "entropy_from_logits": ({"logits": logits}, lambda logits: fn.entropy_from_logits(logits, temperature=0.7)),
    }


MASKED_CASES = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "explained_variance",
    "aggregate",
    "token_rewards",
    "gae",
    "discounted_returns",
    "policy_loss",
    "value_loss",
    "rollout_correction_weights",
]


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flatten(item)]


def _outputs_and_grads(call: Callable, inputs: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor] | None = None):
    """Run ``call`` on leaf copies of ``inputs`` (or on ``leaves``) and backpropagate a weighted sum of its outputs."""
    if leaves is None:
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    outputs = _flatten(call(**leaves))
    differentiable = [o for o in outputs if o.requires_grad]
    if differentiable:
        # a fixed, non-uniform weighting so every output element reaches the gradient differently
        sum((o * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in differentiable).backward()
    grads = {k: v.grad for k, v in leaves.items() if v.requires_grad}
    return [o.detach() for o in outputs], grads


@pytest.mark.parametrize("fill", [1e30, -1e30, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", MASKED_CASES)
def test_masked_out_positions_change_no_output_and_no_gradient(name: str, fill: float):
    inputs, call = _cases()[name]
    poisoned = {k: torch.where(MASK, v, fill) if v.shape == MASK.shape else v for k, v in inputs.items()}
    assert any(not torch.equal(poisoned[k], inputs[k]) for k in inputs)
    outputs, grads = _outputs_and_grads(call, inputs)
    poisoned_outputs, poisoned_grads = _outputs_and_grads(call, poisoned)
    for out, poisoned_out in zip(outputs, poisoned_outputs, strict=True):
        assert_close(poisoned_out, out)
    assert grads.keys() == poisoned_grads.keys()
    for key, grad in grads.items():
        if grad is None:
            assert poisoned_grads[key] is None
        else:
            assert_close(poisoned_grads[key], grad)
            if inputs[key].shape == MASK.shape:
                assert (grad[~MASK] == 0).all()


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", list(_cases()))
def test_no_function_writes_into_its_inputs(name: str, requires_grad: bool):
    inputs, call = _cases()[name]
    originals = {k: v.clone() for k, v in inputs.items()}
    if requires_grad:  # forward and backward
        args = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        _outputs_and_grads(call, inputs, leaves=args)
    else:
        args = inputs
        call(**args)
    for key, original in originals.items():
        assert torch.equal(args[key], original), key
    assert torch.equal(MASK, _right_padded_mask([5, 3, 1], 5))


# ======================================================================================================= bad input
FLOAT_MASK = MASK.float()
X = _per_token(0)
WIDE = torch.zeros(3, 6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        # a mask that is not bool
        (lambda: fn.masked_sum(X, FLOAT_MASK), r"\bmask must be a bool"),
        (lambda: fn.masked_mean(X, FLOAT_MASK), r"\bmask must be a bool"),
        (lambda: fn.masked_mean(X, MASK.long(), dim=-1), r"\bmask must be a bool"),
        (lambda: fn.masked_var(X, FLOAT_MASK), r"\bmask must be a bool"),
        (lambda: fn.masked_whiten(X, FLOAT_MASK), r"\bmask must be a bool"),
        (lambda: fn.explained_variance(X, X, FLOAT_MASK), r"\bmask must be a bool"),
        (lambda: fn.aggregate(X, FLOAT_MASK), r"\bmask must be a bool"),
        (lambda: fn.last_token_index(FLOAT_MASK), "response_mask must be a bool"),
        (lambda: fn.token_rewards(torch.zeros(3), X, FLOAT_MASK, 0.1), "response_mask must be a bool"),
        (lambda: fn.gae(X, X, FLOAT_MASK, 0.9, 0.9), "response_mask must be a bool"),
        (lambda: fn.policy_loss(X, X, X, FLOAT_MASK, 0.2), "response_mask must be a bool"),
        (lambda: fn.value_loss(X, X, X, FLOAT_MASK), "response_mask must be a bool"),
        (lambda: fn.rollout_correction_weights(X, X, FLOAT_MASK, "token_tis", 2.0), "response_mask must be a bool"),
        # mismatched shapes, named
        (lambda: fn.masked_sum(WIDE, MASK), r"\bmask has shape \(3, 5\) but x has \(3, 6\)"),
        (lambda: fn.masked_mean(X, MASK[:, :4]), r"\bmask has shape \(3, 4\)"),
        (lambda: fn.masked_mean(X[0], MASK), r"\bmask has shape \(3, 5\) but x has \(5,\)"),
        (lambda: fn.masked_var(WIDE, MASK), r"\bmask has shape"),
        (lambda: fn.masked_whiten(WIDE, MASK), r"\bmask has shape"),
        (lambda: fn.explained_variance(X, WIDE, MASK), r"\breturns has shape"),
        (lambda: fn.kl_penalty(X, WIDE), r"\bref_logprobs has shape"),
        (lambda: fn.token_rewards(torch.zeros(3), WIDE, MASK, 0.1), r"but kl has \(3, 6\)"),
        (lambda: fn.token_rewards(torch.zeros(4), X, MASK, 0.1), r"\bscores has shape \(4,\)"),
        (lambda: fn.token_rewards(torch.zeros(3, 1), X, MASK, 0.1), r"\bscores has shape \(3, 1\)"),
        (lambda: fn.gae(X, WIDE, MASK, 0.9, 0.9), r"\bvalues has shape"),
        (lambda: fn.gae(X, X, MASK[:2], 0.9, 0.9), r"\bresponse_mask has shape"),
        (lambda: fn.policy_loss(X, WIDE, X, MASK, 0.2), r"\bold_logprobs has shape"),
        (lambda: fn.policy_loss(X, X, WIDE, MASK, 0.2), r"\badvantages has shape"),
        (lambda: fn.policy_loss(X, X, X, MASK, 0.2, token_weights=WIDE), r"\btoken_weights has shape"),
        (lambda: fn.rollout_correction_weights(X, WIDE, MASK, "seq_mis", 2.0), r"\bengine_logprobs has shape"),
        (lambda: fn.rollout_correction_weights(X, X, MASK[:2], "seq_mis", 2.0), r"\bresponse_mask has shape"),
        (lambda: fn.value_loss(X, X, WIDE, MASK), r"\breturns has shape"),
        (lambda: fn.value_loss(X, WIDE, X, MASK), r"\bold_values has shape"),
        (lambda: fn.logprobs_from_logits(torch.zeros(3, 5, 7), torch.zeros(3, 4, dtype=torch.long)), r"\btokens has"),
        # unknown names
        (lambda: fn.kl_penalty(X, X, "k4"), r"Unknown kl_estimator 'k4'"),
        (lambda: fn.kl_penalty(X, X, "K1"), r"Unknown kl_estimator 'K1'"),
        (lambda: fn.aggregate(X, MASK, "mean"), r"Unknown aggregation 'mean'"),
        (lambda: fn.policy_loss(X, X, X, MASK, 0.2, aggregation="token_mean"), r"Unknown aggregation 'token_mean'"),
        (lambda: fn.value_loss(X, X, X, MASK, aggregation="seq-mean"), r"Unknown aggregation 'seq-mean'"),
        (lambda: fn.rollout_correction_weights(X, X, MASK, "tis", 2.0), r"Unknown rollout_correction 'tis'"),
        # out-of-range numbers, named
        (lambda: fn.rollout_correction_weights(X, X, MASK, "token_tis", 0.0), r"rollout_correction_cap must be > 0"),
        (lambda: fn.rollout_correction_weights(X, X, MASK, "seq_mis", -1.0), r"rollout_correction_cap must be > 0"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call: Callable, match: str):
    with pytest.raises(ValueError, match=match):
        call()


def test_masked_whiten_with_precomputed_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    # Given moments mean 0, var 4 (std 2): [1, 2, 3] -> [0.5, 1.0, 1.5] (eps 1e-8 is far below the tolerance).
    assert_close(fn.masked_whiten(x, mask, mean=0.0, var=4.0), torch.tensor([[0.5, 1.0, 1.5, 0.0]]))
    # The rollout's own moments reproduce the default path: mean 2, var 1.
    assert_close(fn.masked_whiten(x, mask, mean=2.0, var=1.0), fn.masked_whiten(x, mask))
    with pytest.raises(ValueError, match="both mean and var"):
        fn.masked_whiten(x, mask, mean=0.0)


def test_ppo_losses_and_logprobs_never_read_a_value_back_to_the_host():
    # Meta tensors have no values: any int()/float()/.item()/bool() on one raises, so passing here means the PPO-update
    # math issues no device-to-host sync (each one stalls the GPU once per micro-batch).
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    mask = meta(3, 5, dtype=torch.bool)
    fn.explained_variance(meta(3, 5), meta(3, 5), mask)
    fn.value_loss(meta(3, 5), meta(3, 5), meta(3, 5), mask, value_clip_coef=0.2)
    for aggregation in fn.AGGREGATIONS:
        fn.policy_loss(
            meta(3, 5), meta(3, 5), meta(3, 5), mask, 0.2, 3.0, aggregation, clip_coef_high=0.28, norm_length=5
        )
        fn.policy_loss(meta(3, 5), meta(3, 5), meta(3, 5), mask, 0.2, 3.0, aggregation, None, 5, meta(3, 5))
        fn.value_loss(meta(3, 5), meta(3, 5), meta(3, 5), mask, 0.2, aggregation, norm_length=5)
    for mode in fn.ROLLOUT_CORRECTIONS:
        fn.rollout_correction_weights(meta(3, 5), meta(3, 5), mask, mode, 2.0)
    fn.logprobs_from_logits(meta(3, 5, 384), meta(3, 5, dtype=torch.long), temperature=0.7)
    fn.entropy_from_logits(meta(3, 5, 384), temperature=0.7)
