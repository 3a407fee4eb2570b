"""Running the reward server: the ``lightning-rlhf-serve-reward`` command (:func:`main`, its jsonargparse parser
over :func:`~lightning_rlhf.serve.create_app`'s signature) and :func:`run_in_thread` for tests and notebooks."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lightning_rlhf.errors import package_error
from lightning_rlhf.serve.app import create_app

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def run_in_thread(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    startup_timeout_s: float = 60.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread while the ``with`` block runs; yields its base URL.

    For tests and notebooks: ``port=0`` takes a free port (the URL names the one bound). On exit the server stops as
    on Ctrl-C (in-flight requests finish, then the app's shutdown: ``reward.teardown()``) and the thread is joined;
    after ``stop_timeout_s`` the open connections are dropped (uvicorn's second Ctrl-C) and the thread, a daemon,
    is left to end.

    Example:
        >>> with run_in_thread(create_app(CharFractionReward())) as url:  # doctest: +SKIP
        ...     httpx.post(f"{url}/score", json={"prompts": ["q"], "responses": ["abc"]}).json()
        {'scores': [1.0]}

    Raises:
        RuntimeError: the server stopped during startup (e.g. ``reward.setup`` raised: chained as the cause).
        TimeoutError: it did not start within ``startup_timeout_s``.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))

    def serve_until_stopped() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn's exit after a failed startup: raised below instead
            server.run()

    thread = threading.Thread(target=serve_until_stopped, name=f"reward-server-{host}:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    try:
        while not server.started:
            if not thread.is_alive():
                cause = getattr(getattr(app, "state", None), "startup_error", None)
                raise RuntimeError(f"the reward server on {host}:{port} stopped during startup.") from cause
            if time.monotonic() > deadline:
                raise TimeoutError(f"the reward server on {host}:{port} did not start in {startup_timeout_s} s.")
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(stop_timeout_s)
        server.force_exit = True
        thread.join(stop_timeout_s)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_parser() -> ArgumentParser:
    """The command's parser: :func:`create_app`'s options (but the token) and the server's."""
    parser = ArgumentParser(
        prog="lightning-rlhf-serve-reward",
        description="Serve a lightning_rlhf reward over HTTP for RemoteReward (POST /score) and OpenRLHF (POST "
        "/get_reward), with a health endpoint (GET /health).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (serve.yaml)")
    parser.add_function_arguments(create_app, skip={"token"})
    parser.add_argument("--host", type=str, default="127.0.0.1", help="interface to bind; 0.0.0.0 opens it to all")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to bind")
    parser.add_argument(
        "--token_env",
        type=str | None,
        default=None,
        help="name of the environment variable holding the bearer token clients must send; unset serves without auth",
    )
    parser.add_argument(
        "--log_level", type=Literal["debug", "info", "warning", "error"], default="info", help="server log level"
    )
    return parser


def build_app(argv: list[str] | None = None) -> tuple[FastAPI, Namespace]:
    """The app and the parsed options of a command line (``sys.argv[1:]`` when None), without binding a port.

    Exits with the parser's usage error for a ``--token_env`` that is not set, or an option ``create_app`` refuses.
    """
    parser = build_parser()
    config = parser.parse_args(argv)
    token = None
    if config.token_env is not None:
        token = os.environ.get(config.token_env)
        if not token:
            parser.error(
                f"--token_env {config.token_env}: the environment variable {config.token_env} is not set or empty; "
                f"export {config.token_env}=<secret> (the token clients send), or drop --token_env to serve without "
                f"auth."
            )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    try:
        options = instantiate(config)
    except (ValueError, TypeError) as err:  # a reward's own check, wrapped by jsonargparse in a dump of the config
        cause = package_error(err)
        if cause is None:
            raise
        parser.error(str(cause))
    keys = [k for k in inspect.signature(create_app).parameters if k != "token"]
    try:
        app = create_app(token=token, **{k: options[k] for k in keys})
    except ValueError as err:
        parser.error(str(err))
    return app, config


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-rlhf-serve-reward`` (``argv`` replaces ``sys.argv[1:]`` in tests)."""
    app, config = build_app(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.host not in LOOPBACK_HOSTS and config.token_env is None:
        logger.warning("serving on %s without a token: anyone who reaches it can score; set --token_env.", config.host)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
