"""The reward server, ``lightning-rlhf-serve-reward``: any reward over HTTP (FastAPI + uvicorn), for
:class:`~lightning_rlhf.rewards.RemoteReward` or OpenRLHF's ``--remote_rm_url``. Needs the ``serve`` extra; nothing
on the training path imports it.

``lightning-rlhf-serve-reward --config serve.yaml`` with ``reward: {class_path: ..., init_args: ...}`` (a
:class:`~lightning_rlhf.rewards.Reward`) or ``reward: my_module.my_function`` (a function by import path); every
option of :func:`create_app` is a flag, plus ``--host`` (127.0.0.1), ``--port`` (8000), ``--token_env`` and
``--log_level`` (``--help`` lists them). The wire format is :mod:`lightning_rlhf.rewards.protocol`'s.

- **Endpoints.** ``GET /health``: ``{"status": "ok", "reward": name, "requests": n, "responses": n, "errors": n,
  "reward_calls": n, "latency_ms": {"p50": ms, "p95": ms} or null, "max_batch_size": n, "max_request_bytes": n,
  "device": "cpu"}``. ``POST /score``: the package's protocol, ``{"scores": [...]}``. ``POST /get_reward``:
  OpenRLHF's, answered with ``{"rewards": [...], "scores": [...]}`` (the same numbers, as OpenRLHF's server sends).
- **Scoring** goes through :func:`~lightning_rlhf.rewards.call_reward`, so fields reach the reward as in-process
  and the scores are checked; NaN and infinity go out as the JSON tokens ``NaN`` / ``Infinity``.
- **Status codes**, each with ``{"detail": message}``: 400 for what the client can fix (not JSON, not the protocol,
  a field name that is one of the reward's own arguments, a field the reward requires but the request lacks: all
  checked before the request is queued); 401 without the right bearer token (nothing scored); 413 for more than
  ``max_batch_size`` responses or a body over ``max_request_bytes`` (by its ``Content-Length``, or its bytes as they
  arrive); 500 when the reward raised or returned invalid scores (the server's reward is at fault; logged with its
  traceback).
- **Auth.** With a token, every endpoint, health included, needs ``Authorization: Bearer <token>`` (compared with
  :func:`hmac.compare_digest`), so the trainer's health check at fit start finds a wrong token before any weight
  moves. The command reads the token from the environment variable ``--token_env`` names, never from the command
  line (visible in ``ps``).
- **One reward call at a time**, in one worker thread, concurrent requests merged (:mod:`.microbatch`);
  ``reward.setup(device)`` runs there at startup and ``reward.teardown()`` at shutdown (the app's lifespan).
- **Logs** (loggers under ``lightning_rlhf.serve``): a line every ``log_every_s`` seconds with traffic, giving the
  requests, responses, reward calls and errors since the last line and their p50 / p95 latency (nearest rank);
  health shows the totals and the percentiles of the last :data:`~.stats.LATENCY_WINDOW` requests.

Modules: :mod:`.app` (``create_app``, ``RewardService``), :mod:`.microbatch` (``MicroBatcher``), :mod:`.stats`
(``RequestStats``), :mod:`.command` (``main``, ``build_parser``, ``build_app``, ``run_in_thread``).
"""

try:
    import fastapi  # noqa: F401  (checked here, so every import of the server names the extra to install)
    import uvicorn  # noqa: F401
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        f"the reward server needs FastAPI and uvicorn ({err.name} is missing): pip install 'lightning-rlhf[serve]'"
    ) from err

from lightning_rlhf.serve.app import NaNJSONResponse, RewardService, create_app
from lightning_rlhf.serve.command import build_app, build_parser, main, run_in_thread
from lightning_rlhf.serve.microbatch import MicroBatcher, next_call
from lightning_rlhf.serve.stats import RequestStats, percentile

__all__ = [
    "MicroBatcher",
    "NaNJSONResponse",
    "RequestStats",
    "RewardService",
    "build_app",
    "build_parser",
    "create_app",
    "main",
    "next_call",
    "percentile",
    "run_in_thread",
]
