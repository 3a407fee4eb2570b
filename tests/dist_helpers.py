"""Shared by the multi-process tests: run the real CLI in a killable process group, and a callback with which each rank
dumps what it saw and its trained weights after every step."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

from lightning_rlhf.rewards import CharFractionReward, Reward

TESTS = Path(__file__).resolve().parent


def run_cli_fit(out: Path, cfg: dict, *extra: str, timeout_s: int = 300) -> str:
    """Run ``lightning-rlhf fit`` with ``cfg`` in ``out`` in a new process group; kill the whole group on timeout.

    Returns the combined output; fails the test on a timeout or a non-zero exit.
    """
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "lightning_rlhf.cli", "fit", "--config", str(path), *extra]
    proc = subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{out.name} did not finish in {timeout_s} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"{out.name} failed:\n{log[-6000:]}"
    return log


class DumpRankState(Callback):
    """Writes ``rank{r}_step{k}.pt`` with the rank's responses and raw scores of that step and its full trainable
    weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self._scores: list[float] = []
        self._responses: list[str] = []

    def on_rollout_end(self, trainer, module, rollout, samples) -> None:
        self._scores = samples.raw_scores.tolist()
        self._responses = list(samples.responses)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        weights, frozen_dtypes = {}, set()
        for name, p in module.named_parameters():
            if p.requires_grad:  # full_tensor() is a collective: every rank runs it for every parameter
                weights[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            else:
                frozen_dtypes.add(str(p.dtype))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "scores": self._scores,
            "responses": self._responses,
            "weights": weights,
            "frozen_dtypes": sorted(frozen_dtypes),
            "world_size": trainer.world_size,
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")


class CountGradientSyncs(Callback):
    """Counts DDP's gradient all-reduces (its comm hook runs once per bucket per synchronizing backward) and writes
    ``rank{r}_syncs.pt`` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.calls = 0

    def on_train_start(self, trainer, module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def count_then_all_reduce(state, bucket):
            self.calls += 1
            return default_hooks.allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, count_then_all_reduce)

    def on_train_end(self, trainer, module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"calls": self.calls}, self.out_dir / f"rank{trainer.global_rank}_syncs.pt")


class SameScoreForSamePrompts(Reward):
    """A reward: 0.5 for every response to a prompt that starts with "Same", the response's length otherwise."""

    def __call__(self, prompts, responses, **tensors):
        return torch.tensor(
            [0.5 if p.startswith("Same") else float(len(r)) for p, r in zip(prompts, responses, strict=True)]
        )


class CharFractionNeedingPromptFields(Reward):
    """``CharFractionReward``'s score, from a reward that needs each prompt's own field ``reversed_prompt`` (its text
    reversed) and raises when a response arrives with another prompt's field: a run that finishes carried every
    prompt's fields with its responses, on every process."""

    def __call__(self, prompts, responses, *, reversed_prompt, **tensors):
        wrong = [p for p, field in zip(prompts, reversed_prompt, strict=True) if field != p[::-1]]
        if wrong:
            raise AssertionError(f"responses to {wrong} came with another prompt's field")
        return CharFractionReward()(prompts, responses)
