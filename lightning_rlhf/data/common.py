"""What every stage's data shares: reading rows, checking chat prompts, encoding text prompts, the tokenizer.

Rules every reader follows: files are UTF-8 (a BOM is dropped) and split on newlines only (``str.splitlines`` would
also split on form feeds and Unicode separators inside a prompt); a JSONL file skips blank lines and names the line of
invalid JSON; every error names the ``data.*`` field and the row (``file:line`` or ``field[index]``).

A **text prompt** is encoded with the tokenizer's special tokens (a BOS stays) minus a trailing EOS the tokenizer
appends (ByT5 and T5 do): an EOS at the end of a prompt would tell the policy the text is over. PPO's prompts and SFT's
prompts use the same encoding, so the policy continues prompts the way it was taught to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

Prompt = str | list[dict[str, str]]
"""One prompt: text, or a list of chat messages ``{"role": ..., "content": ...}``."""

EOS_PROBE = "a"
"""Text encoded once to find out whether the tokenizer appends an EOS."""


def read_lines(path: Path, option: str, suffixes: tuple[str, ...]) -> list[str]:
    """The lines of the text file ``path``, which must exist and end in one of ``suffixes`` (errors name
    ``data.<option>``)."""
    if not path.is_file():
        raise ValueError(f"data.{option}: file {str(path)!r} does not exist.")
    if path.suffix not in suffixes:
        raise ValueError(f"data.{option}: {str(path)!r} must end in {' or '.join(suffixes)} (one row per line).")
    text = path.read_text(encoding="utf-8-sig")
    return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []


def parse_jsonl(lines: list[str], name: str, option: str) -> tuple[list[Any], list[str]]:
    """The JSON value of every non-blank line of the file ``name`` and its label ``"name:line"``."""
    records, labels = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"data.{option}: {name}:{i} is not valid JSON ({err}).") from err
        labels.append(f"{name}:{i}")
    return records, labels


def read_jsonl(path: Path, option: str) -> tuple[list[Any], list[str]]:
    """:func:`parse_jsonl` of the ``.jsonl`` file ``path``."""
    return parse_jsonl(read_lines(path, option, (".jsonl",)), path.name, option)


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is a non-empty list of chat messages ``{"role": str, "content": str}``."""
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        )
    )


def need_chat_template(tokenizer: PreTrainedTokenizerBase, label: str, option: str) -> None:
    """Refuse a chat prompt (row ``label``) when ``tokenizer`` has no chat template."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"data.{option}: row {label} is a list of chat messages but the tokenizer has no chat template; set "
            f"tokenizer.chat_template or give the prompts as text."
        )


def appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` appends an EOS when it adds its special tokens (ByT5, T5)."""
    eos = tokenizer.eos_token_id
    with_special = tokenizer(EOS_PROBE, add_special_tokens=True)["input_ids"]
    without = tokenizer(EOS_PROBE, add_special_tokens=False)["input_ids"]
    return eos is not None and with_special[-1:] == [eos] and without[-1:] != [eos]


def encode_text_prompts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of text prompts: the tokenizer's special tokens, minus a trailing EOS it appends."""
    if not texts:
        return []
    drop_eos = appends_eos(tokenizer)
    return [list(ids[:-1] if drop_eos else ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id collators pad with: the pad token's, else EOS's, else 0 (padding is masked, any valid id works)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def resolve_tokenizer(data_module: Any) -> PreTrainedTokenizerBase:
    """The data module's ``tokenizer``, else that of the LightningModule its trainer trains.

    Raises:
        ValueError: there is neither.
    """
    if data_module.tokenizer is not None:
        return data_module.tokenizer
    tokenizer = getattr(getattr(data_module.trainer, "lightning_module", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(data_module).__name__} has no tokenizer: pass tokenizer=... or train a LightningModule that has a "
            "`tokenizer` attribute after __init__."
        )
    return tokenizer


def check_counts(**counts: int) -> None:
    """Refuse a count below 1 (``num_workers`` below 0), naming its ``data.*`` field."""
    for field, value in counts.items():
        minimum = 0 if field == "num_workers" else 1
        if value < minimum:
            raise ValueError(f"data.{field} must be >= {minimum}, got {value}.")
