"""Masked statistics over the real tokens: sums, means, variances, whitening, explained variance.

An empty selection has a mean of 0 (``masked_mean`` over an all-False mask, or an all-False row with ``dim``), so a
minibatch without real tokens adds neither loss nor gradient; ``masked_var`` and ``masked_whiten`` need at least two
real entries (one with ``unbiased=False``) and raise ``ValueError`` otherwise: a variance of nothing has no value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.functional.checks import check_mask, check_same_shape

WHITEN_EPS = 1e-8
"""Added to the variance before the square root in ``masked_whiten`` (as TRL, torchtune, cleanrl)."""


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is True; masked-out entries (even NaN or inf) are ignored."""
    check_mask(mask, "mask")
    check_same_shape(x=x, mask=mask)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is True.

    Args:
        x: values, any shape.
        mask: bool, same shape as ``x``; True = include.
        dim: reduce over this dimension only; None reduces over everything.
    Returns:
        A scalar (``dim=None``) or ``x`` reduced over ``dim``. An empty selection gives 0.
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over entries where ``mask`` is True (Bessel-corrected when ``unbiased``).

    Raises:
        ValueError: fewer than two real entries (one when ``unbiased=False``).
    """
    check_mask(mask, "mask")
    count = int(mask.sum())
    needed = 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"mask selects {count} entries; masked_var(unbiased={unbiased}) needs at least {needed}.")
    mean = masked_mean(x, mask)
    # Zero masked-out deviations before squaring: a NaN/inf there would reach the gradient as 0 * 2 * (NaN - mean).
    sq_dev = masked_sum(torch.where(mask, x - mean, 0.0) ** 2, mask)
    return sq_dev / (count - 1 if unbiased else count)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, mean: float | None = None, var: float | None = None
) -> Tensor:
    """Normalize ``x`` to unit variance (and zero mean if ``shift_mean``) over the entries where ``mask`` is True.

    Uses the unbiased variance plus ``WHITEN_EPS``. With ``shift_mean=False`` the mean is added back, so only the
    scale changes (TRL's ``whiten(shift_mean=False)``). Entries where ``mask`` is False are 0 in the result.

    Args:
        x: values, any shape.
        mask: bool, same shape; True = include.
        shift_mean: subtract the mean (True) or only rescale (False).
        mean: precomputed mean to use instead of ``masked_mean(x, mask)`` (e.g. reduced across processes).
        var: precomputed unbiased variance to use instead of ``masked_var(x, mask)``; pass both or neither.
    """
    if (mean is None) != (var is None):
        raise ValueError("masked_whiten: pass both mean and var, or neither.")
    if mean is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        check_mask(mask, "mask")
        mean, var = (
            torch.as_tensor(mean, dtype=x.dtype, device=x.device),
            torch.as_tensor(var, dtype=x.dtype, device=x.device),
        )
    whitened = torch.where(mask, x - mean, 0.0) * torch.rsqrt(var + WHITEN_EPS)  # masked NaN/inf: see masked_var
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over real tokens (cleanrl ``explained_var``).

    Returns NaN when the returns have zero variance (nothing to explain) or fewer than two real tokens exist.
    """
    check_same_shape(values=values, returns=returns, mask=mask)
    # No host read of the token count (a device sync per call on GPU): the count test happens on the device.
    count = mask.sum()
    var_returns, var_residual = _sample_var(returns, mask, count), _sample_var(returns - values, mask, count)
    explained = 1 - var_residual / var_returns.masked_fill(var_returns == 0, 1.0)
    return torch.where((count >= 2) & (var_returns > 0), explained, float("nan"))


def _sample_var(x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """Bessel-corrected variance over ``mask`` without checking ``count`` (garbage, but finite, below 2 entries)."""
    sq_dev = masked_sum(torch.where(mask, x - masked_mean(x, mask), 0.0) ** 2, mask)
    return sq_dev / (count - 1).clamp(min=1)


def moment_sums(x: Tensor) -> Tensor:
    """(3,) float64 ``[count, sum, sum of squares]`` of ``x``: the summary of a batch that adds up across processes."""
    x = x.detach().double().flatten()
    return torch.stack(
        [torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum(), x.square().sum()]
    )
