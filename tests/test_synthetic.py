"""The synthetic world: the hidden rule by hand, demonstrations and pairs, determinism, and the shipped prompt file."""

import json
from pathlib import Path

import pytest
import torch

from lightning_rlhf.synthetic import GLOOMY_WORDS, SUNNY_WORDS, TOPICS, WORLD, SyntheticTrueReward, SyntheticWorld

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "recipes" / "data" / "pipeline_prompts.jsonl"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("happy sunny cat", 2 / 3),  # two sunny words of three
        ("bleak sunny cat", 1 / 3),
        ("bleak stale cat", 0.0),
        ("happy", 1 / 3),  # fewer than 3 words still counts 3
        ("happy sunny lucky jolly", 1.0),  # 4 sunny of 4
        ("happy sunny cat yyyy", 0.5),  # a made-up word dilutes: 2 of 4
        ("yyyy yyyy yyyy", 0.0),  # the reward-model hack scores nothing
        ("Happy, SUNNY! cat.", 2 / 3),  # case and punctuation are ignored
        ("", 0.0),
    ],
)
def test_true_reward_by_hand(response, expected):
    assert WORLD.true_reward("topic: cat\n", response) == pytest.approx(expected)


def test_vocabulary_makes_the_rule_a_character_property():
    assert all(w.endswith("y") and len(w) == 5 for w in SUNNY_WORDS)
    assert all("y" not in w and len(w) == 5 for w in GLOOMY_WORDS)
    assert all("y" not in t for t in TOPICS)


def test_demonstrations_have_the_format_and_mean_reward_one_third():
    rows = WORLD.demonstrations(3000, seed=0)
    for row in rows[:200]:
        topic = row["prompt"].removeprefix("topic: ").removesuffix("\n")
        words = row["response"].split()
        assert row["prompt"] == f"topic: {topic}\n"
        assert len(words) == 3
        assert words[-1] == topic
        assert set(words[:2]) <= set(SUNNY_WORDS + GLOOMY_WORDS)
    mean = sum(WORLD.true_reward(r["prompt"], r["response"]) for r in rows) / len(rows)
    assert abs(mean - 1 / 3) < 0.02  # each adjective is sunny with probability 1/2: E = 2 * 1/2 / 3


def test_pairs_are_labelled_by_the_rule_with_the_given_noise():
    clean = WORLD.preference_pairs(500, seed=0, label_noise=0.0)
    assert all(
        WORLD.true_reward(r["prompt"], r["chosen"]) > WORLD.true_reward(r["prompt"], r["rejected"]) for r in clean
    )
    assert all(r["chosen"].split()[-1] == r["rejected"].split()[-1] == r["prompt"].split()[1] for r in clean)
    noisy = WORLD.preference_pairs(2000, seed=0, label_noise=0.2)
    flipped = sum(
        WORLD.true_reward(r["prompt"], r["chosen"]) < WORLD.true_reward(r["prompt"], r["rejected"]) for r in noisy
    )
    assert 0.17 < flipped / len(noisy) < 0.23


def test_same_seed_same_data_other_seed_other_data():
    assert WORLD.demonstrations(50, seed=3) == WORLD.demonstrations(50, seed=3)
    assert WORLD.preference_pairs(50, seed=3) == WORLD.preference_pairs(50, seed=3)
    assert WORLD.preference_pairs(50, seed=3) != WORLD.preference_pairs(50, seed=4)


def test_prompts_cycle_through_every_topic():
    prompts = WORLD.prompts(2 * len(TOPICS) + 1, seed=0)
    assert sorted(prompts[: len(TOPICS)]) == sorted(f"topic: {t}\n" for t in TOPICS)
    assert sorted(prompts[len(TOPICS) : 2 * len(TOPICS)]) == sorted(f"topic: {t}\n" for t in TOPICS)


def test_shipped_prompt_file_is_what_the_code_generates():
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines()]
    assert rows == [{"prompt": p} for p in WORLD.prompts(96, seed=0)]


def test_true_reward_as_a_reward():
    scores = SyntheticTrueReward()(["topic: cat\n"] * 2, ["happy sunny cat", "bleak stale cat"])
    torch.testing.assert_close(scores, torch.tensor([2 / 3, 0.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_adjectives": 0}, "num_adjectives"),
        ({"topics": ()}, "topics"),
        ({"sunny_words": ("happy",), "gloomy_words": ("happy",)}, "sunny words also listed"),
    ],
)
def test_world_refuses_inconsistent_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticWorld(**kwargs)


def test_label_noise_of_one_half_is_refused():
    with pytest.raises(ValueError, match="label_noise"):
        WORLD.preference_pairs(4, label_noise=0.5)
