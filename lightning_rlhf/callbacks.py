"""Callbacks for the RL phase: the ``RLCallback`` hooks, diagnostics alarms, sample tables and plots.

``PPOModule`` calls three RL-phase hooks, besides Lightning's own, on every callback that defines them;
:class:`RLCallback` documents them with no-op defaults. Everything here is opt-in, from Python or YAML::

    trainer:
      callbacks:
        - class_path: lightning_rlhf.callbacks.EntropyCollapseAlarm
          init_args: {min_fraction: 0.25, stop: true}

Diagnostics follow TRL's PPO debugging advice: each alarm warns once per run (a :class:`DiagnosticWarning` that names
the metric, its value and what to change) and can stop training (``stop: true``, after the current iteration).
Stopping a PPO iteration between minibatches when the policy moves too far is not a callback: it is
``ppo.early_stop_kl`` in the core, because it must act before the next optimizer step.

Under DDP every stop decision is made from values identical on every process: the module's global minibatch
statistics, or sums reduced with ``trainer.strategy.reduce`` (which every process calls in the same hook).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_rlhf import plots
from lightning_rlhf.types import Rollout, RolloutSamples

SAMPLE_COLUMNS = ("step", "prompt", "response", "score", "kl", "length")
"""Columns of the sample table (``samples.csv``, TensorBoard text, W&B table)."""
SAMPLES_FILENAME = "samples.csv"


class RLCallback(Callback):
    """A Lightning ``Callback`` with the RL-phase hooks that ``PPOModule`` calls (all no-ops here).

    Order within one PPO iteration (one ``training_step``): ``on_train_batch_start``, ``on_rollout_end``, then for
    each PPO epoch ``on_ppo_minibatch_end`` per minibatch and ``on_ppo_epoch_end``, then ``on_train_batch_end``.
    Every process calls every hook, so a hook may run a collective (``trainer.strategy.reduce``) if it does so
    unconditionally. The module passes the arguments after ``pl_module`` by keyword: keep their names.
    """

    def on_rollout_end(
        self, trainer: Trainer, pl_module: LightningModule, rollout: Rollout, samples: RolloutSamples
    ) -> None:
        """After scoring, KL shaping and advantages, before the first PPO update.

        Args:
            rollout: this process's rollout with every field filled (``scores``, ``kl``, ``advantages``, ...).
            samples: its prompts, decoded responses and raw scores, row for row.
        """

    def on_ppo_minibatch_end(
        self, trainer: Trainer, pl_module: LightningModule, epoch: int, index: int, stats: dict[str, float]
    ) -> None:
        """After each minibatch's update (also when the update was skipped).

        Args:
            epoch: the PPO epoch, from 0.
            index: the minibatch within the epoch, from 0.
            stats: global (all-process) means over the minibatch: ``loss/*``, ``policy/approx_kl``,
                ``policy/clipfrac``, ``policy/ratio_mean``, ``policy/entropy``, ``value/clipfrac``,
                ``policy/grad_norm``.
        """

    def on_ppo_epoch_end(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """After each pass over the rollout (also the pass that ``ppo.early_stop_kl`` cut short).

        Args:
            epoch: the PPO epoch that ended, from 0.
        """


class DiagnosticWarning(UserWarning):
    """Category of the alarms' warnings; ``warnings.simplefilter("error", DiagnosticWarning)`` makes them errors."""


def _global_sums(trainer: Trainer, *values: Tensor | float) -> list[float]:
    """Sums of scalars over all processes, in one collective that every process must reach."""
    device = next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    return trainer.strategy.reduce(packed, reduce_op="sum").tolist()


def _log(pl_module: LightningModule, name: str, value: float, batch_size: int) -> None:
    """Log a value that is already global (no sync) at this step, next to the module's own metrics."""
    pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)


_PLAIN = (bool, int, float, str, type(None))


class _Alarm(RLCallback):
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


class EntropyCollapseAlarm(_Alarm):
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
                "is collapsing onto a few tokens. Raise ppo.kl_coef (or set ppo.target_kl), lower the learning rate, "
                "or add an entropy bonus (ppo.ent_coef, e.g. 0.01); look for one response the reward overpays "
                "(SampleTableCallback)."
            ),
        )


class ResponseLengthDriftAlarm(_Alarm):
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
                "score by length, raise ppo.kl_coef, or lower generation.max_new_tokens."
            )
        else:
            advice = (
                "the reward likely prefers short responses (or an early stop token): give it a minimum length "
                "(e.g. CharFractionReward(min_len=...)), raise ppo.kl_coef, or check what a one-token response scores."
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


class EOSRateAlarm(_Alarm):
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
                f"only {eos_frac:.1%} of responses end with a stop token; the others hit generation.max_new_tokens and "
                "are scored truncated. Set ppo.missing_eos_penalty (TRL uses 1.0), raise generation.max_new_tokens, "
                "or check that the model's end-of-turn token is the tokenizer's EOS or in generation.stop_token_ids."
            ),
        )


class ExplainedVarianceAlarm(_Alarm):
    """Warns when the critic explains no variance of the returns after a warm-up: advantages are then mostly noise.

    Computes ``1 - Var(returns - values) / Var(returns)`` over the rollout's real tokens from global sums (the value
    the module logs as ``value/explained_var``).

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
        if trainer.global_step < self.warmup_steps or rollout.returns is None:
            return
        mask = rollout.response_mask
        returns, residual = rollout.returns.double()[mask], (rollout.returns - rollout.old_values).double()[mask]
        n, r, r2, e, e2 = _global_sums(
            trainer, mask.sum(), returns.sum(), returns.square().sum(), residual.sum(), residual.square().sum()
        )
        var_returns = r2 / n - (r / n) ** 2
        explained = 1.0 - (e2 / n - (e / n) ** 2) / var_returns if var_returns > 0 else math.nan
        self._check(
            trainer,
            explained <= self.min_explained_var,  # False for NaN (constant returns: nothing to explain)
            lambda: (
                f"value/explained_var is {explained:.3g} after {trainer.global_step} iterations: the critic does not "
                "predict the returns, so GAE advantages are mostly noise. Raise ppo.vf_coef, loosen or drop the "
                "value clip (ppo.value_clip_coef), raise the learning rate, or check that the score's scale is "
                "reasonable (ppo.score_norm)."
            ),
        )


class RatioBlowUpAlarm(_Alarm):
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
                "policy too far. Lower the learning rate, use fewer ppo.ppo_epochs or more ppo.num_minibatches, set "
                "ppo.early_stop_kl (e.g. 0.02) or ppo.ratio_threshold (e.g. 10), and check that the rollout and the "
                "update use the same temperature and model (dropout, adapters)."
            ),
        )


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams over ``sequences``; NaN when there is no n-gram."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


class ModeCollapseAlarm(_Alarm):
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
                "fix the reward's loophole, raise ppo.kl_coef, lower the learning rate, or add ppo.ent_coef."
            ),
        )


class SampleTableCallback(RLCallback):
    """Every ``every_n_steps`` PPO iterations, a table of prompt / response / score / KL / length.

    Written on the global-zero process to every logger that can hold it: ``samples.csv`` (appended, with a ``step``
    column) in a ``CSVLogger``'s run directory, ``log_table`` for loggers that have it (``WandbLogger``), a Markdown
    text table for loggers whose experiment has ``add_text`` (``TensorBoardLogger``); and to the console as a rich
    table (plain text without rich). ``score`` is the raw reward; ``kl`` is the per-response KL to the reference (the
    sum of ``rollout.kl`` over its tokens); ``length`` counts response tokens, the stop token included.

    Args:
        every_n_steps: log the table on iterations 0, N, 2N, ...
        max_rows: rows per table (the first rows of this process's rollout).
        max_chars: console and TensorBoard cells are cut to this many characters (CSV and W&B keep the full text).
        console: also print the table.
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 8, max_chars: int = 200, console: bool = True) -> None:
        if every_n_steps < 1 or max_rows < 1 or max_chars < 1:
            raise ValueError("SampleTableCallback: every_n_steps, max_rows and max_chars must be >= 1.")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.max_chars = max_chars
        self.console = console

    def on_rollout_end(self, trainer, pl_module, rollout, samples) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every_n_steps:
            return
        rows = sample_rows(rollout, samples, step, self.max_rows)
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                _append_csv(os.path.join(logger.log_dir, SAMPLES_FILENAME), rows)
            elif callable(getattr(logger, "log_table", None)):  # WandbLogger
                logger.log_table(key="samples", columns=list(SAMPLE_COLUMNS), data=rows, step=step)
            elif callable(getattr(logger.experiment, "add_text", None)):  # TensorBoardLogger's SummaryWriter
                logger.experiment.add_text("samples", self._markdown(rows), global_step=step)
        if self.console:
            self._print(rows, step)

    def _cut(self, text: str) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= self.max_chars else text[: self.max_chars - 1] + "…"

    def _markdown(self, rows: list[list[Any]]) -> str:
        def cell(value: Any) -> str:
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            return self._cut(text).replace("|", "\\|")

        lines = ["| " + " | ".join(SAMPLE_COLUMNS[1:]) + " |", "|" + "---|" * (len(SAMPLE_COLUMNS) - 1)]
        return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row[1:]) + " |" for row in rows])

    def _print(self, rows: list[list[Any]], step: int) -> None:
        try:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
        except ImportError:
            print(f"samples at step {step}:")
            for _, prompt, response, score, kl, length in rows:
                print(f"  {self._cut(prompt)!r} -> {self._cut(response)!r}  score={score:.3g} kl={kl:.3g} len={length}")
            return
        table = Table(title=f"samples at step {step}")
        for name in SAMPLE_COLUMNS[1:]:
            table.add_column(name, justify="right" if name in ("score", "kl", "length") else "left")
        for _, prompt, response, score, kl, length in rows:  # Text(): brackets in samples are not rich markup
            table.add_row(Text(self._cut(prompt)), Text(self._cut(response)), f"{score:.3g}", f"{kl:.3g}", str(length))
        Console().print(table)


def sample_rows(rollout: Rollout, samples: RolloutSamples, step: int, max_rows: int) -> list[list[Any]]:
    """The first ``max_rows`` rows as ``[step, prompt, response, score, kl, length]`` (columns ``SAMPLE_COLUMNS``)."""
    rows = min(max_rows, len(rollout))
    mask = rollout.response_mask[:rows]
    kl = torch.where(mask, rollout.kl[:rows], 0.0).sum(-1) if rollout.kl is not None else torch.full((rows,), math.nan)
    scores, kl, lengths = samples.raw_scores[:rows].tolist(), kl.tolist(), mask.sum(-1).tolist()
    return [
        [step, samples.prompts[i], samples.responses[i], float(scores[i]), float(kl[i]), int(lengths[i])]
        for i in range(rows)
    ]


def _append_csv(path: str, rows: list[list[Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(SAMPLE_COLUMNS)
        writer.writerows(rows)


class PlotCallback(Callback):
    """At the end of ``fit``, PNG plots of the run's metrics in ``<run dir>/<dirname>/`` (see ``lightning_rlhf.plots``).

    Reads the ``metrics.csv`` of the trainer's first ``CSVLogger`` (the ``lightning-rlhf`` command's default logger)
    after flushing it. Needs matplotlib (``pip install 'lightning-rlhf[plots]'``); constructing the callback without
    it raises an ImportError, before any training.

    Args:
        dirname: folder under the run directory for the PNGs.
    """

    def __init__(self, dirname: str = "plots") -> None:
        plots.require_matplotlib()
        self.dirname = dirname

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and not any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
            rank_zero_warn("PlotCallback needs a CSVLogger to read metrics from; no plots will be written.")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None or not trainer.is_global_zero:
            return
        logger.save()
        written = plots.plot_run(logger.log_dir, os.path.join(logger.log_dir, self.dirname))
        rank_zero_info(f"PlotCallback: wrote {len(written)} plots to {os.path.join(logger.log_dir, self.dirname)}")
