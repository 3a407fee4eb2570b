"""The lightning-rlhf command: recipes parse, a tiny fit writes CSV metrics and the config, custom rewards load."""

import csv
from pathlib import Path

import pytest
import yaml

from lightning_rlhf.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
CONFIGS = RECIPES + sorted((REPO / "benchmarks").glob("*.yaml"))
"""Recipes and the benchmarks' `lightning-rlhf fit` configs: every one must parse and carry the recipe header."""

STAGE_MODULES = {
    "lightning_rlhf.module.PPOModule",
    "lightning_rlhf.sft.SFTModule",
    "lightning_rlhf.reward_model.RewardModelModule",
}
"""The package's LightningModules, one per RLHF stage; every recipe trains one of them."""

TINY_OVERRIDES = [
    "--model.policy.tiny.hidden_size=32",
    "--model.policy.tiny.intermediate_size=64",
    "--model.generation.max_new_tokens=4",
    "--model.ppo.ppo_epochs=1",
    "--data.batch_size=4",
    "--data.num_prompts=8",
    "--trainer.max_steps=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] in STAGE_MODULES
    assert printed["trainer"]["max_steps"] > 0 or (printed["trainer"]["max_epochs"] or 0) > 0


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_header_says_purpose_hardware_run_expect(recipe):
    header = "\n".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    for word in ("Purpose", "Hardware", "Run:", "Expect:"):
        assert word in header, f"{recipe.name} header lacks {word!r}"


def test_quickstart_fit_writes_metrics_and_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), *TINY_OVERRIDES])
    run_dirs = list((tmp_path / "runs").rglob("metrics.csv"))
    assert len(run_dirs) == 1
    rows = list(csv.DictReader(run_dirs[0].open()))
    scores = [float(r["rollout/score"]) for r in rows if r.get("rollout/score")]
    assert len(scores) == 2
    assert (run_dirs[0].parent / "config.yaml").exists()


def test_default_root_dir_holds_metrics_config_and_checkpoints(tmp_path, monkeypatch):
    # Lightning users send a run elsewhere with --trainer.default_root_dir (a job directory, one root per sweep run);
    # the CLI's default logger wrote to ./runs whatever it said.
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "job" / "root"
    main(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "quickstart.yaml"),
            *TINY_OVERRIDES,
            f"--trainer.default_root_dir={root}",
        ]
    )
    run = root / "ppo" / "version_0"
    assert (run / "metrics.csv").is_file()
    assert (run / "config.yaml").is_file()
    assert list((run / "checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "runs").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(root)


def test_an_explicit_logger_save_dir_wins_over_default_root_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        f"--trainer.default_root_dir={tmp_path / 'root'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]
    main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), *TINY_OVERRIDES, *args])
    assert (tmp_path / "logs" / "ppo" / "version_0" / "metrics.csv").is_file()
    assert not (tmp_path / "root" / "ppo").exists()


def test_custom_reward_subclass_from_class_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "model": {"class_path": "custom_rewards.LengthRewardPPO", "init_args": {"target_len": 3}},
    }
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(path), *TINY_OVERRIDES])
    saved = yaml.safe_load(next((tmp_path / "runs").rglob("config.yaml")).read_text())
    assert saved["model"]["class_path"] == "custom_rewards.LengthRewardPPO"
    assert saved["model"]["init_args"]["target_len"] == 3
    rows = list(csv.DictReader(next((tmp_path / "runs").rglob("metrics.csv")).open()))
    # Responses have at most 4 bytes, so the length reward (target 3) is in [0, 1] and the reward ran.
    assert all(0.0 <= float(r["rollout/score"]) <= 1.0 for r in rows if r.get("rollout/score"))


def test_function_reward_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "function.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_args": {"reward": "custom_rewards.vowel_share"}}}))
    main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(path), *TINY_OVERRIDES])
    saved = yaml.safe_load(next((tmp_path / "runs").rglob("config.yaml")).read_text())
    assert saved["model"]["init_args"]["reward"] == "custom_rewards.vowel_share"


def test_help_explains_config_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "PPOModule", "--model.ppo.help", "PPOConfig"])
    assert exit_info.value.code in (0, None)
    # The text of PPOConfig.clip_coef's attribute docstring, not just its type.
    assert "Policy ratio clip epsilon" in capsys.readouterr().out
