"""The ``lightning-rlhf`` command: a LightningCLI over :class:`PPOModule` and :class:`PromptDataModule`.

``lightning-rlhf fit --config recipe.yaml`` trains; ``--print_config`` shows every field with its value. The model and
data are chosen by ``class_path``: ``PPOModule`` and ``PromptDataModule`` by default, a subclass (a custom reward), or
another stage's module. Metrics go to a CSV file in the run directory, ``<root>/ppo/version_N/metrics.csv``, next to the
resolved ``config.yaml`` and the ``checkpoints/``; the root is ``--trainer.default_root_dir``, or ``runs`` without it.
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf.errors import package_error

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

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse ``args`` (``sys.argv[1:]`` when None) with every nested null flag rewritten
        (:func:`null_flags_as_mappings`); a dict or Namespace is parsed as LightningCLI does."""
        if args is not None and not isinstance(args, (list, tuple)):
            super().parse_arguments(parser, args)
            return
        self.config = parser.parse_args(null_flags_as_mappings(sys.argv[1:] if args is None else list(args)))

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


NULLS = frozenset({"null", "Null", "NULL", "~", "None"})
"""Command-line values meaning None (YAML's nulls, and Python's spelling)."""
SUBCLASS_GROUPS = ("model", "data")
"""Top-level arguments given by ``class_path`` (subclass mode), whose nested fields a null cannot reach directly."""


def null_flags_as_mappings(args: list[str]) -> list[str]:
    """``--model.ppo.max_grad_norm null`` rewritten as ``--model.ppo={max_grad_norm: null}``, which jsonargparse parses.

    jsonargparse (4.53) hands a nested field of a ``class_path`` argument down as ``--field=<str(value)>``, so a null
    two or more levels below ``model`` or ``data`` arrives as the string ``"None"``: refused for a number (``Expected
    a <class 'NoneType'>``) and taken literally for a string (``--model.reward.init_args.tokenizer null`` gave the
    tokenizer ``"None"``). A mapping given one level below keeps its null and merges with the values already set, so
    the flag is rewritten into that form; every other argument passes unchanged. Both ``--key=null`` and
    ``--key null`` are recognised.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, equals, value = arg.partition("=")
        if not equals and i + 1 < len(args) and args[i + 1] in NULLS:
            value, i = args[i + 1], i + 1
        parts = key.removeprefix("--").split(".")
        head = parts[:2] if parts[1:2] == ["init_args"] else parts[:1]  # model or model.init_args
        below = parts[len(head) :]  # e.g. [ppo, max_grad_norm]
        if key.startswith("--") and parts[0] in SUBCLASS_GROUPS and len(below) >= 2 and value in NULLS:
            mapping = "null"
            for name in reversed(below[1:]):
                mapping = f"{{{name}: {mapping}}}"
            out.append(f"--{'.'.join([*head, below[0]])}={mapping}")
        elif not equals and value in NULLS:  # a space-separated null left as it is: both arguments again
            out += [arg, value]
        else:
            out.append(arg)
        i += 1
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-rlhf`` console script (``args`` replaces ``sys.argv[1:]`` in tests)."""
    # The config dataclasses document each field in an attribute docstring; --help shows them.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        run_cli(args)
    except (ValueError, TypeError) as error:
        cause = package_error(error)
        if cause is None or cause is error:
            raise
        # jsonargparse wraps an error raised while it builds a class (a config check naming the field) in its own
        # "Does not validate against any of the Union subtypes", ending in a dump of the whole namespace: raise the
        # package's error itself, with its own traceback.
        raise cause from None


def run_cli(args: list[str] | None) -> None:
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
