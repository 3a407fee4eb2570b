"""Reward interface, score validation, rule rewards (hand-worked values) and the HF reward-model scorer (tiny model)."""

import pickle

import numpy as np
import pytest
import torch
import transformers
from helpers import save_tiny_reward_model
from torch import nn
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification, ByT5Tokenizer

from lightning_rlhf.rewards import (
    CharFractionReward,
    LengthReward,
    LexiconSentimentReward,
    Reward,
    RewardModelScorer,
    call_reward,
    validate_scores,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PROMPTS = ["The movie was", "Say something: ", "Hi"]
RESPONSES = [" great fun", "a b c d e f g h", ""]


class Boom(Reward):
    def __call__(self, prompts, responses, **tensors):
        raise KeyError("missing")


class Spy(Reward):
    def __call__(self, prompts, responses, **tensors):
        self.seen = tensors
        return torch.zeros(len(prompts))


# ---------------------------------------------------------------- validate_scores / call_reward


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (torch.zeros(3, 1), r"MyReward.*shape \(3, 1\); expected \(3,\).*squeeze"),
        (torch.zeros(2), r"MyReward.*shape \(2,\); expected \(3,\)"),
        (torch.zeros(()), r"MyReward.*shape \(\); expected \(3,\)"),
        (torch.tensor([1, 0, 1]), r"MyReward.*dtype torch.int64.*convert with \.float\(\)"),
        (torch.tensor([True, False, True]), r"MyReward.*dtype torch.bool.*convert with \.float\(\)"),
        ([1, 2, 3], r"MyReward.*dtype torch.int64.*convert with \.float\(\)"),
        (torch.tensor([0.0, float("nan"), 1.0]), r"MyReward.*non-finite.*NaN in rows 1\)"),
        (torch.tensor([0.0, 1.0, -float("inf")]), r"MyReward.*non-finite.*\(inf in rows 2\)"),
        (torch.tensor([float("nan"), float("inf"), float("nan")]), r"NaN in rows 0, 2; inf in rows 1"),
        ("0.5", r"MyReward returned str; return a torch.Tensor of shape \(3,\)"),
        (None, r"MyReward returned NoneType"),
        ({"a": 1.0}, r"MyReward returned dict"),
        (["a", "b", "c"], r"MyReward returned list"),
    ],
)
def test_validate_scores_rejects(scores, match):
    with pytest.raises(ValueError, match=match):
        validate_scores(scores, 3, "MyReward")


def test_validate_scores_converts_and_detaches():
    out = validate_scores([0.5, 1, -2.0], 3, "r")  # a list of numbers becomes a tensor
    assert_close(out, torch.tensor([0.5, 1.0, -2.0]))
    assert out.dtype == torch.float32
    assert validate_scores(np.array([1.0, 2.0]), 2, "r").dtype == torch.float32  # float64 NumPy -> float32
    half = validate_scores(torch.tensor([0.25], dtype=torch.float16), 1, "r")
    assert half.dtype == torch.float32
    grad = validate_scores(torch.ones(2, requires_grad=True) * 2, 2, "r")
    assert not grad.requires_grad


def test_call_reward_wraps_exceptions():
    with pytest.raises(RuntimeError, match=r"reward Boom raised KeyError: 'missing'") as info:
        call_reward(Boom(), ["p"], ["r"])
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RuntimeError, match=r"reward Reward raised NotImplementedError"):
        call_reward(Reward(), ["p"], ["r"])


def test_call_reward_validates_and_names_functions():
    def two_scores(prompts, responses):
        return torch.zeros(2)

    with pytest.raises(ValueError, match=r"two_scores returned scores of shape \(2,\); expected \(1,\)"):
        call_reward(two_scores, ["p"], ["r"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        call_reward(two_scores, ["p", "q"], ["r"])


def test_call_reward_passes_tensors_to_reward_only():
    spy, ids = Spy(), torch.ones(1, 2, dtype=torch.long)
    call_reward(spy, ["p"], ["r"], response_ids=ids)
    assert spy.seen["response_ids"] is ids
    # A plain callable is called as f(prompts, responses): no keyword tensors.
    out = call_reward(lambda p, r: [float(len(x)) for x in r], ["p", "q"], ["ab", "abc"], response_ids=ids)
    assert_close(out, torch.tensor([2.0, 3.0]))


# ---------------------------------------------------------------- rule rewards


def test_char_fraction_reward():
    # "abc": 3/3; "aB c": a, " ", c of 4 -> 0.75; "": 0 by definition; "ABC!": 0/4.
    out = call_reward(CharFractionReward(), ["p"] * 4, ["abc", "aB c", "", "ABC!"])
    assert_close(out, torch.tensor([1.0, 0.75, 0.0, 0.0]))
    # "0101x": 4 of 5 characters are in "01".
    assert_close(CharFractionReward("01")(["p"], ["0101x"]), torch.tensor([0.8]))
    with pytest.raises(ValueError, match="chars must not be empty"):
        CharFractionReward("")


def test_char_fraction_min_len_closes_the_short_response_hack():
    # min_len 8: "a" -> 1/8; "abcdefgh" -> 8/8; "abcdefghij" (longer than min_len) -> 10/10; "" -> 0/8.
    out = CharFractionReward(min_len=8)(["p"] * 4, ["a", "abcdefgh", "abcdefghij", ""])
    assert_close(out, torch.tensor([0.125, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="min_len"):
        CharFractionReward(min_len=-1)


def test_lexicon_sentiment_reward():
    responses = ["The movie was great and fun", "Boring, dull... but GOOD", "", "bad", "it's a film"]
    # 2 positive of 6 words = 1/3; (1 - 2) / 4 words = -0.25; no words -> 0 / max(1, 0) = 0; -1 / 1; 0 / 3.
    out = call_reward(LexiconSentimentReward(), ["p"] * 5, responses)
    assert_close(out, torch.tensor([1 / 3, -0.25, 0.0, -1.0, 0.0]))
    custom = LexiconSentimentReward(positive=["Yay"], negative=["boo"])
    # words yay, YAY, boo, great: (2 - 1) / 4 (default words like "great" no longer count).
    assert_close(custom(["p"], ["yay YAY boo great"]), torch.tensor([0.25]))
    with pytest.raises(ValueError, match=r"both lexicons: \['meh'\]"):
        LexiconSentimentReward(positive=["meh"], negative=["MEH"])


def test_length_reward():
    # target 4: 1 - |len - 4| / 4 clipped to [0, 1]: len 4 -> 1, 2 -> 0.5, 5 -> 0.75, 8 -> 0, 10 -> 0 (clipped), 0 -> 0.
    out = LengthReward(target_len=4)(["p"] * 6, ["abcd", "ab", "abcde", "abcdefgh", "a" * 10, ""])
    assert_close(out, torch.tensor([1.0, 0.5, 0.75, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="target_len must be > 0"):
        LengthReward(0)


def test_rule_rewards_are_plain_picklable_objects():
    for reward in (CharFractionReward(), LexiconSentimentReward(), LengthReward()):
        assert not isinstance(reward, nn.Module)
        clone = pickle.loads(pickle.dumps(reward))
        assert_close(clone(PROMPTS, RESPONSES), reward(PROMPTS, RESPONSES))


# ---------------------------------------------------------------- RewardModelScorer


@pytest.fixture(scope="module")
def byt5():
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory, byt5):
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm"), byt5, pad_token_id=byt5.pad_token_id)


def manual_scores(path, texts, tokenizer, add_special_tokens=True, keep_last=None):
    """Score each text alone: run the backbone, apply the head at the last token."""
    model = AutoModelForSequenceClassification.from_pretrained(path)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
            ids = ids[:, -keep_last:] if keep_last else ids
            hidden = model.model(input_ids=ids).last_hidden_state  # (1, L, H)
            out.append(model.score(hidden[:, -1]).squeeze())
    return torch.stack(out)


def test_scorer_matches_manual_forward_and_ignores_batching(rm_path, byt5):
    scorer = RewardModelScorer(rm_path, batch_size=2)
    assert scorer.model is None  # __init__ loads nothing
    scorer.setup(torch.device("cpu"))
    expected = manual_scores(rm_path, [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)], byt5)
    scores = call_reward(scorer, PROMPTS, RESPONSES)
    assert_close(scores, expected)
    # Padding and batch composition change nothing: one big batch, and each text alone.
    scorer.batch_size = 16
    assert_close(scorer(PROMPTS, RESPONSES), expected)
    alone = torch.cat([scorer([p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    assert_close(alone, expected)
    assert expected.std() > 0  # the texts do get different scores


def test_packed_scorer_matches_each_text_scored_alone_and_runs_fewer_rows(tmp_path, byt5):
    path = save_tiny_reward_model(tmp_path, byt5, pad_token_id=byt5.pad_token_id, num_labels=2)
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    scorer = RewardModelScorer(path, batch_size=16, label_index=1, packing=True)
    scorer.setup(torch.device("cpu"))
    rows = []  # rows of every decoder forward (the packing check's one-row probes come first)
    scorer.model.model.embed_tokens.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    packed = scorer(PROMPTS, RESPONSES)
    assert rows[-1] < len(texts)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=byt5(t, return_tensors="pt").input_ids).logits[0, 1] for t in texts])
    assert_close(packed, alone)
    scorer.packing = False
    assert_close(packed, scorer(PROMPTS, RESPONSES))


def test_packed_scorer_refuses_a_classifier_without_a_score_head(rm_path):
    scorer = RewardModelScorer(rm_path, packing=True)
    scorer.setup(torch.device("cpu"))
    del scorer.model.score  # an encoder classifier's head is named otherwise (BERT: classifier)
    with pytest.raises(ValueError, match=r"reward\.init_args\.packing: LlamaForSequenceClassification has no `score`"):
        scorer(PROMPTS, RESPONSES)


def test_scorer_refuses_a_tokenizer_that_encodes_nothing(tmp_path, byt5):
    # A Qwen2 classifier saved with ByT5's files: transformers 5.24 loads an empty Qwen2Tokenizer from there.
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.Qwen2Config(**shape, vocab_size=384, num_labels=1, pad_token_id=0)
    transformers.Qwen2ForSequenceClassification(config).save_pretrained(tmp_path)
    byt5.save_pretrained(tmp_path)
    scorer = RewardModelScorer(str(tmp_path))
    with pytest.raises(ValueError, match=r"reward\.init_args\.name_or_path='.*' loaded as Qwen2Tokenizer"):
        scorer.setup(torch.device("cpu"))


def test_scorer_is_frozen_and_not_a_module(rm_path):
    scorer = RewardModelScorer(rm_path)
    scorer.setup(torch.device("cpu"))
    assert not isinstance(scorer, nn.Module)
    assert not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    assert not scorer(PROMPTS, RESPONSES).requires_grad
    assert scorer.tokenizer.padding_side == "right"


def test_scorer_sets_missing_pad_token_id(tmp_path, byt5):
    # Without config.pad_token_id the head would pool at the last column, i.e. at padding for shorter texts.
    path = save_tiny_reward_model(tmp_path, byt5, pad_token_id=None)
    scorer = RewardModelScorer(path, batch_size=8)
    scorer.setup(torch.device("cpu"))
    assert scorer.model.config.pad_token_id == byt5.pad_token_id
    alone = torch.cat([scorer([p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    assert_close(scorer(PROMPTS, RESPONSES), alone)


def test_scorer_chat_template(rm_path, byt5):
    scorer = RewardModelScorer(rm_path, use_chat_template=True)
    scorer.setup(torch.device("cpu"))
    texts = [
        byt5.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert texts[0] == "<user>The movie was\n<assistant> great fun\n"
    assert_close(scorer(PROMPTS, RESPONSES), manual_scores(rm_path, texts, byt5, add_special_tokens=False))


def test_scorer_keeps_last_tokens_when_too_long(rm_path, byt5):
    scorer = RewardModelScorer(rm_path, max_length=5)
    scorer.setup(torch.device("cpu"))
    with pytest.warns(UserWarning, match="max_length=5"):
        scores = scorer(PROMPTS[:2], RESPONSES[:2])
    texts = [p + r for p, r in zip(PROMPTS[:2], RESPONSES[:2], strict=True)]
    assert_close(scores, manual_scores(rm_path, texts, byt5, keep_last=5))


def test_scorer_pickles_config_only(rm_path):
    scorer = RewardModelScorer(rm_path)
    scorer.setup(torch.device("cpu"))
    clone = pickle.loads(pickle.dumps(scorer))
    assert clone.model is None
    with pytest.raises(RuntimeError, match=r"call setup\(device\)"):
        clone(PROMPTS, RESPONSES)
    clone.setup(torch.device("cpu"))
    assert_close(clone(PROMPTS, RESPONSES), scorer(PROMPTS, RESPONSES))


def test_scorer_label_index_picks_one_class_logit(tmp_path, byt5):
    path = save_tiny_reward_model(tmp_path, byt5, pad_token_id=byt5.pad_token_id, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        ids = byt5(PROMPTS[0] + RESPONSES[0], return_tensors="pt").input_ids
        expected = model(input_ids=ids).logits[0]  # (2,): one text, no padding
    for index in (0, 1):
        scorer = RewardModelScorer(path, label_index=index)
        scorer.setup(torch.device("cpu"))
        assert_close(scorer(PROMPTS[:1], RESPONSES[:1]), expected[index : index + 1])


def test_scorer_config_errors(tmp_path, rm_path, byt5):
    with pytest.raises(ValueError, match="dtype='fp32' is not one of"):
        RewardModelScorer(rm_path, dtype="fp32")
    two_labels = save_tiny_reward_model(tmp_path, byt5, pad_token_id=0, num_labels=2)
    with pytest.raises(ValueError, match=r"num_labels=2.*label_index"):
        RewardModelScorer(two_labels).setup(torch.device("cpu"))
    with pytest.raises(ValueError, match="label_index=2 is out of range"):
        RewardModelScorer(two_labels, label_index=2).setup(torch.device("cpu"))
    no_template = tmp_path / "plain"
    save_tiny_reward_model(no_template, ByT5Tokenizer(), pad_token_id=0)
    with pytest.raises(ValueError, match="has no chat template"):
        RewardModelScorer(str(no_template), use_chat_template=True).setup(torch.device("cpu"))


# ---------------------------------------------------------------- prompt fields
FIELDS = {"answer": ["4", "9"], "level": [1, 2]}


def test_a_function_gets_the_fields_it_names_and_keeps_the_old_signature():
    seen = {}

    def exact(prompts, responses, answer):
        seen["answer"] = answer
        return torch.tensor([float(r == a) for r, a in zip(responses, answer, strict=True)])

    def texts_only(prompts, responses):  # today's signature: called as before, the fields left out
        return torch.zeros(len(responses))

    assert call_reward(exact, ["2+2", "3*3"], ["4", "8"], **FIELDS).tolist() == [1.0, 0.0]
    assert seen == {"answer": ["4", "9"]}  # not "level", which it does not name
    assert call_reward(texts_only, ["p", "q"], ["r", "s"], **FIELDS).tolist() == [0.0, 0.0]


def test_a_reward_class_gets_its_tensors_and_the_fields_it_takes():
    class AllFields(Reward):
        def __call__(self, prompts, responses, **kwargs):
            self.seen = kwargs
            return torch.zeros(len(responses))

    class Explicit(Reward):  # the base class's keyword-only tensors, one field, no **kwargs
        def __call__(self, prompts, responses, *, level=None, prompt_ids=None, response_ids=None, response_mask=None):
            self.seen = {"level": level, "response_ids": response_ids}
            return torch.zeros(len(responses))

    ids = torch.ones(2, 3, dtype=torch.long)
    every, explicit = AllFields(), Explicit()
    call_reward(every, ["p", "q"], ["r", "s"], response_ids=ids, **FIELDS)
    assert every.seen == {"response_ids": ids, **FIELDS}
    call_reward(explicit, ["p", "q"], ["r", "s"], response_ids=ids, **FIELDS)
    assert explicit.seen == {"level": [1, 2], "response_ids": ids}


def test_a_reward_that_needs_a_missing_field_names_it_and_the_fix():
    def exact(prompts, responses, answer):
        return torch.zeros(len(responses))

    with pytest.raises(ValueError, match=r"reward .*exact needs the prompt field 'answer' .* carry 'level'; add "):
        call_reward(exact, ["p", "q"], ["r", "s"], level=[1, 2])
    with pytest.raises(ValueError, match="carry no fields besides the prompt"):
        call_reward(exact, ["p"], ["r"])


def test_a_field_holds_one_value_per_response():
    with pytest.raises(ValueError, match=r"prompt field 'answer' has 1 values for 2 responses"):
        call_reward(lambda prompts, responses, answer: torch.zeros(2), ["p", "q"], ["r", "s"], answer=["4"])


def test_a_field_may_be_named_like_call_rewards_own_positional_arguments():
    # call_reward's reward, prompts and responses are positional-only: a dataset column "reward" is a field like any.
    def uses(prompts, responses, *, reward):
        return [float(r) for r in reward]

    assert call_reward(uses, ["p", "q"], ["r", "s"], reward=["1", "2"]).tolist() == [1.0, 2.0]
