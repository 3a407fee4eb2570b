"""Critic-free advantages: group-relative baselines over the several responses sampled for one prompt.

A *group* is the responses sampled for the same prompt; ``group_index`` (B,) long names each response's group (any
ids; the rollout numbers its prompts). Every function works on one number per response, ``returns`` (B,): the sum of
its per-token rewards, as verl's estimators take it (``token_level_rewards.sum(-1)``), so the score plus, with the KL
in the reward, ``-kl_coef`` times its summed KL. Per-token advantages are that number on each real token
(:func:`broadcast_to_tokens`).

| estimator | advantage of response i in group g (n responses) | source |
|---|---|---|
| GRPO | ``(R_i - mean_g) / (std_g + eps)``, std unbiased, ``eps`` 1e-6 | Shao et al. 2024 (DeepSeekMath), eq. 3 |
| Dr. GRPO | ``R_i - mean_g`` | Liu et al. 2025 ("Understanding R1-Zero-like training"), sec. 3.2 |
| RLOO | ``R_i - mean_{g without i}`` ``= n / (n - 1) * (R_i - mean_g)`` | Ahmadian et al. 2024, eq. 7 |
| REINFORCE++-baseline | ``R_i - mean_g``, then whitened over the batch (the caller) | Hu 2025, sec. 3 |

The formulas match verl's ``compute_grpo_outcome_advantage`` (``norm_adv_by_std_in_grpo`` False for Dr. GRPO),
``compute_rloo_outcome_advantage`` and ``compute_reinforce_plus_plus_baseline_outcome_advantage``
(``verl/trainer/ppo/core_algos.py``) and OpenRLHF's ``group_norm`` / ``rloo`` / ``reinforce_baseline``
(``openrlhf/trainer/ppo_utils/experience_maker.py``). Where this departs: a group of one response is an error (verl
gives it mean 0 and std 1, i.e. no baseline at all); and GRPO's std can come from the whole batch instead
(``std_norm="batch"``, TRL's ``scale_rewards="batch"``). REINFORCE++ itself (no group) is
:func:`~lightning_rlhf.functional.ppo.discounted_returns`, whitened by the caller.

Pure torch: no Lightning import, inputs never written.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_rlhf.functional.checks import check_choice, check_mask

GroupStdNorm = Literal["group", "batch", "none"]
GROUP_STD_NORMS: tuple[str, ...] = ("group", "batch", "none")
GROUP_STD_EPS = 1e-6
"""Added to the standard deviation before GRPO divides by it (verl's ``epsilon``)."""


def _groups(returns: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """``(inverse, counts)``: each row's group as 0..G-1, and each group's size; checks shapes and group sizes."""
    if returns.dim() != 1 or group_index.shape != returns.shape:
        raise ValueError(
            f"returns and group_index must both be (B,), got {tuple(returns.shape)} and {tuple(group_index.shape)}."
        )
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError(
            "a group of one response has no baseline: every group_index value must name at least two responses "
            "(sample several responses per prompt)."
        )
    return inverse, counts


def group_mean(returns: Tensor, group_index: Tensor) -> Tensor:
    """(B,) float32: for each response, the mean of ``returns`` over its group (itself included)."""
    inverse, counts = _groups(returns, group_index)
    sums = torch.zeros(counts.shape, dtype=torch.float64, device=returns.device).index_add(0, inverse, returns.double())
    return (sums / counts)[inverse].float()


def group_std(returns: Tensor, group_index: Tensor) -> Tensor:
    """(B,) float32: for each response, the unbiased (Bessel-corrected) standard deviation of its group's ``returns``
    (``torch.std``, as verl)."""
    inverse, counts = _groups(returns, group_index)
    deviation = returns.double() - group_mean(returns, group_index).double()
    squares = torch.zeros(counts.shape, dtype=torch.float64, device=returns.device).index_add(
        0, inverse, deviation.square()
    )
    return (squares / (counts - 1)).sqrt()[inverse].float()


def zero_std_groups(scores: Tensor, group_index: Tensor) -> Tensor:
    """(B,) bool, True for the responses of a group whose scores are all equal: its group-relative advantages are all
    0, so it carries no learning signal (DAPO's dynamic sampling drops such groups, Yu et al. 2025, sec. 3.2)."""
    inverse, counts = _groups(scores, group_index)
    low = torch.full(counts.shape, float("inf"), dtype=scores.dtype, device=scores.device)
    high = torch.full(counts.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    low = low.scatter_reduce(0, inverse, scores, reduce="amin")
    high = high.scatter_reduce(0, inverse, scores, reduce="amax")
    return (low == high)[inverse]


def grpo_advantages(
    returns: Tensor,
    group_index: Tensor,
    std_norm: GroupStdNorm = "group",
    batch_std: float | None = None,
    eps: float = GROUP_STD_EPS,
) -> Tensor:
    """(B,) GRPO advantages (Shao et al. 2024, eq. 3): ``returns`` minus its group's mean, divided by a std + ``eps``.

    Args:
        returns: (B,) one number per response (its summed per-token reward).
        group_index: (B,) long, each response's group (at least two responses each).
        std_norm: ``"group"``: the group's unbiased std (GRPO); ``"batch"``: ``batch_std``, the std of every response
            of the batch (TRL ``scale_rewards="batch"``); ``"none"``: no division (Dr. GRPO, Liu et al. 2025).
        batch_std: with ``"batch"``: the unbiased std of ``returns`` over the whole batch (over every process when the
            caller reduces it); None computes it from ``returns``.
        eps: added to the std.
    """
    check_choice(std_norm, GROUP_STD_NORMS, "group_std_norm")
    centered = returns.float() - group_mean(returns, group_index)
    if std_norm == "none":
        return centered
    if std_norm == "group":
        return centered / (group_std(returns, group_index) + eps)
    std = returns.double().std() if batch_std is None else torch.as_tensor(batch_std, dtype=torch.float64)
    return centered / (std.to(returns.device) + eps).float()


def rloo_advantages(returns: Tensor, group_index: Tensor) -> Tensor:
    """(B,) RLOO advantages (Ahmadian et al. 2024, eq. 7): ``returns`` minus the mean of the *other* responses of its
    group, ``n / (n - 1) * (R_i - mean_g)`` for a group of n (verl's form)."""
    inverse, counts = _groups(returns, group_index)
    n = counts[inverse].double()
    return (n / (n - 1) * (returns.double() - group_mean(returns, group_index).double())).float()


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """(B, T) float32: each response's advantage (B,) on every one of its real tokens, 0 elsewhere."""
    check_mask(response_mask)
    if advantages.shape != response_mask.shape[:1]:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected ({response_mask.shape[0]},), one per response."
        )
    return torch.where(response_mask, advantages.float()[:, None], 0.0)
