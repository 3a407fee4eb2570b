"""Reading a decoder's outputs: final hidden states, logits only where asked, heads consumed a chunk at a time.

Every scoring and training forward of the package calls the decoder and ``lm_head`` directly instead of the model's
own forward, so logits are computed only at the positions that need them (the real response tokens, the trained SFT
tokens):

- **No ``output_hidden_states``.** In transformers 5 the hidden-states path installs hooks lazily, which breaks
  pickling after a forward and returns None after unpickling (``ddp_spawn``). It is also cheaper: ``lm_head`` runs
  only on the requested positions.
- **Logit post-processing.** Because ``lm_head`` is called directly, a transform an architecture applies after it is
  lost. Gemma-style ``final_logit_softcapping`` is re-applied here; for everything else :func:`check_logits_path`
  compares this path with the model's own forward on a few tokens and refuses a model whose logits differ (Cohere's
  ``logit_scale``, Granite's ``logits_scaling``, ...) rather than silently train on different logprobs.
"""

from __future__ import annotations

from collections.abc import Callable

import peft
import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from lightning_rlhf.models.packing import pack_rows, unpack, verify_packing
from lightning_rlhf.modes import eval_mode


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model``: the base model of a ``peft.PeftModel`` (its LoRA layers are injected
    there, so calling it runs the active adapter), else ``model`` itself."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


LOGITS_CHECK_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
"""Largest logit difference :func:`check_logits_path` accepts, relative to the largest logit, by the model's dtype."""


def final_hidden(
    causal_lm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_slice: tuple[int, int] | None = None,
    packing: bool = False,
    option: str = "model.ppo.packing",
) -> Tensor:
    """(B, S, H) final hidden states (after the final norm) of a causal LM's decoder at the ``logits_slice`` positions.

    Args:
        causal_lm: a Hugging Face model with ``get_decoder()`` (see :func:`unwrap_peft`): a causal LM, or a sequence
            classifier built on a decoder.
        input_ids: (B, L) long token ids, left and right padding allowed.
        attention_mask: (B, L) bool or int, True/1 for a real token.
        logits_slice: ``(start, end)`` positions to return; None means all L.
        packing: run the rows' real tokens packed into fewer rows (:mod:`lightning_rlhf.models.packing`); each row's
            real tokens must be contiguous. Same results up to rounding.
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


def check_logits_path(lm: nn.Module, option: str = "model.policy") -> None:
    """Refuse a causal LM whose own forward gives other logits than the decoder + ``lm_head`` path of this module
    (:func:`final_hidden`, :func:`lm_logits`), naming ``<option>.name_or_path``."""
    text = lm.config.get_text_config()
    input_ids = torch.arange(4, device=lm.device).remainder(text.vocab_size)[None]  # (1, 4)
    attention_mask = torch.ones_like(input_ids)
    with eval_mode(lm), torch.no_grad():
        theirs = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        ours = lm_logits(lm, final_hidden(lm, input_ids, attention_mask)).float()
    difference = (ours - theirs).abs().max().item()
    if difference > LOGITS_CHECK_TOLERANCE.get(lm.dtype, 1e-4) * max(1.0, theirs.abs().max().item()):
        raise NotImplementedError(
            f"{type(lm).__name__} post-processes its logits after lm_head in a way PolicyValueModel does not "
            f"reproduce (max difference {difference:.3g}); choose another {option}.name_or_path or extend "
            "lm_logits."
        )
