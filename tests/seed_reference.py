"""The seed's PPO math (``/work/shared/seed/rlhf_ppo.md``, section 10.3), ported to numpy as an independent oracle.

Kept as close to the seed's text as a runnable port allows: one sequence at a time, Python loops, float64, no masks.
Only what the seed leaves implicit is filled in: ``PPOBuffer`` takes the sequence's rewards and values as arguments
(the seed appends them with ``buffer.add``), and nothing else of the buffer is needed. Do not "improve" this file to
match the package: its value is that it was written from the seed, not from ``lightning_rlhf.functional``.
"""

from __future__ import annotations

import numpy as np


class PPOBuffer:
    """The seed's buffer, reduced to what ``compute_advantages`` reads."""

    def __init__(self, rewards, values, gamma=0.99, lam=0.95):
        self.gamma = gamma  # Discount factor
        self.lam = lam  # GAE lambda
        self.rewards = list(rewards)
        self.values = list(values)

    def compute_advantages(self, last_value=0):
        """Compute GAE advantages (verbatim from the seed)."""
        rewards = np.array(self.rewards, dtype=np.float64)
        values = np.array(self.values, dtype=np.float64)

        advantages = np.zeros(len(rewards))
        last_gae = 0

        for t in reversed(range(len(rewards))):
            # the seed's own if/else, kept rather than folded into a conditional expression
            if t == len(rewards) - 1:  # noqa: SIM108
                next_value = last_value
            else:
                next_value = values[t + 1]

            delta = rewards[t] + self.gamma * next_value - values[t]
            advantages[t] = last_gae = delta + self.gamma * self.lam * last_gae

        returns = advantages + values
        return advantages, returns


def ppo_loss(new_log_probs, old_log_probs, advantages, clip_ratio=0.2):
    """PPO clipped surrogate loss (verbatim from the seed): the mean over one sequence's tokens."""
    # Probability ratio
    ratio = np.exp(new_log_probs - old_log_probs)

    # Clipped ratio
    clipped_ratio = np.clip(ratio, 1 - clip_ratio, 1 + clip_ratio)

    # Take minimum (pessimistic bound)
    loss = -np.mean(np.minimum(ratio * advantages, clipped_ratio * advantages))

    return loss


def value_loss(predicted_values, returns):
    """Simple MSE value loss (verbatim from the seed)."""
    return 0.5 * np.mean((predicted_values - returns) ** 2)
