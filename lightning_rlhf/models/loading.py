"""The one model builder of every stage: tokenizer, backbone (hub id, directory, tiny Llama), LoRA, checkpointing.

:func:`build_model` runs the same sequence for the policy (PPO), the SFT model and the reward model: check the dtype,
load the model (or build the tiny random Llama), check that a causal LM's logits come out of the decoder and
``lm_head`` path the package reads them through (:func:`~lightning_rlhf.models.heads.check_logits_path`), enable
gradient checkpointing, attach LoRA (peft) or make every
weight trainable, remove the input-grad hook that only reentrant checkpointing needs, and keep the trained weights in
float32 (:func:`~lightning_rlhf.models.weights.cast_weights`). Each stage adds only what is its own (the policy's
value head and reference, the reward model's pad id). Every error names the recipe field to fix, prefixed by the
stage's option (``model.policy`` or ``model.reward_model``), the path of the field's command-line flag.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import peft
import torch
import transformers
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.models.config import BYTE_TOKENIZER, LoraConfig, TinyModelConfig, check_dtype
from lightning_rlhf.models.heads import check_logits_path
from lightning_rlhf.models.weights import cast_weights

TOKENIZER_PROBE = "Hello, world"
"""Text every loaded tokenizer must encode to at least one token (see :func:`load_pretrained_tokenizer`)."""


class ModelSource(Protocol):
    """The fields :func:`build_model` reads: ``PolicyConfig`` and ``RewardModelConfig`` both have them."""

    name_or_path: str | None
    tokenizer: str | None
    dtype: str
    trust_remote_code: bool
    tiny: TinyModelConfig
    gradient_checkpointing: bool
    attn_implementation: str | None


# ---------------------------------------------------------------------------------------------------------- tokenizers
def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative-looking or deeper is a local path.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def check_local_path(name: str, option: str) -> None:
    """Refuse a ``name`` that looks like a local path but is no directory, naming the recipe field ``option``."""
    if _looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(f"{option}={name!r} is not an existing directory; fix the path or give a hub id.")


def load_pretrained_tokenizer(name: str, option: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(name)``, checked to encode text; errors name the recipe field ``option``.

    transformers 5 may load a model family's own tokenizer class instead of the one a directory's
    ``tokenizer_config.json`` names (a Qwen2 model directory saved with another tokenizer loads as an empty
    ``Qwen2Tokenizer``), which encodes every text to nothing; that is refused here instead of failing deep in a forward.

    Raises:
        OSError: it cannot be loaded.
        ValueError: it encodes :data:`TOKENIZER_PROBE` to no tokens.
    """
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise OSError(f"Could not load the tokenizer {option}={name!r}: {err}") from err
    if not tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]:
        raise ValueError(
            f"The tokenizer {option}={name!r} loaded as {type(tokenizer).__name__}, which encodes text to no tokens "
            f"(transformers may have preferred the model family's tokenizer class to the one saved there). Point "
            f"{option} at a tokenizer that matches, or name the tokenizer separately."
        )
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, option: str) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token (its EOS) if it has none; returns it.

    Raises:
        ValueError: it has neither, naming the recipe field ``option`` and the fix.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {option} has neither a pad nor an EOS token; choose another {option} or add a pad "
                "token to it (tokenizer.add_special_tokens({'pad_token': ...}) and save it)."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(
    cfg: ModelSource, option: str = "model.policy", padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg`` (``cfg.tokenizer``, else ``cfg.name_or_path``, else ByT5's byte tokenizer), with a pad
    token and ``padding_side`` (left for prompts that are continued, right for texts that are scored).

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
        OSError: the tokenizer cannot be loaded (the message names ``<option>.tokenizer`` or ``<option>.name_or_path``).
    """
    name = cfg.tokenizer or cfg.name_or_path or BYTE_TOKENIZER
    field = f"{option}.tokenizer" if cfg.tokenizer else f"{option}.name_or_path"
    if name == BYTE_TOKENIZER:
        tokenizer = transformers.ByT5Tokenizer()
    else:
        check_local_path(name, field)
        tokenizer = load_pretrained_tokenizer(name, field, cfg.trust_remote_code)
    ensure_pad_token(tokenizer, field).padding_side = padding_side
    return tokenizer


# ------------------------------------------------------------------------------------------------------------- models
def build_tiny(
    auto_class: Any,
    tiny: TinyModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    **extra: Any,
) -> nn.Module:
    """A small random Llama of shape ``tiny`` as ``auto_class`` (a causal LM, a sequence classifier, ...).

    The weights depend only on ``tiny.seed`` (built under a forked RNG), so rebuilding gives the same base model.
    ``extra`` goes into the ``LlamaConfig`` (e.g. ``num_labels=1``).
    """
    config = transformers.LlamaConfig(
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        return auto_class.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


@contextlib.contextmanager
def naming_attn_implementation(attn_implementation: str | None, option: str) -> Iterator[None]:
    """Re-raise transformers' refusal of an attention implementation as an error that names the field ``option``."""
    try:
        yield
    except (ValueError, ImportError) as err:
        about_attention = "attn_implementation" in str(err) or "Attention" in str(err)
        if attn_implementation is None or not about_attention:
            raise
        raise ValueError(
            f"{option}={attn_implementation!r} cannot be used: {err} Choose another "
            f"(null keeps transformers' default, sdpa)."
        ) from err


def _pretrained(cfg: ModelSource, auto_class: Any, dtype: torch.dtype, option: str, **extra: Any) -> nn.Module:
    name = cfg.name_or_path
    check_local_path(name, f"{option}.name_or_path")
    try:
        with naming_attn_implementation(cfg.attn_implementation, f"{option}.attn_implementation"):
            return auto_class.from_pretrained(
                name,
                dtype=dtype,
                trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation,
                **extra,
            )
    except OSError as err:
        raise OSError(f"Could not load {option}.name_or_path={name!r}: {err}") from err
    except ValueError as err:
        if str(err).startswith(f"{option}.attn_implementation"):
            raise
        raise ValueError(f"{option}.name_or_path={name!r} cannot be loaded as {auto_class.__name__}: {err}") from err


def attach_lora(model: nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> peft.PeftModel:
    """``model`` with a peft LoRA adapter of ``lora`` (``task_type`` ``"SEQ_CLS"`` also trains a classifier's new head).

    Raises:
        ValueError: ``lora.target_modules`` matches no module, naming the model's linear layers.
    """
    config = peft.LoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
    )
    try:
        with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "No modules were targeted" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"model.lora.target_modules={lora.target_modules!r} matches no module of {type(model).__name__}; its "
            f"linear layers are named {names} (or use 'all-linear')."
        ) from err


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing on every decoder layer.

    transformers also hooks the input embeddings so that their output requires grad; only reentrant checkpointing
    needs that, and the hook is a local function that makes the model unpicklable, so it is removed.
    """
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def build_model(
    cfg: ModelSource,
    lora: LoraConfig,
    tokenizer: PreTrainedTokenizerBase,
    option: str = "model.policy",
    auto_class: Any = transformers.AutoModelForCausalLM,
    task_type: str = "CAUSAL_LM",
    **extra: Any,
) -> nn.Module:
    """Load or build ``cfg``'s model as ``auto_class``, then gradient checkpointing, then LoRA or full fine-tuning.

    Args:
        cfg: which model and how (``PolicyConfig``, ``RewardModelConfig``).
        lora: the adapter; ``lora.enabled=False`` makes every weight trainable.
        tokenizer: sets the tiny model's vocabulary size and special token ids.
        option: the stage's recipe prefix, named in errors (``model.policy``, ``model.reward_model``).
        auto_class: the ``transformers`` auto class (causal LM, sequence classifier).
        task_type: peft's task type for the adapter.
        **extra: config fields for the model (``num_labels=1``).
    Returns:
        The model, or a ``peft.PeftModel`` around it; trained weights in float32 whatever ``cfg.dtype``.
    Raises:
        ValueError: an invalid dtype, attention implementation, or ``lora.target_modules`` that match nothing.
        FileNotFoundError: ``name_or_path`` is a local path that does not exist.
        OSError: the model cannot be loaded.
    """
    dtype = check_dtype(cfg.dtype, f"{option}.dtype")
    if cfg.name_or_path is None:
        with naming_attn_implementation(cfg.attn_implementation, f"{option}.attn_implementation"):
            model = build_tiny(auto_class, cfg.tiny, tokenizer, dtype, cfg.attn_implementation, **extra)
    else:
        model = _pretrained(cfg, auto_class, dtype, option, **extra)
    if task_type == "CAUSAL_LM":
        check_logits_path(model, option)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if lora.enabled:
        adapted = attach_lora(model, lora, task_type)
        model.disable_input_require_grads()  # peft adds the hook again with checkpointing; only reentrant needs it
        return cast_weights(adapted)
    return cast_weights(model.requires_grad_(True))
