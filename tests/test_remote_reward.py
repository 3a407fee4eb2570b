"""RemoteReward against scripted servers on 127.0.0.1: batching, fields, retries, deadlines, and every error the
trainer can see (each naming the URL and the fix). Bounded: every server answers or fails within a second."""

import json
import math
import pickle
import random
import time

import pytest
import torch
from fake_servers import Answer, FakeServer, closed_port, length_scores, scores, status

from lightning_rlhf.rewards import RemoteReward, RemoteRewardError

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.02, "timeout_s": 2.0}
"""Quick retries, so the fault tests take milliseconds."""


def remote(url, **kwargs):
    return RemoteReward(url, **{**FAST, **kwargs})


def test_batches_keep_their_order_and_carry_their_fields():
    # 10 responses in requests of 3, 4 in flight, answered in a scrambled order (random delays): the scores come back
    # in the order of the responses, and each request carries its own rows' fields (not the token tensors).
    rng = random.Random(0)

    def delayed(body):
        answer = length_scores(body)
        answer.delay_s = rng.uniform(0, 0.05)
        return answer

    responses = ["x" * n for n in range(10)]
    with FakeServer([delayed]) as server:
        reward = remote(server.url, batch_size=3, max_concurrency=4)
        out = reward(["p"] * 10, responses, answer=[str(n) for n in range(10)], response_ids=torch.zeros(10, 2))
        reward.teardown()
    assert out.tolist() == [float(n) for n in range(10)]
    assert out.dtype == torch.float32
    bodies = sorted((r["body"] for r in server.posts), key=lambda b: b["fields"]["answer"][0])
    assert [b["fields"] for b in bodies] == [
        {"answer": ["0", "1", "2"]},
        {"answer": ["3", "4", "5"]},
        {"answer": ["6", "7", "8"]},
        {"answer": ["9"]},
    ]
    assert all(r["path"] == "/score" for r in server.posts)


def test_a_5xx_is_retried_and_the_call_succeeds():
    with FakeServer([status(503, "warming up"), status(502), length_scores]) as server:
        out = remote(server.url)(["p", "p"], ["a", "bcd"])
    assert out.tolist() == [1.0, 3.0]
    assert len(server.posts) == 3


def test_a_429_waits_as_retry_after_says():
    with FakeServer([status(429, "slow down", **{"Retry-After": "0.3"}), length_scores]) as server:
        start = time.monotonic()
        out = remote(server.url)(["p"], ["ab"])
        waited = time.monotonic() - start
    assert out.tolist() == [2.0]
    assert waited >= 0.3  # the server's Retry-After, not the 0.01-0.02 s backoff


def test_a_4xx_is_not_retried_and_shows_the_servers_message():
    with (
        FakeServer([status(400, "field 'answer' missing"), length_scores]) as server,
        pytest.raises(
            RemoteRewardError,
            match=rf"{server.url}/score refused the request with HTTP 400: field "
            r"'answer' missing; fix the request \(not retried",
        ),
    ):
        remote(server.url)(["p"], ["a"])
    assert len(server.posts) == 1
    with (
        FakeServer([status(401, "bad token")]) as server,
        pytest.raises(RemoteRewardError, match=r"HTTP 401: bad token; set token_env to the variable holding"),
    ):
        remote(server.url)(["p"], ["a"])


def test_connection_refused_is_retried_then_an_error_naming_the_url():
    with closed_port() as url:
        reward = remote(url, max_retries=2)
        with pytest.raises(
            RemoteRewardError,
            match=rf"{url}/score failed 3 times \(max_retries=2\), the last: "
            r"ConnectError",
        ):
            reward(["p"], ["a"])
        with pytest.raises(RemoteRewardError, match=rf"the reward server at {url}/health does not answer .* start it"):
            reward.setup(torch.device("cpu"))


def test_slow_answers_time_out_and_are_retried_within_the_deadline():
    slow = lambda body: Answer(body=b'{"scores": [1.0]}', delay_s=0.6)  # noqa: E731
    with FakeServer([slow, length_scores]) as server:
        out = remote(server.url, timeout_s=0.2)(["p"], ["abc"])
    assert out.tolist() == [3.0]  # the first attempt timed out, the second answered
    with (
        FakeServer([slow]) as server,
        pytest.raises(
            RemoteRewardError,
            match=rf"no scores from {server.url}/score within deadline_s=0\.5 "
            r"\(\d+ attempts, the last: no answer within",
        ),
    ):
        remote(server.url, timeout_s=0.2, deadline_s=0.5, max_retries=100)(["p"], ["abc"])


def test_a_truncated_transfer_is_retried_but_a_malformed_body_is_an_error():
    truncated = lambda body: Answer(body=b'{"scores": [1.0, 2.0]}', truncate=True)  # noqa: E731
    with FakeServer([truncated, length_scores]) as server:
        assert remote(server.url)(["p", "p"], ["a", "bc"]).tolist() == [1.0, 2.0]
        assert len(server.posts) == 2
    malformed = lambda body: Answer(body=b'{"scores": [1.0,')  # noqa: E731
    with FakeServer([malformed, length_scores]) as server:
        with pytest.raises(
            RemoteRewardError, match=r"answered malformed JSON .* the body starts b'\{\"scores\": \[1\.0,'"
        ):
            remote(server.url)(["p", "p"], ["a", "bc"])
        assert len(server.posts) == 1


def test_a_server_that_hangs_up_is_retried():
    with FakeServer([lambda body: Answer(hang_up=True), length_scores]) as server:
        assert remote(server.url)(["p"], ["ab"]).tolist() == [2.0]


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (scores([1.0]), r"'scores' has 1 scores for 2 responses; return one per response"),
        (scores([1.0, None]), r"'scores'\[1\] is None, not a number"),
        (scores([1.0, "2"]), r"'scores'\[1\] is '2', not a number"),
        (scores([1.0, True]), r"'scores'\[1\] is True, not a number"),
        (scores([1.0, 2.0], key="rewards"), r"the response has no 'scores' \(it has \['rewards'\]\)"),
        (scores({"a": 1}), r"'scores' must be a list of numbers, got dict"),
    ],
)
def test_wrong_answers_are_errors_naming_what_is_wrong(answer, match):
    with FakeServer([lambda body: answer]) as server:
        with pytest.raises(RemoteRewardError, match=rf"{server.url}/score: {match}"):
            remote(server.url)(["p", "p"], ["a", "b"])
        assert len(server.posts) == 1  # not retried


def test_non_finite_scores_come_back_as_they_are():
    with FakeServer([lambda body: scores([float("nan"), float("inf"), 1.5])]) as server:
        out = remote(server.url)(["p"] * 3, ["a", "b", "c"])
    assert math.isnan(out[0])
    assert math.isinf(out[1])
    assert out[2] == 1.5


def test_on_failure_skip_returns_nan_with_a_warning_instead_of_raising():
    with closed_port() as url:
        reward = remote(url, max_retries=1, on_failure="skip")
        with pytest.warns(UserWarning, match=r"failed 2 times .* on_failure=skip: this rollout scores NaN"):
            out = reward(["p", "p"], ["a", "b"])
    assert out.shape == (2,)
    assert torch.isnan(out).all()


def test_the_token_comes_from_the_environment(monkeypatch):
    with FakeServer([length_scores]) as server:
        monkeypatch.setenv("REWARD_TOKEN", "s3cret")
        remote(server.url, token_env="REWARD_TOKEN")(["p"], ["a"])
        assert server.posts[0]["headers"]["Authorization"] == "Bearer s3cret"
        monkeypatch.delenv("REWARD_TOKEN")
        with pytest.raises(ValueError, match=r"token_env='REWARD_TOKEN': the environment variable is not set"):
            remote(server.url, token_env="REWARD_TOKEN")(["p"], ["a"])


def test_setup_checks_the_health_endpoint():
    with FakeServer([lambda body: Answer(body=b'{"status": "ok"}')]) as server:
        remote(server.url).setup(torch.device("cpu"))
        assert (server.requests[0]["method"], server.requests[0]["path"]) == ("GET", "/health")
    with (
        FakeServer([status(401, "missing token")]) as server,
        pytest.raises(RemoteRewardError, match=r"/health answered 401 \(missing token\); set token_env"),
    ):
        remote(server.url).setup(torch.device("cpu"))
    with (
        FakeServer([status(404, "Not Found")]) as server,
        pytest.raises(RemoteRewardError, match=r"answered 404 .* For an OpenRLHF server set protocol: openrlhf"),
    ):
        remote(server.url).setup(torch.device("cpu"))
    remote("http://127.0.0.1:1", check_on_setup=False).setup(torch.device("cpu"))  # no check, no error


def test_openrlhf_protocol():
    def openrlhf(body):
        if not body:  # the setup check's GET: a FastAPI POST route answers 405, which shows the server is up
            return Answer(status=405, body=b'{"detail": "Method Not Allowed"}')
        return scores([float(len(q)) for q in body["query"]], key="rewards")

    with FakeServer([openrlhf]) as server:
        url = f"{server.url}/get_reward"
        reward = remote(url, protocol="openrlhf")
        reward.setup(torch.device("cpu"))  # any HTTP answer at the URL will do: OpenRLHF has no health endpoint
        out = reward(["ab", "c"], ["d", "ef"], label=["1", "2"])
    assert out.tolist() == [3.0, 3.0]
    assert server.posts[0]["path"] == "/get_reward"
    assert server.posts[0]["body"] == {"query": ["abd", "cef"], "prompts": ["ab", "c"], "labels": ["1", "2"]}


def test_retries_do_not_touch_the_trainers_random_state():
    random.seed(5)
    torch.manual_seed(5)
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    with FakeServer([status(503), status(503), length_scores]) as server:
        remote(server.url)(["p"], ["a"])
    assert random.getstate() == python_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_it_pickles_for_spawned_processes_and_makes_its_own_client():
    with FakeServer([length_scores]) as server:
        reward = remote(server.url)
        reward(["p"], ["a"])
        copy = pickle.loads(pickle.dumps(reward))
        assert copy.client() is not reward.client()
        assert copy(["p"], ["abc"]).tolist() == [3.0]
        reward.teardown()
        copy.teardown()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "127.0.0.1:8000"}, r"url='127\.0\.0\.1:8000' must start with http:// or https://"),
        ({"protocol": "trl"}, r"protocol='trl' must be 'lightning_rlhf' or 'openrlhf'"),
        ({"batch_size": 0}, r"batch_size=0 must be >= 1"),
        ({"deadline_s": 0}, r"deadline_s=0 must be > 0 seconds"),
        ({"on_failure": "zero"}, r"on_failure='zero' must be 'raise' or 'skip'"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RemoteReward(**{"url": "http://127.0.0.1:8000", **kwargs})


def test_requests_are_json_with_the_package_protocol():
    with FakeServer([length_scores]) as server:
        remote(server.url)(["p1", "p2"], ["a", "bb"])
    assert server.posts[0]["body"] == {"prompts": ["p1", "p2"], "responses": ["a", "bb"]}
    assert server.posts[0]["headers"]["Content-Type"] == "application/json"
    json.dumps(server.posts[0]["body"])  # plain JSON


def test_one_request_failing_for_good_stops_the_others_retries():
    # 2 requests: the one with "bad" in it gets a 400 at once; the other keeps getting 503s and would retry until the
    # deadline (30 s), but stops at its next attempt: the call fails fast, with the 400's message.
    def answer(body):
        if "bad" in body["responses"]:
            return status(400, "bad row")(body)
        return Answer(status=503, body=b'{"detail": "busy"}', delay_s=0.05)

    with FakeServer([answer]) as server:
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=r"HTTP 400: bad row"):
            remote(server.url, batch_size=1, max_retries=1000, deadline_s=30.0)(["p", "p"], ["ok", "bad"])
        assert time.monotonic() - start < 5.0
