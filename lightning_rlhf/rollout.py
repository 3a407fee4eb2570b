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
- **Engines.** Sampling itself is delegated to an engine of :mod:`lightning_rlhf.generation` (``generation.engine``);
  everything it returns after a stop token is discarded here, and the logprobs always come from ``forward_response``.
- **Mode.** Generation and scoring run without gradients and in eval mode (no dropout), and every submodule's
  training flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_rlhf.functional import entropy_from_logits, logprobs_from_logits
from lightning_rlhf.generation import (
    ENGINES,
    Engine,
    autocast_weights_once,
    cached_decode,
    hf_generate,
    lora_merge_blocker,
    merged_lora,
)
from lightning_rlhf.models import PolicyValueModel
from lightning_rlhf.modes import eval_mode
from lightning_rlhf.random_streams import KEY_BITS
from lightning_rlhf.types import Rollout, length_order, padding_extent

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


@dataclass(frozen=True)
class GenerationConfig:
    """How responses are sampled during rollouts."""

    max_new_tokens: int = 32
    """Longest response; a response that reaches it without a stop token has ``ended`` False."""
    temperature: float = 1.0
    """Softmax temperature of sampling; old and reference logprobs use it too, also with greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 turns it off (logprobs ignore the truncation)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 turns it off (logprobs ignore the truncation)."""
    do_sample: bool = True
    """False decodes greedily (deterministic tests); the logprobs still use ``temperature``."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response besides the tokenizer's EOS."""
    min_new_tokens: int = 0
    """Stop tokens are forbidden before this many response tokens (the logprobs ignore that truncation)."""
    engine: str = "auto"
    """Sampling engine (:mod:`lightning_rlhf.generation`): ``"cached"`` (KV cache, finished rows leave the batch),
    ``"hf"`` (transformers ``generate``), or ``"auto"``: ``"cached"``, except ``"hf"`` when the model is sharded
    across processes (FSDP), where every process must run the same number of forwards."""
    merge_lora: bool = True
    """Merge the LoRA adapter into the base weights while generating (restored bit for bit afterwards); skipped where
    it cannot apply (no adapter, sharded or quantized weights, ``modules_to_save``, DoRA)."""
    batch_size: int | None = None
    """Prompts sampled at once; None samples the whole per-device batch together (fastest; set it to cap memory)."""
    cast_weights_once: bool = True
    """Under autocast (``precision: bf16-mixed``), cast the sampled LM's weights to bfloat16 once per rollout instead
    of once per decode step. Holds one bfloat16 copy of those weights while sampling; set false when memory is tight.
    Not applied to a model sharded across processes (FSDP)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"generation.temperature must be > 0, got {self.temperature}; use do_sample=False for greedy."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn it off.")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0, got {self.top_k}; use 0 to turn it off.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"generation.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got "
                f"{self.min_new_tokens}."
            )
        if self.engine not in (*ENGINES, "auto"):
            raise ValueError(f"generation.engine must be 'auto', 'cached' or 'hf', got {self.engine!r}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1 or None (whole batch), got {self.batch_size}.")


ENTROPY: tuple[str, ...] = ("none", "detached", "grad")
"""``forward_response(entropy=...)``: no entropy, the entropy without a graph (logged only), or with one (a bonus)."""


class ResponseForward(NamedTuple):
    """Outputs of one forward over prompt + response, at the response positions."""

    logprobs: Tensor
    """(B, T) float32 log-probabilities of the response tokens at the temperature; 0 where the mask is False."""
    values: Tensor | None
    """(B, T) float32 V(s_t), the value before response token t; 0 where the mask is False. None for ``mode="ref"``."""
    entropy: Tensor | None = None
    """(B, T) float32 entropy of the temperature-scaled distribution that predicts each response token; 0 where the
    mask is False. None unless asked for."""


def forward_response(
    model: PolicyValueModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    temperature: float,
    mode: str = "policy",
    packing: bool = False,
    entropy: str = "none",
    lm_head_chunk_size: int | None = None,
) -> ResponseForward:
    """One forward of prompt + response; logprobs (and values, entropy) for the response tokens.

    The logits at positions ``P - 1 .. P + T - 2`` predict response tokens ``0 .. T - 1``; the values are read at the
    same positions, so ``values[:, t]`` is V(s_t), the state before token t. Gradients flow (the PPO update calls this).
    Logits are computed only at the real response tokens, and consumed inside the model's forward, so they never
    leave it.

    Args:
        model: the policy.
        prompt_ids: (B, P) long, left-padded.
        prompt_mask: (B, P) bool, True for a real prompt token.
        response_ids: (B, T) long, right-padded.
        response_mask: (B, T) bool, True for a real response token.
        temperature: the sampling temperature, > 0.
        mode: ``"policy"`` (logprobs and values) or ``"ref"`` (reference logprobs, no values).
        packing: run the rows packed (:mod:`lightning_rlhf.packing`): no forward over padding positions.
        entropy: one of :data:`ENTROPY`: ``"detached"`` for a logged entropy (its backward over a full vocabulary
            costs about 3x its forward), ``"grad"`` for an entropy bonus.
        lm_head_chunk_size: compute logits, logprobs and entropy this many tokens at a time, recomputed in the
            backward pass (:func:`lightning_rlhf.models.head_outputs`); None all at once.
    Returns:
        A :class:`ResponseForward`.
    """
    if mode not in ("policy", "ref"):
        raise ValueError(f"forward_response mode must be 'policy' or 'ref', got {mode!r}.")
    if entropy not in ENTROPY:
        raise ValueError(f"forward_response entropy must be one of {ENTROPY}, got {entropy!r}.")
    prompt_len, response_len = prompt_ids.shape[1], response_ids.shape[1]
    response_mask = response_mask.bool()
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask.bool(), response_mask], dim=1)
    tokens = response_ids[response_mask]  # (N,) in row-major order, as the logits

    def head(logits: Tensor, rows: slice) -> tuple[Tensor, ...]:
        logprobs = logprobs_from_logits(logits, tokens[rows], temperature)
        if entropy == "none":
            return (logprobs,)
        with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
            return logprobs, entropy_from_logits(logits, temperature)

    out = model(
        input_ids,
        attention_mask,
        mode=mode,
        logits_slice=(prompt_len - 1, prompt_len + response_len - 1),
        packing=packing,
        logits_mask=response_mask,
        head=head,
        head_chunk_size=lm_head_chunk_size,
    )
    per_token, values = out if mode == "policy" else (out, None)
    if values is not None:
        values = torch.where(response_mask, values.float(), torch.zeros((), device=values.device))
    return ResponseForward(
        logprobs=scatter_tokens(per_token[0], response_mask),
        values=values,
        entropy=scatter_tokens(per_token[1], response_mask) if entropy != "none" else None,
    )


def scatter_tokens(per_token: Tensor, mask: Tensor) -> Tensor:
    """(N,) values of the real tokens -> (B, T) float32, in row-major order of ``mask`` (B, T), 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, per_token.float())


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
    packing: bool,
    lm_head_chunk_size: int | None,
    sample_keys: Tensor,
) -> Rollout:
    samples = sample_responses(
        model, prompt_ids, prompt_mask, generation, stop_token_ids, pad_token_id, synced_gpus, sample_keys
    )
    response_ids, response_mask, ended = truncate_at_stop(
        samples,
        stop_token_ids,
        pad_token_id,
    )
    parts: dict[str, list[Tensor]] = {"old_logprobs": [], "old_values": [], "ref_logprobs": []}
    # Micro-batches of similar lengths, so each pads less; only the columns some row of a micro-batch uses go through
    # the model, and its outputs are zero-padded back to the rollout's width and put back in row order.
    order = length_order(prompt_mask, response_mask)
    for chunk in _micro_batches(prompt_ids.shape[0], micro_batch_size):
        rows = order[chunk]
        start, end = padding_extent(prompt_mask[rows], response_mask[rows])
        args = (
            prompt_ids[rows, start:],
            prompt_mask[rows, start:],
            response_ids[rows, :end],
            response_mask[rows, :end],
        )
        pad = (0, response_ids.shape[1] - end)
        options = {"packing": packing, "lm_head_chunk_size": lm_head_chunk_size}
        policy = forward_response(model, *args, generation.temperature, mode="policy", **options)
        parts["old_logprobs"].append(nn.functional.pad(policy.logprobs, pad))
        parts["old_values"].append(nn.functional.pad(policy.values, pad))
        ref = forward_response(model, *args, generation.temperature, mode="ref", **options)
        parts["ref_logprobs"].append(nn.functional.pad(ref.logprobs, pad))
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        ended=ended,
        **{name: torch.cat(chunks)[torch.argsort(order)] for name, chunks in parts.items()},
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
) -> Tensor:
    """Sample one response per prompt with ``generation.engine``; no scoring (see :func:`generate_rollout`).

    The adapter is merged for the whole call when ``generation.merge_lora`` allows it, and under autocast the weights
    are cast once for the call with ``generation.cast_weights_once``; prompts go to the engine in
    chunks of ``generation.batch_size`` rows. Returns (B, T') long tokens, padded with ``pad_token_id`` to the
    longest chunk; anything after a row's first stop token is to be ignored (:func:`truncate_at_stop`).
    ``sample_keys`` (B,) int64 names each response's random stream
    (:func:`lightning_rlhf.random_streams.response_keys`); None draws keys from the global torch RNG.
    """
    if sample_keys is None:
        sample_keys = torch.randint(0, 2**KEY_BITS, (prompt_ids.shape[0],))
    if sample_keys.shape != prompt_ids.shape[:1]:
        raise ValueError(
            f"sample_keys must be ({prompt_ids.shape[0]},), one per prompt; got {tuple(sample_keys.shape)}."
        )
    sample_keys = sample_keys.to(prompt_ids.device)
    engine = generation.engine if generation.engine != "auto" else ("hf" if synced_gpus else "cached")
    if engine == "cached" and synced_gpus:
        raise ValueError(
            "generation.engine 'cached' cannot run a model sharded across processes (FSDP); use 'auto' or 'hf'."
        )
    sample: Engine = cached_decode if engine == "cached" else functools.partial(hf_generate, synced_gpus=synced_gpus)
    merge = generation.merge_lora and lora_merge_blocker(model.lm) is None
    # The weights are cast for autocast after the merge and before the restore; not for a sharded model (its
    # parameters are shards that each forward gathers).
    cast = generation.cast_weights_once and not synced_gpus
    chunks = []
    with (
        merged_lora(model.lm) if merge else contextlib.nullcontext(),
        autocast_weights_once(model.lm, prompt_ids.device.type) if cast else contextlib.nullcontext(),
    ):
        for rows in _micro_batches(prompt_ids.shape[0], generation.batch_size):
            chunk = (prompt_ids[rows], prompt_mask[rows], generation, stop_token_ids, pad_token_id, sample_keys[rows])
            chunks.append(sample(model, *chunk))
    width = max(chunk.shape[1] for chunk in chunks)
    return torch.cat([nn.functional.pad(chunk, (0, width - chunk.shape[1]), value=pad_token_id) for chunk in chunks])


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
    packing: bool = False,
    lm_head_chunk_size: int | None = None,
    sample_keys: Tensor | None = None,
) -> Rollout:
    """Sample one response per prompt and compute old logprobs, reference logprobs and values.

    Runs without gradients and in eval mode; every submodule's training flag is restored afterwards.

    Args:
        model: the policy (possibly wrapped by a sharded strategy; it is only ever called through ``forward``).
        prompt_ids: (B, P) long, left-padded prompts.
        prompt_mask: (B, P) bool, True for a real prompt token; every row needs at least one.
        generation: sampling settings.
        eos_token_id: the tokenizer's EOS; ends a response like ``generation.stop_token_ids``.
        pad_token_id: written after the stop token.
        micro_batch_size: rows per scoring forward (old/ref logprobs, values); None scores the whole batch at once.
            Generation runs in chunks of ``generation.batch_size`` rows.
        synced_gpus: keep generating until every rank is done (needed when parameters are sharded, e.g. FSDP).
        packing: score the rows packed (:mod:`lightning_rlhf.packing`), as ``ppo.packing`` does in the update.
        lm_head_chunk_size: score this many response tokens' logits at a time (``ppo.lm_head_chunk_size``).
        sample_keys: (B,) int64, each response's random stream (:func:`lightning_rlhf.random_streams.response_keys`);
            None draws them from the global torch RNG.
    Returns:
        A :class:`Rollout` with the first eight fields set.
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
            packing,
            lm_head_chunk_size,
            sample_keys,
        )
