"""Exact resume: N steps straight equal N/2 steps, a stop, and a resume to N (sampling on, shuffled, mid-epoch)."""

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig, PolicyConfig, TinyModelConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig

# 10 prompts, batch 4: 2 batches per epoch (2 prompts dropped), so step 3 ends in the middle of epoch 1.
PROMPTS = [f"Prompt number {i}: " for i in range(10)]
STEPS, HALF = 6, 3


def build() -> tuple[PPOModule, PromptDataModule]:
    seed_everything(0, verbose=False)
    module = PPOModule(
        policy=PolicyConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64)),
        lora=LoraConfig(r=4, modules_to_save=["lm_head"]),
        generation=GenerationConfig(max_new_tokens=6, temperature=0.9),
        ppo=PPOConfig(ppo_epochs=2, num_minibatches=2, target_kl=1.0, kl_horizon=100, score_norm="running"),
        reward=CharFractionReward(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    return module, PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=True, seed=1)


def run(out: Path, max_steps: int, ckpt_path: str | None = None) -> PPOModule:
    module, data = build()
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(out, name="", version=""),
        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    straight = run(tmp / "straight", STEPS)
    run(tmp / "first_half", HALF)
    ckpt = next((tmp / "first_half" / "ckpt").glob(f"*step={HALF}.ckpt"))
    resumed = run(tmp / "resumed", STEPS, ckpt_path=str(ckpt))
    return tmp, straight, resumed


def test_resumed_run_logs_the_same_metrics_step_by_step(runs):
    tmp, _, _ = runs
    straight, resumed = rows(tmp / "straight"), rows(tmp / "resumed")
    assert sorted(resumed, key=int) == [str(s) for s in range(HALF, STEPS)]
    for step, metrics in resumed.items():
        assert metrics == straight[step], f"step {step} differs"


def test_resumed_run_ends_with_the_same_weights_and_state(runs):
    _, straight, resumed = runs
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    assert resumed.score_moments.state_dict() == straight.score_moments.state_dict()


def test_checkpoint_of_another_base_model_is_refused(runs):
    tmp, _, _ = runs
    ckpt = torch.load(next((tmp / "first_half" / "ckpt").glob("*.ckpt")), weights_only=True)
    other = PPOModule(policy=PolicyConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, seed=7)))
    with pytest.raises(ValueError, match="another base model"):
        other.on_load_checkpoint(ckpt)
