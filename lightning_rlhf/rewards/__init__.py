"""Sequence-level rewards: the interface, the Hugging Face reward-model scorer, and rule rewards.

- :mod:`~lightning_rlhf.rewards.base`: ``Reward``, :func:`validate_scores`, :func:`call_reward`, :func:`fields_for`
  (which prompt fields a reward takes).
- :mod:`~lightning_rlhf.rewards.scorer`: ``RewardModelScorer`` and :func:`encode_scored_texts`, the one encoding of
  a (prompt, response) pair for a reward model (PPO's scorer and the reward model's training data).
- :mod:`~lightning_rlhf.rewards.rules`: ``CharFractionReward``, ``LexiconSentimentReward``, ``LengthReward``.
- :mod:`~lightning_rlhf.rewards.verifiable`: ``MathAnswerReward`` (a response's answer against the prompt's
  reference, with ``math-verify``) and :func:`last_match`, over :mod:`~lightning_rlhf.rewards.workers`' ``CheckPool``
  (checks in worker processes, a time limit each).
- :mod:`~lightning_rlhf.rewards.combined`: ``CombinedReward``, a weighted sum of named ``RewardComponent`` rewards
  whose raw scores are kept (``PPOModule`` logs them as ``rollout/score/<name>``).
- :mod:`~lightning_rlhf.rewards.remote`: ``RemoteReward``, scores from a server over HTTP (retries, deadlines, clear
  errors), in the wire format of :mod:`~lightning_rlhf.rewards.protocol` (the package's and OpenRLHF's).

Every name is re-exported here: ``class_path: lightning_rlhf.rewards.RewardModelScorer`` keeps working.
"""

from lightning_rlhf.rewards.base import (
    RESERVED_FIELDS,
    TOKEN_INPUTS,
    Reward,
    call_reward,
    fields_for,
    reward_name,
    validate_scores,
)
from lightning_rlhf.rewards.combined import CombinedReward, RewardComponent
from lightning_rlhf.rewards.remote import RemoteReward, RemoteRewardError
from lightning_rlhf.rewards.rules import (
    DEFAULT_NEGATIVE_WORDS,
    DEFAULT_POSITIVE_WORDS,
    CharFractionReward,
    LengthReward,
    LexiconSentimentReward,
)
from lightning_rlhf.rewards.scorer import RewardModelScorer, encode_scored_texts
from lightning_rlhf.rewards.verifiable import MathAnswerReward, check_math_answer, last_match
from lightning_rlhf.rewards.workers import CheckPool, CheckResults

__all__ = [
    "DEFAULT_NEGATIVE_WORDS",
    "DEFAULT_POSITIVE_WORDS",
    "RESERVED_FIELDS",
    "TOKEN_INPUTS",
    "CharFractionReward",
    "CheckPool",
    "CheckResults",
    "CombinedReward",
    "LengthReward",
    "LexiconSentimentReward",
    "MathAnswerReward",
    "RemoteReward",
    "RemoteRewardError",
    "Reward",
    "RewardComponent",
    "RewardModelScorer",
    "call_reward",
    "check_math_answer",
    "encode_scored_texts",
    "fields_for",
    "last_match",
    "reward_name",
    "validate_scores",
]
