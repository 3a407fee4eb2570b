"""Records passed between the rollout, the math and the module.

Shapes and mask polarity, stated once for the whole package:

- ``B`` is the number of sequences in a rollout, ``P`` the padded prompt length, ``T`` the padded response length.
- Prompts are **left**-padded: ``prompt_mask[b, p]`` is True for a real prompt token.
- Responses are **right**-padded: ``response_mask[b, t]`` is True for a real response token. The stop token (EOS or
  an extra stop token) is a real token, every column after it is False. Every row has at least one real token.
- Per-token tensors ``(B, T)`` hold the quantity for response token ``t``: ``old_logprobs[b, t]`` is
  log pi_old(response_ids[b, t] | prompt, response_ids[b, :t]) and ``old_values[b, t]`` is V(s_t), the value of the
  state *before* that token is emitted. Entries where ``response_mask`` is False are 0 and carry no meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class PolicyLossStats(NamedTuple):
    """Diagnostics of one ``policy_loss`` call; detached scalars over real tokens."""

    clipfrac: Tensor
    """Fraction of tokens whose clipped surrogate is the active term (gradient zeroed by the clip)."""
    approx_kl: Tensor
    """k3 estimate of KL(pi_old || pi): mean of (r - 1) - log r; >= 0 and unbiased (Schulman 2020)."""
    approx_kl_k1: Tensor
    """k1 estimate: mean of -log r = mean(old_logprob - logprob); unbiased, can be negative."""
    ratio_mean: Tensor
    """Mean probability ratio r = pi / pi_old."""
    ratio_max: Tensor
    """Largest probability ratio in the batch; a blow-up shows here first."""
    dual_clipfrac: Tensor
    """Fraction of tokens capped by the dual clip (0 when dual clipping is off)."""


class ValueLossStats(NamedTuple):
    """Diagnostics of one ``value_loss`` call; detached scalars over real tokens."""

    clipfrac: Tensor
    """Fraction of tokens where the clipped squared error is the larger one (0 when value clipping is off)."""
    explained_var: Tensor
    """1 - Var(returns - values) / Var(returns); 1 is perfect, 0 is no better than a constant, < 0 is worse."""
    value_mean: Tensor
    """Mean predicted value."""


class ForwardOptions(NamedTuple):
    """How a scoring or update forward runs (``PPOConfig.forward_options`` gives the recipe's)."""

    packing: bool = False
    """Pack the rows' real tokens into fewer rows (``ppo.packing``, :mod:`lightning_rlhf.models.packing`)."""
    lm_head_chunk_size: int | None = None
    """Make, use and recompute the logits this many response tokens at a time (``ppo.lm_head_chunk_size``)."""


PADDED = ForwardOptions()
"""The default forward: padded rows, every logit at once."""


class RolloutSamples(NamedTuple):
    """The text side of a rollout for callbacks (sample tables, diagnostics); row ``b`` matches ``Rollout`` row b."""

    prompts: list[str]
    """The B prompts as given to the reward."""
    responses: list[str]
    """The B decoded responses, without the stop token and padding."""
    raw_scores: Tensor
    """(B,) float32 rewards as returned by the reward, before normalization, clipping and penalties."""


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One batch of sampled responses and everything PPO derives from it.

    The rollout phase fills the first eight fields and ``group_index``; scoring and advantage estimation add the rest
    with ``dataclasses.replace`` (the record is immutable, so no stage edits another stage's tensors). With several
    samples per prompt, a prompt's responses are adjacent rows sharing a ``group_index``.
    """

    prompt_ids: Tensor
    """(B, P) long, left-padded prompt tokens."""
    prompt_mask: Tensor
    """(B, P) bool, True for a real prompt token."""
    response_ids: Tensor
    """(B, T) long, sampled tokens, cut after the first stop token and right-padded."""
    response_mask: Tensor
    """(B, T) bool, True for a real response token (the stop token included)."""
    old_logprobs: Tensor
    """(B, T) float32, log-probabilities of the sampled tokens under the rollout policy (temperature applied)."""
    ref_logprobs: Tensor
    """(B, T) float32, log-probabilities under the reference policy (same temperature)."""
    old_values: Tensor | None
    """(B, T) float32, value estimates V(s_t) of the rollout critic; None for a critic-free estimator."""
    ended: Tensor
    """(B,) bool, True when the response ended with a stop token rather than hitting ``max_new_tokens``."""
    group_index: Tensor | None = None
    """(B,) long, the response's group: the row of its prompt in the prompt batch it was sampled from (responses to the
    same prompt share it). None: every response is a group of its own."""
    loss_mask: Tensor | None = None
    """(B,) bool, True for a response the update trains on (``ppo.filter_zero_std_groups`` and ``ppo.mask_truncated``
    set some False); None: every response."""
    scores: Tensor | None = None
    """(B,) float32, sequence-level reward after normalization, clipping and the missing-EOS penalty."""
    kl: Tensor | None = None
    """(B, T) float32, per-token KL estimate between the rollout policy and the reference."""
    rewards: Tensor | None = None
    """(B, T) float32, per-token rewards: -kl_coef * kl everywhere, plus the score on the last real token."""
    advantages: Tensor | None = None
    """(B, T) float32, GAE advantages (whitened if configured)."""
    returns: Tensor | None = None
    """(B, T) float32, value targets: GAE advantages (before whitening) + old values."""
    engine_logprobs: Tensor | None = None
    """(B, T) float32, log-probabilities of the sampled tokens under the sampling engine's own forward (vLLM, same
    temperature); None for the in-process engines, which sample from the trainer's own distribution."""
    is_weights: Tensor | None = None
    """(B, T) float32, per-token weight of the policy loss from ``ppo.rollout_correction``: detached importance weights
    of the trainer's rollout policy over the sampling engine, 0 where ``response_mask`` is False; None means every
    weight is 1."""

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:
        """(B, P + T) prompt and response tokens side by side."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, P + T) bool, True for every real prompt or response token."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def trained_mask(self) -> Tensor:
        """(B, T) bool, True for the response tokens the loss uses: ``response_mask`` in the rows ``loss_mask``
        keeps."""
        if self.loss_mask is None:
            return self.response_mask
        return self.response_mask & self.loss_mask[:, None]

    def text_mask(self) -> Tensor:
        """(B, T) bool, True for the response tokens that make its text: ``response_mask`` without the stop token
        of a response that ``ended`` (a stop token need not be a special token that decoding would drop)."""
        positions = torch.arange(self.response_mask.shape[1], device=self.response_mask.device)
        stop = (positions == self.response_mask.sum(-1, keepdim=True) - 1) & self.ended[:, None]
        return self.response_mask & ~stop

    def select(self, index: Tensor) -> Rollout:
        """Rows ``index`` (a 1-D long tensor) of every per-sequence field."""
        return self._map(lambda t: t[index])

    def minibatches(self, num_minibatches: int, generator: torch.Generator | None = None) -> list[Rollout]:
        """Split into ``num_minibatches`` equal, disjoint minibatches after a random permutation of the rows.

        Raises:
            ValueError: if ``num_minibatches`` does not divide the rollout size.
        """
        size = len(self)
        if num_minibatches < 1 or size % num_minibatches:
            raise ValueError(
                f"num_minibatches={num_minibatches} must be >= 1 and divide the rollout size {size}; "
                f"choose a divisor of the per-device batch size."
            )
        order = torch.randperm(size, generator=generator).to(self.response_ids.device)
        return [self.select(chunk) for chunk in order.chunk(num_minibatches)]

    def length_order(self) -> Tensor:
        """Row indices from the longest sequence to the shortest (real prompt + response tokens; ties keep order).

        Micro-batches cut from consecutive rows of this order share their padding, so :meth:`trim_padding` can drop
        more of it.
        """
        return length_order(self.prompt_mask, self.response_mask)

    def trim_padding(self) -> Rollout:
        """The same rows without the columns that are padding in every row.

        Leading prompt columns (left padding) and trailing response columns (right padding) that no row uses are
        dropped, so a micro-batch of short sequences costs only its own length. Results of a forward are unchanged:
        those columns are masked out of attention, positions and every loss.
        """
        start, end = padding_extent(self.prompt_mask, self.response_mask)
        if start == 0 and end == self.response_mask.shape[1]:
            return self
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in fields.items():
            if value is not None and value.dim() == 2:
                fields[name] = value[:, start:] if name.startswith("prompt_") else value[:, :end]
        return Rollout(**fields)

    def to(self, device: torch.device | str) -> Rollout:
        """The same record with every tensor on ``device``."""
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Rollout:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Rollout(**{name: None if value is None else fn(value) for name, value in fields.items()})


class SFTLossStats(NamedTuple):
    """Diagnostics of one ``sft_loss`` call; detached scalars over the trained (response) tokens."""

    token_accuracy: Tensor
    """Share of trained tokens that are the argmax of the model's prediction."""
    num_tokens: Tensor
    """Number of trained tokens in the batch (long)."""


class PreferenceLossStats(NamedTuple):
    """Diagnostics of one ``bradley_terry_loss`` call; detached scalars over the pairs."""

    accuracy: Tensor
    """Share of pairs whose chosen score is strictly above the rejected score (a tie counts as wrong)."""
    margin: Tensor
    """Mean of ``chosen_scores - rejected_scores`` (without any target margin)."""
    chosen_score: Tensor
    """Mean score of the chosen responses."""
    rejected_score: Tensor
    """Mean score of the rejected responses."""


def padding_extent(prompt_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """``(start, end)``: prompt columns before ``start`` and response columns from ``end`` on are padding in every row.

    ``start`` is at most ``P - 1`` and ``end`` at least 1, so the kept slices are never empty. One host read.
    """
    start = prompt_mask.any(0).int().argmax()  # first prompt column some row uses (left padding before it)
    used = response_mask.any(0)
    end = (used.int() * torch.arange(1, used.numel() + 1, device=used.device)).max()  # one past the last used column
    start, end = torch.stack([start, end]).tolist()
    return start, max(end, 1)


def length_order(prompt_mask: Tensor, response_mask: Tensor) -> Tensor:
    """(B,) row indices from the most real tokens (prompt + response) to the fewest; ties keep their order."""
    return torch.argsort(prompt_mask.sum(-1) + response_mask.sum(-1), descending=True, stable=True)
