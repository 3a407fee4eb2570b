"""Tests of ``lightning_rlhf.control``: KL controllers and running reward moments, by hand and against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.control import AdaptiveKLController, FixedKLController, RunningMoments
from lightning_rlhf.functional import moment_sums


# ============================================================================================================ fixed KL
@pytest.mark.parametrize("kl", [0.0, 1e-3, 6.0, 1e6, float("nan"), float("inf")])
def test_fixed_controller_never_changes(kl: float):
    controller = FixedKLController(0.05)
    for n_steps in (1, 256, 10**6):
        assert controller.update(kl, n_steps) == 0.05
    assert controller.value == 0.05


def test_fixed_controller_rejects_negative_coef():
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-0.1)
    assert FixedKLController(0.0).value == 0.0  # beta = 0 turns the penalty off and is allowed


# ========================================================================================================= adaptive KL
@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        # e = 12 / 6 - 1 = 1, clipped to 0.2: beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512
        (12.0, 0.100512),
        # e = 3 / 6 - 1 = -0.5, clipped to -0.2: beta = 0.1 * (1 - 0.2 * 256 / 10000) = 0.1 * 0.99488 = 0.099488
        (3.0, 0.099488),
        # e = 6.6 / 6 - 1 = 0.1, inside the clip: beta = 0.1 * (1 + 0.1 * 0.0256) = 0.1 * 1.00256 = 0.100256
        (6.6, 0.100256),
        # e = 5.4 / 6 - 1 = -0.1: beta = 0.1 * (1 - 0.1 * 0.0256) = 0.1 * 0.99744 = 0.099744
        (5.4, 0.099744),
        # on target, e = 0: unchanged
        (6.0, 0.1),
    ],
)
def test_adaptive_controller_one_update_by_hand(kl: float, expected: float):
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert_close(controller.update(kl, n_steps=256), expected)
    assert_close(controller.value, expected)


def test_adaptive_controller_two_updates_compound():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(12.0, n_steps=256)
    # 0.100512 * 1.00512 = 0.10102663
    assert_close(controller.update(100.0, n_steps=256), 0.100512 * 1.00512)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_controller_raises_beta_above_target_and_lowers_it_below(seed: int):
    rng = np.random.default_rng(seed)
    controller = AdaptiveKLController(init_kl_coef=0.2, target=0.05, horizon=1000)
    for _ in range(20):
        before = controller.value
        kl = float(rng.uniform(0.0, 0.2))
        after = controller.update(kl, n_steps=int(rng.integers(1, 64)))
        if kl > 0.05:
            assert after > before
        elif kl < 0.05:
            assert after < before
        assert after > 0


@pytest.mark.parametrize("kl", [float("nan"), float("inf"), float("-inf")])
def test_adaptive_controller_ignores_non_finite_kl(kl: float):
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert controller.update(kl, n_steps=256) == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_kl_coef": 0.0, "target": 6.0, "horizon": 10}, "kl_coef"),
        ({"init_kl_coef": -1.0, "target": 6.0, "horizon": 10}, "kl_coef"),
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 10}, "target_kl"),
        ({"init_kl_coef": 0.1, "target": 6.0, "horizon": 0}, "kl_horizon"),
    ],
)
def test_adaptive_controller_rejects_bad_config(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        AdaptiveKLController(**kwargs)


# ===================================================================================================== state_dict
@pytest.mark.parametrize(
    "make",
    [lambda: FixedKLController(0.05), lambda: AdaptiveKLController(0.1, 6.0, 10000)],
    ids=["fixed", "adaptive"],
)
def test_kl_controller_state_dict_round_trips(make):
    controller = make()
    for kl in (12.0, 3.0, 7.0):
        controller.update(kl, n_steps=256)
    state = controller.state_dict()
    assert all(isinstance(v, int | float) for v in state.values())  # plain numbers, checkpoint-friendly
    restored = make()  # as a resumed run rebuilds it from the same config, then loads the checkpoint
    if isinstance(controller, AdaptiveKLController):
        assert restored.value != controller.value  # the updates moved beta; loading must bring it back
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.update(9.0, n_steps=64) == controller.update(9.0, n_steps=64)
    assert restored.state_dict() == controller.state_dict()


def test_adaptive_controller_restores_beta_and_keeps_its_configured_target_and_horizon():
    # beta is learned state; target and horizon come from the (possibly changed) config of the resumed run
    restored = AdaptiveKLController(init_kl_coef=1.0, target=3.0, horizon=7)
    restored.load_state_dict({"value": 0.25, "target": 6.0, "horizon": 10000})
    assert restored.state_dict() == {"value": 0.25, "target": 3.0, "horizon": 7}


def test_running_moments_state_dict_round_trips():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 4.0]))
    moments.update(torch.tensor([-3.0]))
    state = moments.state_dict()
    assert all(isinstance(v, int | float) for v in state.values())
    restored = RunningMoments()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    batch = torch.tensor([0.5, 7.0])
    assert restored.update(batch) == moments.update(batch)
    assert restored.state_dict() == moments.state_dict()


# ================================================================================================= running moments
def test_sums_hand_worked():
    # count 3, sum 1 + 2 + 3 = 6, sum of squares 1 + 4 + 9 = 14; any shape is flattened
    sums = moment_sums(torch.tensor([[1.0, 2.0, 3.0]]))
    assert_close(sums, torch.tensor([3.0, 6.0, 14.0], dtype=torch.float64))


def test_running_moments_hand_worked():
    moments = RunningMoments()
    # [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1) / 2 = 1
    assert_close(moments.update(torch.tensor([1.0, 2.0, 3.0])), (2.0, 1.0))
    assert_close((moments.mean, moments.std, moments.count), (2.0, 1.0, 3))
    # then [5] (a one-value batch: its own std is 0): all of [1, 2, 3, 5] has mean 11 / 4 = 2.75,
    # squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75, unbiased var 8.75 / 3 = 2.9166667
    assert_close(moments.update(torch.tensor([5.0])), (5.0, 0.0))
    assert_close((moments.mean, moments.var, moments.count), (2.75, 8.75 / 3, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_running_moments_match_numpy_over_batches_of_different_sizes(seed: int):
    g = torch.Generator().manual_seed(seed)
    moments, seen = RunningMoments(), []
    for size in (1, 5, 2, 17, 1, 3, 64):
        batch = torch.randn(size, generator=g) * 2.5 + 3.0
        batch_mean, batch_std = moments.update(batch)
        values = batch.double().numpy()
        seen.append(values)
        everything = np.concatenate(seen)
        assert_close(batch_mean, float(values.mean()))
        assert_close(batch_std, float(values.std(ddof=1)) if size > 1 else 0.0)
        assert_close(moments.mean, float(everything.mean()))
        assert moments.count == everything.size
        if everything.size > 1:
            assert_close(moments.std, float(everything.std(ddof=1)))


@pytest.mark.parametrize("history", [False, True])
def test_merging_summed_sums_of_ranks_equals_updating_with_the_concatenation(history: bool):
    g = torch.Generator().manual_seed(0)
    rank0, rank1 = torch.randn(7, generator=g) + 1.0, torch.randn(4, generator=g) * 3.0
    merged, concatenated = RunningMoments(), RunningMoments()
    if history:
        earlier = torch.randn(10, generator=g) - 2.0
        merged.update(earlier)
        concatenated.update(earlier)
    # what an all-reduce (sum) of each rank's sums() hands every rank
    merged_batch = merged.update_from_sums(moment_sums(rank0) + moment_sums(rank1))
    concatenated_batch = concatenated.update(torch.cat([rank0, rank1]))
    assert_close(merged_batch, concatenated_batch)
    assert merged.count == concatenated.count == 11 + (10 if history else 0)
    assert_close((merged.mean, merged.var), (concatenated.mean, concatenated.var))


def test_running_moments_update_does_not_write_into_its_input():
    x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    original = x.clone()
    RunningMoments().update(x)
    assert torch.equal(x, original)


def test_running_moments_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="at least one value"):
        RunningMoments().update(torch.tensor([]))
