"""Verifiable rewards: a response's final answer checked against the prompt's reference answer.

:class:`MathAnswerReward` scores 1 when the answer a response gives equals the row's reference answer, as Hugging
Face's ``math-verify`` decides it (it parses LaTeX and plain expressions, and compares them numerically and
symbolically: ``\\frac{1}{2}`` equals ``0.5``), else 0; plus an optional format reward for a ``\\boxed{...}``
answer. The reference comes from the prompt's own field (``answer`` by default: a ``.jsonl`` row
``{"prompt": ..., "answer": "42"}``, see :func:`lightning_rlhf.rewards.call_reward`), or from the last match of
``reference_pattern`` in it (GSM8K's answer column is a worked solution ending in ``#### 72``). Thousands separators
are left to ``math-verify``, which reads a comma before three digits as one (``1,234`` equals ``1234``, in the
reference and in the response) and ``1,2`` as the set {1, 2}: stripping commas first would turn that set into 12.

Checks run in worker processes with a time limit each (:class:`~lightning_rlhf.rewards.workers.CheckPool`): sympy can
hang on a crafted expression, and a check that hangs or crashes scores 0, with a warning that counts them, instead of
stalling the run.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf.rewards.base import TOKEN_INPUTS, Reward
from lightning_rlhf.rewards.workers import CheckPool

BOXED = re.compile(r"\\boxed\s*\{")
"""A ``\\boxed{`` in a response: the answer format the prompts ask for."""


def last_match(pattern: str | re.Pattern[str], text: str) -> str | None:
    """The last match of ``pattern`` in ``text`` (its first group, if it has groups), or None without a match."""
    matches = re.findall(pattern, text)
    if not matches:
        return None
    last = matches[-1]
    return last if isinstance(last, str) else last[0]


def check_math_answer(item: tuple[str, str, str | None]) -> float:
    """1.0 when ``response`` (or the last match of ``pattern`` in it) gives the answer ``reference``, else 0.0.

    ``math_verify.parse`` extracts the answer (a ``\\boxed{}`` first, then LaTeX or a plain expression, as its
    default extraction does) and ``math_verify.verify(gold, answer)`` compares. Its own signal-based timeouts are
    off: the worker's time limit is the one that counts. Runs in a worker process (see :class:`MathAnswerReward`).
    """
    from math_verify import parse, verify  # in the worker: the parent does not need it loaded

    response, reference, pattern = item
    if pattern is not None:
        found = last_match(pattern, response)
        if found is None:
            return 0.0
        response = found
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
        reference_pattern: a regular expression whose last match in the reference field is the reference answer
            (its first group, if it has one, stripped of surrounding whitespace), e.g. ``"####\\s*(.+)"`` for
            GSM8K, whose answer column is a worked solution ending in ``#### 72``; None takes the whole field. A
            reference without a (non-empty) match is an error, raised before any check.
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
        reference_pattern: str | None = None,
    ) -> None:
        for name, value in (("pattern", pattern), ("reference_pattern", reference_pattern)):
            if value is not None:
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"MathAnswerReward {name}={value!r} is not a regular expression: {err}.") from err
        self.answer_field, self.pattern, self.format_reward = answer_field, pattern, format_reward
        self.reference_pattern = reference_pattern
        self.pool = CheckPool(check_math_answer, num_workers=num_workers, timeout_s=timeout_s)

    def setup(self, device: torch.device) -> None:
        self.pool.start()

    def teardown(self) -> None:
        self.pool.close()

    def __call__(self, prompts: list[str], responses: list[str], **inputs: Any) -> Tensor:
        """(B,) float32 scores: 1 or 0 for the answer, plus ``format_reward`` for a boxed one."""
        if self.answer_field not in inputs:
            present = sorted(k for k in inputs if k not in TOKEN_INPUTS)
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
        if self.reference_pattern is not None:
            references = self._reference_answers(references, self.reference_pattern)
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

    def _reference_answers(self, references: list[str], pattern: str) -> list[str]:
        """Each reference's answer: the last match of ``pattern`` (its first group), stripped; a ValueError naming
        ``reference_pattern``, the response and the value for a reference without a non-empty match."""
        answers = []
        for index, reference in enumerate(references):
            found = last_match(pattern, reference)
            if found is None or not found.strip():
                shown = reference if len(reference) <= 200 else f"...{reference[-200:]}"
                raise ValueError(
                    f"MathAnswerReward: reference_pattern={pattern!r} has no non-empty match in the "
                    f"prompt field {self.answer_field!r} of response {index}, {shown!r}; fix that row's answer or "
                    "set reference_pattern to match every row (null takes the whole field)."
                )
            answers.append(found.strip())
        return answers
