"""Losses of the supervised stages: SFT's next-token likelihood on response tokens, the reward model's Bradley-Terry."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.functional.checks import check_mask, check_same_shape
from lightning_rlhf.functional.logprobs import logprobs_from_logits
from lightning_rlhf.types import PreferenceLossStats, SFTLossStats


def sft_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, SFTLossStats]:
    """Next-token negative log-likelihood of the trained tokens only (the response), token-mean over the batch.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; a token counts when ``loss_mask`` is True at its own position,
    so prompt and padding tokens add neither loss nor gradient, whatever their logits (TRL ``completion_only_loss``).
    The same as :func:`sft_token_loss` on the logits at the predicting positions.

    Args:
        logits: (B, L, V) unnormalized scores of the causal LM over the whole sequence, any float dtype.
        input_ids: (B, L) long token ids, prompt then response then padding.
        loss_mask: (B, L) bool, True for a token whose prediction is trained (a response token). Position 0 must be
            False: nothing predicts the first token.
    Returns:
        (loss, stats): the scalar mean NLL (0 when no token is trained) and an :class:`SFTLossStats`.
    """
    check_mask(loss_mask, "loss_mask")
    check_same_shape(input_ids=input_ids, loss_mask=loss_mask)
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} but input_ids has {tuple(input_ids.shape)}.")
    predicts = sft_predicting_positions(loss_mask)  # (B, L - 1): position t predicts trained token t + 1
    return sft_token_loss(logits[:, :-1][predicts], input_ids[:, 1:][predicts])


def sft_predicting_positions(loss_mask: Tensor) -> Tensor:
    """(B, L - 1) bool: True at position t when token t + 1 is trained, i.e. where the SFT loss reads logits.

    Args:
        loss_mask: (B, L) bool, True for a trained token; position 0 must be False (nothing predicts it).
    """
    check_mask(loss_mask, "loss_mask")
    if loss_mask[:, 0].any():
        raise ValueError("loss_mask[:, 0] must be False: the first token of a sequence has no prediction to train.")
    return loss_mask[:, 1:]


def sft_token_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, SFTLossStats]:
    """Mean negative log-likelihood of ``targets`` under ``logits`` already gathered at the N trained predictions.

    With the logits of only these positions (``lm_head`` run on N rows instead of B x L), a large vocabulary costs
    no memory or time for prompt and padding positions. The same as :func:`sft_loss_from_terms` of
    :func:`sft_token_terms`, which a chunked ``lm_head`` computes a chunk at a time.

    Args:
        logits: (N, V) unnormalized scores, one row per trained token, any float dtype.
        targets: (N,) long, the token each row must predict.
    Returns:
        (loss, stats): the scalar mean NLL in float32 (0 when N = 0) and an :class:`SFTLossStats`.
    """
    return sft_loss_from_terms(*sft_token_terms(logits, targets))


def sft_token_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token terms of the SFT loss: ``(logprobs, correct)``, each (N,) float32; ``correct`` is 1 where the
    argmax of a row of ``logits`` (N, V) is its target (N,), without a graph."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"Expected logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).float()
    return logprobs_from_logits(logits, targets), correct


def sft_loss_from_terms(logprobs: Tensor, correct: Tensor) -> tuple[Tensor, SFTLossStats]:
    """The SFT loss and its stats from :func:`sft_token_terms`' (N,) outputs: mean NLL (0 when N = 0)."""
    check_same_shape(logprobs=logprobs, correct=correct)
    count = max(logprobs.shape[0], 1)  # a shape, not a host read
    loss = -logprobs.sum() / count
    stats = SFTLossStats(
        token_accuracy=correct.detach().sum() / count,
        num_tokens=torch.tensor(logprobs.shape[0], device=logprobs.device),
    )
    return loss, stats


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, PreferenceLossStats]:
    """Pairwise reward-model loss ``-log sigmoid(r_chosen - r_rejected - margin)``, mean over pairs.

    Bradley and Terry 1952; Ouyang et al. 2022 (InstructGPT) eq. 1 without the 1/C(K, 2) grouping; the margin is
    Touvron et al. 2023 (Llama 2) eq. 2: a pair labelled "much better" must be separated by at least ``margin`` before
    its loss becomes small. Computed as ``softplus(-(diff - margin))``, which is exact for large differences.

    Args:
        chosen_scores: (B,) scalar rewards of the preferred responses (carry the gradient).
        rejected_scores: (B,) scalar rewards of the rejected responses.
        margin: (B,) per-pair target margins, one float for every pair, or None (0).
    Returns:
        (loss, stats): the scalar loss and a :class:`PreferenceLossStats` (accuracy and mean margin ignore ``margin``).
    """
    check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    if chosen_scores.dim() != 1 or chosen_scores.numel() == 0:
        raise ValueError(f"scores must be 1-D with at least one pair, (B,); got shape {tuple(chosen_scores.shape)}.")
    diff = chosen_scores.float() - rejected_scores.float()  # (B,)
    if isinstance(margin, Tensor):
        check_same_shape(chosen_scores=chosen_scores, margin=margin)
        logits = diff - margin.float()
    else:
        logits = diff if margin is None else diff - float(margin)
    loss = torch.nn.functional.softplus(-logits).mean()  # = -log sigmoid(logits)
    with torch.no_grad():
        stats = PreferenceLossStats(
            accuracy=(diff > 0).float().mean(),
            margin=diff.mean(),
            chosen_score=chosen_scores.float().mean(),
            rejected_score=rejected_scores.float().mean(),
        )
    return loss, stats
