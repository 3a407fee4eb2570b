"""The reward server's app: :func:`create_app` and what its routes do (:class:`RewardService`): auth, request limits,
the checks before a request is queued, scoring through the micro-batcher, NaN-preserving JSON, health."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from lightning_rlhf.rewards import RESERVED_FIELDS, CombinedReward, Reward, call_reward, fields_for, reward_name
from lightning_rlhf.rewards.protocol import (
    HEALTH_PATH,
    OPENRLHF_PATH,
    SCORE_PATH,
    ProtocolError,
    parse_openrlhf_request,
    parse_score_request,
)
from lightning_rlhf.serve.microbatch import MicroBatcher
from lightning_rlhf.serve.stats import RequestStats, latency_ms

logger = logging.getLogger(__name__)


class NaNJSONResponse(JSONResponse):
    """JSON with ``NaN`` / ``Infinity`` tokens for non-finite numbers (Starlette's ``JSONResponse`` refuses them)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)``, checked to exist.

    Raises:
        ValueError: naming ``device`` and the fix, for an unknown device or CUDA where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device ({err}); use auto, cpu, cuda or cuda:N.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use --device cpu (or auto).")
    return resolved


def check_options(token: str | None, max_batch_size: int, max_request_bytes: int, max_wait_ms: float) -> None:
    """Raises ValueError naming the :func:`create_app` option and the fix."""
    if token is not None and not token:
        raise ValueError("token is empty; set a secret, or None (no --token_env) to serve without auth.")
    for name, value in (("max_batch_size", max_batch_size), ("max_request_bytes", max_request_bytes)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1 (--{name}).")
    if not max_wait_ms >= 0:
        raise ValueError(f"max_wait_ms={max_wait_ms}: must be >= 0 (--max_wait_ms; 0 waits for nobody).")


def bearer_check(token: str) -> Callable[[Request], None]:
    """A dependency refusing, with 401, a request without ``Authorization: Bearer <token>``."""
    expected = token.encode()

    def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            problem = "no bearer token"
        elif not hmac.compare_digest(given.strip().encode("latin-1"), expected):  # headers are latin-1 decoded
            problem = "a wrong bearer token"
        else:
            return
        raise HTTPException(
            401,
            f"{problem}: this server needs 'Authorization: Bearer <token>' with its token (RemoteReward's token_env "
            f"names the environment variable holding it).",
            headers={"WWW-Authenticate": "Bearer"},
        )

    return check


async def read_body(request: Request, max_request_bytes: int) -> Any:
    """The request's JSON, refused with 413 past ``max_request_bytes`` (declared or received) and 400 if not JSON."""
    too_big = (
        f"over the server's max_request_bytes={max_request_bytes}; send fewer responses per request (RemoteReward's "
        f"batch_size) or start the server with a larger --max_request_bytes."
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_request_bytes:
        raise HTTPException(413, f"the request body is {declared} bytes, {too_big}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_request_bytes:
            raise HTTPException(413, f"the request body is {too_big}")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HTTPException(400, f"the request body is not valid JSON: {err}.") from err


def callees(reward: Reward | Callable[..., Any]) -> list[Reward | Callable[..., Any]]:
    """The rewards that receive a request's fields: ``reward`` and, for a ``CombinedReward``, each component's."""
    if not isinstance(reward, CombinedReward):
        return [reward]
    return [reward, *(callee for component in reward.components for callee in callees(component.reward))]


Parse = Callable[[Any], tuple[list[str], list[str], dict[str, list[Any]]]]
"""A protocol's request parser: :func:`parse_score_request` or :func:`parse_openrlhf_request`."""


class RewardService:
    """What the routes of :func:`create_app` do: the reward's life, the checks of a request, scoring, health.

    Args: as :func:`create_app`'s (the token aside: auth is the routes' dependency).
    """

    def __init__(
        self,
        reward: Reward | Callable[..., Any],
        max_batch_size: int,
        max_request_bytes: int,
        micro_batch: bool,
        max_wait_ms: float,
        device: str,
        log_every_s: float,
    ) -> None:
        self.reward, self.name, self.device = reward, reward_name(reward), resolve_device(device)
        self.callees = callees(reward)
        self.max_batch_size, self.max_request_bytes = max_batch_size, max_request_bytes
        self.batcher = MicroBatcher(self.score_fn, max_batch_size, max_wait_ms / 1000, merge=micro_batch)
        self.stats = RequestStats(log_every_s)

    def score_fn(self, prompts: list[str], responses: list[str], fields: dict[str, list[Any]]) -> list[float]:
        """One reward call, in the batcher's worker thread: checked scores as floats, NaN and infinity kept. No
        autograd graph (a function reward running a model need not say ``no_grad``); no token tensors (the server
        has no policy tokens: a reward that needs ``response_ids`` cannot be served)."""
        with torch.no_grad():
            scores = call_reward(self.reward, prompts, responses, allow_non_finite=True, **fields)
        return scores.cpu().tolist()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The app's life: ``reward.setup(device)`` in the worker thread before serving, ``teardown()`` after."""
        self.batcher.start()
        try:
            try:
                if isinstance(self.reward, Reward):
                    await self.batcher.run_in_worker(self.reward.setup, self.device)
            except Exception as err:
                app.state.startup_error = err  # for run_in_thread's error; uvicorn only logs it
                raise
            logger.info("serving reward %s on %s", self.name, self.device)
            yield
            if isinstance(self.reward, Reward):
                await self.batcher.run_in_worker(self.reward.teardown)
        finally:
            await self.batcher.stop()

    async def answer(self, request: Request, parse: Parse) -> list[float]:
        """The scores of a request, or an ``HTTPException`` (400, 413, 500); counted and timed either way."""
        started, size, failed = time.perf_counter(), 0, True
        try:
            prompts, responses, fields = self.checked(await read_body(request, self.max_request_bytes), parse)
            size = len(responses)
            scores = await self.scored(prompts, responses, fields)
            failed = False
            return scores
        finally:
            self.stats.record(size, time.perf_counter() - started, failed, self.batcher.calls)

    def checked(self, payload: Any, parse: Parse) -> tuple[list[str], list[str], dict[str, list[Any]]]:
        """``parse(payload)``, refused before queuing: 400 off the protocol or for fields the reward cannot take,
        413 past ``max_batch_size``."""
        try:
            prompts, responses, fields = parse(payload)
        except ProtocolError as err:
            raise HTTPException(400, str(err)) from err
        if len(responses) > self.max_batch_size:
            limit = self.max_batch_size
            raise HTTPException(
                413,
                f"{len(responses)} responses in one request, over the server's max_batch_size={limit}; send at most "
                f"{limit} per request (RemoteReward's batch_size) or start the server with a larger --max_batch_size.",
            )
        if unusable := sorted(set(RESERVED_FIELDS) & set(fields)):
            raise HTTPException(
                400, f"fields {unusable} cannot be sent: the names are the reward's own arguments; rename the fields."
            )
        try:  # a field the reward (or a component of it) requires and the request lacks: the client's to fix
            for reward in self.callees:
                fields_for(reward, fields)
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        return prompts, responses, fields

    async def scored(self, prompts: list[str], responses: list[str], fields: dict[str, list[Any]]) -> list[float]:
        """The batcher's scores; 500 with the message when the reward raised or returned invalid scores."""
        if not responses:
            return []
        try:
            return await self.batcher.score(prompts, responses, fields)
        except Exception as err:  # call_reward's RuntimeError (the reward raised) or ValueError (invalid scores)
            logger.error("scoring %d responses failed: %s", len(responses), err, exc_info=err)
            raise HTTPException(500, str(err)) from err

    def health(self) -> dict[str, Any]:
        """The health endpoint's body."""
        return {
            "status": "ok",
            "reward": self.name,
            **self.stats.totals,
            "reward_calls": self.batcher.calls,
            "latency_ms": latency_ms(self.stats.recent),
            "max_batch_size": self.max_batch_size,
            "max_request_bytes": self.max_request_bytes,
            "device": str(self.device),
        }


def create_app(
    reward: Reward | Callable[..., Any],
    *,
    token: str | None = None,
    max_batch_size: int = 1024,
    max_request_bytes: int = 64 * 2**20,
    micro_batch: bool = True,
    max_wait_ms: float = 5.0,
    device: str = "auto",
    log_every_s: float = 60.0,
) -> FastAPI:
    """The reward server as an ASGI app (serve it with uvicorn, or :func:`run_in_thread`); its
    :class:`RewardService` is ``app.state.reward_service``.

    Args:
        reward: the reward served: a ``Reward`` (``class_path`` / ``init_args``) or a function by import path.
        token: the bearer token every request must carry; None serves without auth. The command reads it from
            ``--token_env``.
        max_batch_size: the most responses in one request (more is 413) and in one reward call.
        max_request_bytes: the largest request body in bytes (larger is 413); 64 MiB by default.
        micro_batch: merge concurrent requests into one reward call (the reward runs one call at a time either way).
        max_wait_ms: how long a request waits for others to share its reward call while the reward is idle; 0 only
            merges requests already waiting.
        device: where ``reward.setup`` puts the reward: auto (CUDA when available), cpu, cuda or cuda:N.
        log_every_s: the interval of the request log line (only when requests came); 0 logs every request.

    Raises:
        ValueError: naming the option, for an empty token, a limit below 1, a negative wait or an unknown device.
    """
    check_options(token, max_batch_size, max_request_bytes, max_wait_ms)
    service = RewardService(reward, max_batch_size, max_request_bytes, micro_batch, max_wait_ms, device, log_every_s)
    app = FastAPI(title="lightning-rlhf reward server", lifespan=service.lifespan)
    app.state.reward_service = service
    auth = [Depends(bearer_check(token))] if token is not None else []

    @app.get(HEALTH_PATH, dependencies=auth)
    async def health() -> NaNJSONResponse:
        return NaNJSONResponse(service.health())

    @app.post(SCORE_PATH, dependencies=auth)
    async def score(request: Request) -> NaNJSONResponse:
        return NaNJSONResponse({"scores": await service.answer(request, parse_score_request)})

    @app.post(OPENRLHF_PATH, dependencies=auth)
    async def get_reward(request: Request) -> NaNJSONResponse:
        rewards = await service.answer(request, parse_openrlhf_request)
        return NaNJSONResponse({"rewards": rewards, "scores": rewards})  # as OpenRLHF's own server answers

    return app
