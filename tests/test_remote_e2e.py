"""Rewards over HTTP in real fits, on 127.0.0.1: the quickstart learns over HTTP exactly as in-process; a server that
dies mid-fit stops the run with a clear error and leaves every checkpoint whole; ``on_failure: skip`` rides out a
failing server; the recipe that uses a served reward parses."""

import csv
from pathlib import Path

import pytest
import torch
import yaml
from fake_servers import FakeServer, server_process, status
from fake_servers import scores as answer_scores

from lightning_rlhf.cli import main
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.serve import create_app, run_in_thread

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.callbacks=[]"]


def remote_config(tmp_path: Path, name: str, **init_args) -> str:
    path = tmp_path / f"{name}.yaml"
    reward = {"class_path": "lightning_rlhf.rewards.RemoteReward", "init_args": init_args}
    path.write_text(yaml.safe_dump({"model": {"init_args": {"reward": reward}}}))
    return str(path)


def metrics(root: Path) -> list[dict]:
    return list(csv.DictReader(next(root.rglob("metrics.csv")).open()))


def test_the_quickstart_learns_over_http_exactly_as_in_process(tmp_path, monkeypatch):
    # The same seed and the same scores (float32 through JSON and back is exact): the same curve, bit for bit.
    monkeypatch.chdir(tmp_path)
    steps = ["--trainer.max_steps=12"]
    main(["fit", "--config", str(QUICKSTART), *steps, *QUIET, f"--trainer.default_root_dir={tmp_path / 'local'}"])
    with run_in_thread(create_app(CharFractionReward(min_len=8))) as url:
        served = remote_config(tmp_path, "served", url=url)
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                "--config",
                served,
                *steps,
                *QUIET,
                f"--trainer.default_root_dir={tmp_path / 'http'}",
            ]
        )
    local, http = metrics(tmp_path / "local"), metrics(tmp_path / "http")
    assert len(local) == len(http) == 12
    for name in ("rollout/score", "objective/kl", "loss/total", "policy/approx_kl"):
        assert [row[name] for row in http] == [row[name] for row in local], name
    assert float(local[-1]["rollout/score"]) > float(local[0]["rollout/score"])  # it learned, and over HTTP alike


def test_a_server_killed_mid_fit_stops_the_run_with_a_clear_error_and_no_checkpoint_is_lost(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpts = tmp_path / "ckpts"
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(ckpts), "every_n_train_steps": 1, "save_top_k": -1},
    }
    args = ["--trainer.max_steps=5", "--trainer.enable_progress_bar=false", "--model.generation.max_new_tokens=4"]
    with server_process("--reward=lightning_rlhf.rewards.CharFractionReward") as server:
        served = remote_config(tmp_path, "served", url=server.url, max_retries=2, backoff_s=0.05, deadline_s=5.0)
        callbacks = {
            "trainer": {
                "callbacks": [
                    checkpoint,
                    {"class_path": "fake_servers.KillAtStep", "init_args": {"pid": server.pid, "step": 3}},
                ]
            }
        }
        (tmp_path / "callbacks.yaml").write_text(yaml.safe_dump(callbacks))
        with pytest.raises(
            RuntimeError,
            match=rf"reward RemoteReward raised RemoteRewardError: RemoteReward: "
            rf"{server.url}/score failed 3 times \(max_retries=2\), the last: ConnectError",
        ):
            main(
                [
                    "fit",
                    "--config",
                    str(QUICKSTART),
                    "--config",
                    served,
                    "--config",
                    str(tmp_path / "callbacks.yaml"),
                    *args,
                ]
            )
    saved = sorted(p.name for p in ckpts.glob("*.ckpt"))
    assert saved == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    for path in ckpts.glob("*.ckpt"):  # each whole: it loads, with its weights and loop state
        state = torch.load(path, weights_only=True)
        assert state["state_dict"]
        assert state["global_step"] in (1, 2, 3)
    # A new server at a new port: the run resumes from its last checkpoint and finishes.
    with server_process("--reward=lightning_rlhf.rewards.CharFractionReward") as server:
        served = remote_config(tmp_path, "again", url=server.url)
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                "--config",
                served,
                *args,
                *QUIET[2:],
                f"--ckpt_path={ckpts / 'epoch=0-step=3.ckpt'}",
                f"--trainer.default_root_dir={tmp_path / 'resumed'}",
            ]
        )
    rows = metrics(tmp_path / "resumed")
    assert [int(row["step"]) for row in rows if row.get("rollout/score")] == [3, 4]


def test_on_failure_skip_rides_out_a_failing_server(tmp_path, monkeypatch):
    # The server answers the health check and the first two rollouts, fails the next two (503, not retried), then
    # recovers: those two iterations are skipped (rollout/skipped), the rest train, and the run finishes.
    monkeypatch.chdir(tmp_path)
    reward = CharFractionReward(min_len=4)

    def good(body):
        return answer_scores(reward(body["prompts"], body["responses"]).tolist())

    health = lambda body: answer_scores([])  # noqa: E731
    with FakeServer([health, good, good, status(503, "overloaded"), status(503), good]) as server:
        served = remote_config(tmp_path, "served", url=server.url, max_retries=0, on_failure="skip", batch_size=64)
        with pytest.warns(UserWarning, match=r"HTTP 503 \(overloaded\).* on_failure=skip: this rollout scores NaN"):
            main(
                [
                    "fit",
                    "--config",
                    str(QUICKSTART),
                    "--config",
                    served,
                    "--trainer.max_steps=6",
                    "--model.generation.max_new_tokens=4",
                    *QUIET,
                ]
            )
    rows = [row for row in metrics(tmp_path / "runs") if row.get("step")]
    assert [float(row["rollout/skipped"]) for row in rows] == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert len(server.posts) == 6  # one request per rollout, none retried
