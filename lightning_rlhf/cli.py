"""The ``lightning-rlhf`` command: a LightningCLI over :class:`PPOModule` and :class:`PromptDataModule`.

``lightning-rlhf fit --config recipe.yaml`` trains; ``--print_config`` shows every field with its value. The model and
data are chosen by ``class_path``: ``PPOModule`` and ``PromptDataModule`` by default, a subclass (a custom reward), or
another stage's module. Metrics go to a CSV file in
the run directory (``runs/<name>/version_N/metrics.csv``) next to the resolved ``config.yaml``.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

DEFAULT_RUN_DIR = "runs"


class RLHFCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``class_path``), defaulting to PPOModule and
    PromptDataModule, with CSV metrics in ``runs/``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_rlhf.module.PPOModule"},
                "data": {"class_path": "lightning_rlhf.data.PromptDataModule"},
            }
        )


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
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": DEFAULT_RUN_DIR, "name": "ppo"},
            },
            "log_every_n_steps": 1,
            "plugins": [{"class_path": "lightning_rlhf.checkpointing.AtomicCheckpointIO"}],
        },
        args=args,
    )


if __name__ == "__main__":
    main()
