"""Sample tables: what the policy writes, with its score, KL and length, every few PPO iterations."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf.callbacks.hooks import RLCallback
from lightning_rlhf.types import Rollout, RolloutSamples

SAMPLE_COLUMNS = ("step", "prompt", "response", "score", "kl", "length")
"""Columns of the sample table (``samples.csv``, TensorBoard text, W&B table)."""
SAMPLES_FILENAME = "samples.csv"


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
