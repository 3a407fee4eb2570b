"""Tests of benchmarks/flops.py: hand-worked counts, and exact agreement with torch's FlopCounterMode.

FlopCounterMode has no formula for the CPU SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``), so the
model-level comparisons switch the tiny models to eager attention, whose score and weighted-sum matmuls it counts as
``bmm``; one test registers torch's own SDPA formulas for the CPU kernel instead. Nothing else it counts is missing
from, or extra to, our terms: rotary embeddings, norms, softmax and the loss run no matmul.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from flops import (
    PROJECTIONS,
    DecoderShape,
    FlopCount,
    Lora,
    Work,
    backward_flops,
    forward_flops,
    forward_work,
    generation_work,
    matmul_flops_per_sec,
    train_flops,
)
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from lightning_rlhf.models import (
    LoraConfig,
    PolicyConfig,
    PolicyValueModel,
    TinyModelConfig,
    build_policy,
)

HAND = DecoderShape(
    hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2, vocab_size=10
)
TINY = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
BATCH, LENGTH, SLICE = 3, 12, 5
"""Rows, positions per row (the first row has 4 padding positions), response positions that get logits."""


def counted(fn, custom_mapping=None) -> int:
    with FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter:
        fn()
    return counter.get_total_flops()


def eager(model: torch.nn.Module) -> torch.nn.Module:
    """Eager attention on every causal LM inside ``model``, so FlopCounterMode sees the attention matmuls."""
    for module in model.modules():
        if isinstance(module, transformers.LlamaForCausalLM):
            module.set_attn_implementation("eager")
    return model


def lora_of(config: LoraConfig) -> Lora | None:
    if not config.enabled:
        return None
    targets = PROJECTIONS if config.target_modules == "all-linear" else tuple(config.target_modules)
    return Lora(config.r, targets)


@pytest.fixture(scope="module")
def inputs():
    """(input_ids, attention_mask), (BATCH, LENGTH); row 0 is left-padded by 4."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 300, (BATCH, LENGTH), generator=gen)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    attention_mask[0, :4] = False
    return input_ids, attention_mask


def policy(tokenizer, lora: LoraConfig, num_key_value_heads: int | None = None) -> PolicyValueModel:
    tiny = dataclasses.replace(TINY, num_key_value_heads=num_key_value_heads)
    return eager(build_policy(PolicyConfig(tiny=tiny), lora, tokenizer))


# ------------------------------------------------------------------------------------------------------ hand-worked
def test_hand_worked_forward():
    # h=4, I=8, 2 query heads and 1 KV head of dim 2, vocab 10; one row of 3 positions, logits and values at all 3.
    # Projections: in x out = q 4x4 + k 4x2 + v 4x2 + o 4x4 + gate 4x8 + up 4x8 + down 8x4 = 144; 2*3*144 = 864.
    # Attention: 3x3 pairs, 2 heads of dim 2: (QK^T + PV) 2 * 2*9*2*2 = 144. lm_head 2*3*4*10 = 240. Value 2*3*4 = 24.
    # LoRA r=1 on all: sum(in + out) = 8+6+6+8+12+12+12 = 64; 2*3*1*64 = 384.
    count = forward_flops(HAND, forward_work(1, 3, value_positions=3), Lora(rank=1))
    assert count == FlopCount(projections=864, attention=144, lm_head=240, lora=384, value_head=24)
    assert count.total == 1656


def test_hand_worked_lora_backward():
    # LoRA r=1 on all, one layer: its input (the frozen embedding output) needs no grad, so the base q/k/v run no
    # backward at all; o, gate, up, down compute dX only: 2*3*(16 + 32 + 32 + 32) = 672.
    # Adapters, 2n = 6: q 6*(4 + 2*4) = 72, k and v 6*(4 + 2*2) = 48 each (dA and dB, dX through B only);
    # o 6*(2*4 + 2*4) = 96 and gate, up, down 6*(2*4 + 2*8) = 6*(2*8 + 2*4) = 144 each (dX through A too); sum 696.
    # Attention: q, k, v all need grad, so dP, dV, dQ, dK: 4 * 2*9*2*2 = 288. lm_head dX only: 240. Value dX, dW: 48.
    count = backward_flops(HAND, forward_work(1, 3, value_positions=3), Lora(rank=1))
    assert count == FlopCount(projections=672, attention=288, lm_head=240, lora=696, value_head=48)


def test_full_finetuning_backward_is_twice_the_forward():
    work = forward_work(2, 5, logit_positions=3, value_positions=3)
    forward = forward_flops(HAND, work)
    assert backward_flops(HAND, work) == 2 * forward
    assert train_flops(HAND, work).total == 3 * forward.total


def test_generation_work():
    # Prompt 4, 3 new tokens: prefill 4 positions (16 pairs), decode steps attend to 5 and 6 positions.
    assert generation_work(2, 4, 3) == Work(positions=2 * 6, attention_pairs=2 * (16 + 5 + 6), logit_positions=2 * 3)


# ---------------------------------------------------------------------------------------- against FlopCounterMode
@pytest.mark.parametrize("num_key_value_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_forward_with_all_logits_matches_flop_counter(inputs, num_key_value_heads):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        vocab_size=384,
        attn_implementation="eager",
    )
    lm = transformers.LlamaForCausalLM(config)
    shape = DecoderShape.from_config(lm.config)
    assert shape.num_kv_heads == num_key_value_heads
    got = counted(lambda: lm(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False))
    assert got == forward_flops(shape, forward_work(BATCH, LENGTH)).total


def test_sdpa_counts_the_same_forward_and_recomputes_scores_in_backward(inputs):
    # torch's own SDPA formulas on the CPU kernel: the forward agrees; the backward also counts the score matmul the
    # kernel recomputes (2.5x the attention forward where we count 2x), i.e. half the attention forward more.
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(
            q, k, v
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
    )
    lm = transformers.LlamaForCausalLM(config)
    assert lm.config._attn_implementation == "sdpa"
    shape, work = DecoderShape.from_config(lm.config), forward_work(BATCH, LENGTH)

    def run(backward: bool) -> None:
        logits = lm(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False).logits
        if backward:
            logits.sum().backward()

    forward = forward_flops(shape, work)
    assert counted(lambda: run(False), mapping) == forward.total
    assert counted(lambda: run(True), mapping) == train_flops(shape, work).total + forward.attention // 2


def test_policy_and_reference_forward_with_logits_slice_match_flop_counter(tokenizer, inputs):
    model = policy(tokenizer, LoraConfig(r=4, alpha=8), num_key_value_heads=2)
    shape = DecoderShape.from_config(model.lm.config)
    logits_slice = (LENGTH - SLICE - 1, LENGTH - 1)
    work = forward_work(BATCH, LENGTH, logit_positions=SLICE, value_positions=SLICE)
    with torch.no_grad():
        got = counted(lambda: model(*inputs, mode="policy", logits_slice=logits_slice))
        ref = counted(lambda: model(*inputs, mode="ref", logits_slice=logits_slice))
    assert got == forward_flops(shape, work, Lora(rank=4)).total
    # The reference is the adapter-disabled base model: no adapter, no value head.
    assert ref == forward_flops(shape, forward_work(BATCH, LENGTH, logit_positions=SLICE)).total


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(r=4, alpha=8),
        LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, alpha=4, target_modules=["down_proj"]),
        LoraConfig(enabled=False),
    ],
    ids=["lora-all-linear", "lora-q-v", "lora-down", "full"],
)
def test_training_step_matches_flop_counter(tokenizer, inputs, lora):
    model = policy(tokenizer, lora, num_key_value_heads=2).train()
    shape = DecoderShape.from_config(model.lm.config)
    logits_slice = (LENGTH - SLICE - 1, LENGTH - 1)
    work = forward_work(BATCH, LENGTH, logit_positions=SLICE, value_positions=SLICE)

    def step() -> None:
        logits, values = model(*inputs, mode="policy", logits_slice=logits_slice)
        (logits.logsumexp(-1).sum() + values.sum()).backward()

    forward = counted(lambda: model(*inputs, mode="policy", logits_slice=logits_slice))
    assert forward == forward_flops(shape, work, lora_of(lora)).total
    assert counted(step) == train_flops(shape, work, lora_of(lora)).total


def test_generation_matches_flop_counter(tokenizer, inputs):
    model = policy(tokenizer, LoraConfig(r=4, alpha=8), num_key_value_heads=2).eval()
    shape = DecoderShape.from_config(model.lm.config)
    config = transformers.GenerationConfig(
        max_new_tokens=6, do_sample=False, eos_token_id=len(tokenizer), pad_token_id=0
    )
    with torch.no_grad():
        got = counted(lambda: model(*inputs, mode="generate", generation_config=config))
    assert got == forward_flops(shape, generation_work(BATCH, LENGTH, 6), Lora(rank=4)).total


# ------------------------------------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (lambda: Work(positions=-1), "Work.positions"),
    (lambda: Work(positions=2, logit_positions=3), "more positions"),
    (lambda: forward_work(2, 3, logit_positions=4), "more positions"),
    (lambda: generation_work(2, 0, 3), "prompt_len"),
    (lambda: Lora(rank=0), "rank"),
    (lambda: Lora(rank=2, targets=("lm_head",)), "lm_head"),
    (lambda: dataclasses.replace(HAND, num_kv_heads=3), "multiple of num_kv_heads"),
    (lambda: dataclasses.replace(HAND, head_dim=0), "head_dim"),
    (lambda: DecoderShape.from_config(transformers.GPT2Config()), "not a Llama-shaped decoder"),
    (lambda: DecoderShape.from_config(transformers.MixtralConfig()), "mixture of experts"),
    (lambda: matmul_flops_per_sec(n=0), "n >= 1"),
]


@pytest.mark.parametrize(("make", "match"), BAD_INPUTS, ids=[match for _, match in BAD_INPUTS])
def test_bad_input_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_matmul_rate_is_measured():
    rate = matmul_flops_per_sec("cpu", n=64, min_seconds=0.01)
    assert rate.dtype == torch.float32
    assert rate.seconds >= 0.01
    assert rate.flops_per_sec == pytest.approx(2 * 64**3 * rate.repetitions / rate.seconds)
