"""Callbacks for the RL phase: the ``RLCallback`` hooks, diagnostics alarms, sample tables and plots.

``PPOModule`` calls three RL-phase hooks, besides Lightning's own, on every callback that defines them;
:class:`RLCallback` documents them with no-op defaults. Everything here is opt-in, from Python or YAML::

    trainer:
      callbacks:
        - class_path: lightning_rlhf.callbacks.EntropyCollapseAlarm
          init_args: {min_fraction: 0.25, stop: true}

- :mod:`~lightning_rlhf.callbacks.hooks`: ``RLCallback``, the RL-phase hooks.
- :mod:`~lightning_rlhf.callbacks.alarms`: ``EntropyCollapseAlarm``, ``ResponseLengthDriftAlarm``, ``EOSRateAlarm``,
  ``ExplainedVarianceAlarm``, ``RatioBlowUpAlarm``, ``ModeCollapseAlarm``.
- :mod:`~lightning_rlhf.callbacks.samples`: ``SampleTableCallback``.
- :mod:`~lightning_rlhf.callbacks.artifacts`: ``PlotCallback``, ``ExportCallback``.

Every name is re-exported here: ``class_path: lightning_rlhf.callbacks.EntropyCollapseAlarm`` keeps working.
"""

from lightning_rlhf.callbacks.alarms import (
    Alarm,
    DiagnosticWarning,
    EntropyCollapseAlarm,
    EOSRateAlarm,
    ExplainedVarianceAlarm,
    ModeCollapseAlarm,
    RatioBlowUpAlarm,
    ResponseLengthDriftAlarm,
    distinct_n,
)
from lightning_rlhf.callbacks.artifacts import EXPORT_SUBDIR, ExportCallback, PlotCallback
from lightning_rlhf.callbacks.hooks import RLCallback
from lightning_rlhf.callbacks.samples import SAMPLE_COLUMNS, SAMPLES_FILENAME, SampleTableCallback, sample_rows

__all__ = [
    "EXPORT_SUBDIR",
    "SAMPLES_FILENAME",
    "SAMPLE_COLUMNS",
    "Alarm",
    "DiagnosticWarning",
    "EOSRateAlarm",
    "EntropyCollapseAlarm",
    "ExplainedVarianceAlarm",
    "ExportCallback",
    "ModeCollapseAlarm",
    "PlotCallback",
    "RLCallback",
    "RatioBlowUpAlarm",
    "ResponseLengthDriftAlarm",
    "SampleTableCallback",
    "distinct_n",
    "sample_rows",
]
