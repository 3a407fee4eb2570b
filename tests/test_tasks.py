"""Built-in tasks: seeded, deterministic prompt generation and the registry."""

import dataclasses

import pytest

from lightning_rlhf.rewards import CharFractionReward, LexiconSentimentReward
from lightning_rlhf.tasks import TASKS, get_task


def test_registry_names_and_unknown_task():
    assert sorted(TASKS) == ["lowercase", "sentiment"]
    assert get_task("sentiment").name == "sentiment"
    with pytest.raises(ValueError, match=r"unknown task 'imdb'; built-in tasks: lowercase, sentiment"):
        get_task("imdb")


@pytest.mark.parametrize(("name", "count"), [("lowercase", 224), ("sentiment", 360)])
def test_prompts_are_deterministic_and_cover_every_combination(name, count):
    task = get_task(name)
    assert task.num_distinct == count
    first = task.prompts(count, seed=7)
    assert first == task.prompts(count, seed=7)
    assert first != task.prompts(count, seed=8)
    assert len(set(first)) == count  # one full pass: every prompt exactly once
    assert all(p.isascii() and p[0].isupper() for p in first)  # byte-friendly, capitalised
    assert task.prompts(5, seed=7) == first[:5]  # a shorter request is a prefix of the same order
    longer = task.prompts(count + 10, seed=7)
    assert longer[:count] == first
    assert set(longer[count:]) <= set(first)


def test_example_prompts():
    assert "The movie was" in get_task("sentiment").prompts(360, 0)
    assert "Honestly, the sequel turned out to be" in get_task("sentiment").prompts(360, 0)
    assert "Say something: " in get_task("lowercase").prompts(224, 0)
    assert get_task("lowercase").prompts(0, 0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        get_task("lowercase").prompts(-1, 0)


def test_default_rewards_and_frozen():
    assert isinstance(get_task("lowercase").default_reward(), CharFractionReward)
    assert isinstance(get_task("sentiment").default_reward(), LexiconSentimentReward)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("lowercase").name = "other"
