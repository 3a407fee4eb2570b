"""The reward interface: ``Reward``, the checks every score goes through, and how a reward is called.

A reward maps a batch of (prompt, response) texts to one float score per sequence, ``(B,)``. Subclass :class:`Reward`
and implement ``__call__`` to add your own; load anything heavy in ``setup(device)``, which the trainer calls once
before training. Every call goes through :func:`call_reward`, which names the reward in any error it raises and checks
the scores with :func:`validate_scores`, so a broken reward fails on the first rollout with a message that says how to
fix it instead of silently training on NaNs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf.errors import list_rows

TOKEN_INPUTS = ("prompt_ids", "response_ids", "response_mask")
"""The policy's token tensors, passed to every :class:`Reward` as keyword arguments."""
RESERVED_FIELDS = ("prompts", "responses", *TOKEN_INPUTS, "allow_non_finite")
"""Names a prompt row's own field cannot take: the reward's other arguments, and :func:`call_reward`'s option."""


class Reward:
    """Base class of a sequence-level reward; the extension point for custom rewards.

    Subclass it and implement ``__call__``. The trainer calls ``setup(device)`` once before training (load models,
    move tensors there) and ``teardown()`` at the end of fit, and in between calls the reward on every rollout with
    the decoded texts and, as keyword arguments, the token tensors of the policy (ignore them unless you need them)
    and the prompt rows' own fields that ``__call__`` names (or all of them, with ``**kwargs``): a ``.jsonl`` row
    ``{"prompt": ..., "answer": "42"}`` gives ``answer=[...]``, one value per response (:func:`call_reward`).

    Example:
        >>> class ShortReward(Reward):
        ...     def __call__(self, prompts, responses, **tensors):
        ...         return torch.tensor([-float(len(r)) for r in responses])
        >>> class ExactAnswer(Reward):
        ...     def __call__(self, prompts, responses, *, answer, **tensors):
        ...         return torch.tensor([float(r.strip() == a) for r, a in zip(responses, answer)])
    """

    def setup(self, device: torch.device) -> None:
        """Prepare for scoring on ``device``: load and move heavy state here, not in ``__init__``. Default: no-op.

        Args:
            device: the device the policy trains on.
        """

    def teardown(self) -> None:
        """Release what ``setup`` started (worker processes, servers); the trainer calls it at the end of fit.
        Default: no-op."""

    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        prompt_ids: Tensor | None = None,
        response_ids: Tensor | None = None,
        response_mask: Tensor | None = None,
    ) -> Tensor:
        """Score each (prompt, response) pair.

        Args:
            prompts: the B prompt texts as given in the data.
            responses: the B decoded responses (special tokens skipped).
            prompt_ids: (B, P) long, left-padded policy prompt tokens.
            response_ids: (B, T) long, right-padded policy response tokens.
            response_mask: (B, T) bool, True for a real response token.

        Returns:
            (B,) floating scores, higher is better, on any device (the caller moves them).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(prompts, responses, **tensors).")


def validate_scores(scores: Any, batch_size: int, source: str, allow_non_finite: bool = False) -> Tensor:
    """Check the output of a reward and return it as a detached ``(B,)`` float32 tensor.

    Lists, tuples and NumPy arrays of numbers are converted with ``torch.as_tensor`` (and then checked like tensors);
    anything else that is not a tensor is an error. Half-precision scores are upcast to float32.

    Args:
        scores: what the reward returned.
        batch_size: B, the number of (prompt, response) pairs scored.
        source: the reward's name, used in error messages.
        allow_non_finite: let NaN and infinity through (the caller decides what to do with them).

    Returns:
        (B,) float32 tensor on the device ``scores`` was on.

    Raises:
        ValueError: naming ``source`` and the fix, if ``scores`` is not a tensor (or convertible), does not have shape
            (B,), is not floating point, or holds NaN or infinity.
    """
    if not isinstance(scores, Tensor):
        converted = None
        if isinstance(scores, list | tuple) or hasattr(scores, "__array__"):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                converted = torch.as_tensor(scores)
        if converted is None:
            raise ValueError(
                f"reward {source} returned {type(scores).__name__}; return a torch.Tensor of shape ({batch_size},) "
                f"with one float score per response (a list or NumPy array of numbers is converted automatically)."
            )
        scores = converted
    if scores.shape != (batch_size,):
        hint = " (use .squeeze(-1))" if scores.shape == (batch_size, 1) else ""
        raise ValueError(
            f"reward {source} returned scores of shape {tuple(scores.shape)}; expected ({batch_size},), one score "
            f"per response{hint}."
        )
    if not scores.is_floating_point():
        raise ValueError(
            f"reward {source} returned scores of dtype {scores.dtype}; rewards must be floating point "
            f"(convert with .float())."
        )
    scores = scores.detach().float()
    if not allow_non_finite and not torch.isfinite(scores).all():
        found = "; ".join(
            f"{kind} in rows {list_rows(rows.tolist())}"
            for kind, rows in (
                ("NaN", torch.isnan(scores).nonzero().flatten()),
                ("inf", torch.isinf(scores).nonzero().flatten()),
            )
            if len(rows)
        )
        raise ValueError(
            f"reward {source} returned non-finite scores ({found}); return finite values (e.g. guard divisions, "
            f"use torch.nan_to_num, or clip)."
        )
    return scores


def reward_name(reward: Callable[..., Any]) -> str:
    """The name used for ``reward`` in messages: a function's qualified name, else the class name."""
    return getattr(reward, "__qualname__", None) or type(reward).__name__


def fields_for(reward: Callable[..., Any], fields: Mapping[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
    """The prompt fields ``reward`` takes: those its signature names after ``(prompts, responses)``, or all of them
    when it takes ``**kwargs``; none when its signature cannot be read.

    Raises:
        ValueError: naming the field and the fix, when ``reward`` requires one (a parameter without a default) that
            ``fields`` lacks.
    """
    try:
        parameters = list(inspect.signature(reward).parameters.values())[2:]  # after prompts, responses
    except (TypeError, ValueError):  # a builtin or extension callable: called as before, with the texts alone
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(fields)
    taken = {}
    for parameter in parameters:
        if parameter.name in TOKEN_INPUTS or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.name in fields:
            taken[parameter.name] = fields[parameter.name]
        elif parameter.default is inspect.Parameter.empty:
            carried = ", ".join(repr(name) for name in sorted(fields)) or "no fields besides the prompt"
            raise ValueError(
                f"reward {reward_name(reward)} needs the prompt field {parameter.name!r} for every response, but the "
                f'prompt rows carry {carried}; add "{parameter.name}" to every row of data.prompts (a .jsonl field '
                f'next to "prompt") or give the parameter a default.'
            )
    return taken


def call_reward(
    reward: Callable[..., Any],
    prompts: list[str],
    responses: list[str],
    /,
    allow_non_finite: bool = False,
    **inputs: Any,
) -> Tensor:
    """Call ``reward`` and return its validated ``(B,)`` float32 scores.

    ``inputs`` are the token tensors (:data:`TOKEN_INPUTS`), which a :class:`Reward` receives as keyword arguments,
    and the prompt rows' own fields (one value per response, e.g. ``answer=[...]``), which any reward receives as
    far as its signature takes them (:func:`fields_for`). A callable that names neither is called as
    ``reward(prompts, responses)``, as before fields existed.

    Args:
        reward: a :class:`Reward` or a plain callable ``(prompts, responses, **fields) -> scores``.
        prompts: the B prompt texts.
        responses: the B response texts.
        allow_non_finite: passed to :func:`validate_scores`.
        **inputs: token tensors and prompt fields.

    Returns:
        (B,) float32 scores, see :func:`validate_scores`.

    Raises:
        ValueError: if ``prompts`` and ``responses`` differ in length, a field does not hold one value per response,
            the reward needs a field the prompts lack, or the scores are invalid.
        RuntimeError: ``reward <Name> raised ...``, chained to whatever the reward raised.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up.")
    tensors = {key: value for key, value in inputs.items() if key in TOKEN_INPUTS}
    fields = {key: value for key, value in inputs.items() if key not in TOKEN_INPUTS}
    for key, values in fields.items():
        if len(values) != len(responses):
            raise ValueError(f"prompt field {key!r} has {len(values)} values for {len(responses)} responses.")
    name = reward_name(reward)
    kwargs = {**(tensors if isinstance(reward, Reward) else {}), **fields_for(reward, fields)}
    try:
        scores = reward(prompts, responses, **kwargs)
    except Exception as err:
        raise RuntimeError(f"reward {name} raised {type(err).__name__}: {err}") from err
    return validate_scores(scores, len(prompts), name, allow_non_finite=allow_non_finite)
