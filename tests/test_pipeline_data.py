"""SFTDataModule and PreferenceDataModule: encodings by hand, parity with the PPO prompt and reward-model encodings,
right padding and masks, the validation split, and errors that name the field and the row."""

import json
import pickle

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lightning_rlhf.data import (
    PreferenceCollator,
    PreferenceDataModule,
    PromptDataModule,
    SFTCollator,
    SFTDataModule,
    encode_sft_example,
)
from lightning_rlhf.rewards import RewardModelScorer, encode_scored_texts

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EOS = 1  # ByT5: pad 0, eos 1, unk 2, byte c -> c + 3


def b(text):
    """ByT5 ids of ``text``: byte value + 3."""
    return [c + 3 for c in text.encode()]


@pytest.fixture(scope="module")
def word_tok():
    """A word-level tokenizer that adds BOS (like Llama) and has a chat template; ids: <pad> 0, <s> 1, </s> 2."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in ["hello", "world", "nice", "<|user|>", "<|assistant|>"]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def sft(tokenizer, examples, **kwargs):
    dm = SFTDataModule(examples=examples, tokenizer=tokenizer, **{"batch_size": 2, "shuffle": False, **kwargs})
    dm.setup("fit")
    return dm


def prefs(tokenizer, pairs, **kwargs):
    dm = PreferenceDataModule(pairs=pairs, tokenizer=tokenizer, **{"batch_size": 2, "shuffle": False, **kwargs})
    dm.setup("fit")
    return dm


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------------------ SFT encoding
def test_sft_text_example_by_hand(byt5):
    # The prompt loses the EOS ByT5 appends (the policy must continue it); the response ends with EOS.
    prompt_ids, response_ids = encode_sft_example("hi\n", "ok", byt5)
    assert prompt_ids == b("hi\n")
    assert response_ids == [*b("ok"), EOS]


def test_sft_prompt_ids_equal_ppo_prompt_ids(byt5):
    # SFT must teach the policy on exactly the context PPO's rollouts give it.
    prompts = ["topic: cat\n", "Say hi: "]
    ppo = PromptDataModule(prompts=prompts, tokenizer=byt5, batch_size=1)
    ppo.setup("fit")
    assert [encode_sft_example(p, "x", byt5)[0] for p in prompts] == ppo.prompt_token_ids


def test_sft_chat_example_by_hand(word_tok):
    # prompt rendered with the generation prompt: "<|user|> hello <|assistant|>"; the rest of the conversation,
    # " world ", is the response; the template writes no EOS, so </s> (2) is appended.
    prompt_ids, response_ids = encode_sft_example([{"role": "user", "content": "hello"}], "world", word_tok)
    assert prompt_ids == [7, 4, 8]
    assert response_ids == [5, 2]


def test_sft_chat_template_that_does_not_extend_the_prompt_is_refused(word_tok):
    tok = PreTrainedTokenizerFast(tokenizer_object=word_tok.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    tok.chat_template = (
        "{% if add_generation_prompt %}A{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="does not start with the prompt"):
        encode_sft_example([{"role": "user", "content": "hello"}], "world", tok)


def test_sft_batch_is_right_padded_with_a_response_loss_mask(byt5):
    dm = sft(byt5, [{"prompt": "ab", "response": "c"}, {"prompt": "d", "response": "efg"}])
    batch = next(iter(dm.train_dataloader()))
    # Row 0: a b | c EOS, then one pad. Row 1: d | e f g EOS.
    assert batch["input_ids"].tolist() == [[*b("abc"), EOS, 0], [*b("defg"), EOS]]
    assert batch["attention_mask"].tolist() == [[True] * 4 + [False], [True] * 5]
    assert batch["loss_mask"].tolist() == [[False, False, True, True, False], [False, True, True, True, True]]


def test_sft_collator_pickles():
    collator = pickle.loads(pickle.dumps(SFTCollator(pad_token_id=7)))
    batch = collator([{"prompt_ids": [3], "response_ids": [4]}, {"prompt_ids": [3, 3], "response_ids": [4]}])
    assert batch["input_ids"].tolist() == [[3, 4, 7], [3, 3, 4]]


def test_sft_truncation(byt5):
    rows = [{"prompt": "ab", "response": "cdef"}, {"prompt": "ab", "response": "c"}]
    with pytest.raises(ValueError, match=r"examples\[0\] has 7 tokens, more than data.max_length=4"):
        sft(byt5, rows, max_length=4)
    dm = sft(byt5, rows, max_length=4, truncation="right")
    assert dm.train_rows[0]["response_ids"] == b("cd")  # the end of the response is cut; the prompt stays whole
    with pytest.raises(ValueError, match="the prompt must fit"):
        sft(byt5, rows, max_length=2, truncation="right")


# ----------------------------------------------------------------------------------------------- preference encoding
def scorer_with(tokenizer, use_chat_template=False):
    scorer = RewardModelScorer("unused", use_chat_template=use_chat_template)
    scorer.tokenizer = tokenizer  # what setup() would load; _encode needs nothing else
    return scorer


@pytest.mark.parametrize("tokenizer_name", ["byt5", "word_tok"])
def test_preference_text_encoding_is_the_reward_scorers(tokenizer_name, request):
    tok = request.getfixturevalue(tokenizer_name)
    (ids,) = encode_scored_texts(["hello "], ["world nice"], tok)
    assert [ids] == scorer_with(tok)._encode(["hello "], ["world nice"])


def test_preference_text_encoding_by_hand(byt5):
    assert encode_scored_texts(["hi "], ["yo"], byt5) == [[*b("hi yo"), EOS]]  # scored text ends with the EOS ByT5 adds


def test_preference_chat_encoding_is_the_reward_scorers_with_chat_template(word_tok):
    (ids,) = encode_scored_texts([[{"role": "user", "content": "hello"}]], ["world"], word_tok)
    assert ids == [7, 4, 8, 5]  # "<|user|> hello <|assistant|> world "
    assert [ids] == scorer_with(word_tok, use_chat_template=True)._encode(["hello"], ["world"])


def test_preference_batch_pads_both_sides_to_one_width(byt5):
    rows = [{"prompt": "a", "chosen": "bc", "rejected": "d"}, {"prompt": "e", "chosen": "f", "rejected": "g"}]
    batch = next(iter(prefs(byt5, rows).train_dataloader()))
    assert batch["chosen_ids"].tolist() == [[*b("abc"), EOS], [*b("ef"), EOS, 0]]
    assert batch["rejected_ids"].tolist() == [[*b("ad"), EOS, 0], [*b("eg"), EOS, 0]]
    assert batch["chosen_mask"].tolist() == [[True] * 4, [True] * 3 + [False]]
    assert batch["rejected_mask"].tolist() == [[True] * 3 + [False], [True] * 3 + [False]]
    assert "margin" not in batch


def test_preference_margin_field(byt5, tmp_path):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c", "gap": 2},
        {"prompt": "d", "chosen": "e", "rejected": "f", "gap": 0.5},
    ]
    batch = next(iter(prefs(byt5, write_jsonl(tmp_path / "p.jsonl", rows), margin_key="gap").train_dataloader()))
    torch.testing.assert_close(batch["margin"], torch.tensor([2.0, 0.5]))
    rows[1]["gap"] = "big"
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'gap' must be a number"):
        prefs(byt5, write_jsonl(tmp_path / "p.jsonl", rows), margin_key="gap")


def test_preference_collator_pickles():
    collator = pickle.loads(pickle.dumps(PreferenceCollator(pad_token_id=9)))
    batch = collator([{"chosen_ids": [1, 2], "rejected_ids": [3], "margin": 1.0}])
    assert batch["rejected_ids"].tolist() == [[3, 9]]
    assert batch["margin"].tolist() == [1.0]


def test_preference_left_truncation_keeps_the_end(byt5):
    rows = [{"prompt": "abc", "chosen": "de", "rejected": "f"}] * 2
    with pytest.raises(ValueError, match=r"pairs\[0\] \(chosen\) has 6 tokens"):
        prefs(byt5, rows, max_length=4)
    dm = prefs(byt5, rows, max_length=4, truncation="left")
    assert dm.train_rows[0]["chosen_ids"] == [*b("cde"), EOS]  # the last 4 tokens, as RewardModelScorer keeps


# ------------------------------------------------------------------------------------------ sources, split, errors
def test_validation_split_is_seeded_disjoint_and_complete(byt5):
    rows = [{"prompt": f"p{i}", "response": "r"} for i in range(8)]
    dm = sft(byt5, rows, val_fraction=0.25, seed=1)
    train = [r["prompt_ids"] for r in dm.train_rows]
    val = [r["prompt_ids"] for r in dm.val_rows]
    assert len(train) == 6
    assert len(val) == 2
    assert sorted(train + val) == sorted(b(f"p{i}") for i in range(8))
    assert val == [r["prompt_ids"] for r in sft(byt5, rows, val_fraction=0.25, seed=1).val_rows]
    assert sft(byt5, rows).val_dataloader() == []  # no validation without val_fraction


def test_synthetic_sources(byt5):
    dm = SFTDataModule(synthetic=True, num_examples=10, tokenizer=byt5, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_rows) == 10
    pairs = PreferenceDataModule(synthetic=True, num_pairs=10, val_fraction=0.2, tokenizer=byt5, batch_size=2)
    pairs.setup("fit")
    assert (len(pairs.train_rows), len(pairs.val_rows)) == (8, 2)


def test_file_rows_are_named_in_errors(byt5, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    with pytest.raises(
        ValueError,
        match=r"sft\.jsonl:2 needs the columns 'prompt' and 'response' or 'completion', or 'messages'; it has "
        r"\['prompt'\]",
    ):
        sft(byt5, path)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, "{not json"])
    with pytest.raises(ValueError, match=r"sft.jsonl:2 is not valid JSON"):
        sft(byt5, path)
    with pytest.raises(ValueError, match=r"examples\[0\]: 'response' must be non-empty text"):
        sft(byt5, [{"prompt": "a", "response": " "}, {"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="does not exist"):
        sft(byt5, str(tmp_path / "missing.jsonl"))


def test_chat_prompt_without_template_is_refused(byt5):
    with pytest.raises(ValueError, match="no chat template"):
        sft(byt5, [{"prompt": [{"role": "user", "content": "hi"}], "response": "x"}] * 2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SFTDataModule(), "exactly one of data.examples"),
        (lambda: SFTDataModule(examples="a.jsonl", synthetic=True), "exactly one of data.examples"),
        (lambda: PreferenceDataModule(synthetic=True, num_pairs=0), "data.num_pairs must be >= 1"),
        (lambda: PreferenceDataModule(synthetic=True, label_noise=0.5), "data.label_noise"),
        (lambda: PreferenceDataModule(synthetic=True, margin_key="m"), "synthetic pairs have no margin"),
        (lambda: SFTDataModule(synthetic=True, truncation="left"), "'error' or 'right'"),
        (lambda: SFTDataModule(synthetic=True, val_fraction=1.0), "data.val_fraction"),
    ],
)
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_batch_size_larger_than_the_training_rows(byt5):
    with pytest.raises(ValueError, match=r"data\.batch_size=4 is larger than the 3 training rows"):
        sft(byt5, [{"prompt": "a", "response": "b"}] * 4, batch_size=4, val_fraction=0.25)
