"""``generation.engine: vllm`` on CPU (vLLM's CPU build, in the vLLM CI job's own environment: ``pytest -m vllm``).

The engine must sample the *current* policy after every update (LoRA adapter, ``modules_to_save``, full fine-tuning),
with the rollout's sampling settings, its own logprobs within float32 rounding of the trainer's, and through the CLI:
learn the quickstart (test_vllm_distributed.py: one engine per process, resume).
"""

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from dist_helpers import run_cli_fit
from helpers import TINY_VLLM

from lightning_rlhf.config import GenerationConfig
from lightning_rlhf.functional.random_streams import response_keys
from lightning_rlhf.models import LoraConfig, PolicyConfig, build_policy
from lightning_rlhf.models.engines import cached_decode
from lightning_rlhf.models.policy import forward_response
from lightning_rlhf.models.vllm_engine import VLLMEngine, check_cpu_head_size
from lightning_rlhf.rollout import truncate_at_stop

pytestmark = pytest.mark.vllm

MAX_GAP, MEAN_GAP = 1e-4, 1e-5
"""Bounds of |engine - trainer| logprob of a sampled token in float32 on CPU: the largest over a rollout, and its mean.
Measured in these tests: at most 5.7e-6, means 1.2e-7 to 6.1e-7 (on a policy moved 5x further, up to 6e-4 and 1.4e-5:
the rounding grows with the logits); over the quickstart's 60 iterations the logged mean stays within 1.5e-7 to
4e-7."""
PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: "]
LORA_MODES = {
    "lora": LoraConfig(r=4),
    "modules_to_save": LoraConfig(r=4, modules_to_save=["lm_head"]),
    "full": LoraConfig(enabled=False),
}


def encode(tokenizer, prompts=PROMPTS):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"].bool()


def keys_for(prompts: int, n: int, step: int = 0) -> torch.Tensor:
    return response_keys(0, step, torch.arange(prompts).repeat_interleave(n), torch.arange(n).repeat(prompts))


def engine_for(generation: GenerationConfig, policy: PolicyConfig) -> VLLMEngine:
    return VLLMEngine(policy, generation, torch.float32, torch.device("cpu"))


def perturb(model, seed: int) -> None:
    """Move every trained LM weight by a seeded random step: a policy the engine has not seen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.lm.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def moved_policy(policy: PolicyConfig, lora: LoraConfig, tokenizer):
    model = build_policy(policy, lora, tokenizer, value_head=False).eval()
    perturb(model, seed=7)
    return model


def trainer_logprobs(model, ids, mask, tokens, response_mask, temperature):
    n = tokens.shape[0] // ids.shape[0]
    rows = torch.arange(ids.shape[0]).repeat_interleave(n)
    return forward_response(model, ids[rows], mask[rows], tokens, response_mask, temperature, mode="policy").logprobs


@pytest.mark.parametrize("mode", list(LORA_MODES))
def test_the_engine_samples_the_current_policy_after_every_update(tokenizer, mode):
    policy = PolicyConfig(tiny=TINY_VLLM)
    model = build_policy(policy, LORA_MODES[mode], tokenizer, value_head=False).eval()
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False, engine="vllm")
    sampled = dataclasses.replace(greedy, do_sample=True, samples_per_prompt=2)
    ids, mask = encode(tokenizer)
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    engine = engine_for(greedy, policy)
    try:
        previous = None
        for update in range(3):
            if update:
                perturb(model, seed=update)
            engine.load_policy(model.lm, sequences=8, sequence_len=24)
            # Greedy: the engine's tokens are the trainer's own (the cached engine on the current weights) ...
            tokens = engine(model, ids, mask, greedy, stops, pad, keys_for(4, 1)).tokens
            expected = cached_decode(model, ids, mask, greedy, stops, pad, keys_for(4, 1))
            assert torch.equal(tokens, expected), f"update {update}: the engine does not sample the current policy"
            # ... and each update changed them, so an engine stuck on an older policy would have failed above.
            assert previous is None or not torch.equal(tokens, previous)
            previous = tokens
            # Sampled: the engine's logprobs are the trainer's, up to float32 rounding.
            out = engine(model, ids, mask, sampled, stops, pad, keys_for(4, 2, step=update))
            response_ids, response_mask, _ = truncate_at_stop(out.tokens, stops, pad)
            trainer = trainer_logprobs(model, ids, mask, response_ids, response_mask, 1.0)
            gap = (out.logprobs[:, : response_mask.shape[1]] - trainer).abs()[response_mask]
            assert gap.max() < MAX_GAP
            assert gap.mean() < MEAN_GAP
        if mode != "full":  # one adapter in the engine: a fresh id per push, the previous one removed
            assert engine.lora_request.lora_int_id == 3
            assert engine.llm.llm_engine.list_loras() == {3}
    finally:
        engine.close()


@pytest.fixture(scope="module")
def lora_engine(tokenizer):
    """A LoRA policy with a moved adapter, loaded into one engine for the sampling-settings tests."""
    policy = PolicyConfig(tiny=TINY_VLLM)
    model = moved_policy(policy, LoraConfig(r=4), tokenizer)
    engine = engine_for(GenerationConfig(engine="vllm"), policy)
    engine.load_policy(model.lm, sequences=16, sequence_len=40)
    yield model, engine
    engine.close()


def sample(lora_engine, tokenizer, prompts=PROMPTS, keys=None, **settings):
    model, engine = lora_engine
    generation = GenerationConfig(**({"max_new_tokens": 8, "engine": "vllm"} | settings))
    ids, mask = encode(tokenizer, prompts)
    n = generation.samples_per_prompt
    keys = keys_for(len(prompts), n) if keys is None else keys
    stops = [tokenizer.eos_token_id, *generation.stop_token_ids]
    return engine(model, ids, mask, generation, stops, tokenizer.pad_token_id, keys), (ids, mask)


def test_samples_per_prompt_are_independent_reproducible_and_do_not_depend_on_the_batch(lora_engine, tokenizer):
    out, _ = sample(lora_engine, tokenizer, samples_per_prompt=3)
    assert out.tokens.shape == (12, 8)
    rows = [tuple(row.tolist()) for row in out.tokens]
    assert len(set(rows)) == 12  # every sample of every prompt differs (8 tokens of a 384-token vocabulary)
    again, _ = sample(lora_engine, tokenizer, samples_per_prompt=3)
    assert torch.equal(again.tokens, out.tokens)  # the same keys: the same responses
    other, _ = sample(lora_engine, tokenizer, samples_per_prompt=3, keys=keys_for(4, 3, step=1))
    assert not torch.equal(other.tokens, out.tokens)  # the next iteration's keys: other responses
    # Prompt 2 alone, with its own keys, samples what it sampled in the batch of four.
    alone, _ = sample(lora_engine, tokenizer, prompts=PROMPTS[2:3], samples_per_prompt=3, keys=keys_for(4, 3)[6:9])
    assert torch.equal(alone.tokens, out.tokens[6:9])


def test_stop_tokens_and_min_new_tokens(lora_engine, tokenizer):
    many_stops = list(range(3, 3 + 128))  # a third of the vocabulary ends a response
    out, _ = sample(lora_engine, tokenizer, stop_token_ids=many_stops, samples_per_prompt=4)
    stops = [tokenizer.eos_token_id, *many_stops]
    response_ids, response_mask, ended = truncate_at_stop(out.tokens, stops, tokenizer.pad_token_id)
    assert ended.float().mean() > 0.5  # most responses stop early, on a stop token that is kept
    lengths = response_mask.sum(-1)
    assert bool((lengths < 8).any())
    for row, length, stopped in zip(response_ids, lengths, ended, strict=True):
        assert bool(torch.isin(row[: length - 1], torch.tensor(stops)).any()) is False
        assert bool(torch.isin(row[length - 1], torch.tensor(stops))) is bool(stopped)
    forced, _ = sample(lora_engine, tokenizer, stop_token_ids=many_stops, samples_per_prompt=4, min_new_tokens=5)
    _, forced_mask, _ = truncate_at_stop(forced.tokens, stops, tokenizer.pad_token_id)
    assert int(forced_mask.sum(-1).min()) >= 6  # no stop token among the first 5: at least 5 tokens + the stop


def test_top_k_1_is_greedy_and_logprobs_follow_the_temperature(lora_engine, tokenizer):
    model, _ = lora_engine
    top1, _ = sample(lora_engine, tokenizer, top_k=1)
    greedy, _ = sample(lora_engine, tokenizer, do_sample=False)
    assert torch.equal(top1.tokens, greedy.tokens)
    warm, (ids, mask) = sample(lora_engine, tokenizer, temperature=0.7, samples_per_prompt=2)
    stops = [tokenizer.eos_token_id]
    response_ids, response_mask, _ = truncate_at_stop(warm.tokens, stops, tokenizer.pad_token_id)
    trainer = trainer_logprobs(model, ids, mask, response_ids, response_mask, 0.7)
    gap = (warm.logprobs[:, : response_mask.shape[1]] - trainer).abs()[response_mask]
    assert gap.max() < MAX_GAP
    assert gap.mean() < MEAN_GAP


def test_a_head_size_vllm_cpu_cannot_run_is_named_before_the_engine_starts(tokenizer):
    model = build_policy(
        PolicyConfig(tiny=dataclasses.replace(TINY_VLLM, num_attention_heads=2)), LoraConfig(), tokenizer
    )
    with pytest.raises(ValueError, match=r"head sizes .* this model's is 16 .*num_attention_heads"):
        check_cpu_head_size(model.lm.config)


# ------------------------------------------------------------------------------------------------------ the CLI
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def metrics(out: Path) -> list[dict]:
    return list(csv.DictReader(next(out.rglob("metrics.csv")).open()))


def test_the_quickstart_learns_with_the_vllm_engine(tmp_path):
    # The quickstart's tiny model has heads of size 16; two heads of 32 are the smallest vLLM's CPU attention runs.
    steps = 30
    run_cli_fit(
        tmp_path,
        {},
        f"--config={QUICKSTART}",
        "--model.generation.engine=vllm",
        "--model.policy.tiny.num_attention_heads=2",
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={tmp_path}",
        timeout_s=400,
    )
    rows = metrics(tmp_path)
    assert len(rows) == steps
    score = [float(row["rollout/score"]) for row in rows]
    gap = [float(row["rollout/engine_logprob_gap"]) for row in rows]
    assert sum(score[:3]) / 3 < 0.15
    assert sum(score[-5:]) / 5 > 0.5, score
    assert max(gap) < 1e-5  # mean |engine - trainer| per token, float32


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_mode_frees_the_gpu_and_the_woken_engine_samples_the_same_policy(tokenizer, level):
    # Level 2 discards the weights: without the reload from disk and the policy pushed again, the woken engine samples
    # from garbage (vllm#16564); level 1 offloads them to host memory.
    policy = PolicyConfig(tiny=TINY_VLLM)
    model = moved_policy(policy, LoraConfig(r=4, modules_to_save=["lm_head"]), tokenizer).cuda()
    generation = GenerationConfig(
        max_new_tokens=8, do_sample=False, engine="vllm", vllm_sleep_level=level, vllm_gpu_memory_utilization=0.2
    )
    ids, mask = (t.cuda() for t in encode(tokenizer))
    stops, pad, keys = [tokenizer.eos_token_id], tokenizer.pad_token_id, keys_for(4, 1)
    engine = VLLMEngine(policy, generation, torch.float32, torch.device("cuda"))
    try:
        with engine.sampling(model.lm, 4, 32):
            awake_free = torch.cuda.mem_get_info()[0]
            before = engine(model, ids, mask, generation, stops, pad, keys).tokens
        asleep_free, total = torch.cuda.mem_get_info()
        assert asleep_free - awake_free > 0.1 * total  # most of the engine's 20 % share came back
        with engine.sampling(model.lm, 4, 32):
            after = engine(model, ids, mask, generation, stops, pad, keys).tokens
        assert torch.equal(after, before)
        assert torch.equal(after.cpu(), cached_decode(model, ids, mask, generation, stops, pad, keys).cpu())
    finally:
        engine.close()
