"""Tests of ``lightning_rlhf.types``: the Rollout record's minibatches, row alignment and concatenated inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_rlhf.types import Rollout

B, P, T = 8, 3, 4


def _rollout(batch: int = B) -> Rollout:
    """Every field of row b is built from b, so a row's id can be read back from any field."""
    rows = torch.arange(batch)
    return Rollout(
        prompt_ids=rows[:, None] * 100 + torch.arange(P),
        prompt_mask=torch.arange(P)[None, :] >= (rows % P)[:, None],  # left-padded, b % P pad tokens
        response_ids=rows[:, None] * 100 + 50 + torch.arange(T),
        response_mask=torch.arange(T)[None, :] < (1 + rows % T)[:, None],  # right-padded, 1 + b % T real tokens
        old_logprobs=rows[:, None].float() + 0.1 * torch.arange(T),
        ref_logprobs=-rows[:, None].float() - 0.1 * torch.arange(T),
        old_values=rows[:, None].float().expand(batch, T) * 10,
        ended=rows % 2 == 0,
        group_index=rows // 2,
        loss_mask=rows % 3 != 0,
        scores=rows.float(),
        advantages=rows[:, None].float().expand(batch, T) / 7,
    )


def _row_ids(rollout: Rollout) -> torch.Tensor:
    return rollout.prompt_ids[:, 0] // 100


def _assert_rows_aligned(part: Rollout, full: Rollout) -> None:
    rows = _row_ids(part)
    for field in dataclasses.fields(Rollout):
        value, source = getattr(part, field.name), getattr(full, field.name)
        if source is None:
            assert value is None, field.name
        else:
            assert torch.equal(value, source[rows]), field.name


@pytest.mark.parametrize("num_minibatches", [1, 2, 4, 8])
def test_minibatches_are_disjoint_equal_and_cover_every_row(num_minibatches: int):
    rollout = _rollout()
    parts = rollout.minibatches(num_minibatches, generator=torch.Generator().manual_seed(0))
    assert len(parts) == num_minibatches
    assert [len(part) for part in parts] == [B // num_minibatches] * num_minibatches
    ids = torch.cat([_row_ids(part) for part in parts])
    assert sorted(ids.tolist()) == list(range(B))  # disjoint and covering: each row exactly once
    for part in parts:
        _assert_rows_aligned(part, rollout)


def test_minibatches_follow_the_generator():
    rollout = _rollout()

    def order(seed: int) -> list[int]:
        parts = rollout.minibatches(2, generator=torch.Generator().manual_seed(seed))
        return torch.cat([_row_ids(part) for part in parts]).tolist()

    assert order(0) == order(0)  # reproducible
    assert order(0) == torch.randperm(B, generator=torch.Generator().manual_seed(0)).tolist()  # a random permutation
    assert order(0) != list(range(B))  # actually shuffled (seed 0 gives a non-identity permutation of 8)
    assert order(0) != order(1)


def test_none_fields_stay_none():
    parts = _rollout().minibatches(4, generator=torch.Generator().manual_seed(0))
    for part in parts:
        assert part.kl is None
        assert part.rewards is None
        assert part.returns is None
        assert part.scores is not None
        assert part.advantages is not None


@pytest.mark.parametrize("num_minibatches", [3, 5, 16, 0, -2])
def test_non_dividing_num_minibatches_raises(num_minibatches: int):
    with pytest.raises(ValueError, match=rf"num_minibatches={num_minibatches} must be >= 1 and divide"):
        _rollout().minibatches(num_minibatches)


def test_input_ids_and_attention_mask_concatenate_prompt_then_response():
    rollout = Rollout(
        prompt_ids=torch.tensor([[0, 5, 6], [1, 2, 3]]),
        prompt_mask=torch.tensor([[False, True, True], [True, True, True]]),
        response_ids=torch.tensor([[7, 8, 0], [9, 0, 0]]),
        response_mask=torch.tensor([[True, True, False], [True, False, False]]),
        old_logprobs=torch.zeros(2, 3),
        ref_logprobs=torch.zeros(2, 3),
        old_values=torch.zeros(2, 3),
        ended=torch.tensor([True, False]),
    )
    assert torch.equal(rollout.input_ids, torch.tensor([[0, 5, 6, 7, 8, 0], [1, 2, 3, 9, 0, 0]]))
    expected_mask = torch.tensor([[False, True, True, True, True, False], [True, True, True, True, False, False]])
    assert torch.equal(rollout.attention_mask, expected_mask)
    assert rollout.attention_mask.dtype == torch.bool
    assert len(rollout) == 2


def test_select_and_to_keep_rows_and_none_fields():
    rollout = _rollout()
    index = torch.tensor([5, 0, 5])
    picked = rollout.select(index)
    assert _row_ids(picked).tolist() == [5, 0, 5]
    _assert_rows_aligned(picked, rollout)
    moved = rollout.to("cpu")
    _assert_rows_aligned(moved, rollout)
    assert moved.kl is None


def test_rollout_is_immutable():
    rollout = _rollout()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rollout.scores = None  # type: ignore[misc]
    replaced = dataclasses.replace(rollout, kl=torch.zeros(B, T))
    assert rollout.kl is None
    assert replaced.kl is not None


def _padded_rollout() -> Rollout:
    # Row 0: prompt "ab" (2 of 4 columns), response of 1 token; row 1: prompt of 3 columns, response of 2 of 4 columns.
    prompt_mask = torch.tensor([[False, False, True, True], [False, True, True, True]])
    response_mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    values = torch.arange(8, dtype=torch.float32).view(2, 4)
    return Rollout(
        prompt_ids=torch.arange(8).view(2, 4),
        prompt_mask=prompt_mask,
        response_ids=torch.arange(10, 18).view(2, 4),
        response_mask=response_mask,
        old_logprobs=values,
        ref_logprobs=values + 1,
        old_values=values + 2,
        ended=torch.tensor([True, False]),
        scores=torch.tensor([0.5, -0.5]),
    )


def test_trim_padding_drops_the_columns_no_row_uses():
    full = _padded_rollout()
    trimmed = full.trim_padding()
    assert torch.equal(trimmed.prompt_ids, torch.tensor([[1, 2, 3], [5, 6, 7]]))
    assert torch.equal(trimmed.prompt_mask, full.prompt_mask[:, 1:])
    assert torch.equal(trimmed.response_ids, torch.tensor([[10, 11], [14, 15]]))
    assert torch.equal(trimmed.old_logprobs, torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    assert torch.equal(trimmed.ref_logprobs, full.ref_logprobs[:, :2])
    assert torch.equal(trimmed.old_values, full.old_values[:, :2])
    assert torch.equal(trimmed.scores, full.scores)  # per-sequence fields stay
    assert trimmed.advantages is None
    assert trimmed.trim_padding() is trimmed  # nothing left to trim
    # Every real token survives.
    assert trimmed.response_mask.sum() == full.response_mask.sum()
    assert trimmed.prompt_mask.sum() == full.prompt_mask.sum()


def test_trim_padding_keeps_at_least_one_column():
    full = _padded_rollout()
    empty = dataclasses.replace(full, response_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert empty.trim_padding().response_ids.shape == (2, 1)


def test_text_mask_drops_the_stop_token_of_ended_responses_only():
    # Row b has 1 + b % 4 real tokens and ended = (b even): rows 0, 2, 4, 6 lose their last real token.
    rollout = _rollout()
    expected = rollout.response_mask.clone()
    for b in (0, 2, 4, 6):
        expected[b, b % T] = False
    assert torch.equal(rollout.text_mask(), expected)
    assert torch.equal(rollout.text_mask()[1], rollout.response_mask[1])  # truncated: its last token is text


def test_trained_mask_is_the_response_mask_of_the_rows_loss_mask_keeps():
    rollout = _rollout()  # loss_mask: b % 3 != 0 keeps rows 1, 2, 4, 5, 7
    expected = rollout.response_mask.clone()
    expected[[0, 3, 6]] = False
    assert torch.equal(rollout.trained_mask, expected)
    assert torch.equal(dataclasses.replace(rollout, loss_mask=None).trained_mask, rollout.response_mask)


def test_select_trim_padding_and_to_carry_the_engine_logprobs_and_is_weights():
    # The rollout-correction fields are (B, T) response-side tensors: select picks their rows, trim_padding keeps
    # their first 2 columns (the response columns some row uses), like old_logprobs.
    full = dataclasses.replace(
        _padded_rollout(),
        engine_logprobs=torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, -7.0, -8.0]]),
        is_weights=torch.tensor([[0.5, 0.0, 0.0, 0.0], [1.5, 2.0, 0.0, 0.0]]),
    )
    trimmed = full.trim_padding()
    assert torch.equal(trimmed.engine_logprobs, torch.tensor([[-1.0, -2.0], [-5.0, -6.0]]))
    assert torch.equal(trimmed.is_weights, torch.tensor([[0.5, 0.0], [1.5, 2.0]]))
    picked = trimmed.select(torch.tensor([1, 1, 0]))
    assert torch.equal(picked.engine_logprobs, torch.tensor([[-5.0, -6.0], [-5.0, -6.0], [-1.0, -2.0]]))
    assert torch.equal(picked.is_weights, torch.tensor([[1.5, 2.0], [1.5, 2.0], [0.5, 0.0]]))
    assert torch.equal(full.to("cpu").is_weights, full.is_weights)
    assert _padded_rollout().select(torch.tensor([1])).engine_logprobs is None
    assert _padded_rollout().trim_padding().is_weights is None
