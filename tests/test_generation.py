"""Tests of lightning_rlhf.models.engines: the cached engine against transformers' generate, finished rows leaving the
batch, min_new_tokens, generation chunks, and the exact LoRA merge."""

from __future__ import annotations

import dataclasses
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
from helpers import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_rlhf.functional.random_streams import response_keys
from lightning_rlhf.models import LoraConfig, PolicyConfig, PolicyValueModel, build_policy
from lightning_rlhf.models.engines import cached_decode, hf_generate, lora_merge_blocker, merged_lora
from lightning_rlhf.rollout import GenerationConfig, generate_rollout, sample_responses, truncate_at_stop

PAD, EOS = 0, 1  # ByT5
NEVER = 384  # a token id past the vocabulary: a stop token that is never sampled, so every row runs to the end
ENGINES = {"cached": cached_decode, "hf": hf_generate}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Five left-padded prompts of different lengths: (prompt_ids, prompt_mask)."""
    texts = ["the quick brown", "ab", "xyz!", "hello there", "q"]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask.bool()


def build(tokenizer, lora: LoraConfig | None = None) -> PolicyValueModel:
    """Tiny LoRA policy whose adapter is not zero (LoRA B random), so policy and base model differ."""
    torch.manual_seed(0)
    model = build_policy(PolicyConfig(tiny=TINY), lora or LoraConfig(), tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return model.eval()


def keys_of(seed: int, rows: int) -> torch.Tensor:
    return response_keys(seed, 0, torch.arange(rows))


def sample(engine, model, prompts, stops, seed=0, keys=None, **settings):
    config = GenerationConfig(**{"max_new_tokens": 8} | settings)
    keys = keys_of(seed, len(prompts[0])) if keys is None else keys
    with torch.no_grad():
        tokens = ENGINES[engine](model, *prompts, config, stops, PAD, keys)
    return truncate_at_stop(tokens, stops, PAD)


def stops_that_end_rows_early(model, prompts) -> list[int]:
    """Stop tokens taken from the greedy continuations, so different rows end at different steps."""
    tokens, _, _ = sample("hf", model, prompts, [NEVER], do_sample=False)
    return [int(tokens[0, 1]), int(tokens[2, 4])]


def assert_same_responses(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_cached_engine_decodes_greedily_like_generate_with_rows_ending_early(tokenizer, prompts):
    model = build(tokenizer)
    stops = stops_that_end_rows_early(model, prompts)
    cached = sample("cached", model, prompts, stops, do_sample=False)
    assert_same_responses(cached, sample("hf", model, prompts, stops, do_sample=False))
    lengths = cached[1].sum(-1)
    assert lengths.min() < lengths.max()  # rows ended at different steps, so rows left the batch midway
    assert bool(cached[2].any())


def test_cached_engine_draws_the_same_samples_as_generate(tokenizer, prompts):
    # Same distribution (temperature, then top-k, then top-p) and the same draws from each response's stream.
    model = build(tokenizer)
    settings = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9}
    for seed in range(3):
        cached = sample("cached", model, prompts, [NEVER], seed=seed, **settings)
        assert_same_responses(cached, sample("hf", model, prompts, [NEVER], seed=seed, **settings))
    assert not torch.equal(cached[0], sample("cached", model, prompts, [NEVER], seed=99, **settings)[0])


def test_finished_rows_cost_nothing(tokenizer, prompts):
    model = build(tokenizer)
    stops = stops_that_end_rows_early(model, prompts)
    rows_per_forward = []
    causal_lm = model.lm.get_base_model()
    hook = causal_lm.register_forward_pre_hook(
        lambda m, a, kw: rows_per_forward.append(len(kw["input_ids"])), with_kwargs=True
    )
    try:
        _, mask, _ = sample("cached", model, prompts, stops, do_sample=False)
    finally:
        hook.remove()
    # Prefill with all 5 rows, then one forward per step, each with only the rows still generating (once finished
    # rows are at least a quarter of the batch).
    unfinished = [int((mask.sum(-1) > step).sum()) for step in range(mask.shape[1])]
    assert rows_per_forward[0] == 5
    assert rows_per_forward[1:] == [n if 4 * (5 - n) >= 5 else 5 for n in unfinished[1:]][: len(rows_per_forward) - 1]
    assert rows_per_forward[-1] < 5


@pytest.mark.parametrize("engine", ["cached", "hf"])
def test_a_response_depends_on_its_key_not_on_the_batch_it_is_sampled_in(tokenizer, prompts, engine):
    # Rows sampled together (some finishing early, so the cached engine drops them midway) or one at a time, in
    # another order, draw the same tokens: a response's stream is its key, whatever else the batch holds.
    model = build(tokenizer)
    stops = list(range(100, 200))  # a quarter of the near-uniform tiny model's vocabulary: rows end at various steps
    keys = keys_of(7, 5)
    together = sample(engine, model, prompts, stops, keys=keys, do_sample=True)
    assert together[1].sum(-1).min() < together[1].sum(-1).max()
    for row in (4, 2, 0, 3, 1):
        alone = sample(engine, model, (prompts[0][[row]], prompts[1][[row]]), stops, keys=keys[[row]], do_sample=True)
        length = int(together[1][row].sum())
        assert torch.equal(alone[0][0, :length], together[0][row, :length])
        assert int(alone[1][0].sum()) == length
    # A global RNG draw between the calls changes nothing; another key changes the response.
    torch.rand(1000)
    assert_same_responses(together, sample(engine, model, prompts, stops, keys=keys, do_sample=True))
    other = sample(engine, model, prompts, stops, keys=keys_of(8, 5), do_sample=True)
    assert not torch.equal(other[0], together[0])


@pytest.mark.parametrize("engine", ["cached", "hf"])
def test_min_new_tokens_forbids_stop_tokens_before_it(tokenizer, prompts, engine):
    model = build(tokenizer)
    first = sample(engine, model, prompts, [NEVER], do_sample=False)[0][:, 0].unique().tolist()
    _, mask, _ = sample(engine, model, prompts, first, do_sample=False)
    assert mask.sum(-1).max() == 1  # without it every row stops at its first token
    ids, mask, _ = sample(engine, model, prompts, first, do_sample=False, min_new_tokens=3)
    assert (mask.sum(-1) >= 3).all()
    assert not torch.isin(ids[:, :2], torch.tensor(first)).any()


def test_min_new_tokens_gives_the_same_tokens_in_both_engines(tokenizer, prompts):
    model = build(tokenizer)
    stops = stops_that_end_rows_early(model, prompts)
    cached = sample("cached", model, prompts, stops, do_sample=False, min_new_tokens=5)
    assert_same_responses(cached, sample("hf", model, prompts, stops, do_sample=False, min_new_tokens=5))


@pytest.mark.parametrize("engine", ["cached", "hf"])
def test_generation_chunks_give_the_whole_batch_result(tokenizer, prompts, engine):
    model = build(tokenizer)
    stops = stops_that_end_rows_early(model, prompts)

    def run(batch_size, do_sample):
        config = GenerationConfig(max_new_tokens=8, do_sample=do_sample, engine=engine, batch_size=batch_size)
        keys = keys_of(3, 5)
        return generate_rollout(model, *prompts, config, eos_token_id=stops[0], pad_token_id=PAD, sample_keys=keys)

    for do_sample in (False, True):
        whole, chunked = run(None, do_sample), run(2, do_sample)
        assert torch.equal(whole.response_ids, chunked.response_ids)
        assert torch.equal(whole.response_mask, chunked.response_mask)
        torch.testing.assert_close(whole.old_logprobs, chunked.old_logprobs)


def test_merged_lora_restores_the_base_weights_bit_for_bit(tokenizer):
    model = build(tokenizer)
    layer = model.lm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # weights whose round trip W + delta - delta is not W (tiny against a large delta)
        layer.base_layer.weight[0, :5] = torch.tensor([1e-9, -3e-8, 1e-30, float("nan"), -0.0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = layer.get_delta_weight("default")
    assert not torch.equal((layer.base_layer.weight + delta) - delta, layer.base_layer.weight)
    with merged_lora(model.lm):
        torch.testing.assert_close(layer.base_layer.weight[:, 5:], (before[_q_name(model)] + delta)[:, 5:])
    for name, param in model.named_parameters():
        assert torch.equal(param.view(-1).view(torch.int32), before[name].view(-1).view(torch.int32)), name


def _q_name(model):
    return next(n for n, _ in model.named_parameters() if "layers.0.self_attn.q_proj.base_layer.weight" in n)


def test_merged_lora_restores_the_weights_when_generation_fails(tokenizer):
    model = build(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), merged_lora(model.lm):
        raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("engine", ["cached", "hf"])
def test_merged_generation_samples_from_the_policy(tokenizer, prompts, engine):
    model = build(tokenizer)
    stops = stops_that_end_rows_early(model, prompts)

    def run(merge_lora):
        config = GenerationConfig(max_new_tokens=8, do_sample=False, engine=engine, merge_lora=merge_lora)
        return generate_rollout(model, *prompts, config, eos_token_id=stops[0], pad_token_id=PAD)

    merged, unmerged = run(True), run(False)
    assert torch.equal(merged.response_ids, unmerged.response_ids)
    torch.testing.assert_close(merged.old_logprobs, unmerged.old_logprobs, rtol=0, atol=0)  # scored unmerged
    with model.lm.disable_adapter():  # the base model continues differently: the adapter was really in effect
        base = sample(engine, model, prompts, [NEVER], do_sample=False)[0]
    assert not torch.equal(base, sample(engine, model, prompts, [NEVER], do_sample=False)[0])


def test_merge_blockers_are_named(tokenizer):
    assert lora_merge_blocker(build(tokenizer).lm) is None
    full = build_policy(PolicyConfig(tiny=TINY), LoraConfig(enabled=False), tokenizer)
    assert "no LoRA adapter" in lora_merge_blocker(full.lm)
    saved = build(tokenizer, LoraConfig(modules_to_save=["lm_head"]))
    assert "modules_to_save" in lora_merge_blocker(saved.lm)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("min_new_tokens", -1, "min_new_tokens"),
        ("min_new_tokens", 9, "min_new_tokens"),
        ("engine", "sglang", "engine"),
        ("batch_size", 0, "batch_size"),
        ("vllm_gpu_memory_utilization", 0.0, "vllm_gpu_memory_utilization"),
        ("vllm_gpu_memory_utilization", 1.5, "vllm_gpu_memory_utilization"),
        ("vllm_sleep_level", 3, "vllm_sleep_level"),
        ("vllm_max_model_len", 8, "vllm_max_model_len"),
    ],
)
def test_generation_config_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=f"generation.{match}"):
        GenerationConfig(max_new_tokens=8, **{field: value})


def test_cached_engine_refuses_a_sharded_model(tokenizer, prompts):
    config = GenerationConfig(engine="cached")
    with pytest.raises(ValueError, match="'auto' or 'hf'"):
        generate_rollout(build(tokenizer), *prompts, config, eos_token_id=EOS, pad_token_id=PAD, synced_gpus=True)


def test_llama_layers_get_the_preallocated_cache(tokenizer):
    from lightning_rlhf.models.engines import _kv_cache, _PreallocatedLayer

    cache = _kv_cache(build(tokenizer).lm.config, max_len=40)
    assert [type(layer) for layer in cache.layers] == [_PreallocatedLayer] * TINY.num_hidden_layers


def test_merged_lora_merges_in_full_precision_inside_autocast(tokenizer):
    # Under bf16-mixed the rollout runs inside autocast; the merged weight must still be W + delta in float32.
    model = build(tokenizer)
    layer = model.lm.base_model.model.model.layers[0].mlp.down_proj
    expected = layer.base_layer.weight.detach() + layer.get_delta_weight("default")
    with torch.autocast("cpu", dtype=torch.bfloat16), merged_lora(model.lm):
        torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=0)


class _WeightCasts(TorchDispatchMode):
    """Counts, per parameter, the dtype conversions that read it (autocast's weight casts)."""

    def __init__(self, params) -> None:
        super().__init__()
        self.ids = {id(p): name for name, p in params}
        self.casts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.ids:
            self.casts[self.ids[id(args[0])]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sampling_under_autocast_casts_each_weight_once(tokenizer, prompts, lora):
    # Lightning's bf16-mixed autocast has its weight-cast cache off, so each decode step would cast every weight again.
    # sample_responses casts each weight once per call (frozen LoRA base weights included) and samples the same tokens.
    model = build(tokenizer, LoraConfig(enabled=lora))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = GenerationConfig(max_new_tokens=6, do_sample=False, engine="cached", merge_lora=lora)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)  # as Lightning's bf16-mixed plugin
    with torch.no_grad(), autocast:
        with _WeightCasts(model.lm.named_parameters()) as every_step, merged_lora(model.lm) if lora else nullcontext():
            expected = cached_decode(model, *prompts, config, [NEVER], PAD, keys_of(0, 5))
        with _WeightCasts(model.lm.named_parameters()) as once:
            tokens = sample_responses(model, *prompts, config, [NEVER], PAD, synced_gpus=False).tokens
    assert torch.equal(tokens, expected)
    q_proj = next(name for name in once.casts if "layers.0.self_attn.q_proj" in name and "lora" not in name)
    assert every_step.casts[q_proj] == config.max_new_tokens  # prefill + 5 decode steps without the cache
    assert once.casts[q_proj] == 1
    assert set(once.casts.values()) == {1}
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with torch.no_grad(), autocast, _WeightCasts(model.lm.named_parameters()) as off:
        config = dataclasses.replace(config, cast_weights_once=False)
        assert torch.equal(sample_responses(model, *prompts, config, [NEVER], PAD, synced_gpus=False).tokens, expected)
    assert off.casts[q_proj] == config.max_new_tokens  # generation.cast_weights_once: false keeps the per-step casts


# ------------------------------------------------------------------------------------------ several samples per prompt
def group_keys(seed: int, prompts: int, n: int) -> torch.Tensor:
    """Keys of n samples of each prompt, in the engines' row order (prompt b's samples at b * n .. b * n + n - 1)."""
    return response_keys(seed, 0, torch.arange(prompts).repeat_interleave(n), torch.arange(n).repeat(prompts))


def count_forwards(model):
    """(rows of each forward of the causal LM, the hook's handle)."""
    rows: list[tuple[int, int]] = []
    hook = model.lm.get_base_model().register_forward_pre_hook(
        lambda m, a, kw: rows.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    return rows, hook


@pytest.mark.parametrize("engine", ["cached", "hf"])
def test_n_samples_per_prompt_are_the_prompt_repeated_n_times(tokenizer, prompts, engine):
    # Row b * n + s is sample s of prompt b, drawn from its own key: the same tokens as sampling the repeated prompts
    # one response each with those keys, and the samples of one prompt differ.
    model = build(tokenizer)
    stops = list(range(100, 200))
    n, keys = 3, group_keys(5, 5, 3)
    grouped = sample(engine, model, prompts, stops, keys=keys, samples_per_prompt=n)
    repeated = tuple(t.repeat_interleave(n, dim=0) for t in prompts)
    assert_same_responses(grouped, sample(engine, model, repeated, stops, keys=keys))
    tokens = grouped[0]
    assert tokens.shape[0] == 15
    for b in range(5):
        assert len({tuple(tokens[b * n + s].tolist()) for s in range(n)}) > 1


def test_the_cached_engine_prefills_each_prompt_once_for_all_its_samples(tokenizer, prompts):
    model = build(tokenizer)
    rows, hook = count_forwards(model)
    try:
        sample("cached", model, prompts, [NEVER], keys=group_keys(0, 5, 4), samples_per_prompt=4)
    finally:
        hook.remove()
    prompt_len = prompts[0].shape[1]
    assert rows[0] == (5, prompt_len)  # one prefill of the 5 prompts, not of 20 rows
    assert all(shape == (20, 1) for shape in rows[1:])  # then every step decodes the 20 samples


def test_a_cache_that_cannot_be_repeated_prefills_every_sample(tokenizer, prompts, monkeypatch):
    # A cache layer without batch_repeat_interleave (e.g. a linear-attention state): the prompt is prefilled once per
    # sample instead, and the samples are the same.
    from lightning_rlhf.models import engines

    class NoRepeat(engines._PreallocatedLayer):
        @property
        def batch_repeat_interleave(self):
            raise AttributeError("batch_repeat_interleave")

    real = engines._kv_cache

    def no_repeat_cache(config, max_len):
        cache = real(config, max_len)
        cache.layers = [NoRepeat(max_len) for _ in cache.layers]
        return cache

    model = build(tokenizer)
    keys = group_keys(3, 5, 2)
    reused = sample("cached", model, prompts, [NEVER], keys=keys, samples_per_prompt=2)
    monkeypatch.setattr(engines, "_kv_cache", no_repeat_cache)
    rows, hook = count_forwards(model)
    try:
        repeated = sample("cached", model, prompts, [NEVER], keys=keys, samples_per_prompt=2)
    finally:
        hook.remove()
    assert rows[0][0] == 10
    assert_same_responses(repeated, reused)


def test_generation_chunks_keep_each_prompts_samples_together(tokenizer, prompts):
    model = build(tokenizer)
    config = GenerationConfig(max_new_tokens=6, samples_per_prompt=2)
    keys = group_keys(2, 5, 2)
    whole = sample_responses(model, *prompts, config, [NEVER], PAD, False, keys)
    chunked = sample_responses(model, *prompts, dataclasses.replace(config, batch_size=2), [NEVER], PAD, False, keys)
    assert torch.equal(whole.tokens, chunked.tokens)
    assert whole.logprobs is None  # the trainer's own distribution: no engine logprobs
    assert chunked.logprobs is None
    with pytest.raises(ValueError, match=r"sample_keys must be \(10,\), one per response \(5 prompts x"):
        sample_responses(model, *prompts, config, [NEVER], PAD, False, keys[:5])
