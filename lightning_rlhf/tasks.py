"""Built-in tasks: deterministic prompt generators paired with a default reward, so a run needs no downloads.

A task is a fixed, finite set of rows (``{"prompt": ..., **fields}``) drawn in a seeded random order: every distinct
row once per shuffled pass (:meth:`BaseTask.rows`). The word-list tasks (:class:`Task`: ``lowercase``, ``sentiment``)
make their prompts from a few word lists and carry no fields; :class:`ArithmeticTask` (``arithmetic``) writes small
integer problems whose rows carry the reference answer, ``{"prompt": "What is 17 + 25? ...", "answer": "42"}``, for
``MathAnswerReward``. ``PromptDataModule(task="sentiment")`` uses them; pair the policy with the task's default reward
(``reward_class_path``, or ``default_reward()``).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import itertools
import operator
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from lightning_rlhf.rewards import Reward

Row = TypeVar("Row")


def _shuffled_passes(every: Sequence[Row], n: int, seed: int) -> list[Row]:
    """``n`` items of ``every``: each once in an order shuffled by ``seed``, then further independently shuffled
    passes."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = random.Random(seed)
    out: list[Row] = []
    while len(out) < n:
        order = list(every)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


@dataclasses.dataclass(frozen=True)
class BaseTask(abc.ABC):
    """A named, finite set of prompt rows with the reward it is meant to be trained with."""

    name: str
    """Registry key, e.g. ``"sentiment"``."""
    description: str
    """One line for docs and ``--help``."""
    reward_class_path: str
    """Import path of the default reward, e.g. ``"lightning_rlhf.rewards.LexiconSentimentReward"``."""

    @abc.abstractmethod
    def every_row(self) -> list[dict[str, str]]:
        """Every distinct row, ``{"prompt": ..., **fields}``, in a fixed order (before shuffling)."""

    @property
    def num_distinct(self) -> int:
        """How many different rows (prompts) the task makes."""
        return len(self.every_row())

    def rows(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        """``n`` rows ``{"prompt": str, **fields}`` in a random order fixed by ``seed``.

        Every distinct row appears once, in shuffled order, before any repeats; beyond ``num_distinct`` the sequence
        continues with further independently shuffled passes. The fields besides ``"prompt"`` are the prompt fields a
        reward receives (e.g. ``answer``); the word-list tasks have none.

        Args:
            n: number of rows (>= 0).
            seed: seed of the order; the same ``(n, seed)`` always gives the same list.

        Returns:
            ``n`` new dicts.
        """
        return [dict(row) for row in _shuffled_passes(self.every_row(), n, seed)]

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """The prompt texts of :meth:`rows` ``(n, seed)``, in the same order."""
        return [row["prompt"] for row in self.rows(n, seed)]

    def default_reward(self) -> Reward:
        """A new instance of the default reward (``reward_class_path``) with its default arguments."""
        module, _, cls = self.reward_class_path.rpartition(".")
        return getattr(importlib.import_module(module), cls)()


@dataclasses.dataclass(frozen=True)
class Task(BaseTask):
    """A word-list task: every combination of one entry from each list, joined, is a prompt; rows carry no fields."""

    parts: tuple[tuple[str, ...], ...]
    """Word lists; a prompt is one entry of each, concatenated in order, with its first letter capitalised."""

    def every_row(self) -> list[dict[str, str]]:
        every = ["".join(combo) for combo in itertools.product(*self.parts)]
        return [{"prompt": p[:1].upper() + p[1:]} for p in every]


OPERATIONS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
"""The operators an :class:`ArithmeticTask` may use, as written in its prompts."""


@dataclasses.dataclass(frozen=True)
class ArithmeticTask(BaseTask):
    """Problems ``a <op> b`` of integers in ``[1, max_operand]``, each row with its reference answer.

    A row is ``{"prompt": "What is 17 + 25? Put the answer in \\boxed{}.", "answer": "42"}``: the answer is a
    string (a ``.jsonl`` answer field is one too), negative for a subtraction whose ``b`` exceeds ``a``.
    """

    max_operand: int = 50
    """The largest operand; operands run from 1 to it."""
    operators: tuple[str, ...] = ("+", "-", "*")
    """Operators used, each a key of :data:`OPERATIONS`."""

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ValueError(f"ArithmeticTask max_operand must be >= 1, got {self.max_operand}.")
        if not self.operators or not set(self.operators) <= set(OPERATIONS):
            raise ValueError(
                f"ArithmeticTask operators={self.operators!r} must be one or more of {', '.join(OPERATIONS)}."
            )

    def every_row(self) -> list[dict[str, str]]:
        operands = range(1, self.max_operand + 1)
        return [
            {"prompt": f"What is {a} {op} {b}? Put the answer in \\boxed{{}}.", "answer": str(OPERATIONS[op](a, b))}
            for op in self.operators
            for a in operands
            for b in operands
        ]


LOWERCASE = Task(
    name="lowercase",
    description="Short requests to say something; rewarded for writing only lowercase letters and spaces.",
    reward_class_path="lightning_rlhf.rewards.CharFractionReward",
    parts=(
        ("say", "write", "type", "tell me", "give me", "show me", "print"),
        (" something", " a word", " a few words", " a sentence", " anything", " a line", " a phrase", " a name"),
        (": ", " now: ", " please: ", "! "),
    ),
)
"""7 x 8 x 4 = 224 prompts such as ``"Write a few words please: "``."""

SENTIMENT = Task(
    name="sentiment",
    description="Movie-review openings to continue; rewarded for positive words (a lexicon, like GPT-2 IMDB).",
    reward_class_path="lightning_rlhf.rewards.LexiconSentimentReward",
    parts=(
        ("", "honestly, ", "to be fair, ", "in my opinion, ", "after the premiere, ", "i have to say "),
        (
            "the movie",
            "this film",
            "the sequel",
            "the ending",
            "the acting",
            "the soundtrack",
            "the story",
            "the director's new film",
            "the cast",
            "the first half",
        ),
        (" was", " is", " felt", " seemed", " turned out to be", " was, in a word,"),
    ),
)
"""6 x 10 x 6 = 360 prompts such as ``"Honestly, the sequel turned out to be"`` (no trailing space)."""

ARITHMETIC = ArithmeticTask(
    name="arithmetic",
    description="Integer problems such as 17 + 25 with their answers; rewarded for the right answer (math-verify).",
    reward_class_path="lightning_rlhf.rewards.MathAnswerReward",
)
"""3 x 50 x 50 = 7500 problems (+, -, * of the integers 1 to 50), such as
``"What is 17 + 25? Put the answer in \\boxed{}."`` with ``answer: "42"``."""

TASKS: dict[str, BaseTask] = {t.name: t for t in (ARITHMETIC, LOWERCASE, SENTIMENT)}
"""The registry of built-in tasks by name."""


def get_task(name: str) -> BaseTask:
    """The built-in task called ``name``.

    Raises:
        ValueError: listing the known names if ``name`` is not one of them.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}.")
    return TASKS[name]
