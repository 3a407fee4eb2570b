"""PNG plots of a run's metrics, read from the ``metrics.csv`` that Lightning's ``CSVLogger`` writes.

One PNG per plot (score, true reward when logged, KL, KL coefficient, entropy, response length, clip fractions) and
an ``overview.png`` with every panel, each against the PPO iteration (the CSV's ``step`` column). Pure: no lightning
import; matplotlib (the ``plots`` extra) is imported only when plotting, through its object API (no pyplot, no
display needed).

Command line::

    lightning-rlhf-plot runs/ppo/version_0            # or: python -m lightning_rlhf.plots runs/ppo/version_0
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

METRICS_FILENAME = "metrics.csv"
INSTALL_HINT = "pip install 'lightning-rlhf[plots]'"
TRUE_REWARD_SUFFIXES = ("true_reward", "gold_reward")
"""A logged column whose name ends with one of these (e.g. ``eval/true_reward``) is plotted as the true reward."""


class PlotSpec(NamedTuple):
    """One figure: file stem, title, y label and the metrics drawn on it (absent ones are skipped)."""

    name: str
    title: str
    ylabel: str
    metrics: tuple[str, ...]


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("score", "Score (band: ±1 std over the rollout)", "reward", ("rollout/score", "objective/rlhf_reward")),
    PlotSpec("true_reward", "True reward", "reward", ()),  # columns found by TRUE_REWARD_SUFFIXES
    PlotSpec("kl", "KL to the reference, per response", "nats", ("objective/kl",)),
    PlotSpec("kl_coef", "KL coefficient", "beta", ("objective/kl_coef",)),
    PlotSpec("entropy", "Policy entropy", "nats per token", ("policy/entropy",)),
    PlotSpec("response_len", "Response length", "tokens", ("rollout/response_len",)),
    PlotSpec("clipfrac", "Clip fraction", "fraction of tokens", ("policy/clipfrac", "value/clipfrac")),
)

Series = tuple[list[float], list[float]]


def require_matplotlib() -> Any:
    """The ``matplotlib.figure.Figure`` class, or an ImportError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib, an optional dependency: {INSTALL_HINT}") from err
    return Figure


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Every numeric column of a ``metrics.csv`` as (steps, values), skipping empty and non-finite cells.

    The x value is the ``step`` column (the PPO iteration), or the row number without one.
    """
    series: dict[str, Series] = {}
    with open(path, newline="", encoding="utf-8") as file:
        for row_number, row in enumerate(csv.DictReader(file)):
            step = _float(row.get("step"))
            x = row_number if step is None else step
            for name, cell in row.items():
                value = _float(cell)
                if name in ("step", "epoch") or name is None or value is None:
                    continue
                xs, ys = series.setdefault(name, ([], []))
                xs.append(x)
                ys.append(value)
    return series


def _float(cell: Any) -> float | None:
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def find_metrics_file(run_dir: str | Path) -> Path:
    """``run_dir/metrics.csv`` (or ``run_dir`` itself if it is the CSV); the error lists run directories below it."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if (path / METRICS_FILENAME).is_file():
        return path / METRICS_FILENAME
    below = sorted(str(p.parent) for p in path.rglob(METRICS_FILENAME)) if path.is_dir() else []
    hint = f"; run directories below it: {', '.join(below[:5])}" if below else ""
    raise FileNotFoundError(f"no {METRICS_FILENAME} in {path} (pass a run directory such as runs/ppo/version_0){hint}")


def _lines(spec: PlotSpec, series: dict[str, Series]) -> list[str]:
    if spec.name == "true_reward":
        return sorted(name for name in series if name.endswith(TRUE_REWARD_SUFFIXES))
    return [name for name in spec.metrics if name in series]


def _draw(ax: Any, spec: PlotSpec, names: list[str], series: dict[str, Series]) -> None:
    for name in names:
        xs, ys = series[name]
        ax.plot(xs, ys, label=name, marker="." if len(xs) < 50 else None)
        if name == "rollout/score" and "rollout/score_std" in series:
            steps, stds = series["rollout/score_std"]
            std_at = dict(zip(steps, stds, strict=True))
            pairs = [(x, y, std_at[x]) for x, y in zip(xs, ys, strict=True) if x in std_at]
            if pairs:
                px, py, ps = zip(*pairs, strict=True)
                ax.fill_between(
                    px,
                    [y - s for y, s in zip(py, ps, strict=True)],
                    [y + s for y, s in zip(py, ps, strict=True)],
                    alpha=0.2,
                )
    ax.set_title(spec.title)
    ax.set_xlabel("PPO iteration (step)")
    ax.set_ylabel(spec.ylabel)
    ax.grid(alpha=0.3)
    if len(names) > 1:
        ax.legend()


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for a run; returns their paths.

    Args:
        run_dir: a run directory holding ``metrics.csv`` (e.g. ``runs/ppo/version_0``), or the CSV itself.
        out_dir: where to write; default ``<run_dir>/plots``.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        FileNotFoundError: there is no ``metrics.csv``.
        ValueError: the CSV holds none of the plotted metrics.
    """
    figure_cls = require_matplotlib()
    metrics_file = find_metrics_file(run_dir)
    series = read_metrics(metrics_file)
    panels = [(spec, names) for spec in PLOTS if (names := _lines(spec, series))]
    if not panels:
        wanted = sorted({name for spec in PLOTS for name in spec.metrics})
        raise ValueError(f"{metrics_file} holds none of the plotted metrics ({', '.join(wanted)}).")
    out = Path(out_dir) if out_dir is not None else metrics_file.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec, names in panels:
        fig = figure_cls(figsize=(6, 4), layout="constrained")
        _draw(fig.add_subplot(), spec, names, series)
        written.append(out / f"{spec.name}.png")
        fig.savefig(written[-1], dpi=100)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = figure_cls(figsize=(5 * cols, 3.5 * rows), layout="constrained")
    for i, (spec, names) in enumerate(panels):
        _draw(fig.add_subplot(rows, cols, i + 1), spec, names, series)
    written.append(out / "overview.png")
    fig.savefig(written[-1], dpi=80)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-rlhf-plot RUN_DIR``; returns the exit status (1 with a message on error)."""
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf-plot", description="Write PNG plots of a lightning-rlhf run's metrics.csv."
    )
    parser.add_argument("run_dir", help="run directory with metrics.csv, e.g. runs/ppo/version_0 (or the CSV itself)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"lightning-rlhf-plot: error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
