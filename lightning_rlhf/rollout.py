"""Prompts -> :class:`~lightning_rlhf.types.Rollout`: sample responses, cut them at the stop token, score them with the
rollout policy, the reference and the critic.

Choices made here (see :mod:`lightning_rlhf.types` for shapes and mask polarity):

- **Temperature.** Old and reference logprobs divide the logits by the sampling temperature, so the PPO ratio and the
  KL use the distribution that sampled the tokens, also when ``do_sample=False`` (greedy). ``top_k`` and ``top_p``
  truncation is not reflected in the logprobs (as in TRL and OpenRLHF); leave them off for exact ratios.
- **Sampling settings are explicit.** Every logits processor that has a neutral value (repetition penalty, top-k,
  minimum length, ...) is set to it, so the model's ``generation_config`` (e.g. ``top_k=50``) cannot change the
  sampling distribution; processors without a neutral value must be unset on the model, otherwise this refuses to run.
- **Stop tokens.** A response ends at its first stop token (EOS or one of ``stop_token_ids``), which is a real token;
  every later column is ``pad_token_id`` with mask False. A response that hit ``max_new_tokens`` has ``ended`` False.
- **Engines.** Sampling itself is delegated to an engine of :mod:`lightning_rlhf.models.engines`
  (``generation.engine``), or to the one passed in (``engine=``: the ``vllm`` engine, which ``PPOModule`` holds);
  everything it returns after a stop token is discarded here, and the logprobs PPO uses always come from
  ``forward_response``. An engine's own logprobs (vLLM's) are kept as ``Rollout.engine_logprobs``.
- **Mode.** Generation and scoring run without gradients and in eval mode (no dropout), and every submodule's
  training flag is restored afterwards.
- **Several samples per prompt.** With ``generation.samples_per_prompt = n`` the rollout has ``B * n`` rows, prompt
  b's samples at rows ``b * n .. b * n + n - 1`` with ``group_index`` b; the prompt tensors are repeated for them.
- **No critic.** A model without a value head (critic-free estimators) gives ``old_values`` None.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_rlhf.config import GenerationConfig
from lightning_rlhf.functional.random_streams import KEY_BITS
from lightning_rlhf.models.engines import (
    Engine,
    Sampled,
    autocast_weights_once,
    cached_decode,
    hf_generate,
    lora_merge_blocker,
    merged_lora,
)
from lightning_rlhf.models.policy import ENTROPY, PolicyValueModel, ResponseForward, forward_response, scatter_tokens
from lightning_rlhf.modes import eval_mode
from lightning_rlhf.types import PADDED, ForwardOptions, Rollout, length_order, padding_extent

__all__ = [  # GenerationConfig and the response forward are imported from here too
    "ENTROPY",
    "GenerationConfig",
    "ResponseForward",
    "forward_response",
    "generate_rollout",
    "sample_responses",
    "scatter_tokens",
    "truncate_at_stop",
]


_NO_NEUTRAL_VALUE: tuple[str, ...] = (
    "bad_words_ids",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "max_time",
    "min_p",
    "sequence_bias",
    "stop_strings",
    "suppress_tokens",
    "top_h",
    "watermarking_config",
)
"""Generation options that ``generate`` copies from the model's ``generation_config`` when unset, and that have no
value meaning "off" we could pass instead; they would change the sampling distribution or stop rows early."""


def truncate_at_stop(
    response_ids: Tensor, stop_token_ids: list[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each response after its first stop token and drop the columns that are padding in every row.

    Args:
        response_ids: (B, T') long generated tokens (anything after a row's first stop token is ignored).
        stop_token_ids: tokens that end a response (EOS included).
        pad_token_id: written into every column after the stop token.
    Returns:
        ``(response_ids, response_mask, ended)``: (B, T) long, (B, T) bool with the stop token True and every later
        column False, (B,) bool True where a stop token was found. ``T <= T'`` is the longest kept response.
    """
    stops = torch.tensor(stop_token_ids, dtype=response_ids.dtype, device=response_ids.device)
    is_stop = torch.isin(response_ids, stops)  # (B, T')
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()  # stop tokens strictly before column t
    response_mask = stops_before == 0
    length = int(response_mask.sum(-1).max())
    response_ids = torch.where(response_mask, response_ids, pad_token_id)
    return response_ids[:, :length], response_mask[:, :length], is_stop.any(-1)


def _check_no_inherited_processors(model: nn.Module) -> None:
    lm = model.lm
    inherited = [name for name in _NO_NEUTRAL_VALUE if getattr(lm.generation_config, name, None) is not None]
    if inherited:
        raise ValueError(
            f"The policy's generation_config sets {inherited}, which would change how rollouts are sampled; set them "
            "to None on model.lm.generation_config (build_policy does this)."
        )


def _micro_batches(size: int, micro_batch_size: int | None) -> Iterator[slice]:
    step = size if micro_batch_size is None else micro_batch_size
    if step < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}.")
    for start in range(0, size, step):
        yield slice(start, start + step)


@torch.no_grad()
def _generate_and_score(
    model: PolicyValueModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    generation: GenerationConfig,
    stop_token_ids: list[int],
    pad_token_id: int,
    micro_batch_size: int | None,
    synced_gpus: bool,
    options: ForwardOptions,
    sample_keys: Tensor,
    engine: Engine | None,
) -> Rollout:
    samples = sample_responses(
        model, prompt_ids, prompt_mask, generation, stop_token_ids, pad_token_id, synced_gpus, sample_keys, engine
    )
    response_ids, response_mask, ended = truncate_at_stop(samples.tokens, stop_token_ids, pad_token_id)
    engine_logprobs = None
    if samples.logprobs is not None:  # cut like the tokens; 0 after the stop token
        engine_logprobs = torch.where(response_mask, samples.logprobs[:, : response_mask.shape[1]], 0.0)
    n = generation.samples_per_prompt
    group_index = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(n)
    prompt_ids, prompt_mask = prompt_ids[group_index], prompt_mask[group_index]
    critic = model.value_head is not None
    outputs: dict[str, list[Tensor]] = {"old_logprobs": [], "ref_logprobs": []}
    if critic:
        outputs["old_values"] = []
    # Micro-batches of similar lengths, so each pads less; only the columns some row of a micro-batch uses go through
    # the model, and its outputs are zero-padded back to the rollout's width and put back in row order.
    order = length_order(prompt_mask, response_mask)
    for micro_batch in _micro_batches(prompt_ids.shape[0], micro_batch_size):
        rows = order[micro_batch]
        start, end = padding_extent(prompt_mask[rows], response_mask[rows])
        args = (
            prompt_ids[rows, start:],
            prompt_mask[rows, start:],
            response_ids[rows, :end],
            response_mask[rows, :end],
        )
        pad = (0, response_ids.shape[1] - end)
        policy = forward_response(model, *args, generation.temperature, mode="policy", options=options)
        outputs["old_logprobs"].append(nn.functional.pad(policy.logprobs, pad))
        if critic:
            outputs["old_values"].append(nn.functional.pad(policy.values, pad))
        ref = forward_response(model, *args, generation.temperature, mode="ref", options=options)
        outputs["ref_logprobs"].append(nn.functional.pad(ref.logprobs, pad))
    scored = {name: torch.cat(parts)[torch.argsort(order)] for name, parts in outputs.items()}
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        old_logprobs=scored["old_logprobs"],
        ref_logprobs=scored["ref_logprobs"],
        old_values=scored.get("old_values"),
        ended=ended,
        group_index=group_index,
        engine_logprobs=engine_logprobs,
    )


def sample_responses(
    model: PolicyValueModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    generation: GenerationConfig,
    stop_token_ids: list[int],
    pad_token_id: int,
    synced_gpus: bool,
    sample_keys: Tensor | None = None,
    engine: Engine | None = None,
) -> Sampled:
    """Sample ``generation.samples_per_prompt`` (n) responses per prompt with ``engine``, or without one with the
    engine ``generation.engine`` names; no scoring (see :func:`generate_rollout`).

    The adapter is merged for the whole call when ``generation.merge_lora`` allows it, and under autocast the weights
    are cast once for the call with ``generation.cast_weights_once``; prompts go to the engine in
    chunks of ``generation.batch_size`` prompts. Returns a :class:`~lightning_rlhf.models.engines.Sampled`: (B * n, T')
    long tokens, row ``b * n + s`` sample s of prompt b, padded with ``pad_token_id`` to the longest chunk (anything
    after a row's first stop token is to be ignored: :func:`truncate_at_stop`), and the engine's own logprobs of them
    (vLLM) or None. ``sample_keys`` (B * n,) int64 names each response's random stream, in that row order
    (:func:`lightning_rlhf.functional.random_streams.response_keys`); None draws keys from the global torch RNG.
    """
    n = generation.samples_per_prompt
    if sample_keys is None:
        sample_keys = torch.randint(0, 2**KEY_BITS, (prompt_ids.shape[0] * n,))
    if sample_keys.shape != (prompt_ids.shape[0] * n,):
        raise ValueError(
            f"sample_keys must be ({prompt_ids.shape[0] * n},), one per response ({prompt_ids.shape[0]} prompts x "
            f"model.generation.samples_per_prompt {n}); got {tuple(sample_keys.shape)}."
        )
    sample_keys = sample_keys.to(prompt_ids.device)
    sample, in_process = _engine(generation, synced_gpus, engine)
    merge = in_process and generation.merge_lora and lora_merge_blocker(model.lm) is None
    # The weights are cast for autocast after the merge and before the restore; not for a sharded model (its
    # parameters are shards that each forward gathers).
    cast = in_process and generation.cast_weights_once and not synced_gpus
    chunks: list[Sampled] = []
    with (
        merged_lora(model.lm) if merge else contextlib.nullcontext(),
        autocast_weights_once(model.lm, prompt_ids.device.type) if cast else contextlib.nullcontext(),
    ):
        for rows in _micro_batches(prompt_ids.shape[0], generation.batch_size):
            keys = sample_keys[rows.start * n : rows.stop * n]  # the chunk's prompts' samples, in row order
            inputs = (prompt_ids[rows], prompt_mask[rows], generation, stop_token_ids, pad_token_id, keys)
            out = sample(model, *inputs)
            chunks.append(out if isinstance(out, Sampled) else Sampled(out, None))
    width = max(chunk.tokens.shape[1] for chunk in chunks)
    tokens = torch.cat(
        [nn.functional.pad(c.tokens, (0, width - c.tokens.shape[1]), value=pad_token_id) for c in chunks]
    )
    if chunks[0].logprobs is None:
        return Sampled(tokens, None)
    return Sampled(tokens, torch.cat([nn.functional.pad(c.logprobs, (0, width - c.logprobs.shape[1])) for c in chunks]))


def _engine(generation: GenerationConfig, synced_gpus: bool, engine: Engine | None) -> tuple[Engine, bool]:
    """The engine to sample with, and whether it runs the trainer's own model (then the LoRA merge and the weight
    cast apply)."""
    if engine is not None:
        return engine, False
    name = generation.engine if generation.engine != "auto" else ("hf" if synced_gpus else "cached")
    if name == "vllm":
        raise ValueError(
            "model.generation.engine 'vllm' samples with an engine object that holds vLLM (PPOModule builds one): "
            "pass it as engine=VLLMEngine(...)."
        )
    if name == "cached" and synced_gpus:
        raise ValueError(
            "model.generation.engine 'cached' cannot run a model sharded across processes (FSDP); use 'auto' or 'hf'."
        )
    return (cached_decode if name == "cached" else functools.partial(hf_generate, synced_gpus=synced_gpus)), True


def generate_rollout(
    model: PolicyValueModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    generation: GenerationConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    micro_batch_size: int | None = None,
    synced_gpus: bool = False,
    options: ForwardOptions = PADDED,
    sample_keys: Tensor | None = None,
    engine: Engine | None = None,
) -> Rollout:
    """Sample ``generation.samples_per_prompt`` responses per prompt and compute old logprobs, reference logprobs and
    values (none without a value head).

    Runs without gradients and in eval mode; every submodule's training flag is restored afterwards.

    Args:
        model: the policy (possibly wrapped by a sharded strategy; it is only ever called through ``forward``).
        prompt_ids: (B, P) long, left-padded prompts.
        prompt_mask: (B, P) bool, True for a real prompt token; every row needs at least one.
        generation: sampling settings.
        eos_token_id: the tokenizer's EOS; ends a response like ``generation.stop_token_ids``.
        pad_token_id: written after the stop token.
        micro_batch_size: responses per scoring forward (old/ref logprobs, values); None scores the whole rollout at
            once. Generation runs in chunks of ``generation.batch_size`` prompts.
        synced_gpus: keep generating until every rank is done (needed when parameters are sharded, e.g. FSDP).
        options: how the scoring forwards run (packing, ``lm_head`` chunks), as in the update
            (``PPOConfig.forward_options``).
        sample_keys: (B * n,) int64, each response's random stream, prompt b's samples at ``b * n .. b * n + n - 1``
            (:func:`lightning_rlhf.functional.random_streams.response_keys`); None draws them from the global RNG.
        engine: samples instead of the engine ``generation.engine`` names (``PPOModule`` passes its
            :class:`~lightning_rlhf.models.vllm_engine.VLLMEngine`, which must have the current policy loaded).
    Returns:
        A :class:`Rollout` of ``B * n`` responses with the first eight fields and ``group_index`` set, and
        ``engine_logprobs`` when the engine returns its own.
    """
    prompt_mask = prompt_mask.bool()
    if prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids has shape {tuple(prompt_ids.shape)} but prompt_mask {tuple(prompt_mask.shape)}.")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("Prompts must be left-padded: prompt_mask[:, -1] must be True in every row.")
    _check_no_inherited_processors(model)
    stop_token_ids = list(dict.fromkeys([eos_token_id, *generation.stop_token_ids]))
    with eval_mode(model):
        return _generate_and_score(
            model,
            prompt_ids,
            prompt_mask,
            generation,
            stop_token_ids,
            pad_token_id,
            micro_batch_size,
            synced_gpus,
            options,
            sample_keys,
            engine,
        )
