"""``generation.engine: vllm`` on several processes (CPU, gloo; the vLLM CI job): one engine per process under DDP and
FSDP2 samples what one process samples (one process x 4 prompts == two x 2: the same responses, scores and weights),
and a resumed run continues as the uninterrupted one."""

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from dist_helpers import run_cli_fit
from helpers import TINY_VLLM

pytestmark = pytest.mark.vllm

PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: "]


def metrics(out: Path) -> list[dict]:
    return list(csv.DictReader(next(out.rglob("metrics.csv")).open()))


def dist_config(out_dir: Path, batch_size: int, max_steps: int, ckpt_dir: Path | None = None) -> dict:
    callbacks = [{"class_path": "dist_helpers.DumpRankState", "init_args": {"out_dir": str(out_dir)}}]
    if ckpt_dir is not None:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 1, "save_top_k": -1},
            }
        )
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": max_steps,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out_dir)}},
        },
        "model": {
            "class_path": "lightning_rlhf.module.PPOModule",
            "init_args": {
                "policy": {"tiny": dataclasses.asdict(TINY_VLLM)},
                "lora": {"r": 4, "modules_to_save": ["lm_head"]},
                "generation": {"max_new_tokens": 6, "samples_per_prompt": 2, "engine": "vllm"},
                "ppo": {
                    "ppo_epochs": 2,
                    "kl_coef": 0.05,
                    "advantage_estimator": "grpo",
                    "rollout_correction": "token_tis",
                },
                "reward": {"class_path": "lightning_rlhf.rewards.CharFractionReward"},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.5}},
            },
        },
        "data": {
            "class_path": "lightning_rlhf.data.PromptDataModule",
            "init_args": {"prompts": PROMPTS * 2, "batch_size": batch_size, "shuffle": False},
        },
    }


def run(tmp: Path, name: str, cfg: dict, *extra: str) -> Path:
    out = tmp / name
    out.mkdir(parents=True)
    run_cli_fit(out, cfg, *extra, timeout_s=400)
    return out


def dumps(out: Path, step: int) -> list[dict]:
    return [torch.load(f, weights_only=True) for f in sorted(out.glob(f"rank*_step{step}.pt"))]


TWO = ("--trainer.devices=2",)


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_dist")
    runs = {"single": run(tmp, "single", dist_config(tmp / "single", batch_size=4, max_steps=3))}
    cfg = dist_config(tmp / "ddp", batch_size=2, max_steps=3, ckpt_dir=tmp / "ddp_ckpt")
    runs["ddp"] = run(tmp, "ddp", cfg, *TWO, "--trainer.strategy=ddp_rlhf")
    ckpt = next((tmp / "ddp_ckpt").glob("*step=1.ckpt"))
    cfg = dist_config(tmp / "resumed", batch_size=2, max_steps=3)
    runs["resumed"] = run(tmp, "resumed", cfg, *TWO, "--trainer.strategy=ddp_rlhf", f"--ckpt_path={ckpt}")
    runs["fsdp2"] = run(
        tmp, "fsdp2", dist_config(tmp / "fsdp2", batch_size=2, max_steps=2), *TWO, "--trainer.strategy=fsdp2"
    )
    full = dist_config(tmp / "fsdp2_full", batch_size=2, max_steps=3)
    full["model"]["init_args"]["lora"] = {"enabled": False}
    runs["fsdp2_full"] = run(tmp, "fsdp2_full", full, *TWO, "--trainer.strategy=fsdp2")
    return runs


def test_one_engine_per_process_samples_what_one_process_samples(dist_runs):
    # Each process holds an engine and samples its own 2 prompts; together they sample the one process's 4 prompts'
    # responses (streams named by prompt), score them alike and reach the same weights, under DDP and FSDP2.
    for name, steps in (("ddp", (1, 2, 3)), ("fsdp2", (1, 2))):
        for step in steps:
            (single,), pair = dumps(dist_runs["single"], step), dumps(dist_runs[name], step)
            assert len(pair) == 2
            assert sorted(pair[0]["responses"] + pair[1]["responses"]) == sorted(single["responses"]), (name, step)
            assert sorted(pair[0]["scores"] + pair[1]["scores"]) == pytest.approx(sorted(single["scores"]))
            for param, value in single["weights"].items():
                torch.testing.assert_close(pair[0]["weights"][param], value, msg=f"{name} step {step} {param}")
    for row in metrics(dist_runs["ddp"]):
        assert float(row["rollout/engine_logprob_gap"]) < 1e-5
        assert abs(float(row["rollout/is_weight"]) - 1.0) < 1e-4  # token_tis weights of a near-exact engine


def test_a_resumed_run_samples_and_trains_as_the_uninterrupted_run(dist_runs):
    # The engine holds no state a checkpoint must carry: it is rebuilt, fed the restored policy, and the responses'
    # seeds are named by (run seed, step, prompt), so on CPU in float32 the resumed run is the uninterrupted one.
    straight, resumed = dist_runs["ddp"], dist_runs["resumed"]
    assert not list(resumed.glob("rank*_step1.pt"))
    for step in (2, 3):
        for a, b in zip(dumps(resumed, step), dumps(straight, step), strict=True):
            assert a["responses"] == b["responses"]
            assert a["scores"] == b["scores"]
            for param, value in b["weights"].items():
                torch.testing.assert_close(a["weights"][param], value, msg=f"step {step} {param}")


def test_fsdp2_full_fine_tuning_feeds_the_engine_the_gathered_updated_weights(dist_runs):
    # Every weight trains and is sharded: each rollout gathers them for the engine. A stale or half-updated engine
    # would sample from another distribution than the trainer's and show a gap far above float32 rounding.
    rows = metrics(dist_runs["fsdp2_full"])
    assert len(rows) == 3
    for row in rows:
        assert float(row["rollout/engine_logprob_gap"]) < 1e-5
    dumped = dumps(dist_runs["fsdp2_full"], 3)
    assert len(dumped) == 2
    assert any("q_proj" in name for name in dumped[0]["weights"])  # full fine-tuning: the LM's own weights trained
