"""What only a GPU can show. Skipped without CUDA (see conftest.py); run with `python -m pytest -m gpu`."""

import dataclasses
import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.functional.random_streams import response_keys
from lightning_rlhf.models import LoraConfig, PolicyConfig, TinyModelConfig, build_policy, load_tokenizer
from lightning_rlhf.models.engines import cached_decode, hf_generate, merged_lora
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig, sample_responses, truncate_at_stop

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("packing", "lm_head_chunk_size"), [(False, None), (True, None), (True, 4)], ids=["padded", "packed", "chunked"]
)
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_iteration_on_one_gpu(precision, packing, lm_head_chunk_size):
    seed_everything(0, verbose=False)
    module = PPOModule(
        policy=PolicyConfig(tiny=TinyModelConfig(hidden_size=64)),
        lora=LoraConfig(modules_to_save=["lm_head"]),
        generation=GenerationConfig(max_new_tokens=8),
        ppo=PPOConfig(num_minibatches=2, packing=packing, lm_head_chunk_size=lm_head_chunk_size),
        reward=CharFractionReward(),
    )
    trainer = Trainer(
        max_steps=2, accelerator="gpu", devices=1, precision=precision, logger=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=PromptDataModule(task="lowercase", batch_size=8))
    metrics = trainer.logged_metrics
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["policy/updates"]) == module.ppo.ppo_epochs * module.ppo.num_minibatches
    assert torch.cuda.max_memory_allocated() > 0
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}  # master weights
    frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})


def test_cached_engine_matches_generate_on_cuda_and_restores_merged_weights():
    # The CPU tests' engine equivalence on the GPU (float32, so both paths pick the same argmax), with the LoRA merge.
    seed_everything(0, verbose=False)
    tokenizer = load_tokenizer(PolicyConfig())
    model = build_policy(PolicyConfig(tiny=TinyModelConfig(hidden_size=64)), LoraConfig(), tokenizer).cuda().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    enc = tokenizer(["the quick brown", "ab", "xyz!"], add_special_tokens=False, padding=True, return_tensors="pt")
    prompts = (enc.input_ids.cuda(), enc.attention_mask.bool().cuda())
    stops = [1, 101]
    keys = response_keys(0, 0, torch.arange(3, device="cuda"))
    for do_sample in (False, True):  # greedy, and each response's own random stream
        config = GenerationConfig(max_new_tokens=12, do_sample=do_sample)
        with torch.no_grad(), merged_lora(model.lm):
            cached = truncate_at_stop(cached_decode(model, *prompts, config, stops, 0, keys), stops, 0)
            hf = truncate_at_stop(hf_generate(model, *prompts, config, stops, 0, keys), stops, 0)
        for a, b in zip(cached, hf, strict=True):
            assert torch.equal(a, b)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sampling_under_cuda_autocast_casts_each_weight_once():
    # The CPU test's check on CUDA: bf16 autocast without its cache (as Lightning runs it), weights cast once per call.
    from test_generation import _WeightCasts

    seed_everything(0, verbose=False)
    tokenizer = load_tokenizer(PolicyConfig())
    model = build_policy(PolicyConfig(tiny=TinyModelConfig(hidden_size=64)), LoraConfig(), tokenizer).cuda().eval()
    enc = tokenizer(["the quick brown", "ab"], add_special_tokens=False, padding=True, return_tensors="pt")
    prompts = (enc.input_ids.cuda(), enc.attention_mask.bool().cuda())
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    counts = {}
    with torch.no_grad(), autocast:
        for once in (True, False):
            with _WeightCasts(model.lm.named_parameters()) as casts:
                tokens = sample_responses(
                    model, *prompts, dataclasses.replace(config, cast_weights_once=once), [384], 0, synced_gpus=False
                ).tokens
            counts[once] = (tokens, max(casts.casts.values()))
    assert torch.equal(counts[True][0], counts[False][0])
    assert (counts[True][1], counts[False][1]) == (1, config.max_new_tokens)
