"""Load on one reward server: several client processes, many requests each, every answer checked.

Starts ``lightning-rlhf-serve-reward`` (a subprocess on 127.0.0.1, a free port) serving ``CharFractionReward``, then
``--clients`` processes that each make ``--requests`` calls of ``RemoteReward`` (``--responses`` distinct random texts
per call, one request each). Every client checks that every score it got is the one ``CharFractionReward`` gives its
own texts (so no answer crossed between requests or clients) and reports its call latencies. Prints one JSON line:
requests answered, mismatches (must be 0), latency percentiles over every call, requests per second.

Run ``python benchmarks/reward_server_load.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import statistics
import string
import subprocess
import sys
import time

import httpx2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx2.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the reward server at {url} did not come up within {timeout_s} s")


def client(url: str, index: int, requests: int, responses: int, out: multiprocessing.Queue) -> None:
    """One client process: ``requests`` calls, each checked against the reward computed here."""
    from lightning_rlhf.rewards import CharFractionReward, RemoteReward

    rng = random.Random(index)
    local = CharFractionReward()
    remote = RemoteReward(url, batch_size=responses, max_retries=0, check_on_setup=False)
    latencies, mismatches = [], 0
    began = time.time()
    for _ in range(requests):
        texts = ["".join(rng.choices(string.ascii_letters + " .", k=rng.randint(1, 24))) for _ in range(responses)]
        start = time.perf_counter()
        got = remote(["p"] * responses, texts)
        latencies.append(time.perf_counter() - start)
        mismatches += int(not bool((got == local(["p"] * responses, texts)).all()))
    remote.teardown()
    out.put({"latencies": latencies, "mismatches": mismatches, "began": began, "ended": time.time()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--requests", type=int, default=200, help="calls per client")
    parser.add_argument("--responses", type=int, default=8, help="responses per call")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's micro-batching window")
    parser.add_argument("--threads", type=int, help="accepted for the benchmarks' common interface (unused)")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "lightning_rlhf.serve",
        "--reward=lightning_rlhf.rewards.CharFractionReward",
        f"--port={port}",
        f"--max_wait_ms={args.max_wait_ms}",
        "--log_level=warning",
    ]
    server = subprocess.Popen(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        wait_until_up(url, timeout_s=60)
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        procs = [
            context.Process(target=client, args=(url, i, args.requests, args.responses, out))
            for i in range(args.clients)
        ]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = sorted(lat for r in results for lat in r["latencies"])
    wall = max(r["ended"] for r in results) - min(r["began"] for r in results)  # the request loops, not the imports
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "requests_answered": len(latencies),
                "requests_sent": args.clients * args.requests,
                "mismatches": sum(r["mismatches"] for r in results),
                "latency_ms": {
                    "p50": round(quantiles[49] * 1e3, 2),
                    "p95": round(quantiles[94] * 1e3, 2),
                    "p99": round(quantiles[98] * 1e3, 2),
                    "max": round(latencies[-1] * 1e3, 2),
                },
                "requests_per_s": round(len(latencies) / wall, 1),
                "responses_per_call": args.responses,
                "max_wait_ms": args.max_wait_ms,
            }
        )
    )


if __name__ == "__main__":
    main()
