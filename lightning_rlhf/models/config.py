"""Which model to load and how: the policy's, the reward model's, and the LoRA adapter's configuration.

Frozen dataclasses with attribute docstrings, so ``--help`` explains each field; pure (no model is built here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BYTE_TOKENIZER = "byte"
"""``PolicyConfig.tokenizer`` value that selects ``transformers.ByT5Tokenizer()`` (no files, no network)."""


def check_dtype(name: str, option: str = "model.policy.dtype") -> torch.dtype:
    """The torch dtype named ``name``; an unknown name is a ``ValueError`` naming ``option``."""
    if name not in DTYPES:
        raise ValueError(f"Unknown {option} {name!r}; choose one of {', '.join(repr(d) for d in DTYPES)}.")
    return DTYPES[name]


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the small random Llama built when ``PolicyConfig.name_or_path`` is None (offline runs and tests)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """Width of the MLP's hidden layer."""
    num_hidden_layers: int = 2
    """Number of decoder layers."""
    num_attention_heads: int = 4
    """Number of query heads; must divide ``hidden_size``."""
    num_key_value_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means one per query head."""
    max_position_embeddings: int = 512
    """Longest prompt + response the rotary embedding is set up for."""
    seed: int = 0
    """Seed of the random weights. The same config always builds the same base model, so a checkpoint (which holds
    only the trained weights) is restored onto the base it was trained on."""


@dataclass(frozen=True)
class PolicyConfig:
    """Which causal LM to load and how."""

    name_or_path: str | None = None
    """HF hub id or local directory of a causal LM; None builds a tiny random Llama from ``tiny``."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory; None means the same as ``name_or_path``, or ``"byte"`` when that is None.
    ``"byte"`` selects ``transformers.ByT5Tokenizer()``, which needs no files."""
    dtype: str = "float32"
    """Dtype of the language model's frozen weights: ``"float32"``, ``"bfloat16"`` or ``"float16"``. Trained weights
    (LoRA, ``lora.modules_to_save``, the value head; every LM weight with full fine-tuning) are always float32 master
    weights, so small optimizer steps are not rounded away."""
    trust_remote_code: bool = False
    """Allow model and tokenizer code from the checkpoint's repository to run."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny random model; used only when ``name_or_path`` is None."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (non-reentrant checkpointing) to save memory."""
    attn_implementation: str | None = None
    """Attention kernel, passed to ``transformers``: None keeps its default (``"sdpa"``); ``"eager"``, ``"sdpa"``,
    ``"flex_attention"``, or ``"flash_attention_2"`` (needs the ``flash-attn`` package and a GPU; it runs packed rows,
    ``ppo.packing``, with variable-length kernels instead of a block mask)."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter on the policy (Hu et al. 2021), passed through to ``peft.LoraConfig``."""

    enabled: bool = True
    """False means full fine-tuning: every LM weight trains and the reference is a frozen deep copy."""
    r: int = 8
    """Rank of the update ``B @ A``."""
    alpha: int = 16
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input (active only in training mode, so never during rollouts)."""
    target_modules: str | list[str] = "all-linear"
    """Module names (or suffixes) that get an adapter; ``"all-linear"`` means every linear layer but the output head."""
    modules_to_save: list[str] | None = None
    """Modules trained in full next to the adapter, e.g. ``["lm_head"]`` (peft ``modules_to_save``). The reference
    (adapter disabled) uses their original weights."""


@dataclass(frozen=True)
class RewardModelConfig:
    """Which model becomes the reward model, and how to load it."""

    name_or_path: str | None = None
    """HF hub id or local directory of a sequence-classification model (``num_labels=1``) or of a causal LM, which
    gets a new scalar head; None builds a tiny random Llama with a scalar head from ``tiny``."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory; None means the same as ``name_or_path``, or ``"byte"`` (ByT5, no files) when
    that is None."""
    dtype: str = "float32"
    """Parameter dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    trust_remote_code: bool = False
    """Allow model and tokenizer code from the checkpoint's repository to run."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny random model; used only when ``name_or_path`` is None."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (non-reentrant checkpointing) to save memory."""
    attn_implementation: str | None = None
    """Attention kernel, passed to ``transformers``: None keeps its default (``"sdpa"``); ``"eager"``, ``"sdpa"``,
    ``"flex_attention"``, or ``"flash_attention_2"`` (needs the ``flash-attn`` package and a GPU; it runs packed rows,
    ``packing``, with variable-length kernels instead of a block mask)."""
