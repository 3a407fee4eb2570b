"""A synthetic world for the offline SFT -> reward model -> PPO demo: prompts, demonstrations, and preference pairs
labelled by a hidden rule. Pure Python, deterministic given a seed; nothing is downloaded.

The world:

- A **prompt** names a topic: ``"topic: owl\\n"``.
- A **demonstration** (what SFT imitates) is ``num_adjectives`` adjectives drawn uniformly from the sunny and the
  gloomy words, then the topic: ``"jolly bleak owl"``. Every adjective has five letters, so length says nothing.
- The hidden **true reward** is the share of sunny words in the response, counting at least ``num_adjectives + 1``
  words: ``#sunny / max(#words, num_adjectives + 1)``. A demonstration scores 0, 1/3 or 2/3 (mean 1/3), so the SFT
  policy leaves room to improve; "merry lucky owl" scores 2/3 and extra or made-up words dilute the share.
- **Preference pairs** hold two demonstrations for the same prompt with different true rewards; the better one is
  labelled ``chosen`` with probability ``1 - label_noise``. The reward model sees only these pairs, never the rule.

Why it works as a demo: a two-layer byte-level model learns the demonstration format in a few hundred steps on CPU,
and the rule is a property of characters (every sunny word ends in "y"; no gloomy word or topic contains one), which
a byte-level reward model picks up from pairs alone. It is also hackable, as real reward models are: a model that
learned "count the letter y" loves "yyyy", which the true reward scores 0. Logging the true reward next to the reward
model's score during PPO (``rollout/true_reward`` vs ``rollout/score``) shows such hacking as a widening gap.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import torch
from torch import Tensor

from lightning_rlhf.rewards import Reward

SUNNY_WORDS = ("happy", "sunny", "lucky", "shiny", "fuzzy", "jolly", "merry", "silky")
"""Words the hidden rule likes: five letters, ending in "y"."""
GLOOMY_WORDS = ("bleak", "stale", "harsh", "cruel", "tired", "grave", "plain", "gruff")
"""Words the hidden rule does not count: five letters, no "y"."""
TOPICS = ("cat", "dog", "owl", "fox", "bee", "cow", "ant", "elk", "hen", "pig", "rat", "bat")
"""Prompt topics: three letters, no "y"."""

_WORD = re.compile(r"[a-z]+")


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
    """The vocabulary and the hidden rule of the synthetic world; see the module docstring."""

    topics: tuple[str, ...] = TOPICS
    """Topics a prompt can name."""
    sunny_words: tuple[str, ...] = SUNNY_WORDS
    """Adjectives the true reward counts."""
    gloomy_words: tuple[str, ...] = GLOOMY_WORDS
    """Adjectives the true reward does not count."""
    num_adjectives: int = 2
    """Adjectives in a demonstration, before the topic word."""

    def __post_init__(self) -> None:
        if self.num_adjectives < 1:
            raise ValueError(f"SyntheticWorld.num_adjectives must be >= 1, got {self.num_adjectives}.")
        for name in ("topics", "sunny_words", "gloomy_words"):
            if not getattr(self, name):
                raise ValueError(f"SyntheticWorld.{name} must not be empty.")
        if both := set(self.sunny_words) & (set(self.gloomy_words) | set(self.topics)):
            raise ValueError(f"SyntheticWorld: sunny words also listed as gloomy words or topics: {sorted(both)}.")

    def prompt(self, topic: str) -> str:
        """The prompt that names ``topic``."""
        return f"topic: {topic}\n"

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` prompts cycling through every topic in shuffled passes (each topic equally often per pass)."""
        rng = random.Random(seed)
        out: list[str] = []
        while len(out) < n:
            order = list(self.topics)
            rng.shuffle(order)
            out.extend(self.prompt(t) for t in order[: n - len(out)])
        return out

    def response(self, topic: str, rng: random.Random) -> str:
        """One demonstration for ``topic``: uniform adjectives, then the topic."""
        adjectives = self.sunny_words + self.gloomy_words
        return " ".join([rng.choice(adjectives) for _ in range(self.num_adjectives)] + [topic])

    def demonstrations(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        """``n`` SFT rows ``{"prompt": ..., "response": ...}`` for shuffled topics."""
        rng = random.Random(seed)
        return [{"prompt": self.prompt(t), "response": self.response(t, rng)} for t in self._topics(n, rng)]

    def preference_pairs(self, n: int, seed: int = 0, label_noise: float = 0.1) -> list[dict[str, str]]:
        """``n`` preference rows ``{"prompt", "chosen", "rejected"}`` labelled by the true reward, with noise.

        Both responses are demonstrations for the same prompt with different true rewards; the better one is
        ``chosen`` with probability ``1 - label_noise``.
        """
        if not 0 <= label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}; at 0.5 the labels carry no signal.")
        rng = random.Random(seed)
        rows = []
        for topic in self._topics(n, rng):
            prompt = self.prompt(topic)
            while True:
                a, b = self.response(topic, rng), self.response(topic, rng)
                if self.true_reward(prompt, a) != self.true_reward(prompt, b):
                    break
            better, worse = (a, b) if self.true_reward(prompt, a) > self.true_reward(prompt, b) else (b, a)
            if rng.random() < label_noise:
                better, worse = worse, better
            rows.append({"prompt": prompt, "chosen": better, "rejected": worse})
        return rows

    def true_reward(self, prompt: str, response: str) -> float:
        """The hidden rule: ``#sunny words / max(#words, num_adjectives + 1)``, in [0, 1]; the prompt is ignored."""
        words = _WORD.findall(response.lower())
        sunny = sum(w in self.sunny_words for w in words)
        return sunny / max(len(words), self.num_adjectives + 1)

    def _topics(self, n: int, rng: random.Random) -> list[str]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        return [rng.choice(self.topics) for _ in range(n)]


WORLD = SyntheticWorld()
"""The world the pipeline recipes, the data modules' ``synthetic: true`` and :class:`SyntheticTrueReward` use."""


class SyntheticTrueReward(Reward):
    """The synthetic world's hidden rule as a reward: for evaluation (PPO ``eval_reward``), or as an oracle."""

    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """(B,) float32 true rewards in [0, 1]."""
        return torch.tensor([WORLD.true_reward(p, r) for p, r in zip(prompts, responses, strict=True)])


def write_jsonl(rows: list[dict[str, str]], path: str | Path) -> None:
    """Write ``rows`` as JSON Lines (one object per line, UTF-8)."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
