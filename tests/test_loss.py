"""Tests of lightning_rlhf.loss.ppo_objective: the update's loss is the three seed terms, composed as PPOConfig says."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_rollout import build, rescore, rollout

from lightning_rlhf import functional as F
from lightning_rlhf.config import PPOConfig
from lightning_rlhf.loss import ppo_objective
from lightning_rlhf.models import PolicyConfig, forward_response, load_tokenizer

TEMPERATURE = 0.7  # test_rollout.rollout samples at this temperature


@pytest.fixture(scope="module")
def scored():
    """A tiny policy, one of its rollouts with advantages and returns, then a changed adapter (ratios != 1)."""
    tokenizer = load_tokenizer(PolicyConfig())
    enc = tokenizer(["the quick", "ab", "xyz!"], add_special_tokens=False, padding=True, return_tensors="pt")
    model = build(tokenizer)
    torch.manual_seed(0)
    r = rollout(model, (enc.input_ids, enc.attention_mask.bool()))
    generator = torch.Generator().manual_seed(2)
    r = dataclasses.replace(
        r,
        advantages=torch.randn(r.response_mask.shape, generator=generator),
        returns=torch.randn(r.response_mask.shape, generator=generator),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model, r


def test_ppo_objective_is_policy_plus_weighted_value_minus_weighted_entropy(scored):
    model, r = scored
    ppo = PPOConfig(clip_coef=0.1, vf_coef=0.3, ent_coef=0.05, value_clip_coef=0.2)
    terms = ppo_objective(model, r, ppo, TEMPERATURE)
    out = rescore(model, r, temperature=TEMPERATURE)
    mask = r.response_mask
    pg, pg_stats = F.policy_loss(out.logprobs, r.old_logprobs, r.advantages, mask, 0.1, None, ppo.aggregation)
    vf, vf_stats = F.value_loss(out.values, r.old_values, r.returns, mask, 0.2, ppo.aggregation)
    with torch.no_grad():  # the entropy from the logits of every position, padding included
        logits, _ = model(torch.cat([r.prompt_ids, r.response_ids], 1), torch.cat([r.prompt_mask, mask], 1))
    prompt_len, response_len = r.prompt_ids.shape[1], mask.shape[1]
    token_entropy = F.entropy_from_logits(logits[:, prompt_len - 1 : prompt_len + response_len - 1], TEMPERATURE)
    entropy = F.aggregate(token_entropy, mask, ppo.aggregation)
    torch.testing.assert_close(terms.loss.detach(), pg + 0.3 * vf - 0.05 * entropy)
    torch.testing.assert_close(terms.policy_loss, pg)
    torch.testing.assert_close(terms.value_loss, vf)
    torch.testing.assert_close(terms.entropy, entropy)
    torch.testing.assert_close(terms.policy.clipfrac, pg_stats.clipfrac)
    torch.testing.assert_close(terms.value.clipfrac, vf_stats.clipfrac)
    assert int(terms.tokens) == int(mask.sum())
    assert 0 < float(terms.policy.clipfrac) < 1  # the changed adapter moved some ratios past the clip, not all


def test_the_entropy_bonus_is_aggregated_like_the_loss_and_the_logged_entropy_is_a_token_mean(scored):
    # Rows of 2, 4 and 6 tokens weigh differently in a sequence mean than in a token mean; a low temperature makes
    # the tiny model's entropies differ from token to token, so the two means differ here.
    model, r = scored
    r = dataclasses.replace(r, response_mask=torch.arange(6) < torch.tensor([[2], [4], [6]]))
    ppo = PPOConfig(ent_coef=0.05, aggregation="seq-mean-token-mean")
    terms = ppo_objective(model, r, ppo, 0.05)
    no_bonus = ppo_objective(model, r, dataclasses.replace(ppo, ent_coef=0.0), 0.05)
    with torch.no_grad():
        out = forward_response(
            model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, 0.05, entropy="detached"
        )
    mask = r.response_mask
    token_entropy = F.masked_mean(out.entropy, mask)
    torch.testing.assert_close(terms.entropy, token_entropy)
    bonus = F.aggregate(out.entropy, mask, "seq-mean-token-mean")
    assert not torch.allclose(bonus, token_entropy)
    torch.testing.assert_close(no_bonus.loss.detach() - terms.loss.detach(), 0.05 * bonus)
    assert int(terms.units) == len(mask)  # a sequence mean averages over the responses


def test_ppo_objective_gradient_reaches_the_adapter_and_value_head_and_carries_the_entropy_bonus(scored):
    model, r = scored

    def grads(ent_coef: float) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        ppo_objective(model, r, PPOConfig(ent_coef=ent_coef), TEMPERATURE).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, bonus = grads(0.0), grads(0.5)
    trained = [name for name in plain if "lora_B" in name or "value_head" in name]
    assert trained
    assert all(bool(plain[name].abs().sum() > 0) for name in trained)
    # The entropy term is in the graph only with a bonus, and then it changes the gradient.
    assert not all(torch.equal(plain[name], bonus[name]) for name in trained)


@pytest.mark.parametrize("ent_coef", [0.0, 0.05], ids=["entropy_logged", "entropy_bonus"])
def test_lm_head_chunks_give_the_same_objective_and_gradients_without_holding_all_logits(scored, ent_coef):
    model, r = scored
    rows = []  # rows of every lm_head call: forward, and the chunks' recomputation in backward
    handle = model.lm.get_base_model().lm_head.register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    results = []
    for chunk in (None, 2):
        model.zero_grad(set_to_none=True)
        rows.clear()
        terms = ppo_objective(model, r, PPOConfig(ent_coef=ent_coef, lm_head_chunk_size=chunk), TEMPERATURE)
        terms.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((terms, grads, list(rows)))
    handle.remove()
    (whole, whole_grads, whole_rows), (chunked, chunked_grads, chunked_rows) = results
    tokens = int(r.response_mask.sum())
    assert whole_rows == [tokens]
    assert max(chunked_rows) == 2
    assert sum(chunked_rows) == 2 * tokens  # every chunk ran again in the backward pass
    for field in ("loss", "policy_loss", "value_loss", "entropy"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), msg=field)
    assert chunked_grads.keys() == whole_grads.keys()
    assert any("lora_B" in name for name in chunked_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=name)


def test_lm_head_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match=r"ppo\.lm_head_chunk_size=0 is invalid: use >= 1 or null"):
        PPOConfig(lm_head_chunk_size=0)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.bfloat16])
def test_micro_batch_weights_are_exact_float32_shares_whatever_the_default_dtype(default_dtype):
    # Under precision bf16-true Lightning sets the default dtype to bfloat16 inside training_step; a weight made without
    # a dtype was bfloat16 there (1/3 -> 0.333984375), so micro-batch gradients did not add up to the minibatch's.
    from test_types import _rollout

    from lightning_rlhf.loss import micro_batch_weight

    minibatch = dataclasses.replace(_rollout(9), loss_mask=None)  # row b has 1 + b % 4 real tokens: 21 in all
    part = minibatch.select(torch.tensor([0, 1, 2]))  # 1 + 2 + 3 = 6 tokens, 3 rows
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        by_rows = micro_batch_weight(part, torch.tensor(9.0, dtype=torch.float64), "seq-mean-token-mean")
        by_tokens = micro_batch_weight(part, torch.tensor(21.0, dtype=torch.float64), "token-mean")
    finally:
        torch.set_default_dtype(previous)
    assert by_rows.dtype == by_tokens.dtype == torch.float32
    assert by_rows.item() == torch.tensor(1 / 3, dtype=torch.float32).item()
    assert by_tokens.item() == torch.tensor(6 / 21, dtype=torch.float32).item()


def test_the_kl_term_of_the_loss_is_the_aggregated_kl_to_the_reference(scored):
    # kl_placement loss: kl_coef times the k3 KL of the *current* policy to the reference, aggregated like the rest,
    # with its gradient (GRPO's form).
    model, r = scored
    ppo = PPOConfig(kl_placement="loss", kl_estimator="k3", aggregation="seq-mean-token-mean")
    terms = ppo_objective(model, r, ppo, TEMPERATURE, kl_coef=0.4)
    out = rescore(model, r, temperature=TEMPERATURE)
    kl = F.aggregate(F.kl_penalty(out.logprobs, r.ref_logprobs, "k3"), r.response_mask, "seq-mean-token-mean")
    torch.testing.assert_close(terms.kl_loss, kl)
    torch.testing.assert_close(terms.loss.detach(), terms.policy_loss + ppo.vf_coef * terms.value_loss + 0.4 * kl)
    assert float(kl) > 0  # the changed adapter is away from the reference
    without = ppo_objective(model, r, PPOConfig(aggregation="seq-mean-token-mean"), TEMPERATURE, kl_coef=0.4)
    assert without.kl_loss is None
    torch.testing.assert_close(without.loss.detach(), terms.loss.detach() - 0.4 * kl)


def test_the_loss_reads_only_the_responses_the_loss_mask_keeps(scored):
    model, r = scored
    keep = torch.tensor([True, False, True])
    masked = ppo_objective(model, dataclasses.replace(r, loss_mask=keep), PPOConfig(), TEMPERATURE)
    # the same as the objective of rows 0 and 2 alone (trim_padding and the forward see the same columns)
    alone = ppo_objective(model, r.select(torch.tensor([0, 2])), PPOConfig(), TEMPERATURE)
    torch.testing.assert_close(masked.loss, alone.loss)
    assert int(masked.tokens) == int(r.response_mask[keep].sum())


def test_micro_batch_weights_count_only_the_trained_responses():
    from test_types import _rollout

    from lightning_rlhf.loss import loss_units, micro_batch_weight

    minibatch = _rollout(9)  # row b: 1 + b % 4 real tokens; loss_mask keeps b % 3 != 0: rows 1, 2, 4, 5, 7, 8
    part = minibatch.select(torch.tensor([0, 1, 2]))  # trained: rows 1 (2 tokens) and 2 (3 tokens)
    # tokens of the kept rows: 2 + 3 + 1 + 2 + 4 + 1 = 13; rows: 6
    assert int(loss_units(minibatch, "token-mean")) == 13
    assert int(loss_units(minibatch, "seq-mean-token-sum")) == 6
    assert micro_batch_weight(part, loss_units(minibatch, "token-mean"), "token-mean").item() == pytest.approx(5 / 13)
    units = loss_units(minibatch, "seq-mean-token-sum-norm")
    assert micro_batch_weight(part, units, "seq-mean-token-sum-norm").item() == pytest.approx(2 / 6)


def test_a_critic_free_objective_has_no_value_term(tokenizer):
    from test_rollout import TINY

    from lightning_rlhf.models import LoraConfig, build_policy
    from lightning_rlhf.rollout import GenerationConfig, generate_rollout

    torch.manual_seed(0)
    model = build_policy(PolicyConfig(tiny=TINY), LoraConfig(), tokenizer, value_head=False)
    enc = tokenizer(["the quick", "ab"], add_special_tokens=False, padding=True, return_tensors="pt")
    r = generate_rollout(
        model,
        enc.input_ids,
        enc.attention_mask.bool(),
        GenerationConfig(max_new_tokens=4, samples_per_prompt=2),
        eos_token_id=1,
        pad_token_id=0,
    )
    r = dataclasses.replace(r, advantages=torch.ones(r.response_mask.shape))
    terms = ppo_objective(model, r, PPOConfig(advantage_estimator="grpo", vf_coef=5.0), 1.0)
    assert terms.value_loss is None
    assert terms.value is None
    torch.testing.assert_close(terms.loss.detach(), terms.policy_loss)  # ent_coef 0, no KL term


def test_is_weights_weight_the_per_token_policy_loss_and_none_leaves_it_unweighted(scored):
    # ppo.rollout_correction's weights reach F.policy_loss as token_weights (TRL per_token_loss *
    # importance_sampling_ratio): the policy term is the aggregate of the weighted clipped per-token losses, the
    # value term and the policy stats are unchanged.
    model, r = scored
    mask = r.response_mask
    weights = torch.where(mask, torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) * 2, 0.0)
    ppo = PPOConfig(clip_coef=0.1, aggregation="seq-mean-token-mean")
    weighted = ppo_objective(model, dataclasses.replace(r, is_weights=weights), ppo, TEMPERATURE)
    plain = ppo_objective(model, r, ppo, TEMPERATURE)
    out = rescore(model, r, temperature=TEMPERATURE)
    args = (out.logprobs, r.old_logprobs, r.advantages, mask, 0.1, None, ppo.aggregation)
    expected, _ = F.policy_loss(*args, token_weights=weights)
    unweighted, _ = F.policy_loss(*args)
    torch.testing.assert_close(weighted.policy_loss, expected)
    torch.testing.assert_close(plain.policy_loss, unweighted)
    assert not torch.allclose(expected, unweighted)  # the weights matter here
    torch.testing.assert_close(weighted.value_loss, plain.value_loss)
    torch.testing.assert_close(weighted.policy.clipfrac, plain.policy.clipfrac)
    torch.testing.assert_close(weighted.loss.detach() - plain.loss.detach(), expected - unweighted)


@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("rollout_correction", "tis", "choose one of"),
        ("rollout_correction_cap", 0.0, "use a positive cap"),
        ("rollout_correction_cap", -2.0, "use a positive cap"),
    ],
)
def test_rollout_correction_settings_are_validated(field, value, fix):
    with pytest.raises(ValueError, match=rf"ppo\.{field}={value!r} is invalid: {fix}"):
        PPOConfig(**{field: value})
    assert PPOConfig(rollout_correction="seq_mis", rollout_correction_cap=3.0).rollout_correction == "seq_mis"
