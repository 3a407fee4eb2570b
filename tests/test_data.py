"""PromptDataModule: sources, tokenization rules, left padding, validation errors, and a real Trainer loop."""

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from lightning import LightningModule, Trainer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lightning_rlhf.data import LeftPadCollator, PromptDataModule
from lightning_rlhf.tasks import get_task

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def b(text):
    """ByT5 ids: byte value + 3 (pad 0, eos 1, unk 2)."""
    return [c + 3 for c in text.encode()]


@pytest.fixture(scope="module")
def word_tok():
    """A word-level tokenizer that adds BOS (like Llama) and has a chat template."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in ["hello", "world", "the", "movie", "was", "<|user|>", "<|assistant|>", "<|system|>", "be", "nice"]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def loaded(tokenizer, **kwargs):
    dm = PromptDataModule(tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def batches(dm):
    return list(dm.train_dataloader())


# ---------------------------------------------------------------- sources and tokenization


def test_inline_list_left_pads_and_drops_appended_eos(byt5):
    dm = loaded(byt5, prompts=["ab", "abcd", "x"], batch_size=3, shuffle=False)
    (batch,) = batches(dm)
    # ByT5 appends EOS (id 1) with add_special_tokens=True; a prompt must not end the text, so it is dropped.
    assert batch["prompt_ids"].tolist() == [[0, 0, *b("ab")], b("abcd"), [0, 0, 0, *b("x")]]
    assert batch["prompt_mask"].tolist() == [[False, False, True, True], [True] * 4, [False, False, False, True]]
    assert batch["prompt_ids"].dtype == torch.long
    assert batch["prompt_mask"].dtype == torch.bool
    assert batch["prompts"] == ["ab", "abcd", "x"]
    assert dm.prompt_texts == ["ab", "abcd", "x"]


def test_bos_tokenizer_keeps_bos(word_tok):
    dm = loaded(word_tok, prompts=["hello world", "the movie was"], batch_size=2, shuffle=False)
    assert dm.prompt_token_ids == [[1, 4, 5], [1, 6, 7, 8]]  # BOS first, no EOS appended or dropped


def test_txt_file_keeps_lines_verbatim(tmp_path, byt5):
    path = tmp_path / "prompts.txt"
    path.write_text("Say something: \nThe movie was\r\nhi\n", encoding="utf-8")
    dm = loaded(byt5, prompts=str(path), batch_size=1)
    assert dm.prompt_texts == ["Say something: ", "The movie was", "hi"]  # trailing space kept, CRLF removed
    assert dm.prompt_token_ids[0] == b("Say something: ")


def test_jsonl_file_with_text_and_chat(tmp_path, word_tok):
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello world"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "the movie"}) + "\n\n" + json.dumps({"prompt": chat, "id": 3}) + "\n")
    dm = loaded(word_tok, prompts=str(path), batch_size=2, shuffle=False)
    # Chat: "<|system|> be nice <|user|> hello world <|assistant|>" encoded without special tokens (no BOS added).
    assert dm.prompt_token_ids == [[1, 6, 7], [11, 12, 13, 9, 4, 5, 10]]
    assert dm.prompt_texts == ["the movie", "hello world"]  # rewards see the last user message of a chat
    (batch,) = batches(dm)
    assert batch["prompt_ids"][0].tolist() == [0, 0, 0, 0, 1, 6, 7]


def test_task_source_matches_generator(byt5):
    dm = loaded(byt5, task="sentiment", num_prompts=16, seed=3, batch_size=4)
    assert dm.prompt_texts == get_task("sentiment").prompts(16, seed=3)


def test_tokenizer_from_the_trained_module(byt5):
    dm = PromptDataModule(prompts=["ab", "cd"], batch_size=2)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=byt5), world_size=1)
    dm.setup("fit")
    assert dm.prompt_token_ids == [b("ab"), b("cd")]


# ---------------------------------------------------------------- truncation and batching


def test_too_long_prompt_names_fields_and_row(byt5):
    dm = PromptDataModule(prompts=["ab", "abcdef"], max_prompt_length=3, batch_size=1, tokenizer=byt5)
    with pytest.raises(
        ValueError, match=r"longer than data\.max_prompt_length=3 tokens: prompts\[1\] \(6 tokens\).*data\.truncation"
    ):
        dm.setup("fit")


def test_left_truncation_keeps_last_tokens(byt5):
    dm = loaded(byt5, prompts=["ab", "abcdef"], max_prompt_length=3, truncation="left", batch_size=2, shuffle=False)
    assert dm.prompt_token_ids == [b("ab"), b("def")]
    assert dm.prompt_texts == ["ab", "abcdef"]  # rewards still see the full prompt


def test_drop_last_constant_batches_and_seeded_shuffle(byt5):
    prompts = [f"p{i}" for i in range(10)]
    dm = loaded(byt5, prompts=prompts, batch_size=4, seed=1)
    epoch = batches(dm)
    assert [len(x["prompts"]) for x in epoch] == [4, 4]  # 10 // 4 full batches, the remaining 2 dropped
    seen = [p for x in epoch for p in x["prompts"]]
    assert len(set(seen)) == 8
    assert seen != prompts[:8]  # shuffled
    again = batches(loaded(byt5, prompts=prompts, batch_size=4, seed=1))
    assert [x["prompts"] for x in again] == [x["prompts"] for x in epoch]  # same seed, same order


def test_collate_pickles():
    collate = pickle.loads(pickle.dumps(LeftPadCollator(pad_token_id=7)))
    out = collate([{"input_ids": [5], "prompt": "a"}, {"input_ids": [3, 4], "prompt": "bc"}])
    assert out["prompt_ids"].tolist() == [[7, 5], [3, 4]]
    assert out["prompt_mask"].tolist() == [[False, True], [True, True]]


def test_dataloader_collate_is_picklable(byt5):
    loader = loaded(byt5, prompts=["ab", "cd"], batch_size=2).train_dataloader()
    assert isinstance(loader.collate_fn, LeftPadCollator)
    pickle.dumps(loader.collate_fn)
    pickle.dumps(loader.dataset)


# ---------------------------------------------------------------- errors


def test_exactly_one_source():
    with pytest.raises(
        ValueError, match=r"exactly one of data\.prompts .*, data\.task .* or data\.dataset / data\.data_files"
    ):
        PromptDataModule()
    with pytest.raises(
        ValueError, match=r"exactly one of data\.prompts .*, data\.task .* or data\.dataset / data\.data_files"
    ):
        PromptDataModule(prompts=["a"], task="sentiment")
    with pytest.raises(ValueError, match="unknown task 'imdb'"):
        PromptDataModule(task="imdb")
    with pytest.raises(ValueError, match=r"data\.truncation must be 'error' or 'left'"):
        PromptDataModule(task="sentiment", truncation="right")
    with pytest.raises(ValueError, match=r"data\.batch_size must be >= 1"):
        PromptDataModule(task="sentiment", batch_size=0)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.txt", "", r"data\.prompts: no prompts found"),
        ("gap.txt", "hello\n \nworld\n", r"data\.prompts: prompt gap\.txt:2 is empty"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"data\.prompts: bad\.jsonl:2 is not valid JSON"),
        (
            "field.jsonl",
            '{"text": "a"}\n',
            r"data\.prompts: row field\.jsonl:1 has no column 'prompt' \(its columns: \['text'\]\); set "
            r"data\.prompt_key",
        ),
        ("blank.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n', r"prompt blank\.jsonl:2 is empty"),
        ("msgs.jsonl", '{"prompt": [{"role": "user"}]}\n', r"prompt msgs\.jsonl:1 is a list; a prompt is text or"),
        ("prompts.csv", "a\n", r"must end in \.jsonl or \.txt"),
        (
            "reserved.jsonl",
            '{"prompt": "a"}\n{"prompt": "b", "response_ids": [1]}\n',
            r"a row has a field named 'response_ids', a name the reward's own arguments take",
        ),
    ],
)
def test_file_errors(tmp_path, byt5, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        PromptDataModule(prompts=str(path), batch_size=1, tokenizer=byt5).setup("fit")


def test_missing_file_and_empty_list(tmp_path, byt5):
    with pytest.raises(ValueError, match=r"data\.prompts: file .*nope\.txt' does not exist"):
        PromptDataModule(prompts=str(tmp_path / "nope.txt"), tokenizer=byt5).setup("fit")
    with pytest.raises(ValueError, match=r"data\.prompts: no prompts found in data\.prompts=\[\]"):
        PromptDataModule(prompts=[], tokenizer=byt5).setup("fit")


def test_chat_prompt_needs_a_chat_template(byt5):
    dm = PromptDataModule(prompts=["a", [{"role": "user", "content": "hi"}]], batch_size=1, tokenizer=byt5)
    with pytest.raises(ValueError, match=r"prompts\[1\] is a list of chat messages but the tokenizer has no chat"):
        dm.setup("fit")


def test_batch_size_larger_than_prompts(byt5):
    with pytest.raises(ValueError, match=r"data\.batch_size=4 is larger than the 3 prompts;"):
        PromptDataModule(prompts=["a", "b", "c"], batch_size=4, tokenizer=byt5).setup("fit")
    dm = PromptDataModule(prompts=["a", "b", "c", "d", "e", "f"], batch_size=4, tokenizer=byt5)
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match=r"data\.batch_size=4 is larger than the 6 prompts split over 2 devices"):
        dm.setup("fit")


def test_no_tokenizer():
    with pytest.raises(ValueError, match="PromptDataModule has no tokenizer"):
        PromptDataModule(prompts=["a"]).setup("fit")


def test_prompt_texts_before_setup():
    with pytest.raises(RuntimeError, match=r"setup\(\) has not run yet"):
        _ = PromptDataModule(prompts=["a"]).prompt_texts


# ---------------------------------------------------------------- under a real Trainer


class _Recorder(LightningModule):
    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.automatic_optimization = False
        self.shapes = []

    def training_step(self, batch, batch_idx):
        self.shapes.append((tuple(batch["prompt_ids"].shape), int(batch["prompt_mask"].sum()), len(batch["prompts"])))

    def configure_optimizers(self):
        return None


@pytest.mark.filterwarnings("ignore")
def test_fit_gets_tokenizer_from_module_and_full_batches(byt5):
    module = _Recorder(byt5)
    dm = PromptDataModule(task="lowercase", num_prompts=10, batch_size=4)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert len(module.shapes) == 2
    assert all(shape[0] == 4 and n == 4 for shape, _, n in module.shapes)
    assert dm.prompt_token_ids[0] == b(dm.prompt_texts[0])


def test_help_documents_every_argument():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptDataModule, "data")
    text = " ".join(parser.format_help().split())
    assert "longest prompt in tokens" in text
    assert "the policy tokenizer" in text
    assert "{error,left}" in text


def test_resumable_sampler_order_is_a_function_of_seed_and_epoch():
    from lightning_rlhf.data import ResumableSampler

    sampler = ResumableSampler(10, batch_size=2, shuffle=True, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    assert list(sampler) == first  # re-iterating an epoch gives the same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    fresh = ResumableSampler(10, batch_size=2, shuffle=True, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == list(sampler)  # no hidden RNG carried over from epoch 0
    assert list(ResumableSampler(5, batch_size=1, shuffle=False, seed=0)) == [0, 1, 2, 3, 4]


def test_resumable_sampler_shards_and_skips_completed_batches():
    from lightning_rlhf.data import ResumableSampler

    # 11 prompts on 2 processes: truncated to 10, rank r takes positions r, r + 2, ... of the epoch's order.
    ranks = [ResumableSampler(11, batch_size=2, shuffle=False, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    assert [list(s) for s in ranks] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    # Resumed after 2 completed batches of 2: rank 0 continues at its 5th index.
    resumed = ResumableSampler(
        11, batch_size=2, shuffle=False, seed=0, num_replicas=2, rank=0, completed_batches=lambda: 2
    )
    assert list(resumed) == [8]


def test_the_other_fields_of_a_jsonl_row_travel_with_its_prompt(tmp_path, byt5):
    rows = [
        {"prompt": "2+2", "answer": "4", "level": 1, "tags": ["add"]},
        {"prompt": "3*3", "answer": "9", "level": 2, "tags": []},
        {"prompt": "5-1", "answer": "4", "level": 1, "tags": ["sub", "easy"]},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = loaded(byt5, prompts=str(path), batch_size=3, shuffle=False)
    assert dm.prompt_fields == {"answer": ["4", "9", "4"], "level": [1, 2, 1], "tags": [["add"], [], ["sub", "easy"]]}
    (batch,) = batches(dm)
    assert batch["prompts"] == ["2+2", "3*3", "5-1"]
    assert batch["fields"] == dm.prompt_fields  # strings, numbers and lists, in the batch's row order
    shuffled = loaded(byt5, prompts=str(path), batch_size=3, shuffle=True, seed=1)
    (batch,) = batches(shuffled)
    order = batch["prompt_index"].tolist()
    assert order != [0, 1, 2]  # the fields follow their prompts through the shuffle
    assert batch["fields"]["answer"] == [rows[i]["answer"] for i in order]
    plain = loaded(byt5, prompts=["a", "b"], batch_size=2)
    assert "fields" not in batches(plain)[0]


def test_a_field_only_some_rows_have_is_left_out_with_a_warning(tmp_path, byt5):
    path = tmp_path / "uneven.jsonl"
    path.write_text('{"prompt": "a", "answer": "1", "id": 7}\n{"prompt": "b", "answer": "2"}\n')
    with pytest.warns(UserWarning, match=r"field 'id' is missing from 1 of 2 rows \(first: uneven\.jsonl:2\)"):
        dm = loaded(byt5, prompts=str(path), batch_size=2)
    assert dm.prompt_fields == {"answer": ["1", "2"]}
