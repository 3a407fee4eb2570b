"""Column layouts: turn a dataset row into the ``prompt`` / ``response`` / ``chosen`` / ``rejected`` the stages use.

The layouts are TRL's dataset formats (``trl/data_utils.py`` and its "Dataset formats" guide), text or
conversational (a list of ``{"role", "content"}`` messages):

============  ==========================================  ================================================
stage         columns                                      becomes
============  ==========================================  ================================================
prompts       ``prompt`` (text or messages)                the prompt; every other column is a prompt field
prompts       ``messages`` (no ``prompt`` column)          the messages up to the last user turn
SFT           ``prompt`` + ``completion`` or ``response``  prompt, response (a completion may be one
                                                           assistant message)
SFT           ``messages``                                 everything before the last assistant turn, and it
preference    ``prompt`` + ``chosen`` + ``rejected``       explicit prompt; chosen / rejected text or one
                                                           assistant message each
preference    ``chosen`` + ``rejected``                    implicit prompt: the longest shared beginning
============  ==========================================  ================================================

``data.*_key`` options rename the columns (``prompt_key: question``). Functions here take one row (a dict) and raise
``ValueError`` naming the row's label and the option to set; the data modules call them on every source (files,
inline lists, built-in tasks, Hugging Face datasets) so a layout means the same thing wherever the rows come from.
"""

from __future__ import annotations

from typing import Any

from lightning_rlhf.data.common import Prompt, is_chat

MESSAGES = "messages"
"""The column of a conversation (TRL's conversational language-modeling layout)."""
RESPONSE_COLUMNS = ("response", "completion")
"""Columns an SFT response is read from when ``response_key`` is not set, in this order."""
PROMPT_PLACEHOLDER = "{prompt}"
"""What ``prompt_template`` replaces with the row's prompt text."""


def without_nones(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message without the keys a dataset filled with None (Arrow gives every message every key any message
    of the column has, e.g. ``tool_calls: None``), which chat templates would otherwise render."""
    return {key: value for key, value in message.items() if value is not None}


def as_messages(value: Any) -> Any:
    """``value`` with None-valued message keys dropped when it is a list of messages, else unchanged."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [without_nones(m) for m in value]
    return value


def last_index(messages: list[dict[str, Any]], role: str) -> int:
    """Index of the last message with ``role``, or -1."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == role), -1)


def row_prompt(row: dict[str, Any], prompt_key: str, label: str, option: str) -> Prompt:
    """The prompt of a prompt row: column ``prompt_key``, else (when it is the default ``prompt``) a ``messages``
    conversation cut after its last user turn, so a trailing assistant answer is not part of the prompt."""
    if prompt_key in row:
        return as_messages(row[prompt_key])
    if prompt_key == "prompt" and MESSAGES in row:
        messages = as_messages(row[MESSAGES])
        if not is_chat(messages) or (end := last_index(messages, "user")) < 0:
            raise ValueError(f"data.{option}: row {label}: {MESSAGES!r} must be chat messages with a user turn.")
        return messages[: end + 1]
    raise ValueError(
        f"data.{option}: row {label} has no column {prompt_key!r} (its columns: {sorted(row)}); set data.prompt_key."
    )


def prompt_columns(columns: list[str], prompt_key: str) -> str:
    """The column a dataset's prompts are read from (see :func:`row_prompt`), or ``prompt_key`` if none fits."""
    if prompt_key not in columns and prompt_key == "prompt" and MESSAGES in columns:
        return MESSAGES
    return prompt_key


def templated(prompt: Prompt, template: str | None, as_chat: bool, system_prompt: str | None) -> Prompt:
    """The prompt after ``prompt_template`` (``{prompt}`` replaced by the text, or by a chat prompt's last user
    message) and, with ``as_chat``, a text prompt turned into a user message after an optional system message."""
    if template is not None:
        if isinstance(prompt, str):
            prompt = template.replace(PROMPT_PLACEHOLDER, prompt)
        elif is_chat(prompt) and (end := last_index(prompt, "user")) >= 0:
            turn = {**prompt[end], "content": template.replace(PROMPT_PLACEHOLDER, prompt[end]["content"])}
            prompt = [*prompt[:end], turn, *prompt[end + 1 :]]
    if as_chat and isinstance(prompt, str):
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        prompt = [*system, {"role": "user", "content": prompt}]
    return prompt


def assistant_text(value: Any, label: str, column: str, option: str) -> Any:
    """A response given as text, or as a list holding one assistant message (TRL's conversational completion):
    its content. Anything else is returned as is, for the row check to refuse."""
    if isinstance(value, list) and is_chat(value):
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise ValueError(
                f"data.{option}: row {label}: {column!r} must be text or one assistant message, got "
                f"{len(value)} messages ({', '.join(m['role'] for m in value)})."
            )
        return value[0]["content"]
    return value


def sft_row(row: dict[str, Any], prompt_key: str, response_key: str | None, label: str, option: str) -> dict:
    """``{"prompt", "response"}`` of an SFT row (prompt + completion/response, or a ``messages`` conversation whose
    last assistant turn is the response)."""
    if prompt_key not in row and prompt_key == "prompt" and MESSAGES in row:
        messages = as_messages(row[MESSAGES])
        end = last_index(messages, "assistant") if is_chat(messages) else -1
        if end < 1:
            raise ValueError(
                f"data.{option}: row {label}: {MESSAGES!r} must be chat messages ending in an assistant turn that "
                "follows at least one other turn."
            )
        return {"prompt": messages[:end], "response": messages[end]["content"]}
    key = response_key or next((c for c in RESPONSE_COLUMNS if c in row), RESPONSE_COLUMNS[0])
    if prompt_key not in row or key not in row:
        wanted = f"{prompt_key!r} and {key!r}" if response_key else f"{prompt_key!r} and 'response' or 'completion'"
        raise ValueError(
            f"data.{option}: row {label} needs the columns {wanted}, or {MESSAGES!r}; it has {sorted(row)}. Set "
            "data.prompt_key / data.response_key."
        )
    return {"prompt": as_messages(row[prompt_key]), "response": assistant_text(row[key], label, key, option)}


def shared_prompt(chosen: Any, rejected: Any, label: str, option: str) -> tuple[Prompt, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen, rejected): the longest beginning both share, then the
    rest of each. Text gives a space before the split to the responses (``"... Assistant:"`` + ``" yes"``), as
    TRL's ``extract_prompt`` does; a conversation splits between messages, and each rest must be one assistant
    message."""
    size = min(len(chosen), len(rejected))
    split = next((i for i in range(size) if chosen[i] != rejected[i]), size)
    if isinstance(chosen, str):
        if split > 0 and chosen[split - 1] == " ":
            split -= 1
        return chosen[:split], chosen[split:], rejected[split:]
    chosen, rejected = as_messages(chosen), as_messages(rejected)
    rests = (chosen[split:], rejected[split:])
    if not split or any(len(rest) != 1 or rest[0].get("role") != "assistant" for rest in rests):
        raise ValueError(
            f"data.{option}: row {label}: an implicit-prompt pair must be two conversations that share their first "
            "messages and end in one different assistant message each; give a 'prompt' column instead."
        )
    return chosen[:split], rests[0][0]["content"], rests[1][0]["content"]


def preference_row(
    row: dict[str, Any], prompt_key: str, chosen_key: str, rejected_key: str, label: str, option: str
) -> dict:
    """``{"prompt", "chosen", "rejected", **other columns}`` of a preference row, explicit or implicit prompt."""
    if chosen_key not in row or rejected_key not in row:
        raise ValueError(
            f"data.{option}: row {label} needs the columns {chosen_key!r} and {rejected_key!r}; it has "
            f"{sorted(row)}. Set data.chosen_key / data.rejected_key."
        )
    chosen, rejected = row[chosen_key], row[rejected_key]
    out = {k: v for k, v in row.items() if k not in (prompt_key, chosen_key, rejected_key)}
    if prompt_key in row:
        prompt = as_messages(row[prompt_key])
        chosen = assistant_text(as_messages(chosen), label, chosen_key, option)
        rejected = assistant_text(as_messages(rejected), label, rejected_key, option)
    elif isinstance(chosen, str) == isinstance(rejected, str) and isinstance(chosen, str | list):
        prompt, chosen, rejected = shared_prompt(chosen, rejected, label, option)
    else:
        raise ValueError(
            f"data.{option}: row {label}: {chosen_key!r} and {rejected_key!r} must both be text or both conversations."
        )
    return {**out, "prompt": prompt, "chosen": chosen, "rejected": rejected}
