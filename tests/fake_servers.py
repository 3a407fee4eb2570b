"""A scripted HTTP server on 127.0.0.1 for the remote-reward fault tests: each request gets the next scripted answer.

An answer is a function ``(request_body) -> Answer``; :class:`FakeServer` records every request it receives (path,
headers, JSON body) and plays its script in order (the last answer repeats). Answers can delay, send any status and
body, send a body shorter than its ``Content-Length`` and close (a truncated transfer), or close without answering.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lightning.pytorch.callbacks import Callback


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    truncate: bool = False  # send half the body under the full Content-Length, then close
    hang_up: bool = False  # close the connection without answering


def scores(values: list[Any], key: str = "scores") -> Answer:
    """200 with ``{key: values}`` written by Python's json (NaN as the token ``NaN``)."""
    return Answer(body=json.dumps({key: values}).encode())


def length_scores(body: dict) -> Answer:
    """The score of each response is its length: a deterministic server."""
    return scores([float(len(r)) for r in body["responses"]])


def status(code: int, detail: str = "", **headers: str) -> Callable[[dict], Answer]:
    return lambda body: Answer(status=code, body=json.dumps({"detail": detail}).encode(), headers=headers)


class FakeServer:
    """``script``: answers in order, the last one repeating. ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, script: list[Callable[[dict], Answer]]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, body: dict) -> None:
                with server._lock:
                    index = len(server.requests)
                    record = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                    server.requests.append(record)
                    answer = server.script[min(index, len(server.script) - 1)](body)
                time.sleep(answer.delay_s)
                if answer.hang_up:
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.body)))
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(answer.body[: len(answer.body) // 2] if answer.truncate else answer.body)
                if answer.truncate:
                    self.close_connection = True

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer(json.loads(raw) if raw else {})

            def do_GET(self) -> None:
                self._answer({})

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and hung up: expected in these tests, not worth a traceback

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def posts(self) -> list[dict[str, Any]]:
        """The POST requests received, in order."""
        return [r for r in self.requests if r["method"] == "POST"]


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """The URL of a port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(*args: str, port: int | None = None, timeout_s: float = 60.0) -> Iterator[Any]:
    """``python -m lightning_rlhf.serve --port <port> *args`` as a subprocess, up (its health answers) when this
    yields the process (``.url`` set); terminated on exit if still alive."""
    import subprocess
    import sys

    import httpx2

    port = port or free_port()
    command = [sys.executable, "-m", "lightning_rlhf.serve", f"--port={port}", "--log_level=warning", *args]
    proc = subprocess.Popen(command)
    proc.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if httpx2.get(proc.url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server {args} did not come up (exit code {proc.poll()})")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


class KillAtStep(Callback):
    """Kills process ``pid`` when training reaches ``step`` (``class_path: fake_servers.KillAtStep``): a reward
    server dying in the middle of a fit."""

    def __init__(self, pid: int, step: int) -> None:
        self.pid, self.step = pid, step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(self.pid, signal.SIGKILL)
