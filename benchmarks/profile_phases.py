"""Where a PPO iteration's time goes: ``torch.profiler`` tables of the rollout and the update, and GPU busy time.

Takes ``ppo_iteration.py``'s options (``--preset``, ``--full``, ``--design``, ``--precision``, ...), runs one untimed
iteration, then profiles one more: the rollout (sampling, scoring forwards) and the PPO update separately. Prints, per
part, the wall time, the summed device-kernel time (wall >> kernels means the host cannot launch work fast enough) and
the top operators by self device time and by self host time. The rollout is profiled only with ``--profile-rollout``.

    python benchmarks/profile_phases.py --preset qwen2-0.5b --device cuda --prompt-len 64 128 --max-new-tokens 128
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time

import ppo_iteration as bench
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_rlhf.rollout import generate_rollout

PROFILE_ROLLOUT = "--profile-rollout"
"""Also profile the rollout (slow: every decode step's operators are recorded)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    profile_rollout = PROFILE_ROLLOUT in argv
    args = bench.parse_args([a for a in argv if a != PROFILE_ROLLOUT])
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    prompts = bench.make_prompts(2 * args.batch, *args.prompt_len, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="lightning_rlhf_profile_") as model_dir:
        if args.preset != "none":
            bench.save_random_model(args.preset, model_dir, args.seed)
        args.model_dir = model_dir
        module = bench.BenchPPOModule(design=args.design, **bench.make_module_kwargs(args))
        module.configure_model()
    module.to(device).train()
    optimizer = module.configure_optimizers()
    clock = bench.make_clock(device)
    data = bench.PromptDataModule(prompts=prompts, batch_size=args.batch, shuffle=False, tokenizer=module.tokenizer)
    data.setup("fit")
    eos, pad = bench.unreachable_eos(module.model), module.tokenizer.pad_token_id
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for index, batch in enumerate(data.train_dataloader()):
        prompt_ids, prompt_mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
        profiled = index == 1
        with bench.precision_context(args, device):
            parts = {}
            with profile(activities=activities) if profiled and profile_rollout else contextlib.nullcontext() as prof:
                started = clock()
                rollout = generate_rollout(
                    module.model, prompt_ids, prompt_mask, module.generation, eos_token_id=eos, pad_token_id=pad
                )
                parts["rollout"] = (clock() - started, prof)
            rollout, _ = bench.score_and_advantages(module, batch["prompts"], rollout, clock)
            with profile(activities=activities) if profiled else contextlib.nullcontext() as prof:
                started = clock()
                bench.ppo_update(module, rollout, optimizer, clock)
                parts["update"] = (clock() - started, prof)
        if profiled:
            for name, (wall, prof) in parts.items():
                if prof is None:
                    print(f"\n##### {name}: wall {wall:.3f} s (not profiled)")
                else:
                    report(name, wall, prof, device)


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
