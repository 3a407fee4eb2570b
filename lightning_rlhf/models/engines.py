"""Sampling engines: prompts in, response tokens out. :func:`lightning_rlhf.rollout.generate_rollout` calls one.

An engine is any callable with the :class:`Engine` signature; it only samples tokens. Cutting at the stop token and
scoring (old/reference logprobs, values) happen in ``rollout.py`` with the training model's own forward, so an engine
never decides the logprobs PPO uses. vLLM (``"vllm"``, :mod:`lightning_rlhf.models.vllm_engine`, an optional extra)
fits behind the same signature, with its own copy of the weights; it also returns its own logprobs (:class:`Sampled`).

Two engines ship in this module:

- ``"cached"`` (:func:`cached_decode`, the default): one prefill, then one token per step through the model's KV
  cache. With several samples per prompt the prefill runs once per prompt and its cache is repeated for the samples
  (prefix reuse). Rows that emitted a stop token leave the batch, so finished rows cost nothing; the KV cache is
  preallocated for ``prompt + max_new_tokens`` positions where the model's cache layers allow it (plain attention
  layers), so a step appends in place instead of copying the whole cache (``DynamicCache`` concatenates the whole
  cache at every step; benchmarks/README.md has its cost). Needs a model whose forward is not sharded across
  processes.
- ``"hf"`` (:func:`hf_generate`): ``transformers`` ``generate`` with explicit neutral settings. Used where every
  process must run the same number of forwards (FSDP: ``synced_gpus``). Several samples per prompt are the prompt
  repeated (``generate`` prefills every row).

Both sample from ``softmax(logits / temperature)`` truncated by ``top_k`` then ``top_p`` (transformers' warpers, in
transformers' order), each response with its own random stream (:mod:`lightning_rlhf.functional.random_streams`: the
uniform of step t of row b is a hash of ``(keys[b], t)``, never the global RNG), so both engines draw the same tokens
and a response does not depend on the batch it is sampled in. With ``min_new_tokens`` the stop tokens are forbidden
before that many tokens, as transformers does; like ``top_k`` and ``top_p``, that truncation is not in the logprobs.

:func:`merged_lora` merges a LoRA adapter into the base weights for the duration of generation (two small matmuls
less per adapted layer and step) and restores the base weights bit for bit afterwards. Under autocast (``bf16-mixed``)
:func:`autocast_weights_once` casts each weight once per sampling call instead of once per decode step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import peft
import torch
import transformers
from torch import Tensor, nn
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lightning_rlhf.functional.random_streams import draw_tokens, response_uniforms
from lightning_rlhf.models.policy import PolicyValueModel, adapter_disabled

COMPACT_FRACTION = 0.25
"""Finished rows leave the batch once they are at least this share of the rows still in it (or all of them):
removing rows copies the KV cache, so it is batched rather than done for every single finished row."""


class SamplingSettings(Protocol):
    """The fields of :class:`lightning_rlhf.config.GenerationConfig` an engine reads."""

    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    do_sample: bool
    samples_per_prompt: int


class Sampled(NamedTuple):
    """What an engine with logprobs of its own returns (:class:`~lightning_rlhf.models.vllm_engine.VLLMEngine`)."""

    tokens: Tensor
    """(B * n, T') long sampled tokens, row ``b * n + s`` sample s of prompt b."""
    logprobs: Tensor | None
    """(B * n, T') float32, the engine's log-probability of each sampled token (0 after a row's last token); None
    where the tokens were drawn from the trainer's own distribution (``cached``, ``hf``)."""


class Engine(Protocol):
    """Samples ``settings.samples_per_prompt`` (n) responses per prompt; returns (B * n, T') long tokens,
    T' <= ``max_new_tokens``, row ``b * n + s`` being sample s of prompt b, or a :class:`Sampled` of those tokens and
    the engine's own logprobs of them.

    Anything after a row's first stop token is ignored by the caller (it may be padding or more tokens). ``keys``
    (B * n,) int64 names each response's random stream, in the rows' order
    (:func:`lightning_rlhf.functional.random_streams.response_keys`); greedy decoding ignores it.
    """

    def __call__(
        self,
        model: PolicyValueModel,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: SamplingSettings,
        stop_token_ids: list[int],
        pad_token_id: int,
        keys: Tensor,
    ) -> Tensor | Sampled: ...


# ------------------------------------------------------------------------------------------------------ engines
def hf_generate(
    model: PolicyValueModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    settings: SamplingSettings,
    stop_token_ids: list[int],
    pad_token_id: int,
    keys: Tensor,
    synced_gpus: bool = False,
) -> Tensor:
    """``generate`` of transformers, called through ``model.forward`` (so sharded wrappers run their hooks).

    Sampling runs as a logits processor (:class:`KeyedSampler`) under greedy search: it draws each row's token from its
    own stream and leaves only that token finite, so ``generate``'s argmax picks it.
    """
    config = hf_generation_config(settings, stop_token_ids, pad_token_id)
    prompt_ids = prompt_ids.repeat_interleave(settings.samples_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(settings.samples_per_prompt, dim=0)
    processors = transformers.LogitsProcessorList()
    if settings.do_sample:
        uniforms = response_uniforms(keys.to(prompt_ids.device), settings.max_new_tokens)
        processors.append(KeyedSampler(_warpers(settings), uniforms, prompt_ids.shape[1]))
    sequences = model(
        prompt_ids,
        prompt_mask,
        mode="generate",
        generation_config=config,
        logits_processor=processors,
        synced_gpus=synced_gpus,
    )
    return sequences[:, prompt_ids.shape[1] :]


@torch.no_grad()
def cached_decode(
    model: PolicyValueModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    settings: SamplingSettings,
    stop_token_ids: list[int],
    pad_token_id: int,
    keys: Tensor,
) -> Tensor:
    """Prefill once per prompt, then one token per step for each of its samples; finished rows leave the batch (see
    the module docstring)."""
    causal_lm = model.lm.get_base_model() if isinstance(model.lm, peft.PeftModel) else model.lm
    samples, (prompts, prompt_len) = settings.samples_per_prompt, prompt_ids.shape
    batch = prompts * samples
    max_new = settings.max_new_tokens
    device = prompt_ids.device
    stops = torch.tensor(stop_token_ids, device=device)
    warpers = _warpers(settings)
    uniforms = response_uniforms(keys.to(device), max_new) if settings.do_sample else None  # (B * n, max_new) float64
    cache = _kv_cache(causal_lm.config, prompt_len + max_new)
    cache_arg = {_cache_argument(causal_lm): cache, "use_cache": True}
    if samples > 1 and not all(hasattr(layer, "batch_repeat_interleave") for layer in cache.layers):
        # A cache layer that cannot be repeated (e.g. a linear-attention state): prefill every sample's row instead.
        prompt_ids, prompt_mask = (t.repeat_interleave(samples, dim=0) for t in (prompt_ids, prompt_mask))
        prompts, samples = batch, 1
    attention = torch.zeros(prompts, prompt_len + max_new, dtype=torch.long, device=device)
    attention[:, :prompt_len] = prompt_mask.long()
    # Positions count real tokens only, as in PolicyValueModel's forward: a left-padded row sees the same positions.
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = causal_lm(
        input_ids=prompt_ids,
        attention_mask=attention[:, :prompt_len],
        position_ids=positions,
        logits_to_keep=1,
        **cache_arg,
    ).logits[:, -1]
    if samples > 1:  # the prompt's cache, logits and positions, once for each of its samples (rows b * n + s)
        cache.batch_repeat_interleave(samples)
        logits, attention, positions = (t.repeat_interleave(samples, dim=0) for t in (logits, attention, positions))
    next_position = positions[:, -1:] + 1  # (A, 1) for the A rows still in the batch
    rows = torch.arange(batch, device=device)  # original row of each row still in the batch
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = torch.full((batch, max_new), pad_token_id, dtype=torch.long, device=device)
    for step in range(max_new):
        scores = logits.float()
        if step < settings.min_new_tokens:
            scores = scores.index_fill(-1, stops, float("-inf"))
        token = _sample(scores, warpers, None if uniforms is None else uniforms[rows, step])  # (A,)
        tokens[rows, step] = torch.where(finished, pad_token_id, token)
        finished = finished | torch.isin(token, stops)
        done = int(finished.sum())  # one host read per step; generate() makes the same one
        if done == len(rows) or step == max_new - 1:
            return tokens[:, : step + 1]
        if done >= COMPACT_FRACTION * len(rows):
            keep = (~finished).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, token, attention, next_position = rows[keep], token[keep], attention[keep], next_position[keep]
            finished = finished[keep]
        attention[:, prompt_len + step] = 1
        logits = causal_lm(
            input_ids=token[:, None],
            attention_mask=attention[:, : prompt_len + step + 1],
            position_ids=next_position,
            **cache_arg,
        ).logits[:, -1]
        next_position = next_position + 1
    return tokens


# ------------------------------------------------------------------------------------------------------ sampling
def _warpers(settings: SamplingSettings) -> list[transformers.LogitsProcessor]:
    """Temperature, top-k, top-p, in the order ``generate`` applies them; only the ones not switched off."""
    if not settings.do_sample:
        return []
    warpers: list[transformers.LogitsProcessor] = []
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers


def _sample(scores: Tensor, warpers: list[transformers.LogitsProcessor], uniforms: Tensor | None) -> Tensor:
    """(A,) tokens of (A, V) float32 scores: the argmax without ``uniforms``, else a draw from the warped softmax."""
    if uniforms is None:
        return scores.argmax(-1)
    for warper in warpers:
        scores = warper(None, scores)
    return draw_tokens(scores.softmax(-1), uniforms)


class KeyedSampler(transformers.LogitsProcessor):
    """``generate`` logits processor that samples each row from its own stream; only the drawn token stays finite.

    Runs after ``generate``'s own processors (``min_new_tokens``), like the ``cached`` engine's mask, then applies the
    same warpers and the same draw, so both engines sample the same tokens.

    Args:
        warpers: temperature, top-k, top-p (:func:`_warpers`).
        uniforms: (B, max_new_tokens) float64, from :func:`lightning_rlhf.functional.random_streams.response_uniforms`.
        prompt_len: P, the prompt width: step t sees ``input_ids`` of width ``P + t``.
    """

    def __init__(self, warpers: list[transformers.LogitsProcessor], uniforms: Tensor, prompt_len: int) -> None:
        self.warpers, self.uniforms, self.prompt_len = warpers, uniforms, prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.prompt_len
        token = _sample(scores.float(), self.warpers, self.uniforms[:, step])
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter(-1, token[:, None], 0.0)


def hf_generation_config(
    settings: SamplingSettings, stop_token_ids: list[int], pad_token_id: int
) -> transformers.GenerationConfig:
    """Greedy search with every logits processor at its neutral value, so the model's ``generation_config`` cannot
    interfere; sampling itself is :class:`KeyedSampler`'s (temperature, top-k and top-p included)."""
    return transformers.GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids,
        pad_token_id=pad_token_id,
        use_cache=True,
        num_beams=1,
        num_return_sequences=1,
        min_new_tokens=settings.min_new_tokens,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        guidance_scale=1.0,
        renormalize_logits=False,
        remove_invalid_values=False,
        return_dict_in_generate=False,
    )


# ------------------------------------------------------------------------------------------------------ KV cache
class _PreallocatedLayer(transformers.DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer sized for the whole rollout.

    ``update`` writes the new positions in place and returns views of the filled prefix, so attention sees exactly
    the positions a ``DynamicLayer`` would, without concatenating the whole cache at every step.
    """

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self._keys = key_states.new_zeros(batch, heads, self.max_len, key_states.shape[-1])
        self._values = value_states.new_zeros(batch, value_states.shape[1], self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


def _cache_argument(causal_lm: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(causal_lm.forward).parameters else "past_key_values"


def _kv_cache(config: transformers.PretrainedConfig, max_len: int) -> transformers.DynamicCache:
    """The model's own ``DynamicCache``, with preallocated layers where every layer is a plain attention layer."""
    cache = transformers.DynamicCache(config=config)
    if cache.layers and all(type(layer) is transformers.DynamicLayer for layer in cache.layers):
        cache.layers = [_PreallocatedLayer(max_len) for _ in cache.layers]
    return cache


# ------------------------------------------------------------------------------------------------------ LoRA merge
def lora_merge_blocker(lm: nn.Module) -> str | None:
    """Why the adapter of ``lm`` cannot be merged for generation, or None when it can."""
    if not isinstance(lm, peft.PeftModel):
        return "the policy has no LoRA adapter"
    if any(isinstance(m, peft.utils.ModulesToSaveWrapper) for m in lm.modules()):
        return "model.lora.modules_to_save is set (disabling the adapter would also switch those modules back)"
    layers = [m for m in lm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for layer in layers:
        if type(layer) is not peft.tuners.lora.Linear:
            return f"{type(layer).__name__} adapters are not merged (only plain linear layers)"
        if len(layer.active_adapters) != 1 or layer.merged:
            return "the adapter is already merged, or more than one adapter is active"
        adapter = layer.active_adapters[0]
        if layer.use_dora.get(adapter, False) or layer.lora_bias.get(adapter, False):
            return "DoRA and LoRA biases are not merged"
        weight = layer.get_base_layer().weight
        if type(weight) is not nn.Parameter or not weight.is_floating_point():
            return "the base weights are sharded or quantized"
    return None


@contextlib.contextmanager
def merged_lora(lm: peft.PeftModel) -> Iterator[None]:
    """Merge the adapter into the base weights, run the body with the adapter disabled, restore the weights exactly.

    ``W + delta - delta`` is not always ``W`` in floating point, so the few elements whose round trip would differ
    in any bit are saved before the merge and written back afterwards: the base weights (the reference policy) come
    back bit for bit. ``delta`` is recomputed for the restore, never stored, so the extra memory is one layer's
    ``delta`` at a time plus the saved elements. Check :func:`lora_merge_blocker` first.
    """
    layers = [m for m in lm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    restores: list[tuple[peft.tuners.lora.Linear, Tensor, Tensor]] = []
    # ``delta`` in the weights' own precision even inside an autocast region (bf16-mixed), in both directions.
    device_type = layers[0].get_base_layer().weight.device.type if layers else "cpu"
    try:
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = layer.get_delta_weight(layer.active_adapters[0]).to(weight.dtype)
                merged = weight + delta
                differs = _bits(merged - delta) != _bits(weight)  # compared as bits: -0.0 and NaN payloads count
                restores.append((layer, differs.nonzero(as_tuple=True), weight[differs]))
                weight.copy_(merged)
        with adapter_disabled(lm):
            yield
    finally:
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            for layer, index, original in restores:
                weight = layer.get_base_layer().weight
                weight.sub_(layer.get_delta_weight(layer.active_adapters[0]).to(weight.dtype))
                weight[index] = original


def _bits(tensor: Tensor) -> Tensor:
    """The raw bits of a floating-point tensor, as integers of the same width."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


@contextlib.contextmanager
def autocast_weights_once(module: nn.Module, device_type: str) -> Iterator[None]:
    """Inside an autocast region (``bf16-mixed``), cast each weight of ``module`` once for the body, not every forward.

    Lightning runs ``training_step`` under autocast with its weight-cast cache off (a cached cast would go stale at the
    optimizer step), so every decode step would cast every float32 weight again: one cast kernel per weight and step.
    Sampling changes no weight, so here the cache is on. Autocast caches the casts of leaf tensors that require grad,
    so frozen weights (the LoRA base) are marked as requiring grad for the body (gradients are off: nothing records
    them) and unmarked afterwards. The cache is cleared on entry (casts of weights changed since) and on exit (the
    next forward casts the weights as they are then). Extra memory: one copy of the weights in the autocast dtype.
    Outside autocast, or with gradients on, this does nothing.
    """
    if not torch.is_autocast_enabled(device_type) or torch.is_grad_enabled():
        yield
        return
    frozen = [p for p in module.parameters() if not p.requires_grad]
    torch.clear_autocast_cache()
    try:
        for param in frozen:
            param.requires_grad_(True)
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=True):
            yield
    finally:
        for param in frozen:
            param.requires_grad_(False)
        torch.clear_autocast_cache()
