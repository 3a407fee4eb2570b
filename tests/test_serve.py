"""The reward server (lightning_rlhf.serve) over real HTTP on 127.0.0.1: scores as in-process, status codes, auth,
limits, micro-batching, the reward's setup/teardown, the command's parser. Each server lives for one test."""

import contextlib
import json
import logging
import math
import re
import subprocess
import sys
import threading
import time
from collections import deque

import httpx2
import pytest
import torch
import yaml
from helpers import save_tiny_reward_model
from torch.testing import assert_close

from lightning_rlhf.rewards import (
    CharFractionReward,
    CombinedReward,
    LengthReward,
    Reward,
    RewardComponent,
    RewardModelScorer,
    call_reward,
)
from lightning_rlhf.serve import build_app, command, create_app, main, next_call, percentile, run_in_thread
from lightning_rlhf.serve.microbatch import ScoreRequest

TOKEN = "s3cret-token"
PROMPTS = ["Q1: ", "Q2: ", "Q3: "]
RESPONSES = ["ab c", "AB!", "a!"]


class Numbers(Reward):
    """Scores a response "17" with 17.0; records every call and checks that no two calls overlap."""

    def __init__(self, delay_s=0.0):
        self.delay_s = delay_s
        self.calls, self.setups, self.teardowns, self.threads = [], [], 0, set()
        self.busy = threading.Lock()

    def setup(self, device):
        self.setups.append(device)
        self.threads.add(threading.current_thread().name)

    def teardown(self):
        self.teardowns += 1

    def __call__(self, prompts, responses, **kwargs):
        assert self.busy.acquire(blocking=False), "two reward calls at once"
        self.threads.add(threading.current_thread().name)
        self.calls.append((list(responses), {k: v for k, v in kwargs.items() if v is not None}))
        time.sleep(self.delay_s)
        self.busy.release()
        if "boom" in responses:
            raise KeyError("boom")
        return torch.tensor([float(r) for r in responses])


@contextlib.contextmanager
def served(reward, **options):
    """An httpx2 client of ``create_app(reward, **options)`` served on 127.0.0.1 for the block."""
    with (
        run_in_thread(create_app(reward, device="cpu", **options)) as url,
        httpx2.Client(base_url=url, timeout=30) as client,
    ):
        yield client


def body(prompts, responses, **fields):
    return {"prompts": prompts, "responses": responses, **({"fields": fields} if fields else {})}


def test_health_names_the_reward_and_its_limits():
    with served(CharFractionReward(), max_batch_size=8) as client:
        reply = client.get("/health")
        assert reply.status_code == 200
        health = reply.json()
    assert health["status"] == "ok"
    assert health["reward"] == "CharFractionReward"
    assert (health["requests"], health["reward_calls"], health["latency_ms"]) == (0, 0, None)
    assert (health["max_batch_size"], health["device"]) == (8, "cpu")


def test_a_rule_reward_gives_the_in_process_scores():
    reward = CharFractionReward(min_len=4)
    with served(reward) as client:
        reply = client.post("/score", json=body(PROMPTS, RESPONSES))
        health = client.get("/health").json()
    assert reply.status_code == 200
    # "ab c": 4 of 4 rewarded characters; "AB!": 0 of max(3, 4); "a!": 1 of max(2, 4).
    assert reply.json() == {"scores": [1.0, 0.0, 0.25]}
    assert reply.json()["scores"] == call_reward(reward, PROMPTS, RESPONSES).tolist()
    assert (health["requests"], health["responses"], health["reward_calls"], health["errors"]) == (1, 3, 1, 0)
    assert health["latency_ms"]["p50"] > 0


def test_fields_reach_a_function_reward_and_a_missing_one_is_named():
    from custom_rewards import exact_answer

    with served(exact_answer) as client:
        scored = client.post("/score", json=body(["1+1=", "2+2="], [" 2", "5"], answer=["2", "4"]))
        missing = client.post("/score", json=body(["1+1="], ["2"], level=[1]))
    assert scored.json() == {"scores": [1.0, 0.0]}
    assert missing.status_code == 400
    assert "needs the prompt field 'answer'" in missing.json()["detail"]


def test_a_field_a_combined_rewards_component_needs_is_checked_before_scoring():
    from custom_rewards import exact_answer

    reward = CombinedReward(
        [RewardComponent("correct", exact_answer, 1.0), RewardComponent("length", LengthReward(target_len=2), 0.5)]
    )
    with served(reward) as client:
        missing = client.post("/score", json=body(["1+1="], ["2"]))
        scored = client.post("/score", json=body(["1+1=", "2+2="], ["2", "50"], answer=["2", "4"]))
    assert missing.status_code == 400
    assert "exact_answer needs the prompt field 'answer'" in missing.json()["detail"]
    # "2": correct 1, length 1 - |1 - 2| / 2 = 0.5 -> 1 + 0.5 * 0.5; "50": correct 0, length 1 -> 0.5 * 1.
    assert scored.json() == {"scores": [1.25, 0.5]}


def test_openrlhf_queries_are_split_after_their_prompts_and_labels_become_label():
    def labelled(prompts, responses, *, label):
        return torch.tensor([float(r == a) + len(p) / 4 for p, r, a in zip(prompts, responses, label, strict=True)])

    query = {"query": ["Q: 2+2? 4", "no prompt 4"], "prompts": ["Q: 2+2? ", "other"], "labels": ["4", "4"]}
    with served(labelled) as client:
        reply = client.post("/get_reward", json=query)
    # Row 0 splits into ("Q: 2+2? ", "4"): 1 + 8 / 4. Row 1 does not start with its prompt: ("", "no prompt 4"): 0.
    assert reply.json() == {"rewards": [3.0, 0.0], "scores": [3.0, 0.0]}


def test_a_request_without_the_right_token_is_refused_and_scores_nothing():
    reward = Numbers()
    with served(reward, token=TOKEN) as client:
        refused = [
            client.post("/score", json=body(["p"], ["1"]), headers=headers)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"})
        ]
        health_without = client.get("/health")
        right = {"Authorization": f"Bearer {TOKEN}"}
        accepted = client.post("/score", json=body(["p"], ["1"]), headers=right)
        health_with = client.get("/health", headers=right)
    assert [r.status_code for r in refused] == [401, 401, 401]
    assert "no bearer token" in refused[0].json()["detail"]
    assert "wrong bearer token" in refused[1].json()["detail"]
    assert refused[0].headers["www-authenticate"] == "Bearer"
    assert health_without.status_code == 401
    assert (accepted.status_code, accepted.json()) == (200, {"scores": [1.0]})
    assert health_with.status_code == 200
    assert len(reward.calls) == 1  # only the accepted request reached the reward


def test_too_many_responses_or_too_big_a_body_is_413_and_scores_nothing():
    reward = Numbers()
    with served(reward, max_batch_size=2, max_request_bytes=300) as client:
        too_many = client.post("/score", json=body(["p"] * 3, ["1"] * 3))
        declared = client.post("/score", json=body(["p"], ["1" * 400]))
        chunked = client.post("/score", content=iter([b'{"prompts": ["p"], "responses": ["', b"1" * 400, b'"]}']))
        fits = client.post("/score", json=body(["p"] * 2, ["1", "2"]))
    assert too_many.status_code == 413
    assert "3 responses in one request, over the server's max_batch_size=2" in too_many.json()["detail"]
    assert declared.status_code == 413
    assert "over the server's max_request_bytes=300" in declared.json()["detail"]
    assert chunked.status_code == 413  # no Content-Length: counted as the bytes arrive
    assert fits.json() == {"scores": [1.0, 2.0]}
    assert len(reward.calls) == 1


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"prompts": [', "not valid JSON"),
        (b'["p", "r"]', "the body must be a JSON object, got list"),
        (b'{"prompts": ["p"], "responses": ["a", "b"]}', "got 1 prompts but 2 responses"),
        (b'{"prompts": ["p"], "responses": ["a"], "fields": {"answer": []}}', "field 'answer' must be a list with one"),
        (b'{"prompts": ["p"], "responses": ["a"], "fields": {"prompt_ids": [1]}}', r"fields \['prompt_ids'\] cannot"),
        (
            b'{"prompts": ["p"], "responses": ["a"], "fields": {"allow_non_finite": [1]}}',
            r"fields \['allow_non_finite'\] cannot",
        ),
    ],
)
def test_a_malformed_request_is_400_with_the_reason(content, match):
    reward = Numbers()
    with served(reward) as client:
        reply = client.post("/score", content=content)
    assert reply.status_code == 400
    assert not reward.calls
    assert re.search(match, reply.json()["detail"]), reply.json()


def test_a_reward_that_raises_or_returns_bad_scores_is_500_with_its_message():
    def two_scores(prompts, responses):
        return torch.zeros(2)

    with served(Numbers()) as client:
        raised = client.post("/score", json=body(["p"], ["boom"]))
    with served(two_scores) as client:
        wrong_shape = client.post("/score", json=body(["p"] * 3, ["a"] * 3))
    assert raised.status_code == 500
    assert raised.json()["detail"] == "reward Numbers raised KeyError: 'boom'"
    assert wrong_shape.status_code == 500
    assert "returned scores of shape (2,); expected (3,)" in wrong_shape.json()["detail"]


def test_non_finite_scores_travel_as_json_nan_and_infinity():
    def non_finite(prompts, responses):
        return torch.tensor([math.nan, math.inf, -math.inf, 0.5])

    with served(non_finite) as client:
        reply = client.post("/score", json=body(["p"] * 4, ["r"] * 4))
    assert reply.text == '{"scores":[NaN,Infinity,-Infinity,0.5]}'
    scores = json.loads(reply.text)["scores"]
    assert math.isnan(scores[0])
    assert scores[1:] == [math.inf, -math.inf, 0.5]


def post_concurrently(url, bodies):
    """POST each body to ``url`` from a thread of its own, all released at once; the replies in order."""
    replies, barrier = [None] * len(bodies), threading.Barrier(len(bodies))

    def post(i):
        with httpx2.Client(timeout=30) as client:
            barrier.wait()
            replies[i] = client.post(url, json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return replies


def test_concurrent_requests_share_reward_calls_and_each_gets_its_own_scores():
    reward, n = Numbers(), 8
    bodies = [body(["p", "p"], [str(10 * i), str(10 * i + 1)]) for i in range(n)]
    # A call starts once the waiting requests fill max_batch_size (16 = 8 x 2) or 2 s after the first arrived.
    with run_in_thread(create_app(reward, device="cpu", max_batch_size=2 * n, max_wait_ms=2000)) as url:
        replies = post_concurrently(f"{url}/score", bodies)
    assert [r.json() for r in replies] == [{"scores": [10.0 * i, 10.0 * i + 1]} for i in range(n)]
    assert len(reward.calls) < n
    assert sorted(s for responses, _ in reward.calls for s in responses) == sorted(
        r for b in bodies for r in b["responses"]
    )


def test_requests_with_different_fields_never_share_a_call():
    reward = Numbers()
    bodies = [body(["p"], [str(i)], **({"level": [i]} if i % 2 else {})) for i in range(6)]
    with run_in_thread(create_app(reward, device="cpu", max_wait_ms=2000, max_batch_size=3)) as url:
        replies = post_concurrently(f"{url}/score", bodies)
    assert [r.json() for r in replies] == [{"scores": [float(i)]} for i in range(6)]
    for responses, fields in reward.calls:  # odd responses carry level = their own number, even ones none
        assert all(int(r) % 2 for r in responses) if fields else not any(int(r) % 2 for r in responses)
        assert fields.get("level", [int(r) for r in responses]) == [int(r) for r in responses]


def test_an_error_in_a_merged_call_reaches_only_the_request_that_caused_it():
    reward = Numbers()
    bodies = [body(["p"], ["boom" if i == 2 else str(i)]) for i in range(4)]
    with run_in_thread(create_app(reward, device="cpu", max_wait_ms=2000, max_batch_size=4)) as url:
        replies = post_concurrently(f"{url}/score", bodies)
    assert [r.status_code for r in replies] == [200, 200, 500, 200]
    assert [replies[i].json()["scores"] for i in (0, 1, 3)] == [[0.0], [1.0], [3.0]]
    assert "raised KeyError" in replies[2].json()["detail"]


def test_without_micro_batching_every_request_is_its_own_call_one_at_a_time():
    reward = Numbers(delay_s=0.02)
    with run_in_thread(create_app(reward, device="cpu", micro_batch=False)) as url:
        replies = post_concurrently(f"{url}/score", [body(["p"], [str(i)]) for i in range(4)])
    assert [r.json() for r in replies] == [{"scores": [float(i)]} for i in range(4)]
    assert len(reward.calls) == 4  # Numbers asserts that no two overlapped


def test_setup_and_teardown_run_once_around_the_app_in_the_reward_thread():
    reward = Numbers()
    with served(reward) as client:
        client.post("/score", json=body(["p"], ["1"]))
        assert (reward.setups, reward.teardowns) == ([torch.device("cpu")], 0)
    assert (reward.setups, reward.teardowns) == ([torch.device("cpu")], 1)
    assert len(reward.threads) == 1  # setup and the calls ran in the same worker thread


def test_a_reward_whose_setup_fails_stops_the_server_with_that_error():
    class Broken(Reward):
        def setup(self, device):
            raise OSError("no weights here")

    with pytest.raises(RuntimeError, match="stopped during startup") as caught, run_in_thread(create_app(Broken())):
        pass
    assert str(caught.value.__cause__) == "no weights here"


def test_the_request_log_line_counts_and_times_requests(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_rlhf.serve"), served(Numbers(), log_every_s=0) as client:
        client.post("/score", json=body(["p", "p"], ["1", "2"]))
        client.post("/score", json=body(["p"], ["x", "y"]))  # 400: counted as an error
    lines = [r.getMessage() for r in caplog.records if "requests (" in r.getMessage()]
    assert lines[0].startswith("1 requests (2 responses, 1 reward calls, 0 errors) in ")
    assert lines[1].startswith("1 requests (0 responses, 0 reward calls, 1 errors) in ")
    assert "latency p50 " in lines[0]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_batch_size": 0}, r"max_batch_size=0: must be >= 1 \(--max_batch_size\)"),
        ({"max_request_bytes": 0}, r"max_request_bytes=0: must be >= 1"),
        ({"max_wait_ms": -1.0}, r"max_wait_ms=-1.0: must be >= 0"),
        ({"token": ""}, "token is empty"),
        ({"device": "gpu7"}, r"device='gpu7' is not a device"),
    ],
)
def test_create_app_names_a_bad_option(options, match):
    with pytest.raises(ValueError, match=match):
        create_app(CharFractionReward(), **options)


def test_percentile_is_the_nearest_rank():
    # 50% of 4 values: rank ceil(2) = 2 -> 20; 95%: rank ceil(3.8) = 4 -> 40; one value is every percentile.
    assert percentile([40.0, 10.0, 30.0, 20.0], 50) == 20.0
    assert percentile([40.0, 10.0, 30.0, 20.0], 95) == 40.0
    assert percentile([5.0], 50) == 5.0


def test_next_call_takes_the_oldest_and_what_fits_of_its_kind():
    def waiting(size, *names):
        return ScoreRequest(["p"] * size, ["r"] * size, {n: [0] * size for n in names}, None, 0.0)

    pending = deque([waiting(3, "a"), waiting(2, "b"), waiting(4, "a"), waiting(2, "a")])
    call = next_call(pending, max_batch_size=6)  # 3 + 4 > 6 leaves the 4; 3 + 2 = 5 fits
    assert [(len(r.responses), sorted(r.fields)) for r in call] == [(3, ["a"]), (2, ["a"])]
    assert [(len(r.responses), sorted(r.fields)) for r in pending] == [(2, ["b"]), (4, ["a"])]


def test_the_command_serves_a_yaml_config_with_a_token_from_the_environment(tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    reward = {"class_path": "lightning_rlhf.rewards.CharFractionReward", "init_args": {"min_len": 4}}
    config.write_text(yaml.safe_dump({"reward": reward, "max_batch_size": 8, "port": 8123, "token_env": "RM_TOKEN"}))
    monkeypatch.setenv("RM_TOKEN", TOKEN)
    started = {}
    monkeypatch.setattr(command.uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    main(["--config", str(config), "--log_level", "warning"])
    assert (started["host"], started["port"], started["log_level"]) == ("127.0.0.1", 8123, "warning")
    with run_in_thread(started["app"]) as url, httpx2.Client(base_url=url) as client:
        refused = client.get("/health")
        health = client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        reply = client.post("/score", json=body(PROMPTS, RESPONSES), headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 401
    assert (health["reward"], health["max_batch_size"]) == ("CharFractionReward", 8)
    assert reply.json() == {"scores": [1.0, 0.0, 0.25]}  # min_len=4 reached the reward


def test_the_command_takes_a_function_by_import_path_and_refuses_an_unset_token_env(monkeypatch, capsys):
    app, config = build_app(["--reward", "custom_rewards.exact_answer", "--max_wait_ms", "0"])
    assert (config.host, config.port, config.max_wait_ms) == ("127.0.0.1", 8000, 0.0)
    with run_in_thread(app) as url:
        reply = httpx2.post(f"{url}/score", json=body(["q"], ["4"], answer=["4"]))
    assert reply.json() == {"scores": [1.0]}
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        build_app(["--reward", "custom_rewards.exact_answer", "--token_env", "NO_SUCH_TOKEN"])
    assert "the environment variable NO_SUCH_TOKEN is not set" in capsys.readouterr().err


def test_without_fastapi_the_server_names_the_extra_to_install():
    code = "import sys; sys.modules['fastapi'] = None; import lightning_rlhf.serve"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pip install 'lightning-rlhf[serve]'" in result.stderr.splitlines()[-1]


def test_a_tiny_reward_model_gives_the_in_process_scores(tmp_path, byt5):
    path = save_tiny_reward_model(tmp_path / "rm", byt5, pad_token_id=byt5.pad_token_id)
    local = RewardModelScorer(path, batch_size=4)
    local.setup(torch.device("cpu"))
    prompts = ["The movie was", "Say something: ", "Hi", "Once upon a time"]
    responses = [" great fun", "a b c d e f g h", "", " there was a tiny model"]
    expected = call_reward(local, prompts, responses)
    bodies = [body([p], [r]) for p, r in zip(prompts, responses, strict=True)]
    app = create_app(RewardModelScorer(path, batch_size=4), device="cpu", max_wait_ms=2000, max_batch_size=4)
    with run_in_thread(app) as url:
        merged = post_concurrently(f"{url}/score", bodies)
        alone = httpx2.post(f"{url}/score", json=body(prompts, responses))
    assert_close(torch.tensor([r.json()["scores"][0] for r in merged]), expected)
    assert_close(torch.tensor(alone.json()["scores"]), expected)
