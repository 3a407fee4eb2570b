"""Built-in tasks: seeded, deterministic prompt generation, the arithmetic task's answers, and the registry."""

import dataclasses
import re

import pytest
import torch

from lightning_rlhf.rewards import CharFractionReward, LexiconSentimentReward, MathAnswerReward
from lightning_rlhf.tasks import TASKS, ArithmeticTask, get_task

PROBLEM = re.compile(r"What is (\d+) ([-+*]) (\d+)\? Put the answer in \\boxed\{\}\.")
"""An arithmetic prompt, read back independently of the task's own code."""


def test_registry_names_and_unknown_task():
    assert sorted(TASKS) == ["arithmetic", "lowercase", "sentiment"]
    assert get_task("sentiment").name == "sentiment"
    with pytest.raises(ValueError, match=r"unknown task 'imdb'; built-in tasks: arithmetic, lowercase, sentiment"):
        get_task("imdb")


@pytest.mark.parametrize(("name", "count"), [("lowercase", 224), ("sentiment", 360), ("arithmetic", 3 * 50 * 50)])
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
    assert isinstance(get_task("arithmetic").default_reward(), MathAnswerReward)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("lowercase").name = "other"


@pytest.mark.parametrize("name", ["lowercase", "sentiment"])
def test_the_rows_of_a_word_list_task_are_its_prompts_alone(name):
    task = get_task(name)
    assert task.rows(300, seed=4) == [{"prompt": p} for p in task.prompts(300, seed=4)]


def test_arithmetic_rows_carry_the_right_answer_as_a_string():
    rows = get_task("arithmetic").rows(600, seed=1)
    assert rows == get_task("arithmetic").rows(600, seed=1)
    assert [r["prompt"] for r in rows] == get_task("arithmetic").prompts(600, seed=1)
    operators = set()
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        a, op, b = PROBLEM.fullmatch(row["prompt"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert isinstance(row["answer"], str)
        assert row["answer"] == str(expected)
        assert 1 <= int(a) <= 50
        assert 1 <= int(b) <= 50
        operators.add(op)
    assert operators == {"+", "-", "*"}  # a mix, not one operator first
    assert any(r["answer"].startswith("-") for r in rows)  # b > a gives a negative answer


def test_example_arithmetic_rows_and_a_changed_row_does_not_change_the_task():
    task = get_task("arithmetic")
    every = task.rows(task.num_distinct, seed=0)
    assert {"prompt": "What is 17 + 25? Put the answer in \\boxed{}.", "answer": "42"} in every
    assert {"prompt": "What is 3 - 9? Put the answer in \\boxed{}.", "answer": "-6"} in every
    assert {"prompt": "What is 12 * 11? Put the answer in \\boxed{}.", "answer": "132"} in every
    first = task.rows(1, seed=0)
    first[0]["answer"] = "changed"
    assert task.rows(1, seed=0)[0]["answer"] != "changed"


def test_a_smaller_arithmetic_task_and_bad_settings():
    task = ArithmeticTask("tiny", "d", "lightning_rlhf.rewards.MathAnswerReward", max_operand=2, operators=("-",))
    assert task.num_distinct == 4  # 1-1, 1-2, 2-1, 2-2
    assert sorted(r["answer"] for r in task.rows(4)) == ["-1", "0", "0", "1"]
    with pytest.raises(ValueError, match="ArithmeticTask max_operand must be >= 1, got 0"):
        ArithmeticTask("t", "d", "r", max_operand=0)
    with pytest.raises(ValueError, match=r"ArithmeticTask operators=\('/',\) must be one or more of \+, -, \*"):
        ArithmeticTask("t", "d", "r", operators=("/",))


@pytest.fixture(scope="module")
def math_reward():
    reward = MathAnswerReward(num_workers=1)
    reward.setup(torch.device("cpu"))
    yield reward
    reward.teardown()


def test_math_answer_reward_scores_arithmetic_rows(math_reward):
    rows = get_task("arithmetic").rows(4, seed=2)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    right = [f"The answer is \\boxed{{{a}}}." for a in answers]
    wrong = [f"The answer is \\boxed{{{int(a) + 1}}}." for a in answers]
    scores = math_reward(prompts * 2, right + wrong, answer=answers * 2)
    assert scores.tolist() == [1.0] * 4 + [0.0] * 4
