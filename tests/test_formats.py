"""Column layouts (TRL's dataset formats) for every stage, by hand; then the SFT and preference data modules reading
them from datasets written by ``datasets`` (parquet, ``save_to_disk``) and batching exactly as from inline rows."""

import pytest
import torch
from datasets import Dataset
from test_data import word_tok  # noqa: F401  (a fixture)

from lightning_rlhf.data import PreferenceDataModule, SFTDataModule, encode_sft_example
from lightning_rlhf.data.formats import preference_row, row_prompt, sft_row, shared_prompt, templated
from lightning_rlhf.rewards import encode_scored_texts

USER = {"role": "user", "content": "hi"}
SYSTEM = {"role": "system", "content": "be nice"}


def answer(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- prompts


def test_prompt_rows():
    assert row_prompt({"prompt": "a", "x": 1}, "prompt", "r", "prompts") == "a"
    assert row_prompt({"question": "q"}, "question", "r", "prompts") == "q"
    # a conversation: up to its last user turn (a trailing answer is the target, not the prompt)
    messages = [SYSTEM, USER, answer("yo"), {"role": "user", "content": "again"}, answer("ok")]
    assert row_prompt({"messages": messages}, "prompt", "r", "prompts") == messages[:4]
    with pytest.raises(
        ValueError, match=r"data\.prompts: row r has no column 'question' \(its columns: \['prompt'\]\)"
    ):
        row_prompt({"prompt": "a"}, "question", "r", "prompts")
    with pytest.raises(ValueError, match=r"row r: 'messages' must be chat messages with a user turn"):
        row_prompt({"messages": [SYSTEM]}, "prompt", "r", "prompts")


def test_prompt_template_and_chat():
    assert templated("2+2", "Q: {prompt} \\boxed{}", False, None) == "Q: 2+2 \\boxed{}"
    assert templated([SYSTEM, USER], "{prompt}!", False, None) == [SYSTEM, {"role": "user", "content": "hi!"}]
    assert templated("hi", None, True, None) == [USER]
    assert templated("hi", "{prompt}?", True, "be nice") == [SYSTEM, {"role": "user", "content": "hi?"}]
    assert templated([USER], None, True, "ignored for chat prompts") == [USER]


# ---------------------------------------------------------------- SFT


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r"}),
        ({"prompt": "p", "completion": "c"}, {"prompt": "p", "response": "c"}),  # TRL prompt-completion
        ({"prompt": [USER], "completion": [answer("c")]}, {"prompt": [USER], "response": "c"}),  # conversational
        (
            {"messages": [SYSTEM, USER, answer("a"), USER, answer("b")]},
            {"prompt": [SYSTEM, USER, answer("a"), USER], "response": "b"},
        ),
    ],
)
def test_sft_layouts(row, expected):
    assert sft_row(row, "prompt", None, "r", "examples") == expected


def test_sft_renames_and_errors():
    assert sft_row({"q": "p", "a": "r"}, "q", "a", "r", "examples") == {"prompt": "p", "response": "r"}
    with pytest.raises(
        ValueError,
        match=r"row r needs the columns 'prompt' and 'response' or 'completion', or "
        r"'messages'; it has \['text'\]\. Set data\.prompt_key / data\.response_key",
    ):
        sft_row({"text": "x"}, "prompt", None, "r", "examples")
    with pytest.raises(ValueError, match=r"row r needs the columns 'q' and 'a', or 'messages'; it has \['q'\]"):
        sft_row({"q": "x"}, "q", "a", "r", "examples")
    with pytest.raises(ValueError, match=r"'messages' must be chat messages ending in an assistant turn that follows"):
        sft_row({"messages": [answer("a")]}, "prompt", None, "r", "examples")
    with pytest.raises(
        ValueError,
        match=r"'completion' must be text or one assistant message, got 2 messages "
        r"\(assistant, user\)",
    ):
        sft_row({"prompt": [USER], "completion": [answer("a"), USER]}, "prompt", None, "r", "examples")


# ---------------------------------------------------------------- preferences


def test_explicit_prompt_pairs():
    row = {"prompt": "p", "chosen": "c", "rejected": "r", "margin": 2.0}
    assert preference_row(row, "prompt", "chosen", "rejected", "x", "pairs") == row
    chat = {"prompt": [USER], "chosen": [answer("c")], "rejected": [answer("r")]}
    assert preference_row(chat, "prompt", "chosen", "rejected", "x", "pairs") == {
        "prompt": [USER],
        "chosen": "c",
        "rejected": "r",
    }
    renamed = {"q": "p", "good": "c", "bad": "r"}
    assert preference_row(renamed, "q", "good", "bad", "x", "pairs") == {"prompt": "p", "chosen": "c", "rejected": "r"}


def test_implicit_prompts_split_where_the_pair_differs():
    # hh-rlhf style text: the shared beginning is the prompt; the space before the split goes to the responses.
    chosen, rejected = "\n\nHuman: hi\n\nAssistant: yes sure", "\n\nHuman: hi\n\nAssistant: no"
    assert shared_prompt(chosen, rejected, "x", "pairs") == ("\n\nHuman: hi\n\nAssistant:", " yes sure", " no")
    assert shared_prompt("abc", "abd", "x", "pairs") == ("ab", "c", "d")  # no space: split at the first difference
    # conversations: the shared messages are the prompt, each rest one assistant message
    assert shared_prompt([SYSTEM, USER, answer("c")], [SYSTEM, USER, answer("r")], "x", "pairs") == (
        [SYSTEM, USER],
        "c",
        "r",
    )
    row = {"chosen": [USER, answer("c")], "rejected": [USER, answer("r")], "id": 4}
    assert preference_row(row, "prompt", "chosen", "rejected", "x", "pairs") == {
        "id": 4,
        "prompt": [USER],
        "chosen": "c",
        "rejected": "r",
    }


def test_implicit_prompt_errors():
    with pytest.raises(ValueError, match=r"row x: an implicit-prompt pair must be two conversations that share"):
        shared_prompt([USER, answer("c"), USER], [USER, answer("r")], "x", "pairs")
    with pytest.raises(ValueError, match=r"row x: 'chosen' and 'rejected' must both be text or both conversations"):
        preference_row({"chosen": "a", "rejected": [USER]}, "prompt", "chosen", "rejected", "x", "pairs")
    with pytest.raises(ValueError, match=r"row x needs the columns 'good' and 'rejected'; it has \['chosen', "):
        preference_row({"chosen": "a", "rejected": "b"}, "prompt", "good", "rejected", "x", "pairs")


# ---------------------------------------------------------------- the data modules over datasets


def batches(dm):
    return list(dm.train_dataloader())


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)


SFT_ROWS = [
    {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the movie"}]},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]},
    {"messages": [{"role": "system", "content": "be nice"}, USER, {"role": "assistant", "content": "nice"}]},
    {"messages": [{"role": "user", "content": "the"}, {"role": "assistant", "content": "movie was"}]},
]


def test_sft_from_a_dataset_batches_as_the_same_rows_inline(tmp_path, word_tok):  # noqa: F811
    Dataset.from_list(SFT_ROWS).to_parquet(str(tmp_path / "sft.parquet"))
    kwargs = {"batch_size": 2, "shuffle": True, "seed": 3, "tokenizer": word_tok}
    inline = SFTDataModule(examples=SFT_ROWS, **kwargs)
    from_files = SFTDataModule(data_files=str(tmp_path / "sft.parquet"), num_proc=2, **kwargs)
    inline.setup("fit")
    from_files.setup("fit")
    prompt = SFT_ROWS[0]["messages"][:1]
    assert from_files.train_rows[0] == dict(
        zip(("prompt_ids", "response_ids"), encode_sft_example(prompt, "the movie", word_tok), strict=True)
    )
    same_batches(batches(inline), batches(from_files))
    held_out = SFTDataModule(data_files=str(tmp_path / "sft.parquet"), val_fraction=0.25, **kwargs)
    held_out.setup("fit")
    assert (len(held_out.train_rows), len(held_out.val_rows)) == (3, 1)
    assert held_out.state_dict() == {"fingerprint": held_out.fingerprint}


PAIRS = [
    {"chosen": "Human: hi Assistant: nice", "rejected": "Human: hi Assistant: bad", "score": 1.0},
    {"chosen": "Human: yo Assistant: fine", "rejected": "Human: yo Assistant: meh", "score": 0.5},
]


def test_preferences_with_implicit_prompts_from_a_saved_dataset(tmp_path, byt5):
    Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "pairs"))
    dm = PreferenceDataModule(
        dataset=str(tmp_path / "pairs"), margin_key="score", batch_size=2, shuffle=False, tokenizer=byt5
    )
    dm.setup("fit")
    chosen, rejected = encode_scored_texts(["Human: hi Assistant:"] * 2, [" nice", " bad"], byt5)
    assert dm.train_rows[0] == {"chosen_ids": chosen, "rejected_ids": rejected, "margin": 1.0}
    inline = PreferenceDataModule(pairs=PAIRS, margin_key="score", batch_size=2, shuffle=False, tokenizer=byt5)
    inline.setup("fit")
    same_batches(batches(inline), batches(dm))
    assert batches(dm)[0]["margin"].tolist() == [1.0, 0.5]


def test_dataset_rows_are_checked_with_their_index(tmp_path, byt5):
    Dataset.from_list(
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": " ", "rejected": "c"}]
    ).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"data\.dataset: row train\[1\]: 'chosen' must be non-empty text"):
        PreferenceDataModule(data_files=str(tmp_path / "bad.parquet"), batch_size=1, tokenizer=byt5).setup("fit")
    Dataset.from_list([{"prompt": "a", "answer": "b"}]).to_parquet(str(tmp_path / "sft.parquet"))
    with pytest.raises(ValueError, match=r"row train\[0\] needs the columns 'prompt' and 'response' or 'completion'"):
        SFTDataModule(data_files=str(tmp_path / "sft.parquet"), batch_size=1, tokenizer=byt5).setup("fit")
    with pytest.raises(ValueError, match=r"exactly one of data\.examples .*, data\.dataset / data\.data_files"):
        SFTDataModule(examples=[], data_files="x.parquet")
