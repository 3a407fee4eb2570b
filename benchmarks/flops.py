"""Model FLOPs of a decoder-only transformer, and this machine's matmul rate, for utilization figures.

Counts are analytical, for Hugging Face decoders shaped like Llama, Qwen2 or Mistral: per layer the projections
``q_proj``, ``k_proj``, ``v_proj`` (``num_key_value_heads`` heads each: grouped-query attention), ``o_proj``, and a
gated MLP ``gate_proj``, ``up_proj``, ``down_proj``; then ``lm_head`` over the positions whose logits are computed.
:class:`Work` describes what a call pushes through the model; :func:`forward_flops` and :func:`backward_flops` turn it
into a :class:`FlopCount`. ``tests/test_flops.py`` checks every count against ``torch.utils.flop_counter``.

Conventions (they are those of model FLOPs utilization, Chowdhery et al. 2022, PaLM, appendix B):

- **Matmuls only.** A ``(m, k) x (k, n)`` matmul is ``2 m k n`` FLOPs, as ``FlopCounterMode`` counts it. Elementwise
  work is not counted: norms, rotary embeddings, activations, softmax, biases, LoRA scaling, the loss, the optimizer.
- **Attention as computed, not as needed.** Scores and the weighted sum cost ``2 x 2 x d`` per (query, key) pair per
  query head (``d = head_dim``). A full forward of length ``L`` computes all ``L x L`` pairs per row, as SDPA does
  with an explicit mask and as ``FlopCounterMode`` counts SDPA; the causal half is not discounted. A decode step with
  a KV cache of ``K`` positions computes ``1 x K`` pairs. Padded positions that run through the model count.
- **Backward: what autograd computes, no recomputation.** Each matmul ``Y = X W`` costs one matmul of its own size
  for ``dX`` if ``X`` requires grad, and one for ``dW`` if ``W`` trains. With full fine-tuning (the embeddings train,
  so every layer's input requires grad) a step is 3x the forward. With LoRA the base weights are frozen and the
  embedding output needs no grad, so the first layer's q/k/v projections skip ``dX`` too: a step is about 2x the
  forward plus the adapters' terms. Recomputation is not model work: gradient checkpointing's second forward is not
  counted, nor the score matmul that flash/SDPA backward kernels recompute (``FlopCounterMode`` counts SDPA backward
  as 2.5x its forward, we count 2x: the eager matmuls' backward).
- **LoRA** (Hu et al. 2021) on a projection ``in -> out`` of rank ``r`` adds ``2 n r (in + out)`` forward FLOPs for
  ``n`` positions, reported apart from the base projections. Dropout on the adapter input is elementwise.
- **Value head** (hidden -> 1, always trained) is counted on :attr:`Work.value_positions`.

Not covered: mixture-of-experts MLPs (refused), sliding windows shorter than the sequence (counted as full),
architectures with other projection layouts (e.g. fused ``qkv``, GPT-2's ``c_attn``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of one decoder layer, in the order the forward runs them."""
MATMUL_SIZE: dict[str, int] = {"cpu": 1024, "cuda": 4096}
"""Default side of the square matmul that :func:`matmul_flops_per_sec` times, per device type."""
WARMUP_MATMULS = 3
"""Untimed matmuls before timing (page faults, thread pool start, cuBLAS heuristics)."""
_MOE_FIELDS: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that set a decoder's FLOPs; :meth:`from_config` reads them from a Hugging Face config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (``num_key_value_heads``); fewer than ``num_heads`` is grouped-query attention."""
    head_dim: int
    """Width of one head; ``hidden_size // num_heads`` unless the config sets ``head_dim``."""
    vocab_size: int

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1:
                raise ValueError(f"DecoderShape.{f.name} must be a positive int, got {getattr(self, f.name)!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.")

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From a ``transformers`` config (Llama, Qwen2, Mistral, ...; a multimodal one's text config).

        Raises:
            ValueError: a field is missing, or the model is a mixture of experts.
        """
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if any(getattr(text, name, None) for name in _MOE_FIELDS):
            raise ValueError(f"{type(text).__name__} is a mixture of experts; benchmarks/flops.py counts dense MLPs.")
        names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [name for name in names if getattr(text, name, None) is None]
        if missing:
            raise ValueError(f"{type(text).__name__} has no {missing}; it is not a Llama-shaped decoder.")
        heads = text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
        )

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter of rank ``rank`` on the projections named in ``targets`` (every layer)."""

    rank: int
    targets: tuple[str, ...] = PROJECTIONS
    """Projection names; the default is peft's ``"all-linear"`` on these models (every projection, not lm_head)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"Lora.rank must be a positive int, got {self.rank!r}.")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise ValueError(f"Lora.targets must be a non-empty subset of {PROJECTIONS}; unknown: {unknown}.")


@dataclass(frozen=True)
class Work:
    """What one or more calls push through the model; counts are summed over rows (and over calls: ``a + b``)."""

    positions: int = 0
    """Sequence positions that run through the backbone (padding included when it runs)."""
    attention_pairs: int = 0
    """(query, key) position pairs whose attention scores are computed: ``L * L`` for a full forward of length ``L``."""
    logit_positions: int = 0
    """Positions whose logits ``lm_head`` computes."""
    value_positions: int = 0
    """Positions the value head reads."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 0:
                raise ValueError(f"Work.{f.name} must be an int >= 0, got {getattr(self, f.name)!r}.")
        if max(self.logit_positions, self.value_positions) > self.positions:
            raise ValueError(f"Work reads logits or values at more positions than run through the backbone: {self}.")

    def __add__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def forward_work(batch: int, length: int, logit_positions: int | None = None, value_positions: int = 0) -> Work:
    """One full (no KV cache) forward of ``batch`` rows of ``length`` positions.

    Args:
        logit_positions: positions per row that get logits (a ``logits_slice``); None means all ``length``.
        value_positions: positions per row the value head reads.
    """
    logits = length if logit_positions is None else logit_positions
    return Work(batch * length, batch * length * length, batch * logits, batch * value_positions)


def generation_work(batch: int, prompt_len: int, new_tokens: int) -> Work:
    """``generate`` with a KV cache: a prefill over the prompt, then one position per decode step and row.

    The prefill's logits are computed at the last position only (``logits_to_keep=1``). Token ``t`` (0-based) is
    sampled from the logits of step ``t``; the last sampled token is never fed back, so there are ``new_tokens - 1``
    decode steps, step ``t`` attending to ``prompt_len + t`` cached positions.
    """
    if batch < 1 or prompt_len < 1 or new_tokens < 1:
        raise ValueError(
            f"generation_work needs batch, prompt_len, new_tokens >= 1, got {batch, prompt_len, new_tokens}."
        )
    steps = new_tokens - 1
    decode_pairs = steps * prompt_len + steps * (steps + 1) // 2  # sum of prompt_len + t over t = 1 .. steps
    return Work(
        positions=batch * (prompt_len + steps),
        attention_pairs=batch * (prompt_len * prompt_len + decode_pairs),
        logit_positions=batch * new_tokens,
    )


@dataclass(frozen=True)
class FlopCount:
    """FLOPs by term; ``a + b`` and ``k * a`` combine counts."""

    projections: int = 0
    """The decoder layers' linear layers (frozen base weights included)."""
    attention: int = 0
    """Score and weighted-sum matmuls."""
    lm_head: int = 0
    lora: int = 0
    """Adapter matmuls (``A`` and ``B``)."""
    value_head: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __rmul__(self, k: int) -> FlopCount:
        return FlopCount(*(k * getattr(self, f.name) for f in fields(self)))


def forward_flops(shape: DecoderShape, work: Work, lora: Lora | None = None) -> FlopCount:
    """Forward FLOPs of ``work``; ``lora`` is the active adapter (None: no adapter, or it is disabled)."""
    n, dims = work.positions, shape.projection_dims()
    adapter = 0 if lora is None else sum(2 * n * lora.rank * (i + o) for p, (i, o) in dims.items() if p in lora.targets)
    return FlopCount(
        projections=shape.num_layers * sum(2 * n * i * o for i, o in dims.values()),
        attention=shape.num_layers * 4 * work.attention_pairs * shape.num_heads * shape.head_dim,
        lm_head=2 * work.logit_positions * shape.hidden_size * shape.vocab_size,
        lora=shape.num_layers * adapter,
        value_head=2 * work.value_positions * shape.hidden_size,
    )


def _layer_backward(shape: DecoderShape, work: Work, lora: Lora | None, input_grad: bool) -> tuple[FlopCount, bool]:
    """Backward FLOPs of one decoder layer whose input does (not) require grad; also whether its output does."""
    n, dims, full = work.positions, shape.projection_dims(), lora is None
    targets = () if lora is None else lora.targets
    counts = {"projections": 0, "lora": 0}

    def linear(name: str, x_grad: bool) -> bool:
        fan_in, fan_out = dims[name]
        counts["projections"] += 2 * n * fan_in * fan_out * (x_grad + full)  # dX if X requires grad, dW if W trains
        if name in targets:  # dA, dB, dX through B (A trains, so its output requires grad), dX through A if needed
            counts["lora"] += 2 * n * lora.rank * (fan_in * (1 + x_grad) + 2 * fan_out)
        return x_grad or full or name in targets

    q, k, v = (linear(name, input_grad) for name in ("q_proj", "k_proj", "v_proj"))
    pair_matmul = 2 * work.attention_pairs * shape.num_heads * shape.head_dim
    # out = P @ V: dP = dOut @ V^T when scores need grad, dV = P^T @ dOut. S = Q @ K^T: dQ = dS @ K, dK = dS^T @ Q.
    attention = pair_matmul * ((q or k) + v + q + k)
    residual = linear("o_proj", q or k or v) or input_grad
    gated = linear("gate_proj", residual) | linear("up_proj", residual)
    output_grad = linear("down_proj", gated) or residual
    return FlopCount(attention=attention, **counts), output_grad


def backward_flops(shape: DecoderShape, work: Work, lora: Lora | None = None) -> FlopCount:
    """Backward FLOPs of ``work`` (forward in :func:`forward_flops`); the value head always trains.

    Args:
        lora: the trained adapter: only it and the value head train, the embeddings do not. None means full
            fine-tuning: every weight trains (embeddings and ``lm_head`` included).
    """
    total, grad = FlopCount(), lora is None  # does the first layer's input (the embedding output) require grad?
    for _ in range(shape.num_layers):
        layer, grad = _layer_backward(shape, work, lora, grad)
        total += layer
    # Something trains in every layer (a Lora names at least one projection), so the final hidden state requires
    # grad: lm_head and the value head compute dX; lm_head's dW only with full fine-tuning, the value head's always.
    head = 2 * work.logit_positions * shape.hidden_size * shape.vocab_size
    value_head = 2 * work.value_positions * shape.hidden_size
    return total + FlopCount(lm_head=head * (1 + (lora is None)), value_head=2 * value_head)


def train_flops(shape: DecoderShape, work: Work, lora: Lora | None = None) -> FlopCount:
    """Forward plus backward FLOPs of one training step on ``work`` (see :func:`backward_flops` for ``lora``)."""
    return forward_flops(shape, work, lora) + backward_flops(shape, work, lora)


class MatmulRate(NamedTuple):
    """A measured square-matmul rate."""

    flops_per_sec: float
    n: int
    """Side of the square matrices."""
    dtype: torch.dtype
    repetitions: int
    seconds: float
    """Wall time of the timed repetitions."""


def matmul_flops_per_sec(
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None, n: int | None = None, min_seconds: float = 0.2
) -> MatmulRate:
    """Time ``(n, n) @ (n, n)`` matmuls in this process: a ceiling for utilization at this thread count and dtype.

    Args:
        device: where to run; CUDA work is synchronized before the clock is read.
        dtype: None means float32 on CPU, bfloat16 on CUDA.
        n: matrix side; None means :data:`MATMUL_SIZE` for the device type (1024 on CPU).
        min_seconds: repeat until one timed run of back-to-back matmuls lasts at least this long.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"]) if n is None else n
    if n < 1 or not min_seconds > 0:
        raise ValueError(
            f"matmul_flops_per_sec needs n >= 1 and min_seconds > 0, got n={n}, min_seconds={min_seconds}."
        )
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def timed(repetitions: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repetitions):
            torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    timed(WARMUP_MATMULS)
    repetitions = 1
    while (seconds := timed(repetitions)) < min_seconds:  # aim 20 % past min_seconds, at least double
        repetitions = max(2 * repetitions, math.ceil(1.2 * repetitions * min_seconds / max(seconds, 1e-9)))
    return MatmulRate(2 * n**3 * repetitions / seconds, n, dtype, repetitions, seconds)
