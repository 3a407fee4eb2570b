"""A reward scored by a server over HTTP: :class:`RemoteReward`, safe under faults and load.

The batch is split into requests of ``batch_size`` responses, sent ``max_concurrency`` at a time over one pooled
``httpx2`` client (the httpx API, already installed with ``huggingface_hub``), in the wire format of
:mod:`lightning_rlhf.rewards.protocol` (the package's own, or OpenRLHF's). What can go wrong, and what happens:

==============================================  =================================================================
fault                                           behaviour
==============================================  =================================================================
connection refused / reset, request timeout,    retried with exponential backoff and full jitter
HTTP 5xx, 408, 429                              (``backoff_s * 2**attempt``, capped by ``max_backoff_s``; a 429's
                                                ``Retry-After`` is honoured), at most ``max_retries`` times
HTTP 4xx (other)                                not retried: an error with the server's message
malformed JSON, no ``scores``, a wrong count,   not retried (a server that answers wrongly answers wrongly
a score that is not a number                    again): an error naming the URL and what was wrong
``deadline_s`` spent over all requests          an error with the attempts made and the last failure
NaN / infinity                                  returned as is: the trainer's rule applies (an error on the first
                                                iteration, a skipped iteration later)
==============================================  =================================================================

With ``on_failure: skip`` a failed call returns NaN for every response instead of raising (after a warning that
says why), so the trainer skips that iteration and goes on (up to ``ppo.max_consecutive_skips`` in a row); nothing is
ever silently scored 0. ``setup`` (before any weight moves) checks that the server answers: its health endpoint,
with the token, for the package's protocol; any HTTP answer at the URL for OpenRLHF's, which has none.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_rlhf.rewards.base import TOKEN_INPUTS, Reward
from lightning_rlhf.rewards.protocol import (
    HEALTH_PATH,
    SCORE_PATH,
    ProtocolError,
    openrlhf_request,
    parse_scores,
    score_request,
)

RETRIED_STATUSES = frozenset({408, 429})
"""4xx statuses that mean "try again later" (request timeout, too many requests); every 5xx is retried too."""


class RemoteRewardError(RuntimeError):
    """Scoring over HTTP failed; the message names the URL, what went wrong and the fix."""


class _Stopped(RemoteRewardError):
    """A request given up because another request of the same call failed for good (that one is reported)."""


class _Retryable(Exception):
    """A failed attempt worth another: its message says what failed; ``wait_s`` is the server's Retry-After."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s


class RemoteReward(Reward):
    """Scores from a reward server: ``lightning-rlhf-serve-reward`` (:mod:`lightning_rlhf.serve`), or an OpenRLHF
    remote reward server.

    Args:
        url: the server's base URL (``http://10.0.0.5:8000``) for ``protocol: lightning_rlhf``; the endpoint itself
            (``http://10.0.0.5:5000/get_reward``) for ``protocol: openrlhf``.
        protocol: ``lightning_rlhf`` (prompts, responses and prompt fields; :data:`~lightning_rlhf.rewards.protocol.
            SCORE_PATH`) or ``openrlhf`` (``query`` = prompt + response, ``prompts``, ``labels`` from the prompt field
            ``label``; scores read from ``rewards``).
        token_env: the environment variable holding a bearer token the server requires (kept out of recipes and
            their saved copies); None sends none.
        batch_size: responses per request.
        max_concurrency: requests in flight at once.
        timeout_s: seconds one request may take (connect, send, wait, read) before it is retried.
        max_retries: further attempts of a request after a retryable failure.
        backoff_s: the first backoff; attempt ``k`` waits a uniform random time in ``[0, backoff_s * 2**k]``.
        max_backoff_s: the cap of one backoff.
        deadline_s: seconds one call (all requests of a rollout, retries included) may take.
        on_failure: ``raise`` stops the run with the error; ``skip`` warns and returns NaN scores, which the trainer
            answers by skipping the iteration (after the first; the first iteration's scores must be real).
        check_on_setup: check in ``setup`` that the server answers, so a wrong URL fails before any weight moves.
    """

    def __init__(
        self,
        url: str,
        protocol: Literal["lightning_rlhf", "openrlhf"] = "lightning_rlhf",
        token_env: str | None = None,
        batch_size: int = 64,
        max_concurrency: int = 4,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        deadline_s: float = 300.0,
        on_failure: Literal["raise", "skip"] = "raise",
        check_on_setup: bool = True,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward url={url!r} must start with http:// or https://.")
        if protocol not in ("lightning_rlhf", "openrlhf"):
            raise ValueError(f"RemoteReward protocol={protocol!r} must be 'lightning_rlhf' or 'openrlhf'.")
        if on_failure not in ("raise", "skip"):
            raise ValueError(f"RemoteReward on_failure={on_failure!r} must be 'raise' or 'skip'.")
        for name, value, low in (("batch_size", batch_size, 1), ("max_concurrency", max_concurrency, 1)):
            if value < low:
                raise ValueError(f"RemoteReward {name}={value} must be >= {low}.")
        for name, value in (("timeout_s", timeout_s), ("deadline_s", deadline_s)):
            if not value > 0:
                raise ValueError(f"RemoteReward {name}={value} must be > 0 seconds.")
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("RemoteReward max_retries, backoff_s and max_backoff_s must be >= 0.")
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.token_env = token_env
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.timeout_s, self.deadline_s = timeout_s, deadline_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.on_failure = on_failure
        self.check_on_setup = check_on_setup
        self._client: Any = None
        self._jitter = random.Random()  # its own stream: backoffs must not draw from the trainer's random state
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        """Where batches are POSTed."""
        return self.url + SCORE_PATH if self.protocol == "lightning_rlhf" else self.url

    def _headers(self) -> dict[str, str]:
        if self.token_env is None:
            return {}
        token = os.environ.get(self.token_env)
        if not token:
            raise ValueError(
                f"RemoteReward token_env={self.token_env!r}: the environment variable is not set; export the "
                f"server's token as {self.token_env} before the run."
            )
        return {"Authorization": f"Bearer {token}"}

    def client(self) -> Any:
        """The pooled HTTP client, made on first use (not pickled: each process makes its own)."""
        with self._lock:
            if self._client is None:
                import httpx2

                limits = httpx2.Limits(max_connections=self.max_concurrency)
                self._client = httpx2.Client(headers=self._headers(), limits=limits, timeout=self.timeout_s)
            return self._client

    def setup(self, device: torch.device) -> None:
        """Make the client and, with ``check_on_setup``, check that the server answers (before any weight moves)."""
        if self.check_on_setup:
            self.check_server()

    def check_server(self) -> None:
        """Raise :class:`RemoteRewardError` unless the server answers: its health endpoint with 200 (package
        protocol), or any HTTP response at the URL (OpenRLHF's servers have no health endpoint)."""
        import httpx2

        target = self.url + HEALTH_PATH if self.protocol == "lightning_rlhf" else self.url
        try:
            response = self.client().get(target, timeout=min(self.timeout_s, 10.0))
        except httpx2.TransportError as err:
            raise RemoteRewardError(
                f"RemoteReward: the reward server at {target} does not answer ({type(err).__name__}: {err}); start "
                "it (lightning-rlhf-serve-reward --config ...) or fix model.reward.init_args.url."
            ) from err
        if self.protocol == "lightning_rlhf" and response.status_code != 200:
            hint = (
                "set token_env to the variable holding the server's token"
                if response.status_code == 401
                else "is it a lightning-rlhf-serve-reward server? For an OpenRLHF server set protocol: openrlhf"
            )
            raise RemoteRewardError(
                f"RemoteReward: {target} answered {response.status_code} ({_detail(response)}); {hint}."
            )

    def teardown(self) -> None:
        """Close the client's connections."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ scoring
    def __call__(self, prompts: list[str], responses: list[str], **inputs: Any) -> Tensor:
        """(B,) float32 scores from the server (every prompt field is sent; the token tensors are not)."""
        fields = {name: values for name, values in inputs.items() if name not in TOKEN_INPUTS}
        deadline = time.monotonic() + self.deadline_s
        starts = list(range(0, len(responses), self.batch_size))
        chunks = [
            (prompts[s : s + self.batch_size], responses[s : s + self.batch_size], _rows(fields, s, self.batch_size))
            for s in starts
        ]
        failed = threading.Event()  # one request failing for good stops the others' retries

        def score(chunk: tuple[Sequence[str], Sequence[str], dict[str, list[Any]]]) -> list[float]:
            try:
                return self._score_chunk(*chunk, deadline, failed)
            except RemoteRewardError:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(chunks) or 1)) as pool:
            futures = [pool.submit(score, chunk) for chunk in chunks]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if not errors:
            return torch.tensor([value for future in futures for value in future.result()], dtype=torch.float32)
        err = next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        if self.on_failure == "raise" or not isinstance(err, RemoteRewardError):
            raise err
        warnings.warn(f"{err} on_failure=skip: this rollout scores NaN, so the trainer skips it.", stacklevel=2)
        return torch.full((len(responses),), float("nan"))

    def _score_chunk(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        fields: dict[str, list[Any]],
        deadline: float,
        failed: threading.Event,
    ) -> list[float]:
        """One request's scores, retried as the module docstring says, until ``deadline`` or until ``failed`` (another
        request of the call failed for good) is set."""
        body = (score_request if self.protocol == "lightning_rlhf" else openrlhf_request)(prompts, responses, fields)
        attempts, last = 0, "no attempt"
        while True:
            if failed.is_set():
                raise _Stopped("another request of this rollout failed; not retried further")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteRewardError(
                    f"RemoteReward: no scores from {self.endpoint} within deadline_s={self.deadline_s} ({attempts} "
                    f"attempts, the last: {last}); check the server, or raise deadline_s / max_retries."
                )
            attempts += 1
            try:
                return self._attempt(body, len(responses), min(self.timeout_s, remaining))
            except _Retryable as err:
                last = str(err)
                if attempts > self.max_retries:
                    raise RemoteRewardError(
                        f"RemoteReward: {self.endpoint} failed {attempts} times (max_retries={self.max_retries}), the "
                        f"last: {last}; check the server, or raise max_retries."
                    ) from err
                cap = min(self.max_backoff_s, self.backoff_s * 2 ** (attempts - 1))
                wait = err.wait_s if err.wait_s is not None else self._jitter.uniform(0.0, cap)
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))

    def _attempt(self, body: dict[str, Any], expected: int, timeout_s: float) -> list[float]:
        """One POST: the scores, or :class:`_Retryable` / :class:`RemoteRewardError`."""
        import httpx2

        try:
            response = self.client().post(self.endpoint, json=body, timeout=timeout_s)
        except httpx2.TimeoutException as err:
            raise _Retryable(f"no answer within {timeout_s:.3g} s (timeout_s={self.timeout_s})") from err
        except httpx2.TransportError as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from err
        status = response.status_code
        if status >= 500 or status in RETRIED_STATUSES:
            raise _Retryable(f"HTTP {status} ({_detail(response)})", _retry_after(response))
        if status >= 400:
            fix = "set token_env to the variable holding its token" if status == 401 else "fix the request"
            raise RemoteRewardError(
                f"RemoteReward: {self.endpoint} refused the request with HTTP {status}: {_detail(response)}; {fix} "
                "(not retried: a 4xx answer does not change on retry)."
            )
        try:
            payload = json.loads(response.content)
        except ValueError as err:
            raise RemoteRewardError(
                f"RemoteReward: {self.endpoint} answered malformed JSON ({err}; the body starts "
                f"{response.content[:80]!r}); fix the server's response."
            ) from err
        key = "scores" if self.protocol == "lightning_rlhf" else "rewards"
        try:
            return parse_scores(payload, key, expected)
        except ProtocolError as err:
            raise RemoteRewardError(f"RemoteReward: {self.endpoint}: {err} Fix the server's response.") from err


def _rows(fields: dict[str, Sequence[Any]], start: int, size: int) -> dict[str, list[Any]]:
    return {name: list(values[start : start + size]) for name, values in fields.items()}


def _detail(response: Any) -> str:
    """The server's message: a JSON ``detail`` if there is one, else the start of the body."""
    try:
        payload = response.json()
    except ValueError:
        return response.text[:200] or "no body"
    return str(payload.get("detail", payload))[:200] if isinstance(payload, dict) else str(payload)[:200]


def _retry_after(response: Any) -> float | None:
    """A 429/503's ``Retry-After`` in seconds (the numeric form), else None."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
