"""Rule rewards for the built-in tasks: pure Python, deterministic, counting Unicode characters of the decoded
response, not tokens."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_rlhf.rewards.base import Reward


def _word_list(words: Sequence[str]) -> frozenset[str]:
    return frozenset(w.lower() for w in words)


class CharFractionReward(Reward):
    """Share of the response's characters that belong to ``chars``: ``matches / max(len(response), min_len)``.

    With the default, the policy learns to write lowercase letters and spaces, a task a tiny random byte-level model
    starts near chance at (27 of 384 ByT5 tokens) and learns in a few dozen PPO steps.

    ``min_len`` closes the obvious hack of a plain fraction: without it, "a" followed by EOS scores 1.0, and PPO
    finds that within a hundred steps (responses shrink to one letter). Set it to ``max_new_tokens`` so that only
    a full-length response of rewarded characters scores 1.

    Args:
        chars: the rewarded characters.
        min_len: the smallest denominator; 0 gives the plain fraction (an empty response scores 0).
    """

    def __init__(self, chars: str = "abcdefghijklmnopqrstuvwxyz ", min_len: int = 0) -> None:
        if not chars:
            raise ValueError("CharFractionReward chars must not be empty.")
        if min_len < 0:
            raise ValueError(f"CharFractionReward min_len must be >= 0, got {min_len}.")
        self.chars = chars
        self.min_len = min_len
        self._set = frozenset(chars)

    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """(B,) float32 share in [0, 1]."""
        scores = [sum(c in self._set for c in r) / max(len(r), self.min_len, 1) for r in responses]
        return torch.tensor(scores, dtype=torch.float32)


# fmt: off


# fmt: off
DEFAULT_POSITIVE_WORDS = (
    "good", "great", "excellent", "amazing", "wonderful", "fantastic", "brilliant", "superb", "beautiful", "lovely",
    "enjoyable", "fun", "funny", "delightful", "charming", "moving", "touching", "best", "love", "loved", "loving",
    "perfect", "masterpiece", "awesome", "happy", "impressive", "memorable", "stunning", "recommend", "gripping",
)
"""Default positive lexicon of :class:`LexiconSentimentReward`."""

DEFAULT_NEGATIVE_WORDS = (
    "bad", "terrible", "awful", "horrible", "boring", "dull", "worst", "poor", "weak", "waste", "hate",
    "hated", "stupid", "annoying", "disappointing", "disappointed", "mediocre", "bland", "predictable", "painful",
    "ugly", "mess", "pointless", "forgettable", "lame", "slow", "tedious", "unwatchable", "cheap", "clumsy",
)
"""Default negative lexicon of :class:`LexiconSentimentReward`."""
# fmt: on

_WORD = re.compile(r"[a-z']+")


class LexiconSentimentReward(Reward):
    """Positivity of the response, in the spirit of the GPT-2 IMDB sentiment example, from a word lexicon.

    ``score = clip((#positive words - #negative words) / max(1, #words), -1, 1)``, where words are runs of letters and
    apostrophes of the lowercased response and each occurrence counts.

    Args:
        positive: positive words (matched lowercase); defaults to ``DEFAULT_POSITIVE_WORDS``.
        negative: negative words (matched lowercase); defaults to ``DEFAULT_NEGATIVE_WORDS``.
    """

    def __init__(self, positive: list[str] | None = None, negative: list[str] | None = None) -> None:
        self.positive = _word_list(DEFAULT_POSITIVE_WORDS if positive is None else positive)
        self.negative = _word_list(DEFAULT_NEGATIVE_WORDS if negative is None else negative)
        if both := self.positive & self.negative:
            raise ValueError(f"LexiconSentimentReward: words in both lexicons: {sorted(both)}.")

    def score(self, text: str) -> float:
        """The score of one text, see the class docstring."""
        words = _WORD.findall(text.lower())
        net = sum(w in self.positive for w in words) - sum(w in self.negative for w in words)
        return min(max(net / max(1, len(words)), -1.0), 1.0)

    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """(B,) float32 scores in [-1, 1]."""
        return torch.tensor([self.score(r) for r in responses], dtype=torch.float32)


class LengthReward(Reward):
    """Closeness of the response length (in characters) to a target: ``clip(1 - |len - target| / target, 0, 1)``.

    Trivial to hack on purpose: handy in tests and for seeing reward hacking happen.

    Args:
        target_len: the rewarded length in characters (> 0).
    """

    def __init__(self, target_len: int = 20) -> None:
        if target_len <= 0 or not math.isfinite(target_len):
            raise ValueError(f"LengthReward target_len must be > 0, got {target_len}.")
        self.target_len = target_len

    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """(B,) float32 scores in [0, 1]."""
        t = self.target_len
        return torch.tensor([min(max(1 - abs(len(r) - t) / t, 0.0), 1.0) for r in responses], dtype=torch.float32)
