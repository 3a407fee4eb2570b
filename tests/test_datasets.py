"""Hugging Face datasets as prompt sources: every format and layout, fields, caching, fingerprints, bad input.

Every dataset here is written to a temporary directory by ``datasets`` itself (parquet, JSON Lines, CSV,
``save_to_disk``); nothing is downloaded.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from test_data import CHAT_TEMPLATE, b, word_tok  # noqa: F401  (word_tok is a fixture)

from lightning_rlhf.data import PromptDataModule

ROWS = [
    {"prompt": "ab", "answer": "1", "level": 3, "tags": ["x"]},
    {"prompt": "cde", "answer": "2", "level": 1, "tags": []},
    {"prompt": "f", "answer": "3", "level": 2, "tags": ["y", "z"]},
]
FIELDS = {"answer": ["1", "2", "3"], "level": [3, 1, 2], "tags": [["x"], [], ["y", "z"]]}


def loaded(tokenizer, **kwargs):
    dm = PromptDataModule(tokenizer=tokenizer, **{"batch_size": 1, "shuffle": False, **kwargs})
    dm.setup("fit")
    return dm


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    Dataset.from_list(ROWS).to_parquet(str(path))
    return path


def write(tmp_path, kind, rows=ROWS):
    """``rows`` written by ``datasets`` as ``kind``; returns the data module arguments that read them."""
    data = Dataset.from_list(rows)
    if kind == "parquet":
        data.to_parquet(str(tmp_path / "rows.parquet"))
        return {"data_files": str(tmp_path / "rows.parquet")}
    if kind == "jsonl":
        data.to_json(str(tmp_path / "rows.jsonl"))
        return {"data_files": str(tmp_path / "rows.jsonl")}
    if kind == "csv":
        data.to_csv(str(tmp_path / "rows.csv"), index=False)
        return {"data_files": str(tmp_path / "rows.csv")}
    if kind == "save_to_disk":
        data.save_to_disk(str(tmp_path / "saved"))
        return {"dataset": str(tmp_path / "saved")}
    assert kind == "dataset_dict"
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": data}).save_to_disk(str(tmp_path / "dict"))
    return {"dataset": str(tmp_path / "dict"), "split": "test"}


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "save_to_disk", "dataset_dict"])
def test_every_format_gives_the_prompts_and_their_fields(tmp_path, byt5, kind):
    dm = loaded(byt5, **write(tmp_path, kind))
    assert dm.prompt_texts == ["ab", "cde", "f"]
    assert dm.prompt_token_ids == [b("ab"), b("cde"), b("f")]  # the text-prompt encoding: ByT5's EOS dropped
    assert dm.prompt_fields == FIELDS  # strings, numbers and lists, every column but the prompt
    batches = list(dm.train_dataloader())
    assert [batch["fields"] for batch in batches] == [{k: [v[i]] for k, v in FIELDS.items()} for i in range(3)]
    assert [batch["prompt_index"].tolist() for batch in batches] == [[0], [1], [2]]


def test_csv_columns_arrive_as_csv_types(tmp_path, byt5):
    rows = [{"prompt": "ab", "answer": "12"}, {"prompt": "cd", "answer": "x"}]
    dm = loaded(byt5, **write(tmp_path, "csv", rows))
    assert dm.prompt_fields == {"answer": ["12", "x"]}


def test_a_batch_carries_the_fields_of_its_own_rows(tmp_path, byt5):
    dm = loaded(byt5, **write(tmp_path, "parquet"), batch_size=3, shuffle=True, seed=5)
    (batch,) = list(dm.train_dataloader())
    order = batch["prompt_index"].tolist()
    assert sorted(order) == [0, 1, 2]
    assert batch["prompts"] == [ROWS[i]["prompt"] for i in order]
    assert batch["fields"]["answer"] == [ROWS[i]["answer"] for i in order]
    width = batch["prompt_ids"].shape[1]
    assert batch["prompt_ids"].tolist() == [[0] * (width - len(b(p))) + b(p) for p in batch["prompts"]]


def test_renamed_prompt_column_and_template(tmp_path, byt5):
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    args = write(tmp_path, "parquet", rows)
    dm = loaded(byt5, **args, prompt_key="question", prompt_template="Q: {prompt} A in \\boxed{}.")
    assert dm.prompt_texts == ["Q: 1+1 A in \\boxed{}.", "Q: 2+2 A in \\boxed{}."]
    assert dm.prompt_fields == {"answer": ["2", "4"]}  # the renamed prompt column is not a field
    with pytest.raises(ValueError, match=r"data\.prompt_key='prompt': .* has no column 'prompt'; its columns are "):
        loaded(byt5, **args)


def test_messages_and_chat_prompts_go_through_the_chat_template(tmp_path, word_tok):  # noqa: F811
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "the movie"},  # a trailing answer is not part of the prompt
            ],
            "id": 7,
        }
    ]
    dm = loaded(word_tok, **write(tmp_path, "parquet", rows))
    # "<|system|> be nice <|user|> hello world <|assistant|>", no special tokens added (the template writes them)
    assert dm.prompt_token_ids == [[11, 12, 13, 9, 4, 5, 10]]
    assert dm.prompt_texts == ["hello world"]
    assert dm.prompt_fields == {"id": [7]}

    text = write(tmp_path, "jsonl", [{"prompt": "hello world"}])
    dm = loaded(word_tok, **text, apply_chat_template=True, system_prompt="be nice")
    assert dm.prompt_token_ids == [[11, 12, 13, 9, 4, 5, 10]]
    dm = loaded(word_tok, **text, apply_chat_template=True)
    assert dm.prompt_token_ids == [[9, 4, 5, 10]]  # "<|user|> hello world <|assistant|>"


def test_messages_with_keys_other_rows_lack_render_without_them(tmp_path, word_tok):  # noqa: F811
    # Arrow gives every message the keys any message has ("name": None here); the template must not see them.
    rows = [
        {"prompt": [{"role": "user", "content": "hello"}]},
        {"prompt": [{"role": "user", "content": "world", "name": "the"}]},
    ]
    dm = loaded(word_tok, **write(tmp_path, "parquet", rows))
    ids = [word_tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in rows]
    assert dm.prompt_token_ids == [word_tok(text, add_special_tokens=False)["input_ids"] for text in ids]


def test_tokenising_in_processes_gives_the_same_rows_and_a_second_run_reads_the_cache(tmp_path, byt5):
    rows = [{"prompt": "p" * (i % 7 + 1), "answer": str(i)} for i in range(40)]
    args = write(tmp_path, "parquet", rows)
    one = loaded(byt5, **args)
    two = loaded(byt5, **args, num_proc=2)
    assert two.prompt_token_ids == one.prompt_token_ids == [b(row["prompt"]) for row in rows]
    assert two.prompt_fields == one.prompt_fields
    cache_files = sorted(p.name for p in _cache_dir(one).glob("cache-*.arrow"))
    again = loaded(byt5, **args)  # the same source, tokenizer and settings: the cached map, not a new one
    assert sorted(p.name for p in _cache_dir(again).glob("cache-*.arrow")) == cache_files
    assert _encoded(again).cache_files == _encoded(one).cache_files
    changed = loaded(byt5, **args, prompt_template="> {prompt}")
    assert _encoded(changed).cache_files != _encoded(one).cache_files
    assert changed.prompt_texts[0] == "> p"


def _encoded(dm):
    return dm.rows.rows  # the tokenised dataset under the prompt rows


def _cache_dir(dm):
    return Path(_encoded(dm).cache_files[0]["filename"]).parent


def test_fingerprint_is_saved_and_a_changed_dataset_warns_on_resume(tmp_path, byt5):
    args = write(tmp_path, "parquet")
    dm = loaded(byt5, **args)
    state = dm.state_dict()
    assert state == {"fingerprint": dm.fingerprint}
    same = loaded(byt5, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)  # the same rows: silent
    rows = [{**row, "prompt": row["prompt"] + "!"} for row in ROWS]
    changed = loaded(byt5, **write(tmp_path, "parquet", rows))
    assert changed.fingerprint != dm.fingerprint
    with pytest.warns(
        UserWarning, match=r"data: the rows of data\.data_files='.*rows\.parquet' \(split train\) changed"
    ):
        changed.load_state_dict(state)
    listed = loaded(byt5, prompts=["ab", "cd"])
    assert loaded(byt5, prompts=["ab", "cd"]).fingerprint == listed.fingerprint
    # the rows, not what a template makes of them: the same rows with another template are the same dataset
    assert loaded(byt5, prompts=["ab", "cd"], prompt_template="> {prompt}").fingerprint == listed.fingerprint
    with pytest.warns(UserWarning, match=r"data\.prompts=\['ab', 'ce'\]"):
        loaded(byt5, prompts=["ab", "ce"]).load_state_dict(listed.state_dict())


def test_inline_rows_carry_fields(byt5):
    dm = loaded(byt5, prompts=[{"prompt": "ab", "answer": "1"}, {"prompt": "c", "answer": "2"}])
    assert dm.prompt_texts == ["ab", "c"]
    assert dm.prompt_fields == {"answer": ["1", "2"]}
    with pytest.raises(ValueError, match=r"give every row as \{\"prompt\": \.\.\., \*\*fields\} or none of them"):
        loaded(byt5, prompts=[{"prompt": "ab"}, "c"])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tmp: {"data_files": str(tmp / "nope.parquet")}, r"data\.data_files: '.*nope\.parquet' does not exist"),
        (lambda tmp: {"data_files": str(tmp / "rows.parquet"), "split": "test"}, r"data\.split='test': Unknown split"),
        (
            lambda tmp: {"data_files": str(tmp / "rows.parquet"), "split": "train[3:]"},
            r"data: split 'train\[3:\]' of .* has no rows; choose another data\.split",
        ),
        (
            lambda tmp: {"dataset": "parquet"},
            r"data\.dataset='parquet' is a file format: give the files with data\.data_files",
        ),
        (
            lambda tmp: {"dataset": str(tmp / "dict"), "split": "validation"},
            r"data\.split='validation': the saved dataset .* has the splits \['test', 'train'\]",
        ),
    ],
)
def test_source_errors_name_the_field(tmp_path, byt5, make, match):
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dict")
    )
    with pytest.raises(ValueError, match=match):
        loaded(byt5, **make(tmp_path))


def test_row_errors_name_the_row_before_any_training(tmp_path, byt5):
    (tmp_path / "rows.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"data\.data_files: cannot tell the format of .*rows\.txt"):
        loaded(byt5, data_files=str(tmp_path / "rows.txt"))
    Dataset.from_dict({"prompt": []}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match=r"data: split 'train' of data\.data_files='.*empty\.parquet' .* has no rows"):
        loaded(byt5, data_files=str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match=r"data\.dataset: prompt train\[1\] is empty"):
        loaded(byt5, **write(tmp_path, "parquet", [{"prompt": "a"}, {"prompt": " "}]))
    with pytest.raises(ValueError, match=r"a row has a field named 'responses', a name the reward's own arguments"):
        loaded(byt5, **write(tmp_path, "parquet", [{"prompt": "a", "responses": "b"}]))
    too_long = write(tmp_path, "parquet", [{"prompt": "abc"}, {"prompt": "abcdef"}])
    with pytest.raises(ValueError, match=r"1 prompts are longer than data\.max_prompt_length=4 tokens: train\[1\] \(6"):
        loaded(byt5, **too_long, max_prompt_length=4)
    dm = loaded(byt5, **too_long, max_prompt_length=4, truncation="left")
    assert dm.prompt_token_ids == [b("abc"), b("cdef")]
    assert dm.prompt_texts == ["abc", "abcdef"]  # rewards still see the whole prompt
    with pytest.raises(ValueError, match=r"data\.system_prompt needs data\.apply_chat_template=true"):
        PromptDataModule(prompts=["a"], system_prompt="be nice")


def test_hub_ids_that_cannot_be_reached_say_how_to_work_offline(byt5, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        ConnectionError,
        match=r"data\.dataset='org/name': the Hugging Face Hub cannot be reached .* "
        r"HF_DATASETS_OFFLINE=1",
    ):
        loaded(byt5, dataset="org/name")


def test_hub_ids_pass_subset_and_split(byt5, monkeypatch):
    import datasets

    calls = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return Dataset.from_list([{"question": "ab", "answer": "#### 2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    dm = loaded(byt5, dataset="openai/gsm8k", subset="main", split="test", prompt_key="question")
    assert calls == [("openai/gsm8k", {"split": "test", "name": "main"})]
    assert dm.prompt_fields == {"answer": ["#### 2"]}


def test_jsonl_rows_still_read_with_line_numbers(tmp_path, byt5):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "ab", "answer": "1"}) + "\n")
    dm = loaded(byt5, prompts=str(path))
    assert dm.prompt_fields == {"answer": ["1"]}


def test_a_fit_resumed_over_a_changed_dataset_warns_and_over_the_same_one_does_not(tmp_path, monkeypatch):
    # Through the CLI, as users resume: the checkpoint stores the rows' fingerprint (the data module's state_dict),
    # Lightning hands it back on --ckpt_path, and the data module compares it with the rows it loaded.
    from test_cli import REPO, TINY_OVERRIDES

    from lightning_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"say {word}: ", "answer": str(i)} for i, word in enumerate("abcdefgh")]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "prompts.parquet"))
    data = ["--data.task=null", f"--data.data_files={tmp_path / 'prompts.parquet'}"]
    fit = ["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), *TINY_OVERRIDES, *data]
    main([*fit, f"--trainer.default_root_dir={tmp_path / 'first'}"])
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)["PromptDataModule"]
    assert list(state) == ["fingerprint"]
    resume = [*fit, "--trainer.max_steps=3", f"--ckpt_path={checkpoint}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*resume, f"--trainer.default_root_dir={tmp_path / 'same'}"])
    assert not [w for w in caught if "changed since the checkpoint" in str(w.message)]
    Dataset.from_list([dict(row) for row in rows]).to_parquet(  # the same rows, a new file: no warning
        str(tmp_path / "prompts.parquet")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*resume, f"--trainer.default_root_dir={tmp_path / 'rewritten'}"])
    assert not [w for w in caught if "changed since the checkpoint" in str(w.message)]
    Dataset.from_list([{**row, "prompt": row["prompt"].upper()} for row in rows]).to_parquet(
        str(tmp_path / "prompts.parquet")
    )
    with pytest.warns(
        UserWarning,
        match=rf"data: the rows of data\.data_files='{tmp_path}/prompts\.parquet' "
        r"\(split train\) changed since the checkpoint was written \(fingerprint \w+ -> \w+\)",
    ):
        main([*resume, f"--trainer.default_root_dir={tmp_path / 'changed'}"])
