"""A user's reward defined outside the package, used from YAML via class_path in test_cli.py."""

import torch

from lightning_rlhf.module import PPOModule


class LengthRewardPPO(PPOModule):
    """Rewards responses whose length is close to ``target_len`` characters."""

    def __init__(self, target_len: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.target_len = target_len

    def reward(self, prompts, responses, **tensors):
        return torch.tensor([max(0.0, 1 - abs(len(r) - self.target_len) / self.target_len) for r in responses])


def vowel_share(prompts, responses):
    """A plain function reward: share of vowels in each response."""
    return torch.tensor([sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses])


def exact_answer(prompts, responses, *, answer):
    """A function reward that names a prompt field: 1.0 where the stripped response is the row's answer."""
    return torch.tensor([float(r.strip() == a) for r, a in zip(responses, answer, strict=True)])
