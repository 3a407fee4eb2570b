"""Where a PPO iteration's time goes: ``torch.profiler`` tables of the rollout and the update, and GPU busy time.

Takes ``ppo_iteration.py``'s options (``--preset``, ``--full``, ``--design``, ``--precision``, ``--compile-update``,
...) and runs two ``trainer.fit`` iterations of its ``PPOModule``: one untimed, then one profiled by a callback in two
parts, the rollout (``on_train_batch_start`` to ``on_rollout_end``: ``rollout``, ``score``, ``shape_rewards``,
``estimate_advantages``) and the update (``on_rollout_end`` to the end of the last PPO epoch: ``ppo_update``). Prints,
per part, the wall time, the summed device-kernel time (wall >> kernels means the host cannot launch work fast enough)
and the top operators by self device time and by self host time. The rollout is profiled only with
``--profile-rollout``.

    python benchmarks/profile_phases.py --preset qwen2-0.5b --device cuda --prompt-len 64 128 --max-new-tokens 128
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable

import ppo_iteration as bench
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.profiler import ProfilerActivity, profile

from lightning_rlhf.callbacks import RLCallback
from lightning_rlhf.types import Rollout, RolloutSamples

PROFILE_ROLLOUT = "--profile-rollout"
"""Also profile the rollout (slow: every decode step's operators are recorded)."""
PROFILED_BATCH = 1
"""The iteration profiled: the second, after one untimed iteration (allocator, kernels, compiled layers warm)."""


class PhaseProfiler(RLCallback):
    """Profiles the rollout and the update of iteration :data:`PROFILED_BATCH`; :meth:`report` prints them."""

    def __init__(self, device: torch.device, ppo_epochs: int, profile_rollout: bool) -> None:
        self.device = device
        self.clock: Callable[[], float] = bench.make_clock(device)
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.ppo_epochs = ppo_epochs
        self.profile_rollout = profile_rollout
        self.active = False
        self.part: tuple[str, float, profile | None] | None = None
        """The part being profiled: its name, start and profiler (None: timed only)."""
        self.parts: dict[str, tuple[float, profile | None]] = {}
        """Wall seconds and profile of each part, once done."""

    def _begin(self, name: str, profiled: bool) -> None:
        prof = profile(activities=self.activities) if profiled else None
        if prof is not None:
            prof.start()
        self.part = (name, self.clock(), prof)

    def _end(self) -> None:
        if self.part is None:
            return
        name, started, prof = self.part
        wall = self.clock() - started
        if prof is not None:
            prof.stop()
        self.parts[name] = (wall, prof)
        self.part = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        self.active = batch_idx == PROFILED_BATCH
        if self.active:
            self._begin("rollout", self.profile_rollout)

    def on_rollout_end(
        self, trainer: Trainer, pl_module: LightningModule, rollout: Rollout, samples: RolloutSamples
    ) -> None:
        if self.active:
            self._end()
            self._begin("update", True)

    def on_ppo_epoch_end(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        if self.active and epoch + 1 == self.ppo_epochs:
            self._end()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if self.active:
            self._end()  # ppo.early_stop_kl cut the last epoch short
            self.active = False

    def report(self) -> None:
        for name, (wall, prof) in self.parts.items():
            if prof is None:
                print(f"\n##### {name}: wall {wall:.3f} s (not profiled)")
            else:
                report(name, wall, prof, self.device)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    profile_rollout = PROFILE_ROLLOUT in argv
    args = bench.parse_args([a for a in argv if a != PROFILE_ROLLOUT])
    args.warmup, args.iterations = PROFILED_BATCH, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    prompts = bench.make_prompts((PROFILED_BATCH + 1) * args.batch, *args.prompt_len, seed=args.seed)
    profiler = PhaseProfiler(device, args.ppo_epochs, profile_rollout)
    callbacks = [profiler] + ([bench.CompiledUpdate()] if args.compile_update else [])
    with tempfile.TemporaryDirectory(prefix="lightning_rlhf_profile_") as model_dir:
        if args.preset != "none":
            bench.save_random_model(args.preset, model_dir, args.seed)
        args.model_dir = model_dir
        bench.fit(args, device, prompts, callbacks)
    profiler.report()


def report(name: str, wall: float, prof: profile, device: torch.device) -> None:
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(getattr(e, attr) for e in events) / 1e6
    print(
        f"\n##### {name}: wall {wall:.3f} s, self {'device' if device.type == 'cuda' else 'host'} time {kernels:.3f} s"
    )
    print(events.table(sort_by=attr, row_limit=22, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    sys.stdout.flush()


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"profile_phases: {time.perf_counter() - started:.1f} s")
