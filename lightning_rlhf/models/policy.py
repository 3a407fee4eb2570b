"""The policy: a causal LM with LoRA (or fully trained), its reference, and the critic's value head in one module.

With LoRA (the default) the reference policy is the same network with the adapter disabled, so no second copy of the
weights exists. With full fine-tuning the reference is a frozen deep copy. The critic is a linear value head on the
policy's last hidden state (after the final norm), sharing the backbone with the policy.

Every use of the model (policy logits and values, reference logits, generation) goes through
:meth:`PolicyValueModel.forward`, so a sharded wrapper around it (FSDP1 ``wrap``, FSDP2 ``fully_shard``) always runs
its root hooks. :func:`forward_response` is the one scoring forward of prompt + response that the rollout and the
update share.

Where this departs from the usual HF usage:

- **Generation defaults.** :func:`build_policy` replaces the checkpoint's ``generation_config`` by one that holds
  only the special token ids: rollouts are configured by :class:`lightning_rlhf.config.GenerationConfig` alone, so a
  checkpoint's ``top_k`` or ``repetition_penalty`` can never make the sampling distribution differ from the one whose
  logprobs PPO uses.
- **No dropout.** :func:`build_policy` turns every dropout off (``nn.Dropout`` modules, LoRA's included, and the
  dropout probabilities in the model's config and modules), as TRL does for PPO: the old logprobs come from an
  eval-mode forward and the update's from a training-mode one, so with dropout the ratio would not be 1 at
  pi == pi_old. A model that still differs between the two modes afterwards is refused.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import peft
import torch
import transformers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.functional import entropy_from_logits, logprobs_from_logits
from lightning_rlhf.models.config import LoraConfig, PolicyConfig, check_dtype
from lightning_rlhf.models.heads import HeadFn, final_hidden, logits_or_head, unwrap_peft
from lightning_rlhf.models.loading import build_model
from lightning_rlhf.models.weights import cast_weights, check_dropout_off, disable_dropout
from lightning_rlhf.types import PADDED, ForwardOptions

MODES: tuple[str, ...] = ("policy", "ref", "generate")
VALUE_HEAD_INIT_SCALE = 0.1
"""The value head's weight is drawn from N(0, (VALUE_HEAD_INIT_SCALE / sqrt(hidden_size))^2) and its bias is 0, so on
a final hidden state of unit RMS the initial values are about N(0, 0.01) whatever the width: the critic starts near
0 instead of at a random offset that the first value losses would have to unlearn."""
ENTROPY: tuple[str, ...] = ("none", "detached", "grad")
"""``forward_response(entropy=...)``: no entropy, the entropy without a graph (logged only), or with one (a bonus)."""


def build_policy(
    cfg: PolicyConfig, lora: LoraConfig, tokenizer: PreTrainedTokenizerBase, value_head: bool = True
) -> PolicyValueModel:
    """The policy of ``cfg`` (:func:`~lightning_rlhf.models.loading.build_model`) with a value head and a reference.

    Args:
        cfg: which model and how to load it.
        lora: the adapter; ``lora.enabled=False`` selects full fine-tuning with a frozen copy as the reference.
        tokenizer: from :func:`~lightning_rlhf.models.loading.load_tokenizer`; sets the tiny model's vocabulary size and
            special token ids.
        value_head: build the critic's value head; False for a critic-free estimator (no value head at all).
    Returns:
        A :class:`PolicyValueModel` whose trainable parameters are the adapter (plus ``lora.modules_to_save``) and the
        value head, or every LM weight and the value head with full fine-tuning, all in float32 whatever
        ``policy.dtype`` (:func:`~lightning_rlhf.models.weights.cast_weights`); every dropout off
        (:func:`~lightning_rlhf.models.weights.disable_dropout`); a ``generation_config`` that sets nothing but the
        special tokens.
    Raises:
        ValueError: an invalid ``policy.dtype`` or ``lora.target_modules`` that match nothing.
        FileNotFoundError: ``policy.name_or_path`` is a local path that does not exist.
        NotImplementedError: the model's logits need post-processing this forward does not do, or it still behaves
            differently in training mode with its dropout off.
    """
    lm = build_model(cfg, lora, tokenizer, "model.policy")
    base = unwrap_peft(lm)
    old = base.generation_config
    base.generation_config = transformers.GenerationConfig(
        bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id
    )
    check_dropout_off(disable_dropout(lm))
    if lora.enabled:
        return PolicyValueModel(lm, value_head=value_head)
    # The frozen reference keeps policy.dtype; the trained copy holds float32 master weights.
    ref_lm = cast_weights(copy.deepcopy(lm).requires_grad_(False), check_dtype(cfg.dtype, "model.policy.dtype"))
    return PolicyValueModel(lm, ref_lm=ref_lm, value_head=value_head)


@contextlib.contextmanager
def adapter_disabled(lm: peft.PeftModel) -> Iterator[None]:
    """The base model alone for the body: ``lm.disable_adapter()`` without its model-status scan.

    peft's context manager first collects every layer's adapter status (``get_model_status``), which costs more host
    time than switching the layers (benchmarks/README.md), and every reference forward pays it. The layers are switched
    the same way (peft's ``disable_adapter_layers`` and ``enable_adapter_layers``); a model whose adapter is already
    disabled is left as it is.
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


class PolicyValueModel(nn.Module):
    """Policy (LM with adapter), reference (adapter disabled, or a frozen copy) and critic (value head) in one module.

    ``ref_lm`` stays in eval mode whatever ``train()`` is called with: the reference must be deterministic. With
    ``value_head=False`` (critic-free estimators) there is no critic: ``value_head`` is None and the policy forward
    returns None for the values.
    """

    def __init__(self, lm: nn.Module, ref_lm: nn.Module | None = None, value_head: bool = True) -> None:
        super().__init__()
        self.lm = lm
        """``peft.PeftModel`` (LoRA) or the plain HF causal LM (full fine-tuning)."""
        self.ref_lm = ref_lm
        """Frozen reference copy for full fine-tuning; None with LoRA (reference = adapter disabled)."""
        if ref_lm is not None:
            ref_lm.requires_grad_(False)
            ref_lm.eval()
        self.value_head: nn.Linear | None = None
        """Critic: final hidden state (after the final norm) -> V(s), float32; None without a critic."""
        if value_head:
            hidden_size = lm.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
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

    def critic_values(
        self,
        hidden: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_slice: tuple[int, int] | None,
        packing: bool,
    ) -> Tensor:
        """(B, S) float32 values V(s) of the policy's final hidden states ``hidden`` (B, S, H): the value head on the
        shared backbone. The other arguments are the forward's, for a critic with a backbone of its own (a subclass).
        """
        assert self.value_head is not None, "critic_values needs a value head"
        # The head reads the hidden state in its own dtype (float32), and the values leave in float32 for the PPO math.
        return self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)

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
            packing: run the rows' real tokens packed into fewer rows (:mod:`lightning_rlhf.models.packing`); each row's
                real tokens must be contiguous. Same results up to rounding; ``"policy"`` and ``"ref"`` only.
            logits_mask: (B, S) bool over the slice: compute logits only where True (``lm_head`` and everything
                after it skip the padding); the logits are then (N, V) for the N True positions in row-major order.
            head: with ``logits_mask``: return ``head``'s per-token outputs instead of the logits
                (:func:`~lightning_rlhf.models.heads.head_outputs`), e.g. logprobs and entropy, computed inside this
                forward.
            head_chunk_size: with ``head``: run ``lm_head`` and ``head`` on this many tokens at a time, recomputed in
                the backward pass, so the (N, V) logits are never held at once; None runs all N together.
            **generate_kwargs: passed to ``generate`` (``mode="generate"`` only).
        Returns:
            ``"policy"``: ``(logits, values)``, (B, S, V) (or (N, V) with ``logits_mask``) in the LM's dtype and
            (B, S) float32 (None without a value head), where S is the slice length (L without a slice). ``"ref"``:
            the reference logits, (B, S, V) or (N, V). With ``head``, its outputs take the logits' place.
            ``"generate"``: (B, L + T') long, the prompts followed by the generated tokens.
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
            values = None
            if self.value_head is not None:
                values = self.critic_values(hidden, input_ids, attention_mask, logits_slice, packing)
            return outputs(unwrap_peft(self.lm), hidden), values
        if self.ref_lm is not None:
            return outputs(self.ref_lm, final_hidden(self.ref_lm, input_ids, attention_mask, logits_slice, packing))
        if head_chunk_size is not None and torch.is_grad_enabled():
            # A chunk's recomputation in the backward pass would run after the block below, with the adapter on.
            raise ValueError("The reference forward with a chunked head must run without grad (torch.no_grad()).")
        with adapter_disabled(self.lm):
            base = unwrap_peft(self.lm)
            return outputs(base, final_hidden(base, input_ids, attention_mask, logits_slice, packing))


class ResponseForward(NamedTuple):
    """Outputs of one forward over prompt + response, at the response positions."""

    logprobs: Tensor
    """(B, T) float32 log-probabilities of the response tokens at the temperature; 0 where the mask is False."""
    values: Tensor | None
    """(B, T) float32 V(s_t), the value before response token t; 0 where the mask is False. None for ``mode="ref"``
    and for a model without a value head."""
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
    options: ForwardOptions = PADDED,
    entropy: str = "none",
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
        options: packing and ``lm_head`` chunking (:class:`~lightning_rlhf.types.ForwardOptions`).
        entropy: one of :data:`ENTROPY`: ``"detached"`` for a logged entropy (its backward over a full vocabulary
            costs several times its forward), ``"grad"`` for an entropy bonus.
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
        packing=options.packing,
        logits_mask=response_mask,
        head=head,
        head_chunk_size=options.lm_head_chunk_size,
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
