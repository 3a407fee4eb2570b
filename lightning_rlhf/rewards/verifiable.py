"""Verifiable rewards: a response's final answer checked against the prompt's reference answer.

:class:`MathAnswerReward` scores 1 when the answer a response gives equals the row's reference answer, as Hugging
Face's ``math-verify`` decides it (it parses LaTeX and plain expressions, and compares them numerically and
symbolically: ``\\frac{1}{2}`` equals ``0.5``), else 0; plus an optional format reward for a ``\\boxed{...}``
answer. The reference comes from the prompt's own field (``answer`` by default: a ``.jsonl`` row
``{"prompt": ..., "answer": "42"}``, see :func:`lightning_rlhf.rewards.call_reward`). Checks run in worker
processes with a time limit each (:class:`~lightning_rlhf.rewards.workers.CheckPool`): sympy can hang on a crafted
expression, and a check that hangs or crashes scores 0, with a warning that counts them, instead of stalling the run.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf.rewards.base import Reward
from lightning_rlhf.rewards.workers import CheckPool

BOXED = re.compile(r"\\boxed\s*\{")
"""A ``\\boxed{`` in a response: the answer format the prompts ask for."""


def check_math_answer(item: tuple[str, str, str | None]) -> float:
    """1.0 when ``response`` (or the last match of ``pattern`` in it) gives the answer ``reference``, else 0.0.

    ``math_verify.parse`` extracts the answer (a ``\\boxed{}`` first, then LaTeX or a plain expression, as its
    default extraction does) and ``math_verify.verify(gold, answer)`` compares. Its own signal-based timeouts are
    off: the worker's time limit is the one that counts. Runs in a worker process (see :class:`MathAnswerReward`).
    """
    from math_verify import parse, verify  # in the worker: the parent does not need it loaded

    response, reference, pattern = item
    if pattern is not None:
        matches = re.findall(pattern, response)
        if not matches:
            return 0.0
        last = matches[-1]
        response = last if isinstance(last, str) else last[0]
    gold = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$", parsing_timeout=None)
    answer = parse(response, parsing_timeout=None)
    if not gold or not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=None))


class MathAnswerReward(Reward):
    """``correct + format_reward * has_boxed``: 1 for a response whose answer equals the prompt's reference answer
    (``math-verify``), plus ``format_reward`` when it writes the answer in ``\\boxed{}``.

    The worker processes start in ``setup`` (the trainer calls it once) and stop in ``teardown`` (at the end of fit).

    Args:
        answer_field: the prompt field holding the reference answer, a string such as ``"42"`` or ``"\\frac{1}{2}"``.
        pattern: a regular expression whose last match in the response is the answer (its first group, if it has
            one), e.g. ``"#### (.+)"`` for GSM8K-style answers; None lets ``math-verify`` find it (a ``\\boxed{}``
            first, then the last expression).
        format_reward: added to the score of a response that contains ``\\boxed{...}``.
        num_workers: checking processes.
        timeout_s: seconds one check may take before it scores 0.
    """

    def __init__(
        self,
        answer_field: str = "answer",
        pattern: str | None = None,
        format_reward: float = 0.0,
        num_workers: int = 2,
        timeout_s: float = 5.0,
    ) -> None:
        if pattern is not None:
            re.compile(pattern)  # a bad pattern fails here, naming itself
        self.answer_field, self.pattern, self.format_reward = answer_field, pattern, format_reward
        self.pool = CheckPool(check_math_answer, num_workers=num_workers, timeout_s=timeout_s)

    def setup(self, device: torch.device) -> None:
        self.pool.start()

    def teardown(self) -> None:
        self.pool.close()

    def __call__(self, prompts: list[str], responses: list[str], **inputs: Any) -> Tensor:
        """(B,) float32 scores: 1 or 0 for the answer, plus ``format_reward`` for a boxed one."""
        if self.answer_field not in inputs:
            present = sorted(k for k in inputs if k not in ("prompt_ids", "response_ids", "response_mask"))
            raise ValueError(
                f"MathAnswerReward needs the prompt field {self.answer_field!r} (answer_field) with each response; "
                f"the prompts carry {present or 'no fields'}: add it to every row of data.prompts or set answer_field."
            )
        references = inputs[self.answer_field]
        if bad := [i for i, ref in enumerate(references) if not isinstance(ref, str)]:
            raise ValueError(
                f'MathAnswerReward: prompt field {self.answer_field!r} must be a string (e.g. "42"), got '
                f"{type(references[bad[0]]).__name__} {references[bad[0]]!r} for response {bad[0]}; quote the answers."
            )
        checked = self.pool.map([(r, ref, self.pattern) for r, ref in zip(responses, references, strict=True)], 0.0)
        if checked.timed_out or checked.crashed:
            warnings.warn(
                f"MathAnswerReward: {checked.timed_out} of {len(responses)} checks ran past timeout_s="
                f"{self.pool.timeout_s} and {checked.crashed} crashed; they scored 0.",
                stacklevel=2,
            )
        boxed = [float(bool(BOXED.search(r))) for r in responses]
        scores = torch.tensor(checked.values, dtype=torch.float32)
        return scores + self.format_reward * torch.tensor(boxed, dtype=torch.float32)
