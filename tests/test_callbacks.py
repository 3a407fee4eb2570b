"""Callbacks: each alarm fires on a synthetic rollout built to trigger it and stays quiet on a healthy one; the sample
table holds the decoded text; RL-phase hooks and alarms work inside a real tiny fit."""

import csv
import dataclasses
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_POLICY as TINY
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_rlhf.callbacks import (
    DiagnosticWarning,
    EntropyCollapseAlarm,
    EOSRateAlarm,
    ExplainedVarianceAlarm,
    ModeCollapseAlarm,
    RatioBlowUpAlarm,
    ResponseLengthDriftAlarm,
    RLCallback,
    SampleTableCallback,
    distinct_n,
)
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig
from lightning_rlhf.types import Rollout, RolloutSamples

B, T = 8, 8


# ------------------------------------------------------------------------------------------------ synthetic rollouts
@dataclasses.dataclass
class Iteration:
    """One synthetic PPO iteration: what the hooks see. Defaults are healthy."""

    lengths: tuple[int, ...] = (3,) * B
    ended: tuple[bool, ...] = (True,) * B
    same_tokens: bool = False
    critic: str = "good"  # good: values = returns - 0.5 (explained variance 1); bad: values = -returns (-3)
    entropy: float = 3.0
    ratio: float = 1.02

    def rollout(self) -> Rollout:
        mask = torch.arange(T)[None, :] < torch.tensor(self.lengths)[:, None]
        # Healthy: every token of the rollout differs (unique responses, distinct-2 = 1); collapsed: one token.
        ids = torch.full((B, T), 5) if self.same_tokens else torch.arange(B * T).view(B, T) + 3
        returns = torch.arange(B * T, dtype=torch.float32).view(B, T) / 10
        values = returns - 0.5 if self.critic == "good" else -returns
        zeros = torch.zeros(B, T)
        return Rollout(
            prompt_ids=torch.ones(B, 2, dtype=torch.long),
            prompt_mask=torch.ones(B, 2, dtype=torch.bool),
            response_ids=torch.where(mask, ids, 0),
            response_mask=mask,
            old_logprobs=zeros,
            ref_logprobs=zeros,
            old_values=torch.where(mask, values, 0.0),
            ended=torch.tensor(self.ended),
            scores=torch.zeros(B),
            kl=torch.where(mask, 0.1, 0.0),
            returns=torch.where(mask, returns, 0.0),
        )

    def stats(self) -> dict[str, float]:
        return {"policy/entropy": self.entropy, "policy/ratio_mean": self.ratio, "policy/approx_kl": 0.01}


class StubModule:
    """Stands in for the LightningModule: records what callbacks log."""

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def run_iteration(callback, trainer, iteration: Iteration, module=None, minibatches: int = 2) -> None:
    """Calls the hooks in the order PPOModule does, with the module's keyword arguments."""
    module = module or StubModule()
    rollout = iteration.rollout()
    samples = RolloutSamples([f"prompt {i}" for i in range(B)], [f"response {i}" for i in range(B)], torch.zeros(B))
    callback.on_rollout_end(trainer, module, rollout=rollout, samples=samples)
    for index in range(minibatches):
        callback.on_ppo_minibatch_end(trainer, module, epoch=0, index=index, stats=iteration.stats())
    callback.on_ppo_epoch_end(trainer, module, epoch=0)
    callback.on_train_batch_end(trainer, module, None, {}, 0)


def diagnostic_warnings(callback, trainer, iterations) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for iteration in iterations:
            run_iteration(callback, trainer, iteration)
    return [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]


@pytest.fixture
def trainer():
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


HEALTHY = Iteration()
ALARMS = {
    "entropy": EntropyCollapseAlarm,
    "length": ResponseLengthDriftAlarm,
    "eos": EOSRateAlarm,
    "explained_var": lambda **kw: ExplainedVarianceAlarm(warmup_steps=0, **kw),
    "ratio": RatioBlowUpAlarm,
    "mode_collapse": ModeCollapseAlarm,
}
TRIGGERS = [
    # (alarm, the bad iteration, what the warning must suggest)
    ("entropy", Iteration(entropy=0.6), "ent_coef"),  # 0.6 < 0.25 x 3.0 (the first iteration's)
    ("entropy", Iteration(entropy=0.01), "kl_coef"),  # below min_entropy 0.05
    ("length", Iteration(lengths=(7,) * B), "length penalty"),  # 7 / 3 = 2.33x the first rollout's > 2
    ("length", Iteration(lengths=(1,) * B), "minimum length"),  # 1 / 3 = 0.33x < 0.5
    ("eos", Iteration(ended=(False,) * B), "missing_eos_penalty"),  # 0% < 10%
    ("explained_var", Iteration(critic="bad"), "vf_coef"),  # 1 - Var(2R) / Var(R) = -3
    ("ratio", Iteration(ratio=3.0), "early_stop_kl"),
    ("ratio", Iteration(ratio=0.2), "ratio_threshold"),
    ("ratio", Iteration(ratio=math.nan), "learning rate"),
    ("mode_collapse", Iteration(same_tokens=True), "unique 12.5%"),  # 1 distinct response of 8
]


@pytest.mark.parametrize(("alarm", "bad", "advice"), TRIGGERS, ids=[f"{t[0]}-{i}" for i, t in enumerate(TRIGGERS)])
def test_alarm_fires_once_on_a_rollout_built_to_trigger_it(trainer, alarm, bad, advice):
    callback = ALARMS[alarm]()
    # The first (healthy) iteration is the reference of the relative alarms; then `patience` bad ones in a row.
    fired = diagnostic_warnings(callback, trainer, [HEALTHY] + [bad] * (callback.patience + 3))
    assert len(fired) == 1, fired
    assert type(callback).__name__ in fired[0]
    assert advice in fired[0]
    assert not trainer.should_stop


@pytest.mark.parametrize("alarm", sorted(ALARMS))
def test_alarm_stays_quiet_on_a_healthy_run(trainer, alarm):
    callback = ALARMS[alarm]()
    assert diagnostic_warnings(callback, trainer, [HEALTHY] * 8) == []
    assert not trainer.should_stop


def test_alarm_waits_for_patience_consecutive_bad_iterations(trainer):
    alarm = EOSRateAlarm(patience=3)
    truncated = Iteration(ended=(False,) * B)
    assert diagnostic_warnings(alarm, trainer, [truncated, truncated, HEALTHY, truncated, truncated]) == []
    assert len(diagnostic_warnings(alarm, trainer, [truncated])) == 1


def test_alarm_with_stop_sets_should_stop(trainer):
    alarm = RatioBlowUpAlarm(stop=True)
    fired = diagnostic_warnings(alarm, trainer, [Iteration(ratio=50.0)])
    assert trainer.should_stop
    assert "Stopping training" in fired[0]


def test_explained_variance_alarm_waits_for_the_warmup(trainer):
    # global_step is 0 < warmup_steps: a fresh critic is allowed to be useless.
    assert (
        diagnostic_warnings(ExplainedVarianceAlarm(warmup_steps=10, patience=1), trainer, [Iteration(critic="bad")])
        == []
    )


def test_relative_alarms_compare_with_the_first_iteration(trainer):
    # Starting at entropy 0.6 is not a collapse; the same value after starting at 3.0 is (0.6 < 0.25 * 3.0).
    low = Iteration(entropy=0.6)
    assert diagnostic_warnings(EntropyCollapseAlarm(), trainer, [low] * 5) == []
    assert len(diagnostic_warnings(EntropyCollapseAlarm(), trainer, [HEALTHY] + [low] * 3)) == 1


def test_distinct_n_hand_worked():
    # Bigrams (1,2) (2,3) (1,2) (2,4): 3 distinct of 4. Unigrams 1 2 3 1 2 4: 4 distinct of 6. No 4-gram: NaN.
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
    assert math.isnan(distinct_n([[1, 2, 3], [1, 2, 4]], 4))


def test_diagnostics_are_logged(trainer):
    rollout = Iteration(lengths=(3, 3, 3, 3, 3, 3, 3, 3)).rollout()
    # Rows 0 and 1 share their tokens: 7 distinct responses of 8; bigrams: 16 in all, rows 0 and 1 share 2 -> 14/16.
    ids = rollout.response_ids.clone()
    ids[1] = ids[0]
    module = StubModule()
    samples = RolloutSamples([""] * B, [""] * B, torch.zeros(B))
    for callback in (ModeCollapseAlarm(), ResponseLengthDriftAlarm()):
        callback.on_rollout_end(
            trainer, module, rollout=dataclasses.replace(rollout, response_ids=ids), samples=samples
        )
    assert module.logged["diagnostics/unique_frac"] == 7 / 8
    assert module.logged["diagnostics/distinct_2"] == 14 / 16
    assert module.logged["diagnostics/response_len_drift"] == 1.0


def test_alarm_reference_survives_a_checkpoint(trainer):
    alarm = EntropyCollapseAlarm()
    diagnostic_warnings(alarm, trainer, [HEALTHY])
    resumed = EntropyCollapseAlarm()
    resumed.load_state_dict(alarm.state_dict())
    # The resumed run still compares with the original first iteration (3.0), so 0.6 is a collapse.
    assert len(diagnostic_warnings(resumed, trainer, [Iteration(entropy=0.6)] * 3)) == 1
    assert EntropyCollapseAlarm(min_fraction=0.1).state_key != alarm.state_key


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="patience"):
        EOSRateAlarm(patience=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleTableCallback(every_n_steps=0)


# ---------------------------------------------------------------------------------------------------- sample table
class FakeTensorBoard(Logger):
    """A logger whose experiment has SummaryWriter's add_text, as TensorBoardLogger's (no tensorboard needed)."""

    name, version = "tensorboard", 0

    def __init__(self):
        super().__init__()
        self.texts = []

    @property
    def experiment(self):
        return SimpleNamespace(add_text=lambda tag, text, global_step: self.texts.append((tag, text, global_step)))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TableLogger(Logger):
    """A logger with WandbLogger's log_table signature."""

    name, version = "table", 0

    def __init__(self):
        super().__init__()
        self.tables = []

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


def test_sample_table_goes_to_every_logger_and_the_console(tmp_path, capsys):
    csv_logger, tensorboard, table = CSVLogger(tmp_path / "csv"), FakeTensorBoard(), TableLogger()
    trainer = Trainer(accelerator="cpu", logger=[csv_logger, tensorboard, table], enable_progress_bar=False)
    rollout = Iteration(lengths=(1, 2, 3, 4, 5, 6, 7, 8)).rollout()
    responses = [f"answer {i}" for i in range(B)]
    responses[0] = 'a | pipe, a "quote",\na newline and [bold]markup[/bold]'
    samples = RolloutSamples([f"prompt {i}" for i in range(B)], responses, torch.arange(B) / 10)
    SampleTableCallback(max_rows=3).on_rollout_end(trainer, StubModule(), rollout=rollout, samples=samples)

    rows = list(csv.DictReader((tmp_path / "csv" / "lightning_logs" / "version_0" / "samples.csv").open()))
    assert [r["response"] for r in rows] == responses[:3]  # exact text, newline included
    assert [r["prompt"] for r in rows] == ["prompt 0", "prompt 1", "prompt 2"]
    # KL 0.1 on each real token: lengths 1, 2, 3 give 0.1, 0.2, 0.3; scores 0, 0.1, 0.2.
    assert [int(r["length"]) for r in rows] == [1, 2, 3]
    torch.testing.assert_close([float(r["kl"]) for r in rows], [0.1, 0.2, 0.3])
    torch.testing.assert_close([float(r["score"]) for r in rows], [0.0, 0.1, 0.2])
    assert {r["step"] for r in rows} == {"0"}

    ((tag, markdown, step),) = tensorboard.texts
    assert (tag, step) == ("samples", 0)
    assert "a \\| pipe" in markdown  # escaped so the Markdown table keeps its columns
    assert "| prompt 1 | answer 1 |" in markdown

    ((key, columns, data, step),) = table.tables
    assert (key, step) == ("samples", 0)
    assert columns == ["step", "prompt", "response", "score", "kl", "length"]
    assert data[0][2] == responses[0]

    out = capsys.readouterr().out
    assert "samples at step 0" in out
    assert "[bold]markup[/bold]" in out  # printed as text, not interpreted as rich markup
    assert "answer 2" in out


# ------------------------------------------------------------------------------------------------- inside real fits
PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: ", "Tell me ", "Once upon a time", "Yes", "No way "]


class Recorder(RLCallback):
    """Records the decoded responses and per-response KL and length of every rollout."""

    def __init__(self):
        self.rollouts = {}
        self.hooks = []

    def on_rollout_end(self, trainer, pl_module, rollout, samples):
        self.hooks.append("rollout")
        kl = (rollout.kl * rollout.response_mask).sum(-1).tolist()
        self.rollouts[trainer.global_step] = (samples, kl, rollout.response_mask.sum(-1).tolist())

    def on_ppo_minibatch_end(self, trainer, pl_module, epoch, index, stats):
        self.hooks.append(("minibatch", epoch, index))

    def on_ppo_epoch_end(self, trainer, pl_module, epoch):
        self.hooks.append(("epoch", epoch))


def tiny_fit(tmp_path, callbacks, steps: int) -> Trainer:
    seed_everything(0, verbose=False)
    module = PPOModule(
        policy=TINY,
        lora=LoraConfig(r=4, alpha=8),
        generation=GenerationConfig(max_new_tokens=6),
        ppo=PPOConfig(ppo_epochs=2, num_minibatches=2),
        reward=CharFractionReward(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))
    return trainer


def test_sample_table_holds_the_decoded_text_of_a_real_fit(tmp_path, capsys):
    recorder = Recorder()
    healthy_alarms = [EntropyCollapseAlarm(), ResponseLengthDriftAlarm(), RatioBlowUpAlarm(), ModeCollapseAlarm()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_fit(tmp_path, [recorder, SampleTableCallback(every_n_steps=2, max_rows=3), *healthy_alarms], 3)
    assert not [w for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert recorder.hooks[:4] == ["rollout", ("minibatch", 0, 0), ("minibatch", 0, 1), ("epoch", 0)]

    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "samples.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 0, 0, 2, 2, 2]  # every 2nd iteration of 3
    for step in (0, 2):
        samples, kl, lengths = recorder.rollouts[step]
        table = [r for r in rows if int(r["step"]) == step]
        assert [r["response"] for r in table] == samples.responses[:3]
        assert [r["prompt"] for r in table] == samples.prompts[:3]
        assert [int(r["length"]) for r in table] == lengths[:3]
        torch.testing.assert_close([float(r["kl"]) for r in table], kl[:3])
    assert "samples at step 2" in capsys.readouterr().out

    metrics = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    assert len(metrics) == 3
    assert all(0 < float(m["diagnostics/unique_frac"]) <= 1 for m in metrics)
    assert all(float(m["diagnostics/response_len_drift"]) > 0 for m in metrics)
    assert trainer.global_step == 3


def test_alarm_with_stop_ends_a_real_fit(tmp_path):
    alarm = EntropyCollapseAlarm(min_entropy=1e9, patience=1, stop=True)  # any entropy is "collapsed"
    with pytest.warns(DiagnosticWarning, match="EntropyCollapseAlarm"):
        trainer = tiny_fit(tmp_path, [alarm], steps=3)
    assert trainer.global_step == 1


def test_state_key_holds_only_plain_settings():
    # Lightning attaches `log` (bound to the module) to every callback and builds `state_key` around each hook call;
    # a key that repr-ed it would print the whole model every time.
    from lightning_rlhf.callbacks import EntropyCollapseAlarm

    alarm = EntropyCollapseAlarm(patience=2)
    alarm.log = torch.nn.Linear(2, 2).forward
    assert alarm.state_key == EntropyCollapseAlarm(patience=2).state_key
    assert "Linear" not in alarm.state_key
    assert "patience" in alarm.state_key
