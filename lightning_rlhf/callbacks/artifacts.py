"""Artifacts of a run written by callbacks: PNG plots of its metrics and Hugging Face exports of its policy.

``ExportCallback`` writes the export of :mod:`lightning_rlhf.export` at the end of fit (and every N steps). Under
FSDP2 (``--trainer.strategy fsdp2``, ``module.device_mesh`` set) each process holds a shard of every weight, so every
process first takes part in gathering the full state dict (only rank 0 receives it, on CPU); rank 0 then loads it into
an unsharded copy of the policy and exports that. Single process and DDP export ``module.model`` directly on rank 0.
All processes wait for rank 0 to finish, and fail together when it fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_rlhf import plots
from lightning_rlhf.export import export_policy
from lightning_rlhf.models import build_policy

EXPORT_SUBDIR = "export"
"""Default export directory, under ``trainer.log_dir``."""


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


class ExportCallback(Callback):
    """Export the policy (peft adapter, merged model on request, tokenizer) and the value head of a ``PPOModule``.

    The final export goes to ``dirpath`` itself; periodic exports go to ``dirpath/step_<global_step>``.

    Args:
        dirpath: output directory; None means ``<trainer.log_dir>/export``.
        every_n_steps: also export every this many PPO iterations (``trainer.global_step``); None = only at the end.
        merge: LoRA: also write the adapter merged into the base (``merged/``); full fine-tuning always does.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int | None = None, merge: bool = False) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} is invalid: use a positive number of steps or None.")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.merge = merge
        self._last_periodic_step: int | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_periodic_step:
            return
        self._last_periodic_step = step
        self.export(trainer, pl_module, self._root(trainer) / f"step_{step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, self._root(trainer))

    def _root(self, trainer: Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0, so every process calls it.
        return Path(self.dirpath) if self.dirpath is not None else Path(trainer.log_dir) / EXPORT_SUBDIR

    def export(self, trainer: Trainer, pl_module: LightningModule, out_dir: Path) -> dict[str, Path] | None:
        """Export into ``out_dir``; every process must call this. Returns the written paths on rank 0, else None."""
        model = pl_module.model
        if model is None:
            raise RuntimeError("ExportCallback: the module has no model to export (configure_model was not called).")
        state = None
        if pl_module.device_mesh is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # A collective: every process gathers; with cpu_offload only rank 0 receives the tensors.
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
        paths, error = None, None
        if trainer.is_global_zero:
            try:
                if state is not None:
                    model = build_policy(pl_module.policy_config, pl_module.lora_config, pl_module.tokenizer)
                    model.load_state_dict(state)
                paths = export_policy(model, pl_module.tokenizer, out_dir, merge=self.merge)
            except Exception as err:  # re-raised below, after the other processes have been told
                error = err
        message = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"ExportCallback: the export on rank 0 failed: {message}")
        return paths
