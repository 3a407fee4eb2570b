"""What only a GPU can show. Skipped without CUDA (see conftest.py); run with `python -m pytest -m gpu`."""

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig, PolicyConfig, TinyModelConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_iteration_on_one_gpu(precision):
    seed_everything(0, verbose=False)
    module = PPOModule(
        policy=PolicyConfig(tiny=TinyModelConfig(hidden_size=64)),
        lora=LoraConfig(modules_to_save=["lm_head"]),
        generation=GenerationConfig(max_new_tokens=8),
        ppo=PPOConfig(num_minibatches=2),
        reward=CharFractionReward(),
    )
    trainer = Trainer(
        max_steps=2, accelerator="gpu", devices=1, precision=precision, logger=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=PromptDataModule(task="lowercase", batch_size=8))
    metrics = trainer.logged_metrics
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["policy/updates"]) == 4.0
    assert torch.cuda.max_memory_allocated() > 0
