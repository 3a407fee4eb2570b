"""Export after a tiny fit: what peft and transformers load back must generate, score and value like the module."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from dist_helpers import run_cli_fit
from helpers import TINY_POLICY as TINY
from lightning.pytorch import Trainer, seed_everything
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlhf.callbacks import ExportCallback
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.export import export_from_checkpoint, export_policy, load_value_head, main
from lightning_rlhf.models import LoraConfig, PolicyConfig, build_policy, load_tokenizer
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig

TESTS = Path(__file__).resolve().parent
PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: ", "Tell me ", "Once upon a time", "Yes", "No way "]
EVAL_PROMPTS = ["Hello there. ", "abc", "Once upon a time"]
NEW_TOKENS = 8
LORA = LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"])
FULL = LoraConfig(enabled=False)


def fit_and_export(tmp: Path, lora: LoraConfig) -> SimpleNamespace:
    """Two PPO iterations with an ExportCallback, then a Lightning checkpoint and a direct export of the module."""
    seed_everything(0, verbose=False)
    module = PPOModule(
        policy=TINY,
        lora=lora,
        generation=GenerationConfig(max_new_tokens=6),
        ppo=PPOConfig(ppo_epochs=2, num_minibatches=2),
        reward=CharFractionReward(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )
    trainer = Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ExportCallback(dirpath=str(tmp / "callback"), every_n_steps=1, merge=True)],
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))
    trainer.save_checkpoint(tmp / "last.ckpt")
    paths = export_policy(module.model, module.tokenizer, tmp / "direct", merge=True)
    return SimpleNamespace(module=module, paths=paths, tmp=tmp)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return fit_and_export(tmp_path_factory.mktemp("lora"), LORA)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return fit_and_export(tmp_path_factory.mktemp("full"), FULL)


@pytest.fixture(params=["lora", "full"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def prompts(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(EVAL_PROMPTS, padding=True, add_special_tokens=False, return_tensors="pt")  # left-padded


def trained_tokens(module: PPOModule) -> torch.Tensor:
    enc = prompts(module.tokenizer)
    with torch.no_grad():
        return module.model(
            enc["input_ids"], enc["attention_mask"], mode="generate", do_sample=False, max_new_tokens=NEW_TOKENS
        )


def greedy(lm, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return lm.generate(**prompts(tokenizer), do_sample=False, max_new_tokens=NEW_TOKENS)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)  # as in training: left padding does not shift the positions


def test_training_moved_the_exported_weights(lora_run, full_run):
    lora_weights = load_file(lora_run.paths["adapter"] / "adapter_model.safetensors")
    assert any("lm_head" in k for k in lora_weights), "modules_to_save lm_head missing from the adapter"
    assert any(v.abs().sum() > 0 for k, v in lora_weights.items() if "lora_B" in k), "LoRA B is still zero"
    base = AutoModelForCausalLM.from_pretrained(full_run.paths["merged"]).state_dict()
    initial = build_policy(TINY, FULL, load_tokenizer(TINY)).lm.state_dict()
    assert any(not torch.equal(base[k], initial[k]) for k in initial), "full fine-tuning export equals the init"


def test_base_is_the_untrained_model(lora_run):
    # peft's unload() alone would keep the trained copy of lm_head (modules_to_save) in the base.
    base = AutoModelForCausalLM.from_pretrained(lora_run.paths["base"]).state_dict()
    initial = build_policy(TINY, FULL, load_tokenizer(TINY)).lm.state_dict()
    assert base.keys() == initial.keys()
    for name, weight in initial.items():
        torch.testing.assert_close(base[name], weight, rtol=0, atol=0, msg=name)


def test_adapter_generates_the_trained_tokens(lora_run):
    paths = lora_run.paths
    tokenizer = AutoTokenizer.from_pretrained(paths["adapter"])
    assert tokenizer.padding_side == "left"
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["base"]), paths["adapter"])
    expected = trained_tokens(lora_run.module)
    assert torch.equal(greedy(policy, tokenizer), expected)
    base_only = AutoModelForCausalLM.from_pretrained(paths["base"])
    assert not torch.equal(greedy(base_only, tokenizer), expected), "the adapter changes nothing: weak test"


def test_merged_model_gives_the_trained_tokens_and_logits(run):
    module, merged_dir = run.module, run.paths["merged"]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not isinstance(merged, PeftModel)
    assert torch.equal(greedy(merged, tokenizer), trained_tokens(module))
    enc = prompts(tokenizer)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        logits, _ = module.model(ids, mask, mode="policy")
        theirs = merged(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], logits[real])


def test_value_head_reloads_with_the_trained_values(run):
    module, out = run.module, run.paths["value_head"].parent
    assert json.loads((out / "value_head.json").read_text())["hidden_size"] == TINY.tiny.hidden_size
    value_head = load_value_head(out)
    merged = AutoModelForCausalLM.from_pretrained(run.paths["merged"])
    enc = prompts(module.tokenizer)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        _, values = module.model(ids, mask, mode="policy")
        hidden = merged.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        theirs = value_head(hidden.last_hidden_state.float()).squeeze(-1)
    torch.testing.assert_close(theirs[mask.bool()], values[mask.bool()])
    torch.testing.assert_close(load_value_head(run.paths["value_head"]).weight, module.model.value_head.weight)


def test_export_does_not_change_the_training_model(lora_run, tmp_path):
    model = lora_run.module.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_policy(model, lora_run.module.tokenizer, tmp_path, merge=True)
    after = model.state_dict()
    assert model.uses_lora
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def files_equal(a: Path, b: Path) -> None:
    """Every weights file of export ``a`` is in export ``b`` with equal tensors (``b`` may hold more: step_N/)."""
    names = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(names) >= 2
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_export_from_checkpoint_matches_the_direct_export(run):
    paths = export_from_checkpoint(run.tmp / "last.ckpt", run.tmp / "from_ckpt", merge=True)
    assert paths.keys() == run.paths.keys()
    files_equal(run.tmp / "direct", run.tmp / "from_ckpt")


def test_callback_exports_at_the_end_of_fit_and_every_n_steps(run):
    written = {p.relative_to(run.tmp / "callback").as_posix() for p in (run.tmp / "callback").rglob("*")}
    model_dirs = ["adapter", "base", "merged"] if run.module.model.uses_lora else ["merged"]
    for prefix in ("", "step_1/", "step_2/"):
        assert f"{prefix}value_head.safetensors" in written
        assert f"{prefix}value_head.json" in written
        for name in model_dirs:
            assert f"{prefix}{name}/config.json" in written or f"{prefix}{name}/adapter_config.json" in written
            assert f"{prefix}{name}/tokenizer_config.json" in written
    assert "step_3/value_head.json" not in written
    files_equal(run.tmp / "direct", run.tmp / "callback")
    with pytest.raises(AssertionError):  # the step-1 export holds other weights than the final one
        files_equal(run.tmp / "direct", run.tmp / "callback" / "step_1")


def test_callback_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="every_n_steps"):
        ExportCallback(every_n_steps=0)


def test_merged_lm_head_survives_tied_embeddings(tmp_path):
    # A trained lm_head (modules_to_save) on a base whose lm_head is tied to the input embeddings must not be
    # replaced by the embeddings when the merged model is loaded.
    tokenizer = load_tokenizer(PolicyConfig())
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    model = build_policy(PolicyConfig(name_or_path=str(tmp_path / "tied"), tokenizer="byte"), LORA, tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "value_head" not in name:
                p.add_(0.1 * torch.randn_like(p))
    paths = export_policy(model, tokenizer, tmp_path / "out", merge=True)
    assert not json.loads((paths["merged"] / "config.json").read_text())["tie_word_embeddings"]
    assert "base" not in paths  # a named base: adapter_config.json points at it
    adapter_config = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "tied")
    ids = torch.tensor([[5, 9, 100, 42, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected, _ = model(ids, mask, mode="policy")
        merged = AutoModelForCausalLM.from_pretrained(paths["merged"])(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "tied"), paths["adapter"])
        from_adapter = adapter(input_ids=ids).logits
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(from_adapter, expected)


def test_cli_errors_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing.ckpt' does not exist" in capsys.readouterr().err
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "other.ckpt"), str(tmp_path / "out")])
    assert "is not a lightning_rlhf PPOModule checkpoint" in capsys.readouterr().err
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "text.ckpt"), str(tmp_path / "out")])
    assert "Could not read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_checkpoint(lora_run, tmp_path, capsys):
    main([str(lora_run.tmp / "last.ckpt"), str(tmp_path / "out")])
    assert "adapter:" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "adapter",
        "base",
        "value_head.json",
        "value_head.safetensors",
    }


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_rlhf.export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert "lightning-rlhf-export: error:" in result.stderr


def test_fsdp2_export_gathers_the_full_weights(tmp_path):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 1,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "callbacks": [
                {"class_path": "dist_helpers.DumpRankState", "init_args": {"out_dir": str(tmp_path / "dump")}},
                {
                    "class_path": "lightning_rlhf.callbacks.ExportCallback",
                    "init_args": {"dirpath": str(tmp_path / "export"), "merge": True},
                },
            ],
        },
        "model": {
            "class_path": "lightning_rlhf.module.PPOModule",
            "init_args": {
                "policy": {"tiny": {"hidden_size": 32, "intermediate_size": 64}},
                "lora": {"r": 4, "modules_to_save": ["lm_head"]},
                "generation": {"max_new_tokens": 6, "do_sample": False},
                "ppo": {"ppo_epochs": 1, "num_minibatches": 1},
                "reward": {"class_path": "lightning_rlhf.rewards.CharFractionReward"},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            },
        },
        "data": {
            "class_path": "lightning_rlhf.data.PromptDataModule",
            "init_args": {"prompts": PROMPTS, "batch_size": 4, "shuffle": False},
        },
    }
    run_cli_fit(tmp_path, cfg, "--trainer.devices=2", "--trainer.strategy=fsdp2")
    trained = torch.load(tmp_path / "dump" / "rank0_step1.pt", weights_only=True)["weights"]
    value_head = load_value_head(tmp_path / "export")
    torch.testing.assert_close(value_head.weight, trained["model.value_head.weight"], rtol=0, atol=0)
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "base"), tmp_path / "export" / "adapter"
    )
    exported = {f"model.lm.{k}": v for k, v in adapter.named_parameters()}
    for name, weight in trained.items():
        if "value_head" not in name:
            torch.testing.assert_close(exported[name], weight, rtol=0, atol=0, msg=name)
    assert (tmp_path / "export" / "merged" / "model.safetensors").is_file()
