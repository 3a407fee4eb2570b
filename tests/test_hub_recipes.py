"""The hub recipes run one PPO iteration on CPU with tiny stand-ins of their models.

CI has no hub access and no GPU, so each hub model is replaced by a small random model of the same architecture
(Qwen2 policy and Qwen3 sequence-classification reward model with chat templates; GPT-2 policy and DistilBERT
classifier), saved with a byte-level BPE tokenizer trained in memory. Everything else is the recipe as users run it:
its precision (``bf16-true`` for Qwen), LoRA or full fine-tuning, PPO settings, reward options and prompts; only the
accelerator, the step count, the epochs and the response length shrink (and GPT-2's batch, 64 -> 8). The Qwen
recipe's ``bf16-true`` crash at the first rollout was found on a GPU; this test finds it on CPU.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lightning_rlhf.cli import main

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    *(REPO / "recipes" / "data" / "chat_prompts.jsonl").read_text().splitlines(),
    "The movie was great, I watched this film and loved it. A terrible, boring plot.",
]
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
FAST_RUN = [
    "--trainer.accelerator=cpu",
    "--trainer.max_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.generation.max_new_tokens=6",
    "--model.ppo.ppo_epochs=1",
]


def byte_bpe(special: list[str], **tokens: str) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 and Qwen style) trained on a few lines, with ``special`` tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **tokens)


def save(model_class, config, tokenizer, directory: Path) -> str:
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def run_recipe(recipe: str, tmp_path: Path, monkeypatch, *overrides: str) -> dict[str, float]:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(REPO / "recipes" / recipe), *FAST_RUN, *overrides])
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    (row,) = [r for r in csv.DictReader(metrics.open()) if r.get("rollout/score")]
    return {key: float(value) for key, value in row.items() if value}


def qwen_stand_in(tmp_path: Path) -> tuple[str, transformers.PreTrainedTokenizerFast, dict[str, int]]:
    """A tiny random Qwen2 policy saved to ``tmp_path / "qwen2"`` with a Qwen-style chat tokenizer: its path, the
    tokenizer, and the token ids a model of that vocabulary needs."""
    tokenizer = byte_bpe(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    policy = save(
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True, **ids),
        tokenizer,
        tmp_path / "qwen2",
    )
    return policy, tokenizer, ids


PACKING = ["--model.ppo.packing=false", "--model.ppo.packing=true"]
"""Each recipe also runs with ppo.packing: the boundary check and packed forwards on these architectures (bf16 weights
for Qwen, learned absolute positions and a frozen reference copy for GPT-2)."""


@pytest.mark.parametrize("packing", PACKING, ids=["padded", "packed"])
def test_qwen_recipe_runs_in_bf16_true_with_a_chat_reward_model(tmp_path, monkeypatch, packing):
    policy, tokenizer, ids = qwen_stand_in(tmp_path)
    reward = save(
        transformers.Qwen3ForSequenceClassification,
        transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, num_labels=1, **ids),
        tokenizer,
        tmp_path / "qwen3_rm",
    )
    row = run_recipe(
        "qwen2.5-0.5b-instruct_rm.yaml",
        tmp_path,
        monkeypatch,
        f"--model.policy.name_or_path={policy}",
        f"--model.reward.init_args.name_or_path={reward}",
        f"--data.prompts={REPO / 'recipes' / 'data' / 'chat_prompts.jsonl'}",
        packing,
    )
    assert row["policy/updates"] == 4  # num_minibatches 4 of the recipe, one epoch
    for name in ("rollout/score", "objective/kl", "loss/total", "policy/grad_norm"):
        assert math.isfinite(row[name]), name


@pytest.mark.parametrize("packing", PACKING, ids=["padded", "packed"])
def test_gpt2_recipe_runs_full_fine_tuning_with_a_classifier_reward(tmp_path, monkeypatch, packing):
    tokenizer = byte_bpe(["<|endoftext|>"], eos_token="<|endoftext|>")  # GPT-2: no pad token
    policy = save(
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
        ),
        tokenizer,
        tmp_path / "gpt2",
    )
    rm_tokenizer = byte_bpe(["[PAD]"], pad_token="[PAD]")
    reward = save(
        transformers.DistilBertForSequenceClassification,
        transformers.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=len(rm_tokenizer)),
        rm_tokenizer,
        tmp_path / "distilbert",
    )
    row = run_recipe(
        "gpt2-imdb_sentiment.yaml",
        tmp_path,
        monkeypatch,
        f"--model.policy.name_or_path={policy}",
        f"--model.reward.init_args.name_or_path={reward}",
        "--data.batch_size=8",
        packing,
    )
    assert row["policy/updates"] == 4
    for name in ("rollout/score", "objective/kl", "loss/total", "policy/grad_norm"):
        assert math.isfinite(row[name]), name


GSM8K_ROWS = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }
    for a, b in [(3, 4), (10, 5), (7, 8), (1, 1), (2, 9), (6, 6), (12, 30), (4, 40)] * 2
]
"""Rows shaped like openai/gsm8k's (``question``; ``answer``, a worked solution ending in ``#### <number>``)."""


def test_gsm8k_recipe_reads_a_dataset_and_checks_answers_against_its_reference(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    policy, _, _ = qwen_stand_in(tmp_path)
    DatasetDict({"train": Dataset.from_list(GSM8K_ROWS)}).save_to_disk(str(tmp_path / "gsm8k"))
    row = run_recipe(
        "qwen2.5-0.5b-instruct_gsm8k_grpo.yaml",
        tmp_path,
        monkeypatch,
        f"--model.policy.name_or_path={policy}",
        f"--data.dataset={tmp_path / 'gsm8k'}",  # a local copy saved with save_to_disk, in place of the hub id
    )
    assert row["policy/updates"] == 4  # num_minibatches 4 of the recipe's 16 x 8 responses, one epoch
    # No tiny random model gets an answer right or writes \boxed{}: every score is 0, and every reference was read
    # (the reward raises for a reference its reference_pattern does not match, or a missing answer field).
    assert row["rollout/score"] == 0.0
    assert row["rollout/zero_std_frac"] == 1.0
    for name in ("objective/kl", "loss/total"):
        assert math.isfinite(row[name]), name
