"""Diagnostics alarms: each watches one symptom of a PPO run going wrong and warns once (optionally stops).

Diagnostics follow TRL's PPO debugging advice: each alarm warns once per run (a :class:`DiagnosticWarning` that names
the metric, its value and what to change) and can stop training (``stop: true``, after the current iteration).
Stopping a PPO iteration between minibatches when the policy moves too far is not a callback: it is
``ppo.early_stop_kl`` in the core, because it must act before the next optimizer step.

Under DDP every stop decision is made from values identical on every process: the module's global (logged or
minibatch) statistics, or sums over all processes (:func:`~lightning_rlhf.distributed.global_sums`, which every
process calls in the same hook).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_rlhf.callbacks.hooks import RLCallback
from lightning_rlhf.distributed import ReduceSum, explained_variance, global_sums


class DiagnosticWarning(UserWarning):
    """Category of the alarms' warnings; ``warnings.simplefilter("error", DiagnosticWarning)`` makes them errors."""


def _reduce_sum(trainer: Trainer) -> ReduceSum:
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def _global_sums(trainer: Trainer, *values: Tensor | float) -> list[float]:
    """:func:`~lightning_rlhf.distributed.global_sums` with the trainer's all-reduce."""
    return global_sums(_reduce_sum(trainer), *values)


def _log(pl_module: LightningModule, name: str, value: float, batch_size: int) -> None:
    """Log a value that is already global (no sync) at this step, next to the module's own metrics."""
    pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)


_PLAIN = (bool, int, float, str, type(None))


class Alarm(RLCallback):
    """Warns once when its condition has held for ``patience`` consecutive checks; with ``stop`` also stops training.

    Keeps ``_reference`` (the first iteration's value, for relative thresholds) across a checkpoint resume.
    """

    def __init__(self, patience: int, stop: bool) -> None:
        if patience < 1:
            raise ValueError(f"{type(self).__name__}(patience={patience}) is invalid: use at least 1.")
        self.patience = patience
        self.stop = stop
        self._reset()

    def _reset(self) -> None:
        self._strikes = 0
        self._fired = False
        self._reference: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # before a checkpoint restore, which then loads the saved state
            self._reset()

    @property
    def state_key(self) -> str:
        # Only the constructor's plain settings: Lightning attaches ``log``/``log_dict`` (bound to the module) to
        # every callback and reads ``state_key`` around every hook call, so repr-ing those would print the model.
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_") and isinstance(v, _PLAIN)}
        return self._generate_state_key(**settings)

    def state_dict(self) -> dict[str, Any]:
        return {"strikes": self._strikes, "fired": self._fired, "reference": self._reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._strikes, self._fired, self._reference = (
            state_dict["strikes"],
            state_dict["fired"],
            state_dict["reference"],
        )

    def _check(self, trainer: Trainer, bad: bool, message: Callable[[], str]) -> None:
        """Count a check; on the ``patience``-th bad one in a row warn (once per run) and, with ``stop``, stop."""
        self._strikes = self._strikes + 1 if bad else 0
        if self._strikes < self.patience:
            return
        if not self._fired:
            self._fired = True
            then = "Stopping training (stop=True)." if self.stop else "Set stop=True to also stop training."
            rank_zero_warn(f"{type(self).__name__}: {message()} {then}", category=DiagnosticWarning)
        if self.stop:
            trainer.should_stop = True


class EntropyCollapseAlarm(Alarm):
    """Warns when the policy's token entropy collapses: the policy is turning deterministic.

    Reads ``policy/entropy`` from the minibatch statistics and checks the iteration's mean at ``on_train_batch_end``.

    Args:
        min_entropy: warn when the entropy (nats per token, at the sampling temperature) falls below this; None = off.
        min_fraction: warn when it falls below this fraction of the first iteration's entropy; None = off.
        patience: consecutive iterations the condition must hold before the alarm fires.
        stop: also stop training when the alarm fires.
    """

    def __init__(
        self,
        min_entropy: float | None = 0.05,
        min_fraction: float | None = 0.25,
        patience: int = 3,
        stop: bool = False,
    ) -> None:
        super().__init__(patience, stop)
        self.min_entropy = min_entropy
        self.min_fraction = min_fraction

    def _reset(self) -> None:
        super()._reset()
        self._entropies: list[float] = []  # policy/entropy of this iteration's minibatches

    def on_ppo_minibatch_end(self, trainer, pl_module, epoch, index, stats) -> None:
        self._entropies.append(stats["policy/entropy"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._entropies:
            return
        entropy = sum(self._entropies) / len(self._entropies)
        self._entropies = []
        if self._reference is None:
            self._reference = entropy
        reference = self._reference
        bad = (self.min_entropy is not None and entropy < self.min_entropy) or (
            self.min_fraction is not None and entropy < self.min_fraction * reference
        )
        self._check(
            trainer,
            bad,
            lambda: (
                f"policy/entropy fell to {entropy:.3g} nats per token (first iteration: {reference:.3g}): the policy "
                "is collapsing onto a few tokens. Raise model.ppo.kl_coef (or set model.ppo.target_kl), lower the "
                "learning rate, or add an entropy bonus (model.ppo.ent_coef, e.g. 0.01); look for one response the "
                "reward overpays (SampleTableCallback)."
            ),
        )


class ResponseLengthDriftAlarm(Alarm):
    """Warns when the mean response length drifts far from the first rollout's; logs ``diagnostics/response_len_drift``
    (mean length / first rollout's mean length).

    Args:
        max_factor: warn when the mean length exceeds this multiple of the first rollout's; None = off.
        min_factor: warn when it falls below this fraction of the first rollout's; None = off.
        patience: consecutive iterations the condition must hold before the alarm fires.
        stop: also stop training when the alarm fires.
    """

    def __init__(
        self, max_factor: float | None = 2.0, min_factor: float | None = 0.5, patience: int = 3, stop: bool = False
    ) -> None:
        super().__init__(patience, stop)
        self.max_factor = max_factor
        self.min_factor = min_factor

    def on_rollout_end(self, trainer, pl_module, rollout, samples) -> None:
        count, tokens = _global_sums(trainer, len(rollout), rollout.response_mask.sum())
        length = tokens / count
        if self._reference is None:
            self._reference = length
        drift = length / self._reference
        _log(pl_module, "diagnostics/response_len_drift", drift, len(rollout))
        grew = self.max_factor is not None and drift > self.max_factor
        shrank = self.min_factor is not None and drift < self.min_factor
        if grew:
            advice = (
                "the reward likely prefers longer responses (length bias): add a length penalty or normalize the "
                "score by length, raise model.ppo.kl_coef, or lower model.generation.max_new_tokens."
            )
        else:
            advice = (
                "the reward likely prefers short responses (or an early stop token): give it a minimum length "
                "(e.g. CharFractionReward(min_len=...)), raise model.ppo.kl_coef, or check what a one-token response "
                "scores."
            )
        reference = self._reference
        self._check(
            trainer,
            grew or shrank,
            lambda: (
                f"mean response length is {length:.3g} tokens, {drift:.3g}x the first rollout's {reference:.3g}: "
                + advice
            ),
        )


class EOSRateAlarm(Alarm):
    """Warns when too few responses end with a stop token (the rest were cut at ``max_new_tokens``).

    Args:
        min_eos_frac: warn when the share of responses that end with a stop token (``rollout/eos_frac``) is below this.
        patience: consecutive iterations the condition must hold before the alarm fires.
        stop: also stop training when the alarm fires.
    """

    def __init__(self, min_eos_frac: float = 0.1, patience: int = 3, stop: bool = False) -> None:
        super().__init__(patience, stop)
        self.min_eos_frac = min_eos_frac

    def on_rollout_end(self, trainer, pl_module, rollout, samples) -> None:
        count, ended = _global_sums(trainer, len(rollout), rollout.ended.sum())
        eos_frac = ended / count
        self._check(
            trainer,
            eos_frac < self.min_eos_frac,
            lambda: (
                f"only {eos_frac:.1%} of responses end with a stop token; the others hit "
                "model.generation.max_new_tokens and are scored truncated. Set model.ppo.missing_eos_penalty (TRL uses "
                "1.0), raise model.generation.max_new_tokens, or check that the model's end-of-turn token is the "
                "tokenizer's EOS or in model.generation.stop_token_ids."
            ),
        )


class ExplainedVarianceAlarm(Alarm):
    """Warns when the critic explains no variance of the returns after a warm-up: advantages are then mostly noise.

    Computes ``1 - Var(returns - values) / Var(returns)`` over the rollout's real tokens on every process
    (:func:`~lightning_rlhf.distributed.explained_variance`, the value the module logs as ``value/explained_var``).

    Args:
        min_explained_var: warn when the explained variance is at or below this (0: no better than a constant).
        warmup_steps: PPO iterations to ignore while a fresh value head learns.
        patience: consecutive iterations the condition must hold before the alarm fires.
        stop: also stop training when the alarm fires.
    """

    def __init__(
        self, min_explained_var: float = 0.0, warmup_steps: int = 10, patience: int = 5, stop: bool = False
    ) -> None:
        super().__init__(patience, stop)
        self.min_explained_var = min_explained_var
        self.warmup_steps = warmup_steps

    def on_rollout_end(self, trainer, pl_module, rollout, samples) -> None:
        if trainer.global_step < self.warmup_steps or rollout.returns is None or rollout.old_values is None:
            return  # no critic (a critic-free estimator): nothing to explain
        explained = explained_variance(rollout.returns, rollout.old_values, rollout.response_mask, _reduce_sum(trainer))
        self._check(
            trainer,
            explained <= self.min_explained_var,  # False for NaN (constant returns: nothing to explain)
            lambda: (
                f"value/explained_var is {explained:.3g} after {trainer.global_step} iterations: the critic does not "
                "predict the returns, so GAE advantages are mostly noise. Raise model.ppo.vf_coef, loosen or drop the "
                "value clip (model.ppo.value_clip_coef), raise the learning rate, or check that the score's scale is "
                "reasonable (model.ppo.score_norm)."
            ),
        )


class RatioBlowUpAlarm(Alarm):
    """Warns when a minibatch's mean probability ratio pi / pi_old leaves a band around 1 (or is not finite).

    Reads ``policy/ratio_mean`` from each minibatch's global statistics. The ratio is 1 on an iteration's first
    minibatch and stays near 1 while the clip holds (TRL: 2.0, 1000 or 0.1 mean the updates are too drastic).

    Args:
        max_ratio: warn when the mean ratio exceeds this.
        min_ratio: warn when the mean ratio falls below this.
        patience: consecutive minibatches the condition must hold before the alarm fires.
        stop: also stop training (after the current iteration) when the alarm fires.
    """

    def __init__(self, max_ratio: float = 2.0, min_ratio: float = 0.5, patience: int = 1, stop: bool = False) -> None:
        super().__init__(patience, stop)
        self.max_ratio = max_ratio
        self.min_ratio = min_ratio

    def on_ppo_minibatch_end(self, trainer, pl_module, epoch, index, stats) -> None:
        ratio = stats["policy/ratio_mean"]
        self._check(
            trainer,
            not self.min_ratio <= ratio <= self.max_ratio,  # True for NaN too
            lambda: (
                f"policy/ratio_mean is {ratio:.3g} at PPO epoch {epoch}, minibatch {index}: one rollout moved the "
                "policy too far. Lower the learning rate, use fewer model.ppo.ppo_epochs or more "
                "model.ppo.num_minibatches, set model.ppo.early_stop_kl (e.g. 0.02) or model.ppo.ratio_threshold (e.g. "
                "10), and check that the rollout and the update use the same temperature and model (dropout, adapters)."
            ),
        )


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams over ``sequences``; NaN when there is no n-gram."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


class ModeCollapseAlarm(Alarm):
    """Measures the diversity of each rollout's responses and warns when it collapses.

    Logs ``diagnostics/unique_frac`` (distinct responses / responses) and ``diagnostics/distinct_{n}`` (distinct
    token n-grams / all token n-grams, over every response of the rollout). Under DDP both are the mean over
    processes of each process's share of the rollout.

    Args:
        n: n-gram order of distinct-n.
        min_unique_frac: warn when the share of distinct responses is below this; None = off.
        min_distinct: warn when distinct-n is below this; None = off.
        patience: consecutive iterations the condition must hold before the alarm fires.
        stop: also stop training when the alarm fires.
    """

    def __init__(
        self,
        n: int = 2,
        min_unique_frac: float | None = 0.5,
        min_distinct: float | None = 0.1,
        patience: int = 3,
        stop: bool = False,
    ) -> None:
        super().__init__(patience, stop)
        if n < 1:
            raise ValueError(f"ModeCollapseAlarm(n={n}) is invalid: use an n-gram order of at least 1.")
        self.n = n
        self.min_unique_frac = min_unique_frac
        self.min_distinct = min_distinct

    def on_rollout_end(self, trainer, pl_module, rollout, samples) -> None:
        rows = [
            tuple(ids[mask].tolist()) for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)
        ]
        local_distinct = distinct_n(rows, self.n)
        has_grams = not math.isnan(local_distinct)
        unique, distinct, with_grams, processes = _global_sums(
            trainer, len(set(rows)) / len(rows), local_distinct if has_grams else 0.0, float(has_grams), 1.0
        )
        unique_frac = unique / processes
        distinct = distinct / with_grams if with_grams else math.nan
        _log(pl_module, "diagnostics/unique_frac", unique_frac, len(rollout))
        _log(pl_module, f"diagnostics/distinct_{self.n}", distinct, len(rollout))
        bad = (self.min_unique_frac is not None and unique_frac < self.min_unique_frac) or (
            self.min_distinct is not None and distinct < self.min_distinct
        )
        self._check(
            trainer,
            bad,
            lambda: (
                f"responses are collapsing onto a few strings (unique {unique_frac:.1%}, distinct-{self.n} "
                f"{distinct:.3g}): the policy found an output the reward overpays. Inspect it (SampleTableCallback), "
                "fix the reward's loophole, raise model.ppo.kl_coef, lower the learning rate, or add "
                "model.ppo.ent_coef."
            ),
        )
