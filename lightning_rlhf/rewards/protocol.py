"""The wire format of rewards over HTTP: what :class:`~lightning_rlhf.rewards.RemoteReward` sends and the server of
``lightning-rlhf-serve-reward`` (:mod:`lightning_rlhf.serve`) answers. One home for both sides.

The package's own protocol, JSON over HTTP POST at :data:`SCORE_PATH`::

    request:  {"prompts": ["...", ...], "responses": ["...", ...], "fields": {"answer": ["42", ...]}}
    response: {"scores": [1.0, ...]}                        one number per response, in order

``fields`` (optional) are the prompt fields, one value per response, as a reward receives them
(:func:`~lightning_rlhf.rewards.call_reward`). A non-finite score travels as the JSON tokens ``NaN`` / ``Infinity``
(Python's ``json`` writes and reads them), so the trainer's rule for non-finite scores applies as in-process. An error
is a 4xx/5xx status with ``{"detail": "message"}``.
``GET`` :data:`HEALTH_PATH` answers 200 with ``{"status": "ok", ...}`` when the server is up.

OpenRLHF's remote reward protocol (``openrlhf/utils/remote_rm_utils.py``, ``openrlhf/cli/serve_rm.py``), accepted too
so a trainer can be pointed at a server users already run and the server can be called by OpenRLHF: POST at
:data:`OPENRLHF_PATH` with ``{"query": [prompt + response, ...], "prompts": [...], "labels": [...]}`` (``prompts`` and
``labels`` optional), answered with ``{"rewards": [...]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SCORE_PATH = "/score"
"""POST: score a batch in the package's protocol."""
HEALTH_PATH = "/health"
"""GET: 200 when the server is up."""
OPENRLHF_PATH = "/get_reward"
"""POST: score a batch in OpenRLHF's protocol."""
OPENRLHF_LABEL_FIELD = "label"
"""The prompt field sent (and received) as OpenRLHF's ``labels``."""


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; the message says which part and why."""


def score_request(prompts: Sequence[str], responses: Sequence[str], fields: Mapping[str, Sequence[Any]]) -> dict:
    """The package protocol's request body for one batch."""
    body: dict[str, Any] = {"prompts": list(prompts), "responses": list(responses)}
    if fields:
        body["fields"] = {name: list(values) for name, values in fields.items()}
    return body


def openrlhf_request(prompts: Sequence[str], responses: Sequence[str], fields: Mapping[str, Sequence[Any]]) -> dict:
    """OpenRLHF's request body: ``query`` = prompt + response, ``prompts``, and ``labels`` from the prompt field
    :data:`OPENRLHF_LABEL_FIELD` when the rows carry one."""
    body: dict[str, Any] = {"query": [p + r for p, r in zip(prompts, responses, strict=True)], "prompts": list(prompts)}
    if OPENRLHF_LABEL_FIELD in fields:
        body["labels"] = list(fields[OPENRLHF_LABEL_FIELD])
    return body


def _strings(payload: Mapping[str, Any], key: str) -> list[str]:
    values = payload.get(key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ProtocolError(f"'{key}' must be a list of strings, got {type(values).__name__}.")
    return values


def parse_score_request(payload: Any) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    """``(prompts, responses, fields)`` of a package-protocol request body.

    Raises:
        ProtocolError: not an object, ``prompts`` / ``responses`` not lists of strings or of different lengths,
            ``fields`` not an object of lists with one value per response.
    """
    if not isinstance(payload, dict):
        raise ProtocolError(f"the body must be a JSON object, got {type(payload).__name__}.")
    prompts, responses = _strings(payload, "prompts"), _strings(payload, "responses")
    if len(prompts) != len(responses):
        raise ProtocolError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up.")
    fields = payload.get("fields") or {}
    if not isinstance(fields, dict):
        raise ProtocolError(f"'fields' must be an object of lists, got {type(fields).__name__}.")
    for name, values in fields.items():
        if not isinstance(values, list) or len(values) != len(responses):
            raise ProtocolError(f"field {name!r} must be a list with one value per response ({len(responses)}).")
    return prompts, responses, fields


def parse_openrlhf_request(payload: Any) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    """``(prompts, responses, fields)`` of an OpenRLHF request: each query split after its prompt when ``prompts``
    are given and it starts with its prompt (else the whole query is the response, after an empty prompt: what a
    reward model scoring ``prompt + response`` text sees either way); ``labels`` become the field ``label``."""
    if not isinstance(payload, dict):
        raise ProtocolError(f"the body must be a JSON object, got {type(payload).__name__}.")
    queries = _strings(payload, "query")
    given = payload.get("prompts")
    prompts = _strings(payload, "prompts") if given is not None else [""] * len(queries)
    if len(prompts) != len(queries):
        raise ProtocolError(f"got {len(queries)} queries but {len(prompts)} prompts.")
    split = [(p, q[len(p) :]) if q.startswith(p) else ("", q) for p, q in zip(prompts, queries, strict=True)]
    fields: dict[str, list[Any]] = {}
    if (labels := payload.get("labels")) is not None:
        if not isinstance(labels, list) or len(labels) != len(queries):
            raise ProtocolError(f"'labels' must be a list with one value per query ({len(queries)}).")
        fields[OPENRLHF_LABEL_FIELD] = labels
    return [p for p, _ in split], [r for _, r in split], fields


def parse_scores(payload: Any, key: str, expected: int) -> list[float]:
    """The ``expected`` scores under ``key`` of a response body, as floats (NaN and infinity kept: the trainer's
    rule for non-finite scores applies to them).

    Raises:
        ProtocolError: not an object, ``key`` missing, not a list, the wrong length, or an entry that is not a number
            (None, a string, a boolean).
    """
    if not isinstance(payload, dict) or key not in payload:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ProtocolError(f"the response has no {key!r} (it has {found}).")
    scores = payload[key]
    if not isinstance(scores, list):
        raise ProtocolError(f"{key!r} must be a list of numbers, got {type(scores).__name__}.")
    if len(scores) != expected:
        raise ProtocolError(f"{key!r} has {len(scores)} scores for {expected} responses; return one per response.")
    bad = [i for i, s in enumerate(scores) if isinstance(s, bool) or not isinstance(s, int | float)]
    if bad:
        raise ProtocolError(f"{key!r}[{bad[0]}] is {scores[bad[0]]!r}, not a number; return a number per response.")
    return [float(s) for s in scores]
