"""Plots: the command and PlotCallback write non-empty PNGs from a small real run's metrics.csv; clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf import plots
from lightning_rlhf.callbacks import PlotCallback
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig, PolicyConfig, TinyModelConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig

pytest.importorskip("matplotlib")

TINY = PolicyConfig(
    tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
)
PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: "]
EXPECTED = {"score", "kl", "kl_coef", "entropy", "response_len", "clipfrac", "overview"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-iteration tiny PPO run with a CSVLogger and PlotCallback; returns its run directory."""
    seed_everything(0, verbose=False)
    module = PPOModule(
        policy=TINY,
        lora=LoraConfig(r=4, alpha=8),
        generation=GenerationConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1, num_minibatches=2),
        reward=CharFractionReward(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    logger = CSVLogger(tmp_path_factory.mktemp("runs"), name="ppo")
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        callbacks=[PlotCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))
    return Path(logger.log_dir)


def assert_pngs(folder: Path, names: set[str]) -> None:
    assert {p.stem for p in folder.glob("*.png")} == names
    for name in names:
        data = (folder / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 1000, name


def test_plot_callback_writes_pngs_into_the_run_directory_at_fit_end(run_dir):
    assert_pngs(run_dir / "plots", EXPECTED)


def test_plot_command_writes_non_empty_pngs_from_a_real_run(run_dir, tmp_path, capsys):
    assert plots.main([str(run_dir), "--out", str(tmp_path)]) == 0
    assert_pngs(tmp_path, EXPECTED)
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / f"{name}.png") for name in EXPECTED)


def test_python_dash_m_runs_the_command_and_returns_its_status(tmp_path):
    # The error path: no plotting (fast), but the module entry point, the message and the exit status.
    result = subprocess.run(
        [sys.executable, "-m", "lightning_rlhf.plots", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "lightning-rlhf-plot: error: no metrics.csv" in result.stderr


def test_true_reward_is_plotted_when_logged_and_empty_cells_are_skipped(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,eval/true_reward,rollout/score,step\n0,,0.1,0\n0,0.5,0.2,1\n0,nan,0.3,2\n0,0.7,0.4,3\n"
    )
    series = plots.read_metrics(tmp_path / "metrics.csv")
    assert series["eval/true_reward"] == ([1.0, 3.0], [0.5, 0.7])
    assert series["rollout/score"] == ([0.0, 1.0, 2.0, 3.0], [0.1, 0.2, 0.3, 0.4])
    assert "epoch" not in series
    written = plots.plot_run(tmp_path)
    assert_pngs(tmp_path / "plots", {"score", "true_reward", "overview"})
    assert {p.stem for p in written} == {"score", "true_reward", "overview"}


def test_missing_matplotlib_fails_with_the_install_command(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plots.main([str(run_dir), "--out", str(tmp_path)]) == 1
    assert "pip install 'lightning-rlhf[plots]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ImportError, match=r"lightning-rlhf\[plots\]"):
        PlotCallback()


def test_a_folder_without_metrics_names_the_run_directories_below_it(run_dir, capsys):
    assert plots.main([str(run_dir.parent)]) == 1
    err = capsys.readouterr().err
    assert "no metrics.csv" in err
    assert str(run_dir) in err


def test_a_csv_without_plotted_metrics_is_an_error(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,other/thing\n0,1.0\n")
    with pytest.raises(ValueError, match="none of the plotted metrics"):
        plots.plot_run(tmp_path)
