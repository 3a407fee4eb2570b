"""Tests of lightning_rlhf.models.packing: the packing plan, packed forwards equal padded ones, the boundary check."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import TINY

from lightning_rlhf.config import PPOConfig
from lightning_rlhf.loss import ppo_objective
from lightning_rlhf.models import LoraConfig, PolicyConfig, build_policy, packing
from lightning_rlhf.models.packing import first_fit_decreasing, pack_rows, unpack, verify_packing
from lightning_rlhf.rollout import forward_response
from lightning_rlhf.types import ForwardOptions, Rollout

PAD = 0


def build(tokenizer, lora: LoraConfig | None = None, **policy_fields):
    torch.manual_seed(0)
    policy = PolicyConfig(tiny=TINY, **policy_fields)
    model = build_policy(policy, lora or LoraConfig(r=4, alpha=8), tokenizer)
    with torch.no_grad():  # a trained-looking policy that differs from the reference
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
            elif not model.uses_lora:
                param.add_(torch.randn_like(param), alpha=0.05)
    return model


def responses_of_different_lengths():
    """(prompt_ids, prompt_mask, response_ids, response_mask): 4 left-padded prompts, responses of 7, 1, 4, 2 tokens."""
    prompt_lengths, response_lengths = [5, 2, 3, 5], [7, 1, 4, 2]
    generator = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(3, 200, (4, 5), generator=generator)
    response_ids = torch.randint(3, 200, (4, 7), generator=generator)
    prompt_mask = torch.arange(5) >= 5 - torch.tensor(prompt_lengths)[:, None]
    response_mask = torch.arange(7) < torch.tensor(response_lengths)[:, None]
    return prompt_ids.where(prompt_mask, PAD), prompt_mask, response_ids.where(response_mask, PAD), response_mask


def test_first_fit_decreasing_places_longest_first_into_the_first_row_with_room():
    # Longest first: 5 (seq 1) opens row 0; 4 (seq 3) opens row 1; 3 (seq 0) opens row 2; 2 (seq 2) fits after it;
    # 1 (seq 5) fits after the 4 in row 1; the empty seq 4 takes no slot.
    place = first_fit_decreasing([3, 5, 2, 4, 0, 1], width=5)
    assert place == [(2, 0), (0, 0), (2, 3), (1, 0), (0, 0), (1, 4)]
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        first_fit_decreasing([6], width=5)


def test_pack_rows_moves_each_run_and_restarts_positions():
    input_ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 0], [0, 31, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 0, 0, 0]]).bool()
    packed = pack_rows(input_ids, mask, pad_token_id=99)
    # Width 4 (the longest run): row 1's run fills packed row 0; row 0's run and row 2's single token share row 1.
    assert packed.input_ids.tolist() == [[21, 22, 23, 24], [11, 12, 13, 31]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert packed.index.tolist() == [[0, 0, 4, 5, 6], [0, 1, 2, 3, 0], [0, 7, 0, 0, 0]]
    # Unused slots hold the pad id at position 0.
    packed = pack_rows(torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), pad_token_id=99)
    assert packed.input_ids.tolist() == [[5, 6, 7], [8, 9, 99]]
    assert packed.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]


def test_pack_rows_refuses_rows_with_padding_between_real_tokens():
    with pytest.raises(ValueError, match=r"rows \[1\].*ppo\.packing: false"):
        pack_rows(torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]]))


def test_unpack_gathers_positions_and_routes_gradients_back():
    leaf = torch.arange(12.0, requires_grad=True)
    packed = leaf.view(2, 3, 2)  # (R, W, H)
    index = torch.tensor([[4, 0], [1, 5]])
    out = unpack(packed, index)
    assert out.tolist() == [[[8.0, 9.0], [0.0, 1.0]], [[2.0, 3.0], [10.0, 11.0]]]
    out[0, 0].sum().backward()
    assert leaf.grad.view(6, 2).sum(-1).tolist() == [0.0, 0.0, 0.0, 0.0, 2.0, 0.0]


@pytest.mark.parametrize(
    ("lora", "policy_fields"),
    [(True, {}), (False, {}), (True, {"attn_implementation": "eager"}), (True, {"gradient_checkpointing": True})],
    ids=["lora", "full", "eager", "checkpointing"],
)
def test_packed_forward_matches_the_padded_forward_and_its_gradient(tokenizer, lora, policy_fields):
    lora_config = LoraConfig(r=4, alpha=8) if lora else LoraConfig(enabled=False)
    model = build(tokenizer, lora_config, **policy_fields).train()
    inputs = responses_of_different_lengths()
    results = {}
    for packed in (False, True):
        model.zero_grad()
        policy = forward_response(
            model, *inputs, temperature=0.7, mode="policy", options=ForwardOptions(packing=packed)
        )
        ref = forward_response(model, *inputs, temperature=0.7, mode="ref", options=ForwardOptions(packing=packed))
        (policy.logprobs.sum() + policy.values.pow(2).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[packed] = (policy.logprobs, policy.values, ref.logprobs, grads)
    padded, packed = results[False], results[True]
    for expected, actual in zip(padded[:3], packed[:3], strict=True):
        torch.testing.assert_close(actual, expected)
    assert padded[3].keys() == packed[3].keys()
    assert len(padded[3]) > 2
    for name, grad in padded[3].items():
        torch.testing.assert_close(packed[3][name], grad, msg=name)
    assert (packed[0] - padded[2]).abs().max() > 1e-3  # the policy is not the reference


def test_packed_forward_runs_fewer_positions(tokenizer):
    model = build(tokenizer)
    shapes = []
    decoder = model.lm.get_base_model().get_decoder()
    decoder.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    forward_response(model, *responses_of_different_lengths(), temperature=1.0, options=ForwardOptions(packing=True))
    # Runs of 12, 3, 7, 7 tokens in rows of 12: [12], [7, 3], [7]; padded it would be 4 rows of 12.
    assert shapes[-1] == (3, 12)


def test_ppo_objective_with_packing_equals_the_padded_objective(tokenizer):
    model = build(tokenizer)
    prompt_ids, prompt_mask, response_ids, response_mask = responses_of_different_lengths()
    generator = torch.Generator().manual_seed(5)
    per_token = {
        name: torch.randn(response_mask.shape, generator=generator).where(response_mask, 0.0)
        for name in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")
    }
    part = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended=response_mask[:, -1], **per_token)
    padded = ppo_objective(model, part, PPOConfig(), temperature=0.7)
    packed = ppo_objective(model, part, PPOConfig(packing=True), temperature=0.7)
    for field in ("loss", "policy_loss", "value_loss", "entropy"):
        torch.testing.assert_close(getattr(packed, field), getattr(padded, field), msg=field)


def test_verify_packing_accepts_a_model_that_keeps_sequences_apart_and_checks_it_once(tokenizer):
    decoder = build(tokenizer).lm.get_base_model().get_decoder()
    calls = []
    decoder.register_forward_pre_hook(lambda *args: calls.append(1))
    decoder.train()
    verify_packing(decoder)
    assert len(calls) == 3  # packed probe, leaking reference, sequence alone
    assert decoder.training  # training flags restored
    verify_packing(decoder)
    assert len(calls) == 3


# Tiny configs of other families: absolute positions (GPT-2), q/k norms (Qwen3), logit soft-capping (Gemma 2).
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SMALL_GQA = SMALL | {"num_key_value_heads": 2, "head_dim": 8, "vocab_size": 300}
ARCHITECTURES = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=300)),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**SMALL_GQA)),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**SMALL_GQA)),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_packed_decoder_matches_the_padded_decoder_across_architectures(name):
    cls, config = ARCHITECTURES[name]
    torch.manual_seed(0)
    decoder = cls(config).eval().get_decoder()
    ids = torch.randint(3, 300, (3, 10))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2:], mask[1, :4], mask[2, 5:8] = True, True, True
    verify_packing(decoder)
    packed = pack_rows(ids, mask)
    with torch.no_grad():
        out = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        padded = decoder(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False)
    hidden = unpack(out.last_hidden_state, packed.index)
    torch.testing.assert_close(hidden[mask], padded.last_hidden_state[mask])


def test_verify_packing_refuses_opt_whose_mask_ignores_the_sequence_boundaries():
    # OPT builds its causal mask without the position ids (transformers 5.24), so packed sequences attend to each other.
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300}
    config = transformers.OPTConfig(**shape, word_embed_proj_dim=32)
    decoder = transformers.OPTForCausalLM(config).get_decoder()
    with pytest.raises(ValueError, match=r"ppo\.packing: OPTDecoder does not keep packed sequences apart"):
        verify_packing(decoder)


def test_verify_packing_refuses_a_model_whose_attention_crosses_sequences(tokenizer, monkeypatch):
    # Without the packed-sequence detection, transformers builds a plain causal mask: the second sequence attends to
    # the first. The check must name the field and the fix before any packed forward runs.
    model = build(tokenizer)
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"ppo\.packing: .*LlamaModel.*Set model\.ppo\.packing: false"):
        forward_response(
            model, *responses_of_different_lengths(), temperature=1.0, options=ForwardOptions(packing=True)
        )
    assert model.lm.get_base_model().get_decoder() not in packing._verified
