"""Tests of the critic-free advantage estimators: ``lightning_rlhf.functional.advantages`` (the math, hand-worked) and
``lightning_rlhf.advantages.estimate_advantages`` (step 4 of the loop, on a ``Rollout``).

The hand-worked example throughout: 2 prompts x 3 samples. Prompt 0's responses return [1, 0, 0] (mean 1/3, unbiased
std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)); prompt 1's return [3, 1, 2] (mean 2, deviations [1, -1, 0],
unbiased variance (1 + 1 + 0) / 2 = 1, std 1). All six: mean 7/6, squared deviations (1 + 49 + 49 + 121 + 1 + 25) / 36
= 246 / 36, unbiased variance 246 / 180, std sqrt(41 / 30).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf import functional as fn
from lightning_rlhf.advantages import estimate_advantages
from lightning_rlhf.config import PPOConfig
from lightning_rlhf.types import Rollout

RETURNS = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
EPS = fn.GROUP_STD_EPS
CENTERED = [2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0]
"""Each return minus its group's mean."""


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ============================================================================================= the math, by hand
def test_group_mean_and_std_hand_worked():
    assert_close(fn.group_mean(RETURNS, GROUPS), _t([1 / 3] * 3 + [2.0] * 3))
    assert_close(fn.group_std(RETURNS, GROUPS), _t([math.sqrt(1 / 3)] * 3 + [1.0] * 3))


def test_grpo_divides_the_centered_return_by_the_group_std():
    std = math.sqrt(1 / 3)
    expected = [2 / 3 / (std + EPS), -1 / 3 / (std + EPS), -1 / 3 / (std + EPS), 1 / (1 + EPS), -1 / (1 + EPS), 0.0]
    assert_close(fn.grpo_advantages(RETURNS, GROUPS), _t(expected))


def test_grpo_with_the_batch_std_and_without_a_std():
    batch_std = math.sqrt(41 / 30)
    assert_close(fn.grpo_advantages(RETURNS, GROUPS, "batch"), _t([c / (batch_std + EPS) for c in CENTERED]))
    # a given std (e.g. reduced over every process) is used as it is
    assert_close(fn.grpo_advantages(RETURNS, GROUPS, "batch", batch_std=2.0), _t([c / (2 + EPS) for c in CENTERED]))
    # Dr. GRPO: the centered return itself
    assert_close(fn.grpo_advantages(RETURNS, GROUPS, "none"), _t(CENTERED))


def test_rloo_subtracts_the_mean_of_the_other_responses():
    # prompt 0: 1 - (0 + 0) / 2 = 1, 0 - (1 + 0) / 2 = -0.5 (twice); prompt 1: 3 - 1.5, 1 - 2.5, 2 - 2
    assert_close(fn.rloo_advantages(RETURNS, GROUPS), _t([1.0, -0.5, -0.5, 1.5, -1.5, 0.0]))


def test_zero_std_groups_marks_the_groups_whose_scores_are_all_equal():
    scores = torch.tensor([2.0, 2.0, 2.0, 3.0, 1.0, 3.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    assert fn.zero_std_groups(scores, groups).tolist() == [True] * 3 + [False] * 3 + [True] * 2


def test_group_sizes_may_differ_and_ids_need_not_be_consecutive():
    # groups {7: [1, 0], 3: [3, 1, 2, 6]}: means 0.5 and 3; RLOO: n / (n - 1) (R - mean)
    returns, groups = torch.tensor([1.0, 3.0, 0.0, 1.0, 2.0, 6.0]), torch.tensor([7, 3, 7, 3, 3, 3])
    assert_close(fn.group_mean(returns, groups), _t([0.5, 3.0, 0.5, 3.0, 3.0, 3.0]))
    assert_close(fn.rloo_advantages(returns, groups), _t([1.0, 0.0, -1.0, -8 / 3, -4 / 3, 4.0]))


GROUP_LOCAL = [
    fn.group_mean,
    fn.group_std,
    fn.zero_std_groups,
    fn.rloo_advantages,
    lambda r, g: fn.grpo_advantages(r, g, "group"),
    lambda r, g: fn.grpo_advantages(r, g, "none"),
]


@pytest.mark.parametrize("estimate", [*GROUP_LOCAL, lambda r, g: fn.grpo_advantages(r, g, "batch")])
def test_results_permute_with_the_responses(estimate):
    permutation = torch.tensor([4, 0, 5, 2, 1, 3])  # the groups' responses interleaved
    assert_close(estimate(RETURNS[permutation], GROUPS[permutation]), estimate(RETURNS, GROUPS)[permutation])


@pytest.mark.parametrize("estimate", GROUP_LOCAL)
def test_a_response_reads_only_its_own_group(estimate):
    other = RETURNS.clone()
    other[3:] = torch.tensor([5.0, 5.0, 5.0])  # prompt 1's returns changed (to a zero-std group)
    assert torch.equal(estimate(other, GROUPS)[:3], estimate(RETURNS, GROUPS)[:3])
    assert not torch.equal(estimate(other, GROUPS)[3:], estimate(RETURNS, GROUPS)[3:])


def test_the_batch_std_reads_every_group():
    other = RETURNS.clone()
    other[3:] = torch.tensor([10.0, -4.0, 7.0])
    assert not torch.equal(
        fn.grpo_advantages(other, GROUPS, "batch")[:3], fn.grpo_advantages(RETURNS, GROUPS, "batch")[:3]
    )


def test_group_estimators_leave_their_inputs_alone():
    returns, groups = RETURNS.clone(), GROUPS.clone()
    for estimate in (fn.group_mean, fn.group_std, fn.zero_std_groups, fn.rloo_advantages, fn.grpo_advantages):
        estimate(returns, groups)
    assert torch.equal(returns, RETURNS)
    assert torch.equal(groups, GROUPS)


@pytest.mark.parametrize("estimate", [fn.group_mean, fn.rloo_advantages, fn.grpo_advantages, fn.zero_std_groups])
def test_a_group_of_one_response_is_an_error(estimate):
    with pytest.raises(ValueError, match="a group of one response has no baseline"):
        estimate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"returns and group_index must both be \(B,\)"):
        fn.grpo_advantages(RETURNS, GROUPS[:4])
    with pytest.raises(ValueError, match="Unknown group_std_norm 'std'"):
        fn.grpo_advantages(RETURNS, GROUPS, "std")
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\)"):
        fn.broadcast_to_tokens(torch.zeros(2), torch.ones(3, 4, dtype=torch.bool))


def test_broadcast_to_tokens_puts_each_advantage_on_its_real_tokens():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert_close(fn.broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), _t([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# ======================================================================================= step 4, on a Rollout
LENGTHS = [1, 2, 1, 1, 1, 2]
"""Real response tokens of the six responses."""


def _rollout(returns: torch.Tensor = RETURNS, lengths: list[int] = LENGTHS) -> Rollout:
    """Six responses to two prompts whose per-token rewards sum to ``returns``: all of it on the last real token."""
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    last = torch.nn.functional.one_hot(torch.tensor(lengths) - 1, width).bool()
    zeros = torch.zeros(len(lengths), width)
    return Rollout(
        prompt_ids=torch.ones(len(lengths), 2, dtype=torch.long),
        prompt_mask=torch.ones(len(lengths), 2, dtype=torch.bool),
        response_ids=torch.ones(len(lengths), width, dtype=torch.long),
        response_mask=mask,
        old_logprobs=zeros,
        ref_logprobs=zeros,
        old_values=None,
        ended=torch.ones(len(lengths), dtype=torch.bool),
        group_index=GROUPS,
        rewards=torch.where(last, returns[:, None], 0.0),
    )


def _per_token(values: list[float], lengths: list[int] = LENGTHS) -> torch.Tensor:
    width = max(lengths)
    return _t([[v if t < n else 0.0 for t in range(width)] for v, n in zip(values, lengths, strict=True)])


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("rloo", [1.0, -0.5, -0.5, 1.5, -1.5, 0.0]),
        ("dr_grpo", CENTERED),
        ("grpo", [c / (s + EPS) for c, s in zip(CENTERED, [math.sqrt(1 / 3)] * 3 + [1.0] * 3, strict=True)]),
    ],
)
def test_group_estimators_put_each_response_advantage_on_all_its_tokens(estimator, expected):
    advantages, returns = estimate_advantages(_rollout(), PPOConfig(advantage_estimator=estimator), None)
    assert_close(advantages, _per_token(expected))
    assert returns is None


def test_grpo_batch_std_comes_from_the_reduced_moments():
    # A stand-in all-reduce doubling every sum, as two processes holding the same six returns would: the same std.
    ppo = PPOConfig(advantage_estimator="grpo", group_std_norm="batch")
    advantages, _ = estimate_advantages(_rollout(), ppo, lambda sums: 2 * sums)
    # count 12, variance (2 * 246 / 36) / 11 = 41 / 33 (not 41 / 30: more values, the same spread)
    assert_close(advantages, _per_token([c / (math.sqrt(41 / 33) + EPS) for c in CENTERED]))


def test_reinforce_plus_plus_baseline_whitens_the_centered_returns_over_tokens():
    # centered returns on each token: [2/3], [-1/3, -1/3], [-1/3], [1], [-1], [0, 0]: 8 tokens, sum -1/3, mean -1/24;
    # deviations 17/24, -7/24 (3 times), 25/24, -23/24, 1/24 (twice): squares (289 + 147 + 625 + 529 + 2) / 576,
    # unbiased variance 1592 / (576 * 7) = 199 / 504
    ppo = PPOConfig(advantage_estimator="reinforce_plus_plus_baseline")
    advantages, returns = estimate_advantages(_rollout(), ppo, None)
    scale = 1 / math.sqrt(199 / 504 + fn.WHITEN_EPS)
    assert_close(advantages, _per_token([(c + 1 / 24) * scale for c in CENTERED]))
    assert returns is None


def test_reinforce_plus_plus_whitens_discounted_token_returns():
    # gamma 0.5 on response 1 (two tokens, return 0 on its last): token returns [0, 0]; on response 5 ([0, 2]):
    # [0.5 * 2, 2] = [1, 2]. Every token return: 1 | 0, 0 | 0 | 3 | 1 | 1, 2: 8 tokens, sum 8, mean 1;
    # squared deviations 0 + 1 + 1 + 1 + 4 + 0 + 0 + 1 = 8, unbiased variance 8 / 7
    advantages, returns = estimate_advantages(
        _rollout(), PPOConfig(advantage_estimator="reinforce_plus_plus", gamma=0.5), None
    )
    token_returns = _t([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    assert_close(returns, token_returns)
    mask = _rollout().response_mask
    assert_close(advantages, torch.where(mask, (token_returns - 1) / math.sqrt(8 / 7 + fn.WHITEN_EPS), 0.0))


def test_the_sequence_return_includes_the_kl_in_the_reward():
    # The group estimators read the summed per-token reward (verl): -kl_coef * KL on each token counts too.
    rollout = _rollout()
    with_kl = dataclasses.replace(rollout, rewards=rollout.rewards - 0.5 * rollout.response_mask.float())
    # returns - 0.5 * lengths: [0.5, -1, -0.5, 2.5, 0.5, 1]; means -1/3 and 4/3; RLOO 1.5 * (R - mean)
    advantages, _ = estimate_advantages(with_kl, PPOConfig(advantage_estimator="rloo"), None)
    assert_close(advantages, _per_token([1.25, -1.0, -0.25, 1.75, -1.25, -0.5]))


def test_responses_left_out_of_the_loss_do_not_shift_the_whitening():
    # loss_mask drops prompt 1's responses: REINFORCE++-baseline whitens prompt 0's 4 tokens alone, [2/3], [-1/3, -1/3],
    # [-1/3]: mean -1/12, deviations 3/4 and -1/4 (3 times), unbiased variance (9/16 + 3/16) / 3 = 1/4
    rollout = dataclasses.replace(_rollout(), loss_mask=torch.tensor([True] * 3 + [False] * 3))
    advantages, _ = estimate_advantages(rollout, PPOConfig(advantage_estimator="reinforce_plus_plus_baseline"), None)
    scale = 1 / math.sqrt(1 / 4 + fn.WHITEN_EPS)
    assert_close(advantages, _per_token([0.75 * scale, -0.25 * scale, -0.25 * scale, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "estimator", ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"]
)
def test_masked_out_token_rewards_change_nothing(estimator):
    rollout = _rollout()
    poisoned = dataclasses.replace(rollout, rewards=torch.where(rollout.response_mask, rollout.rewards, 1e6))
    ppo = PPOConfig(advantage_estimator=estimator)
    for clean, dirty in zip(
        estimate_advantages(rollout, ppo, None), estimate_advantages(poisoned, ppo, None), strict=True
    ):
        if clean is None:
            assert dirty is None
        else:
            assert_close(dirty, clean)


def test_gae_still_needs_the_critic_values():
    with pytest.raises(ValueError, match="'gae' needs the critic's values"):
        estimate_advantages(_rollout(), PPOConfig(), None)
