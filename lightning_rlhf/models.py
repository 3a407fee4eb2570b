"""The policy: a causal LM (hub id, local directory, or tiny random Llama), LoRA, a value head, and the reference.

With LoRA (the default) the reference policy is the same network with the adapter disabled, so no second copy of the
weights exists. With full fine-tuning the reference is a frozen deep copy. The critic is a linear value head on the
policy's last hidden state (after the final norm), sharing the backbone with the policy.

Every use of the model (policy logits and values, reference logits, generation) goes through
:meth:`PolicyValueModel.forward`, so a sharded wrapper around it (FSDP1 ``wrap``, FSDP2 ``fully_shard``) always runs
its root hooks.

Where this departs from the usual HF usage:

- **No ``output_hidden_states``.** The decoder and ``lm_head`` are called directly: in transformers 5 the
  hidden-states path installs hooks lazily, which breaks pickling after a forward and returns None after unpickling
  (``ddp_spawn``). It is also cheaper: ``lm_head`` runs only on the requested positions.
- **Logit post-processing.** Because ``lm_head`` is called directly, a transform an architecture applies after it is
  lost. Gemma-style ``final_logit_softcapping`` is re-applied here; for everything else ``build_policy`` compares this
  path with the model's own forward on a few tokens and refuses a model whose logits differ (Cohere's
  ``logit_scale``, Granite's ``logits_scaling``, ...) rather than silently train on different logprobs.
- **No dropout.** ``build_policy`` turns every dropout off (``nn.Dropout`` modules, LoRA's included, and the dropout
  probabilities in the model's config and modules), as TRL does for PPO: the old logprobs come from an eval-mode
  forward and the update's from a training-mode one, so with dropout the ratio would not be 1 at pi == pi_old. A model
  that still differs between the two modes afterwards is refused. SFT and reward-model training keep their dropout.
- **Generation defaults.** ``build_policy`` replaces the checkpoint's ``generation_config`` by one that holds only the
  special token ids: rollouts are configured by :class:`lightning_rlhf.rollout.GenerationConfig` alone, so a
  checkpoint's ``top_k`` or ``repetition_penalty`` can never make the sampling distribution differ from the one
  whose logprobs PPO uses.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
import torch.utils.checkpoint
import transformers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.modes import eval_mode
from lightning_rlhf.packing import pack_rows, unpack, verify_packing

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES: tuple[str, ...] = ("policy", "ref", "generate")
BYTE_TOKENIZER = "byte"
"""``PolicyConfig.tokenizer`` value that selects ``transformers.ByT5Tokenizer()`` (no files, no network)."""
VALUE_HEAD_INIT_SCALE = 0.1
"""The value head's weight is drawn from N(0, (VALUE_HEAD_INIT_SCALE / sqrt(hidden_size))^2) and its bias is 0, so on
a final hidden state of unit RMS the initial values are about N(0, 0.01) whatever the width: the critic starts near
0 instead of at a random offset that the first value losses would have to unlearn."""
_LOGITS_CHECK_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


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


def _check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown policy.dtype {name!r}; choose one of {', '.join(repr(d) for d in DTYPES)}.")
    return DTYPES[name]


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative-looking or deeper is a local path.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _check_local_path(name: str, option: str) -> None:
    if _looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(f"{option}={name!r} is not an existing directory; fix the path or give a hub id.")


def load_tokenizer(cfg: PolicyConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg``, with a pad token and left padding (prompts are left-padded for generation).

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
        OSError: the tokenizer cannot be loaded (the message names ``policy.tokenizer``).
    """
    name = cfg.tokenizer or cfg.name_or_path or BYTE_TOKENIZER
    if name == BYTE_TOKENIZER:
        tokenizer = transformers.ByT5Tokenizer()
    else:
        option = "policy.tokenizer" if cfg.tokenizer else "policy.name_or_path"
        _check_local_path(name, option)
        tokenizer = load_pretrained_tokenizer(name, option, cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer {name!r} has neither a pad nor an EOS token; choose another policy.tokenizer or add "
                "a pad token to it (tokenizer.add_special_tokens({'pad_token': ...}) and save it)."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


TOKENIZER_PROBE = "Hello, world"
"""Text every loaded tokenizer must encode to at least one token (see :func:`load_pretrained_tokenizer`)."""


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


def _tiny_llama(cfg: PolicyConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> nn.Module:
    with _naming_attn_implementation(cfg.attn_implementation, "policy.attn_implementation"):
        return build_tiny(transformers.AutoModelForCausalLM, cfg.tiny, tokenizer, dtype, cfg.attn_implementation)


def _pretrained(cfg: PolicyConfig, dtype: torch.dtype) -> nn.Module:
    name = cfg.name_or_path
    _check_local_path(name, "policy.name_or_path")
    try:
        with _naming_attn_implementation(cfg.attn_implementation, "policy.attn_implementation"):
            return transformers.AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation
            )
    except OSError as err:
        raise OSError(f"Could not load the causal LM policy.name_or_path={name!r}: {err}") from err


@contextlib.contextmanager
def _naming_attn_implementation(attn_implementation: str | None, option: str) -> Iterator[None]:
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


def _check_logits_path(lm: nn.Module) -> None:
    """Refuse a model whose own forward gives other logits than ``PolicyValueModel``'s decoder + ``lm_head`` path."""
    text = lm.config.get_text_config()
    input_ids = torch.arange(4, device=lm.device).remainder(text.vocab_size)[None]  # (1, 4)
    attention_mask = torch.ones_like(input_ids)
    with eval_mode(lm), torch.no_grad():
        theirs = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        ours = lm_logits(lm, final_hidden(lm, input_ids, attention_mask)).float()
    difference = (ours - theirs).abs().max().item()
    if difference > _LOGITS_CHECK_TOLERANCE.get(lm.dtype, 1e-4) * max(1.0, theirs.abs().max().item()):
        raise NotImplementedError(
            f"{type(lm).__name__} post-processes its logits after lm_head in a way PolicyValueModel does not "
            f"reproduce (max difference {difference:.3g}); choose another policy.name_or_path or extend "
            "lm_logits."
        )


@contextlib.contextmanager
def adapter_disabled(lm: peft.PeftModel) -> Iterator[None]:
    """The base model alone for the body: ``lm.disable_adapter()`` without its model-status scan.

    peft's context manager first collects every layer's adapter status (``get_model_status``), which is most of its
    cost: 20 ms per call on Qwen2-0.5B's 2,001 modules against 7 ms for switching the layers, host time that every
    reference forward pays. The layers are switched the same way (peft's ``disable_adapter_layers`` and
    ``enable_adapter_layers``); a model whose adapter is already disabled is left as it is.
    """
    first = next((m for m in lm.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)), None)
    if first is None or first.disable_adapters:
        yield
        return
    lm.base_model.disable_adapter_layers()
    try:
        yield
    finally:
        lm.base_model.enable_adapter_layers()


def _attach_lora(lm: nn.Module, lora: LoraConfig) -> peft.PeftModel:
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
    )
    try:
        with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(lm, config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "No modules were targeted" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.target_modules={lora.target_modules!r} matches no module of {type(lm).__name__}; its linear "
            f"layers are named {names} (or use 'all-linear')."
        ) from err


DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _is_dropout_name(name: str) -> bool:
    # transformers names dropout probabilities "*dropout*" (attention_dropout, hidden_dropout_prob, lora_dropout) or
    # "*pdrop" (GPT-2: resid_pdrop, embd_pdrop, attn_pdrop).
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn off every dropout of ``model``, in training mode as in eval mode; returns ``model``.

    Sets ``p = 0`` on every dropout module (LoRA's ``lora_dropout`` included), and 0 on every float attribute of a
    module or a ``transformers`` config whose name says dropout: attention kernels read those probabilities directly
    (``LlamaAttention.attention_dropout``), not through a module.
    """
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and _is_dropout_name(name):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, transformers.PretrainedConfig):
            for part in {id(c): c for c in (config, config.get_text_config())}.values():
                for name, value in part.to_dict().items():
                    if isinstance(value, float) and _is_dropout_name(name):
                        setattr(part, name, 0.0)
    return model


def check_dropout_off(model: nn.Module, option: str = "policy.name_or_path") -> None:
    """Refuse a model whose outputs on a few tokens differ between training and eval mode (dropout left on).

    Raises:
        NotImplementedError: naming ``option``; PPO's ratio would not be 1 where the policy has not moved.
    """
    text = unwrap_peft(model).config.get_text_config()
    input_ids = torch.arange(4, device=next(model.parameters()).device).remainder(text.vocab_size)[None]  # (1, 4)
    attention_mask = torch.ones_like(input_ids)
    outputs = []
    with torch.no_grad():
        for training in (False, True):
            with eval_mode(model):
                model.train(training)
                outputs.append(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits)
    if not torch.equal(*outputs):
        raise NotImplementedError(
            f"{type(unwrap_peft(model)).__name__} gives other outputs in training mode than in eval mode after its "
            f"dropout was turned off (max difference {(outputs[0] - outputs[1]).abs().max().item():.3g}), so PPO's "
            f"ratio would not be 1 before the policy moves; choose another {option}."
        )


def _enable_checkpointing(lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing on every decoder layer.

    transformers also hooks the input embeddings so that their output requires grad; only reentrant checkpointing
    needs that, and the hook is a local function that makes the model unpicklable, so it is removed.
    """
    if hasattr(lm, "activation_checkpointing_enable"):  # the transformers 5 name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.disable_input_require_grads()


def build_policy(cfg: PolicyConfig, lora: LoraConfig, tokenizer: PreTrainedTokenizerBase) -> PolicyValueModel:
    """Load or build the causal LM, attach LoRA (or set up full fine-tuning) and a value head.

    Args:
        cfg: which model and how to load it.
        lora: the adapter; ``lora.enabled=False`` selects full fine-tuning with a frozen copy as the reference.
        tokenizer: from :func:`load_tokenizer`; sets the tiny model's vocabulary size and special token ids.
    Returns:
        A :class:`PolicyValueModel` whose trainable parameters are the adapter (plus ``lora.modules_to_save``) and the
        value head, or every LM weight and the value head with full fine-tuning, all in float32 whatever
        ``policy.dtype`` (:func:`cast_weights`); every dropout off (:func:`disable_dropout`).
    Raises:
        ValueError: an invalid ``policy.dtype`` or ``lora.target_modules`` that match nothing.
        FileNotFoundError: ``policy.name_or_path`` is a local path that does not exist.
        NotImplementedError: the model's logits need post-processing this forward does not do, or it still behaves
            differently in training mode with its dropout off.
    """
    dtype = _check_dtype(cfg.dtype)
    lm = _tiny_llama(cfg, tokenizer, dtype) if cfg.name_or_path is None else _pretrained(cfg, dtype)
    _check_logits_path(lm)
    old = lm.generation_config
    lm.generation_config = transformers.GenerationConfig(
        bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id
    )
    if cfg.gradient_checkpointing:
        _enable_checkpointing(lm)
    if lora.enabled:
        peft_lm = disable_dropout(_attach_lora(lm, lora))
        lm.disable_input_require_grads()  # peft adds the hook again when checkpointing is on
        check_dropout_off(peft_lm)
        return cast_weights(PolicyValueModel(peft_lm))
    check_dropout_off(disable_dropout(lm))
    ref_lm = copy.deepcopy(lm)
    lm.requires_grad_(True)
    return cast_weights(PolicyValueModel(lm, ref_lm=ref_lm))


def cast_weights(model: nn.Module, frozen_dtype: torch.dtype | None = None) -> nn.Module:
    """Every trainable parameter in float32, and with ``frozen_dtype`` every frozen floating parameter in it.

    A trained weight stored in bfloat16 loses every optimizer step smaller than half its rounding step (with AdamW at
    lr 1e-5 most LoRA elements never moved), so trained weights are float32 master weights whatever the frozen base is
    stored in (``policy.dtype``, ``precision: bf16-true``): the base stays in half precision, the adapter computes in
    float32 (peft casts its input and result), and a full copy trained next to a frozen original
    (``lora.modules_to_save``) gets its input cast to float32 and its output back to the original's dtype
    (:class:`CastAround`). Buffers keep their dtype, as ``from_pretrained(dtype=...)`` leaves them (rotary
    frequencies stay float32). Casts only what differs, so it can run again on a sharded model. Returns ``model``.
    """
    for param in model.parameters():
        target = torch.float32 if param.requires_grad else frozen_dtype
        if target is not None and param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
    for wrapper in model.modules():
        if isinstance(wrapper, peft.utils.ModulesToSaveWrapper):
            for trained in wrapper.modules_to_save.values():
                if getattr(trained, "cast_around", None) is None:  # hooked once, however often this runs
                    trained.cast_around = CastAround(wrapper.original_module)
                    trained.register_forward_pre_hook(trained.cast_around)
                    trained.register_forward_hook(trained.cast_around.output)
    return model


class CastAround:
    """Hooks of a float32 module trained in place of a frozen ``original`` of another dtype: floating inputs are cast
    to the module's own dtype, floating outputs to the original's, so its neighbours see the dtype they expect.

    A top-level class (not a closure), so a model holding it pickles.
    """

    def __init__(self, original: nn.Module) -> None:
        self.original = original

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        dtype = next(module.parameters()).dtype
        return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)

    def output(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        dtype = next(self.original.parameters()).dtype
        return out.to(dtype) if isinstance(out, Tensor) and out.is_floating_point() else out


class PolicyValueModel(nn.Module):
    """Policy (LM with adapter), reference (adapter disabled, or a frozen copy) and critic (value head) in one module.

    ``ref_lm`` stays in eval mode whatever ``train()`` is called with: the reference must be deterministic.
    """

    def __init__(self, lm: nn.Module, ref_lm: nn.Module | None = None) -> None:
        super().__init__()
        self.lm = lm
        """``peft.PeftModel`` (LoRA) or the plain HF causal LM (full fine-tuning)."""
        self.ref_lm = ref_lm
        """Frozen reference copy for full fine-tuning; None with LoRA (reference = adapter disabled)."""
        if ref_lm is not None:
            ref_lm.requires_grad_(False)
            ref_lm.eval()
        hidden_size = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        """Critic: final hidden state (after the final norm) -> V(s), float32."""
        nn.init.normal_(self.value_head.weight, std=VALUE_HEAD_INIT_SCALE / math.sqrt(hidden_size))
        nn.init.zeros_(self.value_head.bias)

    @property
    def uses_lora(self) -> bool:
        """True when the policy is a LoRA adapter and the reference is the adapter-disabled base model."""
        return isinstance(self.lm, peft.PeftModel)

    def train(self, mode: bool = True) -> PolicyValueModel:
        """Set training mode on everything but ``ref_lm``, which stays in eval mode."""
        super().train(mode)
        if self.ref_lm is not None:
            self.ref_lm.eval()
        return self

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        mode: str = "policy",
        logits_slice: tuple[int, int] | None = None,
        packing: bool = False,
        logits_mask: Tensor | None = None,
        head: HeadFn | None = None,
        head_chunk_size: int | None = None,
        **generate_kwargs,
    ) -> tuple[Any, Tensor] | Any:
        """Policy logits and values, reference logits, or generated tokens.

        Args:
            input_ids: (B, L) long token ids, left padding allowed.
            attention_mask: (B, L) bool or int, True/1 for a real token.
            mode: ``"policy"``, ``"ref"`` or ``"generate"``.
            logits_slice: ``(start, end)``: return logits and values for positions ``start:end`` only (the others'
                logits are never computed); None means every position.
            packing: run the rows' real tokens packed into fewer rows (:mod:`lightning_rlhf.packing`); each row's
                real tokens must be contiguous. Same results up to rounding; ``"policy"`` and ``"ref"`` only.
            logits_mask: (B, S) bool over the slice: compute logits only where True (``lm_head`` and everything
                after it skip the padding); the logits are then (N, V) for the N True positions in row-major order.
            head: with ``logits_mask``: return ``head``'s per-token outputs instead of the logits
                (:func:`head_outputs`), e.g. logprobs and entropy, computed inside this forward.
            head_chunk_size: with ``head``: run ``lm_head`` and ``head`` on this many tokens at a time, recomputed in
                the backward pass, so the (N, V) logits are never held at once; None runs all N together.
            **generate_kwargs: passed to ``generate`` (``mode="generate"`` only).
        Returns:
            ``"policy"``: ``(logits, values)``, (B, S, V) (or (N, V) with ``logits_mask``) in the LM's dtype and
            (B, S) float32, where S is the slice length (L without a slice). ``"ref"``: the reference logits, (B, S, V)
            or (N, V). With ``head``, its outputs take the logits' place. ``"generate"``: (B, L + T') long, the
            prompts followed by the generated tokens.
        """
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(repr(m) for m in MODES)}.")
        attention_mask = attention_mask.long()
        if mode == "generate":
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        if generate_kwargs:
            raise TypeError(f"Unexpected arguments for mode={mode!r}: {sorted(generate_kwargs)}.")

        def outputs(causal_lm: nn.Module, hidden: Tensor) -> Any:
            return logits_or_head(causal_lm, hidden, logits_mask, head, head_chunk_size)

        if mode == "policy":
            hidden = final_hidden(unwrap_peft(self.lm), input_ids, attention_mask, logits_slice, packing)
            # float32 unless the whole module was cast (precision bf16-true): the head reads the hidden state in its
            # own dtype, and the values leave in float32 for the PPO math either way.
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)
            return outputs(unwrap_peft(self.lm), hidden), values
        if self.ref_lm is not None:
            return outputs(self.ref_lm, final_hidden(self.ref_lm, input_ids, attention_mask, logits_slice, packing))
        if head_chunk_size is not None and torch.is_grad_enabled():
            # A chunk's recomputation in the backward pass would run after the block below, with the adapter on.
            raise ValueError("The reference forward with a chunked head must run without grad (torch.no_grad()).")
        with adapter_disabled(self.lm):
            base = unwrap_peft(self.lm)
            return outputs(base, final_hidden(base, input_ids, attention_mask, logits_slice, packing))


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model``: the base model of a ``peft.PeftModel`` (its LoRA layers are injected
    there, so calling it runs the active adapter), else ``model`` itself."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def final_hidden(
    causal_lm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_slice: tuple[int, int] | None = None,
    packing: bool = False,
    option: str = "ppo.packing",
) -> Tensor:
    """(B, S, H) final hidden states (after the final norm) of a causal LM's decoder at the ``logits_slice`` positions.

    Args:
        causal_lm: a Hugging Face model with ``get_decoder()`` (see :func:`unwrap_peft`): a causal LM, or a sequence
            classifier built on a decoder.
        input_ids: (B, L) long token ids, left and right padding allowed.
        attention_mask: (B, L) bool or int, True/1 for a real token.
        logits_slice: ``(start, end)`` positions to return; None means all L.
        packing: run the rows' real tokens packed into fewer rows (:mod:`lightning_rlhf.packing`); each row's real
            tokens must be contiguous. Same results up to rounding.
        option: the recipe field that turned packing on, named in the errors.
    """
    attention_mask = attention_mask.long()
    start, end = logits_slice or (0, input_ids.shape[1])
    decoder = causal_lm.get_decoder()
    if packing:
        verify_packing(decoder, option)
        packed = pack_rows(input_ids, attention_mask, option=option)
        # No attention mask: transformers reads the sequence boundaries from the restarting position ids.
        out = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
        return unpack(out.last_hidden_state, packed.index[:, start:end])
    # (B, L): positions count real tokens only, so a left-padded row sees the same positions as the row alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state[:, start:end]


def lm_logits(causal_lm: nn.Module, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, S, V) logits of (B, S, H) final hidden states, or (N, V) at the N positions where ``mask`` is True
    (row-major order; ``lm_head`` never runs elsewhere)."""
    if mask is not None:
        hidden = hidden[mask]  # (N, H)
    logits = causal_lm.get_output_embeddings()(hidden)  # (B, S, V) or (N, V)
    cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:  # Gemma 2 and later: cap * tanh(logits / cap)
        logits = torch.tanh(logits / cap) * cap
    return logits


HeadFn = Callable[[Tensor, slice], tuple[Tensor, ...]]
"""``head(logits, rows)``: per-token outputs, each (C,), of the (C, V) logits of tokens ``rows`` (a slice of 0..N)."""


def logits_or_head(
    causal_lm: nn.Module,
    hidden: Tensor,
    logits_mask: Tensor | None,
    head: HeadFn | None,
    head_chunk_size: int | None,
) -> Tensor | tuple[Tensor, ...]:
    """:func:`lm_logits` of ``hidden`` (B, S, H) at ``logits_mask``, or with ``head`` :func:`head_outputs` there
    (``logits_mask`` required): what :meth:`PolicyValueModel.forward` returns in the logits' place."""
    if head is None:
        return lm_logits(causal_lm, hidden, logits_mask)
    if logits_mask is None:
        raise ValueError("A `head` needs `logits_mask`: the positions whose logits it reads.")
    return head_outputs(causal_lm, hidden[logits_mask], head, head_chunk_size)


def head_outputs(
    causal_lm: nn.Module, hidden: Tensor, head: HeadFn, chunk_size: int | None = None
) -> tuple[Tensor, ...]:
    """``head`` applied to the logits of N final hidden states, optionally ``chunk_size`` tokens at a time.

    With a chunk size, each chunk's logits live only while ``head`` reads them: with grad enabled every chunk runs
    under non-reentrant activation checkpointing, so the backward pass recomputes its ``lm_head`` (one more
    ``lm_head`` matmul per token) instead of holding N x V logits and their gradient. ``lm_head`` is called as a
    module, so its hooks (LoRA ``modules_to_save``, FSDP) run each time. The results equal the unchunked ones up to
    rounding (matmuls of another shape).

    Args:
        causal_lm: the model whose ``lm_head`` (and logit softcapping) makes the logits (:func:`lm_logits`).
        hidden: (N, H) final hidden states, one per token.
        head: maps a chunk's (C, V) logits and its rows to a tuple of (C,) outputs.
        chunk_size: tokens per chunk (>= 1), or None for all N at once.
    Returns:
        ``head``'s outputs over all N tokens, each (N,).
    """
    total = hidden.shape[0]
    if chunk_size is None or total <= chunk_size:
        return head(lm_logits(causal_lm, hidden), slice(0, total))
    pieces = []
    for start in range(0, total, chunk_size):
        rows = slice(start, min(start + chunk_size, total))

        def chunk(h: Tensor, rows: slice = rows) -> tuple[Tensor, ...]:
            return head(lm_logits(causal_lm, h), rows)

        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(chunk, hidden[rows], use_reentrant=False))
        else:
            pieces.append(chunk(hidden[rows]))
    return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))


def packed_classifier_scores(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, option: str, label: int = 0
) -> Tensor:
    """(N,) float32 logits of class ``label`` of a decoder-based sequence classifier, its rows run packed.

    Equal, up to rounding, to ``model(input_ids, attention_mask).logits[:, label]``: the decoder runs on packed rows
    (:func:`final_hidden`) and the ``score`` head reads each row's hidden state where the Hugging Face head pools, the
    rightmost token that is not ``pad_token_id``.

    Args:
        model: an ``AutoModelForSequenceClassification`` (or a ``peft.PeftModel`` around one) with a ``score`` head.
        input_ids: (N, L) long, right-padded with ``config.pad_token_id``.
        attention_mask: (N, L) bool or int, True/1 for a real token; each row's real tokens contiguous.
        option: the recipe field that turned packing on, named in the errors.
        label: the class whose logit is returned.
    Raises:
        ValueError: the model has no ``score`` head (an encoder classifier, say), or lets packed sequences attend to
            each other.
    """
    classifier = unwrap_peft(model)
    head = getattr(classifier, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"{option}: {type(classifier).__name__} has no `score` head to read packed hidden states with; set "
            f"{option}: false."
        )
    hidden = final_hidden(classifier, input_ids, attention_mask, packing=True, option=option)  # (N, L, H)
    not_padding = input_ids != classifier.config.get_text_config().pad_token_id  # (N, L)
    last = (torch.arange(input_ids.shape[1], device=input_ids.device) * not_padding).argmax(-1)  # (N,) as HF pools
    return head(hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last])[:, label].float()
