"""The SFT -> reward model -> PPO hand-off: each stage loads what the previous one saved, through the shipped recipes;
PPO logs the evaluation reward; and (marker ``slow``) the whole offline pipeline raises the true reward."""

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from lightning import Trainer

from lightning_rlhf.cli import main
from lightning_rlhf.data import PreferenceDataModule, PromptDataModule
from lightning_rlhf.models import LoraConfig, PolicyConfig, TinyModelConfig
from lightning_rlhf.module import PPOModule
from lightning_rlhf.reward_model import RewardModelConfig, RewardModelModule
from lightning_rlhf.rewards import Reward, RewardModelScorer, encode_scored_texts
from lightning_rlhf.rollout import GenerationConfig
from lightning_rlhf.synthetic import WORLD

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "recipes" / "pipeline"
PROMPTS = REPO / "recipes" / "data" / "pipeline_prompts.jsonl"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def recipe(name):
    return yaml.safe_load((PIPELINE / name).read_text())


def test_recipes_hand_off_through_the_same_paths():
    sft, rm, ppo = recipe("sft.yaml"), recipe("rm.yaml"), recipe("ppo.yaml")
    assert sft["model"]["class_path"] == "lightning_rlhf.sft.SFTModule"
    assert rm["model"]["class_path"] == "lightning_rlhf.reward_model.RewardModelModule"
    ppo_args = ppo["model"]["init_args"]
    assert ppo_args["policy"]["name_or_path"] == sft["model"]["init_args"]["output_dir"]
    assert ppo_args["reward"]["class_path"] == "lightning_rlhf.rewards.RewardModelScorer"
    assert ppo_args["reward"]["init_args"]["name_or_path"] == rm["model"]["init_args"]["output_dir"]
    assert ppo_args["eval_reward"]["class_path"] == "lightning_rlhf.synthetic.SyntheticTrueReward"
    assert (REPO / ppo["data"]["init_args"]["prompts"]).is_file()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Run the SFT and reward-model recipes (tiny overrides) through the CLI; their output directories."""
    out = tmp_path_factory.mktemp("pipeline")
    sft_model, rm_model = out / "sft-model", out / "rm-model"
    common = [f"--trainer.logger.init_args.save_dir={out}", "--trainer.max_steps=4", *QUIET]
    sft_args = [
        f"--model.init_args.output_dir={sft_model}",
        "--model.init_args.policy.tiny.hidden_size=32",
        "--model.init_args.policy.tiny.intermediate_size=64",
        "--data.init_args.num_examples=80",
        "--data.init_args.batch_size=16",
    ]
    rm_args = [
        f"--model.init_args.output_dir={rm_model}",
        "--model.init_args.reward_model.tiny.hidden_size=32",
        "--model.init_args.reward_model.tiny.intermediate_size=64",
        "--data.init_args.num_pairs=80",
        "--data.init_args.batch_size=16",
    ]
    main(["fit", "--config", str(PIPELINE / "sft.yaml"), *sft_args, *common])
    main(["fit", "--config", str(PIPELINE / "rm.yaml"), *rm_args, *common])
    return {"out": out, "sft": sft_model, "rm": rm_model}


@pytest.mark.parametrize("lora_enabled", [True, False], ids=["lora", "full"])
def test_sft_output_is_the_ppo_policy_and_its_reference(stages, lora_enabled):
    ppo = PPOModule(policy=PolicyConfig(name_or_path=str(stages["sft"])), lora=LoraConfig(enabled=lora_enabled))
    ppo.configure_model()
    assert isinstance(ppo.tokenizer, transformers.ByT5Tokenizer)  # the tokenizer saved next to the model
    sft = transformers.AutoModelForCausalLM.from_pretrained(stages["sft"])
    ids = torch.tensor([ppo.tokenizer("topic: owl\n")["input_ids"][:-1]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expected = sft(input_ids=ids).logits
        torch.testing.assert_close(ppo.model(ids, mask, mode="ref"), expected)  # reference = the SFT model
        torch.testing.assert_close(ppo.model(ids, mask, mode="policy")[0], expected)  # and the policy starts there


def test_reward_model_output_loads_in_the_ppo_scorer_with_the_trained_scores(tmp_path):
    module = RewardModelModule(
        reward_model=RewardModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64)),
        lora=LoraConfig(enabled=False),
        output_dir=str(tmp_path / "rm"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    data = PreferenceDataModule(synthetic=True, num_pairs=64, batch_size=16)
    Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(module, data)
    scorer = RewardModelScorer(str(tmp_path / "rm"))  # what ppo.yaml's reward builds from stage 2's output_dir
    scorer.setup(torch.device("cpu"))
    pairs = WORLD.preference_pairs(4, seed=7)
    prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    # PPO scores (prompt, response) texts; training saw them encoded by PreferenceDataModule: the same scores.
    with torch.no_grad():
        trained = torch.cat(
            [
                module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
                for ids in encode_scored_texts(prompts, responses, module.tokenizer)
            ]
        )
    torch.testing.assert_close(scorer(prompts, responses), trained)


class RecordingReward(Reward):
    """Constant 0.25; remembers that setup ran."""

    def __init__(self):
        self.devices = []

    def setup(self, device):
        self.devices.append(device)

    def __call__(self, prompts, responses, **tensors):
        return torch.full((len(responses),), 0.25)


def test_eval_reward_is_set_up_logged_and_never_optimized(stages):
    eval_reward = RecordingReward()
    module = PPOModule(
        policy=PolicyConfig(name_or_path=str(stages["sft"])),
        generation=GenerationConfig(max_new_tokens=4),
        reward=lambda prompts, responses: torch.zeros(len(responses)),  # the optimized reward: constant 0
        eval_reward=eval_reward,
    )
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, PromptDataModule(prompts=str(PROMPTS), batch_size=4))
    assert eval_reward.devices == [torch.device("cpu")]
    assert trainer.callback_metrics["rollout/true_reward"] == pytest.approx(0.25)
    assert trainer.callback_metrics["rollout/score"] == 0.0  # what PPO optimizes is still the configured reward


def test_ppo_recipe_runs_on_the_previous_stages_outputs(stages):
    out = stages["out"]
    overrides = [
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.policy.name_or_path={stages['sft']}",
        f"--model.init_args.reward.init_args.name_or_path={stages['rm']}",
        f"--data.init_args.prompts={PROMPTS}",
        "--trainer.max_steps=2",
        "--data.init_args.batch_size=8",
        "--model.init_args.generation.max_new_tokens=8",
        "--model.init_args.ppo.ppo_epochs=1",
        "--model.init_args.ppo.num_minibatches=2",
    ]
    main(["fit", "--config", str(PIPELINE / "ppo.yaml"), *overrides, *QUIET])
    rows = list(csv.DictReader(next((out / "ppo").rglob("metrics.csv")).open()))
    true_rewards = [float(r["rollout/true_reward"]) for r in rows if r.get("rollout/true_reward")]
    assert len(true_rewards) == 2
    assert all(0.0 <= t <= 1.0 for t in true_rewards)
    assert all(r["rollout/score"] for r in rows if r.get("rollout/true_reward"))


@pytest.mark.slow
def test_full_pipeline_raises_the_true_reward(tmp_path):
    spec = importlib.util.spec_from_file_location("run_pipeline", REPO / "scripts" / "run_pipeline.py")
    run_pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_pipeline)
    result = run_pipeline.main(["--out", str(tmp_path), "--samples", "16"])
    assert result["rm_accuracy_true"] > 0.95  # the rule, learned from noisy pairs alone
    assert result["rm_val_accuracy"] > 0.8  # noisy labels: the ceiling is 0.9
    sft, ppo = result["sft_policy"], result["ppo_policy"]
    assert sft["kl"] == pytest.approx(0.0, abs=1e-4)  # the SFT policy is the reference
    assert ppo["rm_score"] > sft["rm_score"] + 1.0
    assert ppo["true_reward"] > sft["true_reward"] + 0.15  # not only the reward model's score
    assert 0.0 < ppo["kl"] < 20.0
