"""The ``lightning-rlhf`` command: a LightningCLI over :class:`PPOModule` and :class:`PromptDataModule`.

``lightning-rlhf fit --config recipe.yaml`` trains; ``--print_config`` shows every field with its value. The model and
data are chosen by ``class_path``: ``PPOModule`` and ``PromptDataModule`` by default, a subclass (a custom reward), or
another stage's module. Metrics go to a CSV file in the run directory, ``<root>/ppo/version_N/metrics.csv``, next to the
resolved ``config.yaml`` and the ``checkpoints/``; the root is ``--trainer.default_root_dir``, or ``runs`` without it.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

DEFAULT_RUN_DIR = "runs"
"""Where runs go when neither ``--trainer.default_root_dir`` nor the logger's ``save_dir`` says otherwise."""


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``save_dir`` may be left to the trainer: the CLI's default logger.

    Args:
        save_dir: the root of the run directories; None (the CLI default) means ``--trainer.default_root_dir``, or
            ``runs`` when that is not given, as Lightning does for its own default logger.
        name: the experiment's folder under ``save_dir``.
        **kwargs: the other ``CSVLogger`` arguments (``version``, ``prefix``, ``flush_logs_every_n_steps``).
    """

    def __init__(self, save_dir: str | None = None, name: str = "ppo", **kwargs: Any) -> None:
        super().__init__(DEFAULT_RUN_DIR if save_dir is None else save_dir, name=name, **kwargs)


class RLHFCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``class_path``), defaulting to PPOModule and
    PromptDataModule, with CSV metrics under ``--trainer.default_root_dir`` (default ``runs/``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_rlhf.module.PPOModule"},
                "data": {"class_path": "lightning_rlhf.data.PromptDataModule"},
            }
        )

    def before_instantiate_classes(self) -> None:
        """Point a ``RunCSVLogger`` without ``save_dir`` at ``trainer.default_root_dir`` (or ``runs``); a logger with
        its own ``save_dir``, or any other logger, is left as configured."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            if isinstance(logger, Namespace) and logger.get("class_path") == RUN_LOGGER:
                if logger.get("init_args") is None:
                    logger.init_args = Namespace()
                if logger.init_args.get("save_dir") is None:
                    logger.init_args.save_dir = trainer.default_root_dir or DEFAULT_RUN_DIR


RUN_LOGGER = f"{RunCSVLogger.__module__}.{RunCSVLogger.__qualname__}"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-rlhf`` console script (``args`` replaces ``sys.argv[1:]`` in tests)."""
    # The config dataclasses document each field in an attribute docstring; --help shows them.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    RLHFCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": RUN_LOGGER, "init_args": {"name": "ppo"}},
            "log_every_n_steps": 1,
            "plugins": [{"class_path": "lightning_rlhf.checkpointing.AtomicCheckpointIO"}],
        },
        args=args,
    )


if __name__ == "__main__":
    main()
