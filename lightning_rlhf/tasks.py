"""Built-in tasks: deterministic prompt generators paired with a default rule reward, so a run needs no downloads.

A task's prompts are the combinations of a few fixed word lists (one entry from each, joined), drawn in a seeded
random order. ``PromptDataModule(task="sentiment")`` uses them; pair the policy with the task's default reward
(``Task.reward_class_path``, or ``Task.default_reward()``).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_rlhf.rewards import Reward


@dataclasses.dataclass(frozen=True)
class Task:
    """A named prompt generator with the reward it is meant to be trained with."""

    name: str
    """Registry key, e.g. ``"sentiment"``."""
    description: str
    """One line for docs and ``--help``."""
    reward_class_path: str
    """Import path of the default reward, e.g. ``"lightning_rlhf.rewards.LexiconSentimentReward"``."""
    parts: tuple[tuple[str, ...], ...]
    """Word lists; a prompt is one entry of each, concatenated in order, with its first letter capitalised."""

    @property
    def num_distinct(self) -> int:
        """How many different prompts the word lists make."""
        count = 1
        for options in self.parts:
            count *= len(options)
        return count

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` prompts in a random order fixed by ``seed``.

        Every distinct prompt appears once, in shuffled order, before any repeats; beyond ``num_distinct`` the
        sequence continues with further independently shuffled passes.

        Args:
            n: number of prompts (>= 0).
            seed: seed of the order; the same ``(n, seed)`` always gives the same list.

        Returns:
            ``n`` prompt strings.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        every = ["".join(combo) for combo in itertools.product(*self.parts)]
        every = [p[:1].upper() + p[1:] for p in every]
        rng = random.Random(seed)
        out: list[str] = []
        while len(out) < n:
            order = every.copy()
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    def default_reward(self) -> Reward:
        """A new instance of the default reward (``reward_class_path``) with its default arguments."""
        module, _, cls = self.reward_class_path.rpartition(".")
        return getattr(importlib.import_module(module), cls)()


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

TASKS: dict[str, Task] = {t.name: t for t in (LOWERCASE, SENTIMENT)}
"""The registry of built-in tasks by name."""


def get_task(name: str) -> Task:
    """The built-in task called ``name``.

    Raises:
        ValueError: listing the known names if ``name`` is not one of them.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}.")
    return TASKS[name]
