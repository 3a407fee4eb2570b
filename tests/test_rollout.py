"""Tests of lightning_rlhf.rollout: response forward, stop-token truncation, generate_rollout."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.models import (
    LoraConfig,
    PolicyConfig,
    PolicyValueModel,
    TinyModelConfig,
    build_policy,
)
from lightning_rlhf.rollout import GenerationConfig, forward_response, generate_rollout, truncate_at_stop

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
EOS, PAD = 1, 0  # ByT5


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Three left-padded prompts: (prompt_ids, prompt_mask), each (3, 9)."""
    enc = tokenizer(["the quick", "ab", "xyz!"], add_special_tokens=False, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask.bool()


def build(tokenizer, lora: LoraConfig | None = None, seed: int = 0, lora_b: bool = True) -> PolicyValueModel:
    """Tiny LoRA policy; with ``lora_b`` every LoRA B is nonzero, so the policy differs from the reference."""
    torch.manual_seed(seed)
    model = build_policy(PolicyConfig(tiny=TINY), lora or LoraConfig(), tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if lora_b and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def rollout(model, prompts, micro_batch_size=None, **generation):
    config = GenerationConfig(**{"max_new_tokens": 6, "temperature": 0.7} | generation)
    return generate_rollout(
        model, *prompts, config, eos_token_id=EOS, pad_token_id=PAD, micro_batch_size=micro_batch_size
    )


def rescore(model, r, mode="policy", temperature=0.7):
    with torch.no_grad():
        return forward_response(model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, temperature, mode)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0.0), ("max_new_tokens", 0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)],
)
def test_generation_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=rf"generation\.{field}"):
        GenerationConfig(**{field: value})


def test_truncate_at_stop_cuts_after_the_first_stop_and_trims_columns():
    response_ids = torch.tensor([[5, 1, 7, 1], [0, 6, 7, 8], [9, 9, 3, 9]])
    ids, mask, ended = truncate_at_stop(response_ids, stop_token_ids=[1, 3], pad_token_id=PAD)
    # Row 0 stops at its first 1; row 1 never stops (its leading 0 is a sampled token, not padding); row 2 stops at 3.
    torch.testing.assert_close(ids, torch.tensor([[5, 1, PAD, PAD], [0, 6, 7, 8], [9, 9, 3, PAD]]))
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]).bool())
    torch.testing.assert_close(ended, torch.tensor([True, False, True]))

    ids, mask, ended = truncate_at_stop(torch.tensor([[1, 7, 7], [4, 3, 1]]), stop_token_ids=[1, 3], pad_token_id=PAD)
    # The longest kept response has 2 tokens, so the third column (padding in every row) is dropped.
    torch.testing.assert_close(ids, torch.tensor([[1, PAD], [4, 3]]))
    torch.testing.assert_close(mask, torch.tensor([[True, False], [True, True]]))
    torch.testing.assert_close(ended, torch.tensor([True, True]))


def test_forward_response_aligns_logits_with_the_tokens_they_predict(tokenizer, prompts):
    model = build(tokenizer)
    prompt_ids, prompt_mask = prompts
    response_ids = torch.tensor([[10, 20, 30], [40, 50, PAD], [60, PAD, PAD]])
    response_mask = response_ids != PAD
    out = forward_response(
        model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=0.7, entropy="detached"
    )
    full_logits, full_values = model(
        torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    )
    # Position P - 1 + t (P = 9) predicts response token t and holds V(s_t).
    logp = torch.log_softmax(full_logits[:, 8:11] / 0.7, -1)
    expected = logp.gather(-1, response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, torch.where(response_mask, expected, 0.0))
    torch.testing.assert_close(out.values, torch.where(response_mask, full_values[:, 8:11], 0.0))
    torch.testing.assert_close(out.entropy, torch.where(response_mask, -(logp.exp() * logp).sum(-1), 0.0))
    assert out.logprobs.requires_grad  # no no_grad inside: the PPO update differentiates through this
    assert not out.entropy.requires_grad  # "detached": logged only
    plain = forward_response(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=0.7)
    assert plain.entropy is None

    ref = forward_response(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=0.7, mode="ref")
    assert ref.values is None
    assert (ref.logprobs[~response_mask] == 0).all()
    assert (ref.logprobs - out.logprobs)[response_mask].abs().max() > 1e-3


def test_forward_response_is_invariant_to_left_padding(tokenizer, prompts):
    model = build(tokenizer)
    prompt_ids, prompt_mask = prompts
    response_ids = torch.tensor([[10, 20, 30], [40, 50, PAD], [60, PAD, PAD]])
    response_mask = response_ids != PAD
    batched = forward_response(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=0.7)
    for row in range(3):
        length = int(response_mask[row].sum())
        alone = forward_response(
            model,
            prompt_ids[row][prompt_mask[row]][None],
            prompt_mask[row][prompt_mask[row]][None],
            response_ids[row, :length][None],
            response_mask[row, :length][None],
            temperature=0.7,
        )
        torch.testing.assert_close(batched.logprobs[row, :length], alone.logprobs[0])
        torch.testing.assert_close(batched.values[row, :length], alone.values[0])
    assert (batched.values[~response_mask] == 0).all()


def test_generate_rollout_masks_and_logprobs_match_a_recomputation(tokenizer, prompts):
    model = build(tokenizer, lora_b=False)  # fresh adapter: the policy equals the reference
    torch.manual_seed(0)
    r = rollout(model, prompts)
    batch, length = r.response_ids.shape
    assert batch == 3
    assert 1 <= length <= 6
    assert r.response_mask.dtype == torch.bool
    assert r.prompt_mask.dtype == torch.bool
    assert r.ended.dtype == torch.bool
    assert r.old_logprobs.dtype == r.ref_logprobs.dtype == r.old_values.dtype == torch.float32
    assert all(t.shape == (3, length) for t in (r.response_mask, r.old_logprobs, r.ref_logprobs, r.old_values))
    assert r.response_mask[:, 0].all()
    assert (r.response_mask[:, 1:] <= r.response_mask[:, :-1]).all()
    assert r.response_mask.sum(-1).max() == length  # no all-padding column is kept
    assert (r.response_ids[~r.response_mask] == PAD).all()
    assert (r.old_logprobs[~r.response_mask] == 0).all()
    assert (r.old_values[~r.response_mask] == 0).all()
    torch.testing.assert_close(r.ended, (r.response_ids == EOS).logical_and(r.response_mask).any(-1))

    policy = rescore(model, r)
    torch.testing.assert_close(r.old_logprobs, policy.logprobs)
    torch.testing.assert_close(r.old_values, policy.values)
    torch.testing.assert_close(r.ref_logprobs, r.old_logprobs)
    assert (r.old_logprobs[r.response_mask] < 0).all()


def test_reference_logprobs_come_from_the_model_with_the_adapter_disabled(tokenizer, prompts):
    model = build(tokenizer)  # nonzero LoRA B: policy and reference differ
    torch.manual_seed(0)
    r = rollout(model, prompts)
    torch.testing.assert_close(r.ref_logprobs, rescore(model, r, mode="ref").logprobs)
    assert (r.ref_logprobs - r.old_logprobs)[r.response_mask].abs().min() > 0


def test_generate_rollout_ends_each_response_at_its_first_stop_token(tokenizer, prompts):
    model = build(tokenizer)
    free = rollout(model, prompts, max_new_tokens=8, do_sample=False)
    # A stop token that row 0 produces (first at column k >= 1) and the other rows never produce.
    others = set(free.response_ids[1:][free.response_mask[1:]].tolist()) | {EOS}
    row0 = free.response_ids[0][free.response_mask[0]].tolist()
    k = next(k for k in range(1, len(row0)) if row0[k] not in others and row0[k] not in row0[:k])
    stopped = rollout(model, prompts, max_new_tokens=8, do_sample=False, stop_token_ids=[row0[k]])

    assert stopped.response_ids[0, : k + 1].tolist() == row0[: k + 1]
    assert stopped.response_mask[0].tolist() == [True] * (k + 1) + [False] * (stopped.response_ids.shape[1] - k - 1)
    assert (stopped.response_ids[0, k + 1 :] == PAD).all()
    assert stopped.ended.tolist() == [True, *free.ended[1:].tolist()]
    width = int(free.response_mask[1:].sum(-1).max())
    torch.testing.assert_close(stopped.response_ids[1:, :width], free.response_ids[1:, :width])
    torch.testing.assert_close(stopped.old_logprobs[1:, :width], free.old_logprobs[1:, :width])


def test_generate_rollout_turns_dropout_off_and_restores_every_training_flag(tokenizer, prompts):
    # build_policy turns dropout off; put LoRA's back on, so the rollout's own eval mode is what keeps it out.
    model = build(tokenizer, LoraConfig(dropout=0.5))
    dropouts = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in name]
    assert dropouts
    assert all(m.p == 0.0 for m in dropouts)
    for m in dropouts:
        m.p = 0.5
    model.train()
    model.value_head.eval()  # a mixed state must come back exactly
    before = {name: module.training for name, module in model.named_modules()}
    r = rollout(model, prompts)
    assert {name: module.training for name, module in model.named_modules()} == before

    with torch.no_grad():
        in_train_mode = forward_response(model, *prompts, r.response_ids, r.response_mask, 0.7).logprobs
    model.eval()
    torch.testing.assert_close(r.old_logprobs, rescore(model, r).logprobs)
    assert (in_train_mode - r.old_logprobs).abs().max() > 1e-3  # dropout would have changed the logprobs


def test_micro_batches_give_the_whole_batch_result(tokenizer, prompts):
    model = build(tokenizer)
    whole = rollout(model, prompts, do_sample=False)
    for micro_batch_size in (1, 2):
        parts = rollout(model, prompts, micro_batch_size=micro_batch_size, do_sample=False)
        assert torch.equal(parts.response_ids, whole.response_ids)
        torch.testing.assert_close(parts.old_logprobs, whole.old_logprobs)
        torch.testing.assert_close(parts.ref_logprobs, whole.ref_logprobs)
        torch.testing.assert_close(parts.old_values, whole.old_values)


def test_left_padded_prompts_generate_as_they_would_alone(tokenizer, prompts):
    model = build(tokenizer)
    batched = rollout(model, prompts, do_sample=False)
    for row in range(3):
        real = prompts[1][row]
        alone = rollout(model, (prompts[0][row][real][None], real[real][None]), do_sample=False)
        length = alone.response_ids.shape[1]
        assert torch.equal(batched.response_ids[row, :length], alone.response_ids[0])
        torch.testing.assert_close(batched.old_logprobs[row, :length], alone.old_logprobs[0])


def test_the_models_generation_config_cannot_change_sampling(tokenizer, prompts):
    model = build(tokenizer)
    greedy = rollout(model, prompts, do_sample=False, temperature=1.0)
    model.lm.generation_config.top_k = 1  # if it leaked, sampling would be greedy
    model.lm.generation_config.repetition_penalty = 1e6
    torch.manual_seed(0)
    sampled = rollout(model, prompts, temperature=1.0)
    assert not torch.equal(sampled.response_ids, greedy.response_ids)

    model.lm.generation_config.suppress_tokens = [EOS]
    with pytest.raises(ValueError, match="suppress_tokens"):
        rollout(model, prompts)


def test_right_padded_prompts_are_refused(tokenizer, prompts):
    prompt_ids, prompt_mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        rollout(build(tokenizer), (prompt_ids.flip(1), prompt_mask.flip(1)))


def test_scoring_forwards_skip_columns_that_are_padding_in_every_row(tokenizer, prompts):
    model = build(tokenizer)
    widths = []
    decoder = model.lm.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[1]) if kw.get("use_cache") is False else None,
        with_kwargs=True,
    )
    try:
        r = rollout(model, prompts, micro_batch_size=1)
    finally:
        hook.remove()
    # One row per micro-batch, longest first: the policy and the reference forward see that row's own prompt and
    # response only.
    own = (r.prompt_mask.sum(-1) + r.response_mask.sum(-1)).tolist()
    assert widths == [w for w in sorted(own, reverse=True) for _ in ("policy", "ref")]
    assert min(own) < r.prompt_ids.shape[1] + r.response_ids.shape[1]  # something was trimmed
    full = rescore(model, r)  # the whole batch at full width gives the same logprobs and values
    torch.testing.assert_close(r.old_logprobs, full.logprobs)
    torch.testing.assert_close(r.old_values, full.values)


def test_micro_batches_are_cut_from_rows_of_similar_length(tokenizer, prompts):
    # Two rows per micro-batch over prompts of 15, 4, 2, 11 and 1 tokens: grouped by length, the micro-batches pad
    # to 15 + 11 and 4 + 2 (+ 1 alone) columns instead of 15 + 4, 11 + 2, 1; the results come back in row order.
    model = build(tokenizer)
    texts = ["the quick brown", "abcd", "xy", "hello there", "q"]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    batch = (enc.input_ids, enc.attention_mask.bool())
    widths = []
    decoder = model.lm.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)) if kw.get("use_cache") is False else None,
        with_kwargs=True,
    )
    try:
        r = rollout(model, batch, micro_batch_size=2, max_new_tokens=3, stop_token_ids=[])
    finally:
        hook.remove()
    assert bool(r.response_mask.all())  # every response is 3 tokens: the width is set by the prompts
    assert [w for w in widths[::2]] == [(2, 15 + 3), (2, 4 + 3), (1, 1 + 3)]
    full = rescore(model, r)
    torch.testing.assert_close(r.old_logprobs, full.logprobs)
    torch.testing.assert_close(r.ref_logprobs, rescore(model, r, mode="ref").logprobs)


def test_a_rollout_of_n_samples_per_prompt_repeats_each_prompt_for_its_group(tokenizer, prompts):
    model = build(tokenizer)
    r = rollout(model, prompts, micro_batch_size=4, samples_per_prompt=3)
    assert len(r) == 9
    assert r.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(r.prompt_ids, prompts[0].repeat_interleave(3, dim=0))
    assert torch.equal(r.prompt_mask, prompts[1].repeat_interleave(3, dim=0))
    # every response is scored with its own prompt (micro-batches of 4 cut across groups)
    policy, ref = rescore(model, r), rescore(model, r, mode="ref")
    torch.testing.assert_close(r.old_logprobs, policy.logprobs)
    torch.testing.assert_close(r.old_values, policy.values)
    torch.testing.assert_close(r.ref_logprobs, ref.logprobs)


def test_a_policy_without_a_value_head_gives_a_rollout_without_values(tokenizer, prompts):
    torch.manual_seed(0)
    model = build_policy(PolicyConfig(tiny=TINY), LoraConfig(), tokenizer, value_head=False)
    assert model.value_head is None
    assert not any("value_head" in name for name, _ in model.named_parameters())
    r = rollout(model, prompts, samples_per_prompt=2)
    assert r.old_values is None
    torch.testing.assert_close(r.old_logprobs, rescore(model, r).logprobs)
    assert rescore(model, r).values is None
