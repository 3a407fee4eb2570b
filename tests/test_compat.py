"""What the package restructure must keep: old import paths (with a DeprecationWarning where a module moved), the
short class paths recipes use and ``--print_config`` prints, and checkpoints written before it."""

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cpu_trainer
from lightning.pytorch import Callback

from lightning_rlhf.cli import main
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig, PolicyConfig, TinyModelConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig

REPO = Path(__file__).resolve().parents[1]
OLD_CHECKPOINT = Path(__file__).resolve().parent / "data" / "ppo_checkpoint_0.1.0.dev0_a8e45fa.ckpt"
"""Written by the flat package (commit a8e45fa) after 2 iterations of the module that ``old_config_module`` builds."""

MOVED = {
    "lightning_rlhf.generation": ("lightning_rlhf.models.engines", ["cached_decode", "hf_generate", "merged_lora"]),
    "lightning_rlhf.packing": ("lightning_rlhf.models.packing", ["pack_rows", "unpack", "verify_packing"]),
    "lightning_rlhf.pipeline_data": ("lightning_rlhf.data", ["SFTDataModule", "PreferenceDataModule"]),
    "lightning_rlhf.export_callback": ("lightning_rlhf.callbacks.artifacts", ["ExportCallback"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_still_imports_with_a_deprecation_warning(old):
    new, names = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        alias = importlib.import_module(old)
    target = importlib.import_module(new)
    for name in names:
        assert getattr(alias, name) is getattr(target, name)


PUBLIC_PATHS = [
    "lightning_rlhf.functional.gae",
    "lightning_rlhf.functional.policy_loss",
    "lightning_rlhf.models.build_policy",
    "lightning_rlhf.models.PolicyValueModel",
    "lightning_rlhf.models.load_tokenizer",
    "lightning_rlhf.rewards.RewardModelScorer",
    "lightning_rlhf.rewards.CharFractionReward",
    "lightning_rlhf.data.PromptDataModule",
    "lightning_rlhf.data.SFTDataModule",
    "lightning_rlhf.callbacks.EntropyCollapseAlarm",
    "lightning_rlhf.callbacks.SampleTableCallback",
    "lightning_rlhf.callbacks.PlotCallback",
    "lightning_rlhf.rollout.GenerationConfig",
    "lightning_rlhf.rollout.forward_response",
    "lightning_rlhf.module.PPOModule",
    "lightning_rlhf.sft.SFTModule",
    "lightning_rlhf.reward_model.RewardModelModule",
    "lightning_rlhf.reward_model.RewardModelConfig",
]


@pytest.mark.parametrize("path", PUBLIC_PATHS)
def test_public_names_keep_their_import_paths_without_warnings(path):
    module, name = path.rsplit(".", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert getattr(importlib.import_module(module), name) is not None


def test_print_config_prints_the_short_class_paths(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_rlhf.module.PPOModule"
    assert printed["data"]["class_path"] == "lightning_rlhf.data.PromptDataModule"
    assert printed["model"]["init_args"]["reward"]["class_path"] == "lightning_rlhf.rewards.CharFractionReward"
    callbacks = {c["class_path"] for c in printed["trainer"]["callbacks"]}
    assert "lightning_rlhf.callbacks.EntropyCollapseAlarm" in callbacks


def old_config_module() -> PPOModule:
    return PPOModule(
        policy=PolicyConfig(
            tiny=TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        ),
        lora=LoraConfig(r=2, alpha=4),
        generation=GenerationConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1, num_minibatches=1, target_kl=1.0, score_norm="running"),
        reward=CharFractionReward(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )


def test_a_checkpoint_written_before_the_restructure_resumes():
    saved = torch.load(OLD_CHECKPOINT, weights_only=True)  # plain dicts and tensors only
    assert saved["global_step"] == 2
    assert "sampling_seed" not in saved["lightning_rlhf"]  # older than the per-response streams
    fresh = old_config_module()
    fresh.configure_model()
    trained = {name for name, p in fresh.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trained  # the same parameter names: the weights load where they belong
    module = old_config_module()
    restored = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            restored["kl_coef"] = pl_module.kl_ctl.value
            restored["weights"] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if n in trained}

    trainer = cpu_trainer(max_steps=3, callbacks=[AtStart()])
    data = PromptDataModule(prompts=["Say: ", "Hello ", "abc", "Tell me "], batch_size=2, shuffle=False)
    trainer.fit(module, datamodule=data, ckpt_path=str(OLD_CHECKPOINT))
    assert trainer.global_step == 3
    assert restored["kl_coef"] == saved["lightning_rlhf"]["kl_ctl"]["value"]
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(restored["weights"][name], value, msg=name)
    assert module.score_moments.count == saved["lightning_rlhf"]["score_moments"]["count"] + 2
