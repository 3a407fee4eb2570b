"""Interrupted runs (SIGTERM, and SIGKILL in the middle of a checkpoint write) lose at most the work since the last
checkpoint, leave only checkpoints that load, and resume with ``--ckpt_path last``."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TIMEOUT_S = 180
FAST = [
    "--model.init_args.policy.tiny.hidden_size=32",
    "--model.init_args.policy.tiny.intermediate_size=64",
    "--model.init_args.generation.max_new_tokens=4",
    "--model.init_args.ppo.ppo_epochs=1",
    "--data.init_args.batch_size=8",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.callbacks+=ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.save_last=true",
    "--trainer.callbacks.dirpath=ckpt",
]


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "lightning_rlhf.cli",
        "fit",
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        *FAST,
        *args,
    ]
    log = (cwd / "log.txt").open("a")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, cwd: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run did not finish in {TIMEOUT_S} s:\n{(cwd / 'log.txt').read_text()[-3000:]}")


def steps_of(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.stem.rsplit("step=", 1)[1]) for p in ckpt_dir.glob("*step=*.ckpt"))


def assert_all_checkpoints_load(ckpt_dir: Path) -> int:
    """Every checkpoint file loads (weights only); returns the step that last.ckpt holds."""
    for path in ckpt_dir.glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        assert "lightning_rlhf" in checkpoint, path.name
    return torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"]


def resume_and_check(cwd: Path, from_step: int) -> None:
    proc = start(cwd, "--ckpt_path=last", f"--trainer.max_steps={from_step + 2}")
    assert wait(proc, cwd) == 0, (cwd / "log.txt").read_text()[-3000:]
    metrics = sorted(cwd.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    logged = [int(r["step"]) for r in csv.DictReader(metrics.open())]
    assert logged == [from_step, from_step + 1], "the resumed run did not continue from the last checkpoint"


def test_sigkill_during_a_checkpoint_write_leaves_loadable_checkpoints(tmp_path):
    proc = start(
        tmp_path,
        "--trainer.max_steps=20",
        "--trainer.callbacks+=interrupt_helpers.KillDuringSave",
        "--trainer.callbacks.at_step=4",
    )
    assert wait(proc, tmp_path) == -signal.SIGKILL
    ckpt = tmp_path / "ckpt"
    assert list(ckpt.glob(".*.tmp")), "the kill did not happen during a write"
    assert steps_of(ckpt) == [1, 2, 3]  # the step-4 file was never completed, so it does not exist
    last = assert_all_checkpoints_load(ckpt)
    assert last == 3
    resume_and_check(tmp_path, last)


def test_sigterm_during_training_then_resume(tmp_path):
    proc = start(tmp_path, "--trainer.max_steps=100000")
    deadline = time.monotonic() + TIMEOUT_S
    while len(steps_of(tmp_path / "ckpt")) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    wait(proc, tmp_path)  # Lightning stops on SIGTERM (its exit code is not specified)
    assert "Received SIGTERM" in (tmp_path / "log.txt").read_text()
    last = assert_all_checkpoints_load(tmp_path / "ckpt")
    assert last >= 3
    resume_and_check(tmp_path, last)
