"""Seconds per PPO iteration, split by phase, for the shared-backbone design and a TRL-style separate-models design.

Prints one JSON line per run. Two designs at the same model config (``--design``):

- ``shared`` (this package): ``PPOModule``'s own model, :func:`lightning_rlhf.models.build_policy`. One backbone
  serves the policy (LoRA), the reference (adapter disabled; a frozen copy with ``--full``) and the critic (value head
  on the policy's final hidden state). Rollout: generate, one forward for old logprobs *and* values, one reference
  forward. Update: one forward and backward per minibatch.
- ``separate`` (TRL-style): :class:`SeparatePolicyValue`, a ``PolicyValueModel`` in its full-fine-tuning layout (the
  policy LM, LoRA or full, and a frozen copy of the base model as ``ref_lm``) whose critic has its own full backbone
  and value head (TRL's ``AutoModelForSequenceClassification`` value model), trained jointly with one optimizer; it
  overrides only ``critic_values``. Rollout: generate, a policy forward and a critic forward, a reference forward.
  Update: a policy forward and a critic forward (and both backwards) per minibatch.

Every iteration is one ``trainer.fit`` iteration of ``PPOModule`` (:class:`BenchPPOModule` picks the design in
``configure_model`` and folds a preset's ids for the reward in ``decode_responses``), so the timed code is the
package's own. Callbacks and forward hooks split it into phases:

- ``generate``, ``old_logprobs_values_forward``, ``ref_forward``: ``PPOModule.rollout``, cut by forward hooks on the
  model (:class:`ModeMarks`). With ``--engine vllm``, ``generate`` also holds the policy's push into the engine
  (``VLLMEngine.load_policy``, waking it from sleep mode on CUDA; its start at the first, warm-up, iteration).
- ``score_advantages``: the module's ``perf/rollout_sec`` (rollout, ``score``, ``shape_rewards``,
  ``estimate_advantages``) minus those three. ``rollout_score_advantages``: ``perf/rollout_sec`` itself.
- ``update``: ``PPOModule.ppo_update``, ``perf/iteration_sec`` minus ``perf/rollout_sec``. ``update_forward``: the
  model's forward calls inside it (logprobs included: they are computed inside the forward); the rest of the update is
  the loss terms, backward, grad norm, clipping and AdamW.
- ``total``: ``perf/iteration_sec``. ``step_wall``: ``on_train_batch_start`` to ``on_train_batch_end``, which adds
  Lightning's hooks and the module's metric logging.
- ``separate`` only: ``rollout_critic_forward`` and ``update_critic_forward`` time the ``critic_values`` override
  (the critic's backbone and value head); ``rollout_policy_forward`` and ``update_policy_forward`` are the rest of the
  ``mode="policy"`` forwards (the policy's backbone and logprobs).

On CUDA every mark waits for the queued kernels. The module reads its rollout clock after the host reads of its
advantage step (whitening and explained variance wait for the kernels before them), and the callback synchronizes at
the end of the last PPO epoch, before the module reads its iteration clock, so each phase holds its own kernels.

Equal token counts: ``generation.min_new_tokens = max_new_tokens`` forbids the stop tokens before the last position, so
every response is exactly ``--max-new-tokens`` long in both designs. The script checks this at every rollout.

Models: the tiny random Llama (``--hidden`` ...), or ``--preset`` (:mod:`presets`: a published architecture with random
weights, loaded through ``from_pretrained``). Precision: ``--precision`` (``bf16-mixed`` by default on CUDA).

Utilization: the ``"utilization"`` block gives each phase's model FLOPs (:mod:`flops`: matmuls only, from the
iteration's actual token counts, prompt padding included; also over the real tokens alone) and those FLOPs per second
over the rate of a square matmul measured in this process before and after the run (in the matmuls' dtype: float32
for ``32-true``, bfloat16 otherwise); with ``--peak-tflops`` also over the accelerator's peak (MFU).

Scaling: ``--sweep length`` (or ``batch``) runs the benchmark once per response length (or batch size), each in its
own process printing its own JSON line, with 2 timed iterations after 1 warm-up unless given.

Run ``python benchmarks/ppo_iteration.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from flops import (
    DecoderShape,
    Lora,
    MatmulRate,
    Work,
    forward_flops,
    forward_work,
    generation_work,
    matmul_flops_per_sec,
    train_flops,
)
from lightning.pytorch import LightningModule, Trainer
from presets import add_model_arguments, fold_to_tokenizer, policy_config, save_random_model
from torch import Tensor, nn

from lightning_rlhf.callbacks import RLCallback
from lightning_rlhf.config import ENGINES, GenerationConfig, PPOConfig
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import (
    LoraConfig,
    PolicyConfig,
    PolicyValueModel,
    attach_lora,
    build_policy,
    cast_weights,
    check_dtype,
    disable_dropout,
    final_hidden,
    unwrap_peft,
)
from lightning_rlhf.module import PPOModule
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.types import Rollout, RolloutSamples

DESIGNS: tuple[str, ...] = ("shared", "separate")
SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "length": ("--max-new-tokens", (32, 64, 128, 256)),
    "batch": ("--batch", (8, 16, 32, 64, 128)),
}
"""``--sweep`` choices: the option each run overrides, and its default values."""
RUN: dict[str, int] = {"iterations": 10, "warmup": 2}
"""``--iterations`` and ``--warmup`` unless given."""
SWEEP_RUN: dict[str, int] = {"iterations": 2, "warmup": 1}
"""``--iterations`` and ``--warmup`` of each sweep run unless given: a sweep on 2 CPU cores takes a few minutes."""
PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "bf16-true")
ROLLOUT_PHASES: tuple[str, ...] = ("generate", "old_logprobs_values_forward", "ref_forward")
PROMPT_CHARS = string.ascii_lowercase + " "
"""Prompt alphabet: one byte, so one ByT5 token, per character."""
ADAPTER_MARKERS: tuple[str, ...] = ("lora_", "modules_to_save")
"""Parameter-name parts of peft's adapter weights, which the adapter-disabled reference does not use."""


# ---------------------------------------------------------------------------------------------- the separate design
class SeparatePolicyValue(PolicyValueModel):
    """TRL-style roles in separate networks: a ``PolicyValueModel`` whose critic has a backbone of its own.

    ``lm`` (the policy) gives the logits and ``ref_lm`` (a frozen copy of the base model) the reference logits, as in
    the package's full-fine-tuning layout; :meth:`critic_values` runs ``critic`` (a decoder without ``lm_head``,
    trained in full as TRL trains its value model) and reads the value head on its final hidden state. Every backbone
    forward is the package's (``final_hidden``, ``logits_or_head``), so a role costs what it costs in the shared design
    and only the number of backbones differs.
    """

    def __init__(self, lm: nn.Module, ref_lm: nn.Module, critic: nn.Module) -> None:
        super().__init__(lm, ref_lm=ref_lm)
        self.critic = critic
        """The critic's own decoder."""
        self.critic_seconds: Counter[str] = Counter()
        """Seconds in :meth:`critic_values`, under ``"rollout"`` (no grad) and ``"update"`` (read and cleared by
        callers)."""
        self.clock: Callable[[], float] = time.perf_counter

    def critic_values(
        self,
        hidden: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_slice: tuple[int, int] | None,
        packing: bool,
    ) -> Tensor:
        """The value head on the critic's own final hidden states; the policy's ``hidden`` is not read."""
        started = self.clock()
        # LlamaModel.get_decoder() is the model itself, so final_hidden runs the critic's decoder.
        own = final_hidden(self.critic, input_ids, attention_mask, logits_slice, packing)
        values = super().critic_values(own, input_ids, attention_mask, logits_slice, packing)
        self.critic_seconds["update" if torch.is_grad_enabled() else "rollout"] += self.clock() - started
        return values


def build_separate(cfg: PolicyConfig, lora: LoraConfig, tokenizer: Any) -> SeparatePolicyValue:
    """Policy, reference copy and critic backbone, with the random init ``build_policy(cfg, lora, tokenizer)`` draws.

    The base weights come from ``cfg`` alone; the global RNG is put back after the full-fine-tuning build, so the
    adapter and then the value head (drawn in ``PolicyValueModel.__init__``) get the same draws, in the same order, as
    in the shared design.
    """
    with torch.random.fork_rng(devices=[]):
        full = build_policy(cfg, LoraConfig(enabled=False), tokenizer)  # trainable LM, frozen reference copy
        critic = copy.deepcopy(full.lm.get_decoder())  # trained in full
    lm = full.lm
    if lora.enabled:
        # As build_policy's LoRA policy: the adapter attached to the base in policy.dtype (so it is initialized in that
        # dtype too), then dropout off and the adapter in float32.
        dtype = check_dtype(cfg.dtype, "policy.dtype")
        base = cast_weights(lm.requires_grad_(False), dtype)
        lm = cast_weights(disable_dropout(attach_lora(base, lora)), dtype)
    return SeparatePolicyValue(lm, full.ref_lm, critic)


# -------------------------------------------------------------------------------------------- parameter accounting
def _unique_bytes(params: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages among ``params`` (a tensor reached twice counts once)."""
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in params}.values())


def role_parameters(model: PolicyValueModel) -> dict[str, list[Tensor]]:
    """The parameters each role reads in a forward: policy, reference and critic."""
    if isinstance(model, SeparatePolicyValue):
        return {
            "policy": list(model.lm.parameters()),
            "reference": list(model.ref_lm.parameters()),
            "critic": [*model.critic.parameters(), *model.value_head.parameters()],
        }
    if model.ref_lm is not None:
        reference = list(model.ref_lm.parameters())
    else:  # adapter disabled: the base weights only
        reference = [p for n, p in model.lm.named_parameters() if not any(m in n for m in ADAPTER_MARKERS)]
    decoder = unwrap_peft(model.lm).get_decoder()
    return {
        "policy": list(model.lm.parameters()),
        "reference": reference,
        "critic": [*decoder.parameters(), *model.value_head.parameters()],
    }


def parameter_bytes(model: PolicyValueModel) -> dict[str, int]:
    roles = role_parameters(model)
    out = {role: _unique_bytes(params) for role, params in roles.items()}
    out["all_roles_unique"] = _unique_bytes(p for params in roles.values() for p in params)
    out["trainable"] = _unique_bytes(p for p in model.parameters() if p.requires_grad)
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _unique_bytes(t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor))


# ----------------------------------------------------------------------------------------------------------- timing
def make_clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter``, after waiting for queued CUDA work so a phase's time includes its kernels."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


class ModelCall(NamedTuple):
    """One scoring or update call of the model (``mode="policy"`` or ``"ref"``), as its forward pre-hook saw it."""

    mode: str
    rows: int
    length: int
    """Positions per row: prompt + response columns."""
    slice_positions: int
    """Positions per row the value head reads: the length of ``logits_slice``."""
    logit_positions: int
    """Positions with logits, all rows together: the True positions of ``logits_mask`` (the real response tokens),
    or ``rows x slice_positions`` without one."""
    grad: bool
    """Grad was enabled: an update step, whose backward follows."""

    @property
    def phase(self) -> str:
        if self.grad:
            return "update"
        return "ref_forward" if self.mode == "ref" else "old_logprobs_values_forward"


class ModeMarks:
    """Records when each ``model(..., mode=...)`` call starts and ends, through forward hooks.

    ``PPOModule.rollout`` samples (through ``mode="generate"``, or an engine that calls the LM directly), then calls
    the model with ``mode="policy"``, then ``"ref"``; the marks split its wall time into three phases without
    changing the code it runs. The marks also keep every scoring and update call's input shape (for model FLOPs) and
    the seconds spent inside the calls of each phase, and hooks on the LoRA ``A`` matrices record whether sampling ran
    the adapter or merged weights (no adapter matmuls).
    """

    def __init__(self, model: nn.Module, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.marks: dict[tuple[str, str], float] = {}
        self.active = False
        self.sampling_adapter_rows = 0
        """Rows the adapters' ``A`` matrices saw before the first policy forward of this rollout."""
        self.calls: list[ModelCall] = []
        self.call_seconds: Counter[str] = Counter()
        """Seconds inside the scoring and update calls, by :attr:`ModelCall.phase`."""
        model.register_forward_pre_hook(self._start, with_kwargs=True)
        model.register_forward_hook(self._end, with_kwargs=True)
        for name, module in model.named_modules():
            if name.split(".")[-2:-1] == ["lora_A"]:  # peft: <layer>.lora_A.<adapter name>
                module.register_forward_hook(self._adapter)

    def reset(self) -> None:
        """Forget the previous iteration's marks."""
        self.marks.clear()
        self.sampling_adapter_rows = 0
        self.calls.clear()
        self.call_seconds.clear()

    def _adapter(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.active and ("start", "policy") not in self.marks:
            self.sampling_adapter_rows += args[0].shape[:-1].numel()

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        mode = kwargs.get("mode", "policy")
        self.marks["start", mode] = self.clock()
        if mode != "generate":
            input_ids = args[0] if args else kwargs["input_ids"]
            start, end = kwargs.get("logits_slice") or (0, input_ids.shape[1])
            mask = kwargs.get("logits_mask")
            logits = input_ids.shape[0] * (end - start) if mask is None else int(mask.sum())
            self.calls.append(ModelCall(mode, *input_ids.shape, end - start, logits, torch.is_grad_enabled()))

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.active:
            return
        mode = kwargs.get("mode", "policy")
        self.marks["end", mode] = self.clock()
        if mode != "generate":
            self.call_seconds[self.calls[-1].phase] += self.marks["end", mode] - self.marks["start", mode]

    def split(self, started: float) -> dict[str, float]:
        """Phase seconds of the rollout begun at ``started``, read before the update's calls: generate (to the end of
        ``mode="generate"``; to the policy forward for an engine that calls the LM directly), old logprobs and values
        (the cut at the stop token and the policy forward, to the start of the reference forward), reference (to its
        end)."""
        generated = self.marks.get(("end", "generate"), self.marks["start", "policy"])
        ref_started, ref_ended = self.marks["start", "ref"], self.marks["end", "ref"]
        if not started <= generated <= self.marks["start", "policy"] <= ref_started <= ref_ended:
            raise RuntimeError(f"PPOModule.rollout called the model in an unexpected order: {self.marks}")
        return {
            "generate": generated - started,
            "old_logprobs_values_forward": ref_started - generated,
            "ref_forward": ref_ended - ref_started,
        }


# ------------------------------------------------------------------------------------------------------ model FLOPs
# Conventions of flops.py: matmuls only, so scoring, advantages, the grad norm and AdamW count 0 FLOPs.
def call_flops(args: argparse.Namespace, shape: DecoderShape, call: ModelCall) -> int:
    """Model FLOPs of one scoring or update call of the model (forward, and backward when it ran with grad).

    The shared design reads logits and values from one backbone. The separate design's policy reads only logits, its
    critic (a full backbone without ``lm_head``, trained in full) only values.
    """
    lora = None if args.full else Lora(rank=args.lora_r)

    def work(logits: bool, values: bool) -> Work:
        backbone = forward_work(call.rows, call.length, logit_positions=0)
        value_positions = call.rows * call.slice_positions if values else 0
        return dataclasses.replace(
            backbone, logit_positions=call.logit_positions if logits else 0, value_positions=value_positions
        )

    if call.mode == "ref":
        return forward_flops(shape, work(logits=True, values=False)).total
    step = train_flops if call.grad else forward_flops
    if args.design == "shared":
        return step(shape, work(logits=True, values=True), lora).total
    return step(shape, work(logits=True, values=False), lora).total + step(shape, work(logits=False, values=True)).total


def sampling_flops(
    args: argparse.Namespace, shape: DecoderShape, rows: int, prompt_len: int, tokens: dict[str, Any]
) -> int:
    """Sampling ``tokens["new_tokens"]`` for ``rows`` prompts of ``prompt_len`` positions, all rows at once.

    The adapter counts only if sampling ran it: an engine that merges it runs none (its ``B @ A`` merge is not counted).
    """
    lora = Lora(rank=args.lora_r) if tokens["sampling_lora"] else None
    return forward_flops(shape, generation_work(rows, prompt_len, tokens["new_tokens"]), lora).total


def with_totals(phases: Counter[str]) -> dict[str, int]:
    """The phases in order, with the rollout (as ``perf/rollout_sec`` times it) and the iteration total."""
    rollout = sum(phases[phase] for phase in ROLLOUT_PHASES)
    return {phase: phases[phase] for phase in ROLLOUT_PHASES} | {
        "rollout_score_advantages": rollout,
        "update": phases["update"],
        "total": rollout + phases["update"],
    }


def executed_flops(args: argparse.Namespace, shape: DecoderShape, tokens: dict[str, Any]) -> dict[str, int]:
    """Phase FLOPs of what ran: sampling over the padded prompts, and every model call with the shape it received
    (the package drops columns that are padding in a whole micro-batch)."""
    phases = Counter(generate=sampling_flops(args, shape, len(tokens["prompt_lengths"]), tokens["width"], tokens))
    for call in tokens["calls"]:
        phases[call.phase] += call_flops(args, shape, call)
    return with_totals(phases)


def real_token_flops(args: argparse.Namespace, shape: DecoderShape, tokens: dict[str, Any]) -> dict[str, int]:
    """Phase FLOPs if every row ran alone, unpadded: ``ppo_epochs`` update passes over each row's real tokens."""
    new_tokens, phases = tokens["new_tokens"], Counter[str]()
    for prompt_len in tokens["prompt_lengths"]:
        length = prompt_len + new_tokens
        phases["generate"] += sampling_flops(args, shape, 1, prompt_len, tokens)
        for mode, grad, repeats in (("policy", False, 1), ("ref", False, 1), ("policy", True, args.ppo_epochs)):
            call = ModelCall(mode, 1, length, new_tokens, new_tokens, grad)
            phases[call.phase] += repeats * call_flops(args, shape, call)
    return with_totals(phases)


def token_counts(prompt_mask: Tensor, new_tokens: int, marks: ModeMarks) -> dict[str, Any]:
    """What one iteration pushed through the model: each prompt's real length, the padded width, the response length,
    whether sampling ran the LoRA adapter, and the scoring and update calls of the model."""
    return {
        "prompt_lengths": prompt_mask.sum(-1).tolist(),
        "width": prompt_mask.shape[1],
        "new_tokens": new_tokens,
        "sampling_lora": marks.sampling_adapter_rows > 0,
        "calls": list(marks.calls),
    }


def utilization(
    args: argparse.Namespace, result: dict[str, Any], timed: list[dict[str, float]], rates: list[MatmulRate]
) -> dict[str, Any]:
    """Per phase: model FLOPs, FLOP/s and FLOP/s over the matmul rate (medians over the timed iterations)."""
    rate = statistics.mean(r.flops_per_sec for r in rates)
    tokens = result["tokens"][args.warmup :]
    executed = [executed_flops(args, result["shape"], t) for t in tokens]
    real = [real_token_flops(args, result["shape"], t) for t in tokens]
    phases = {}
    for phase in executed[0]:
        if phase not in timed[0]:
            continue
        flops_per_sec = [flops[phase] / it[phase] for flops, it in zip(executed, timed, strict=True)]
        phases[phase] = {
            "gflop": round(statistics.median(flops[phase] for flops in executed) / 1e9, 3),
            "gflop_real_tokens": round(statistics.median(flops[phase] for flops in real) / 1e9, 3),
            "gflop_per_sec": round(statistics.median(flops_per_sec) / 1e9, 2),
            "utilization": round(statistics.median(flops_per_sec) / rate, 4),
        }
        if args.peak_tflops:
            phases[phase]["mfu"] = round(statistics.median(flops_per_sec) / (args.peak_tflops * 1e12), 4)
    return {
        "matmul_gflop_per_sec": round(rate / 1e9, 2),
        "matmul_gflop_per_sec_before_after": [round(r.flops_per_sec / 1e9, 2) for r in rates],
        "matmul": f"{rates[0].n}x{rates[0].n} {str(rates[0].dtype).removeprefix('torch.')}",
        "update_padding_fraction": round(update_padding_fraction(tokens, args.ppo_epochs), 4),
        "sampling_ran_lora": any(t["sampling_lora"] for t in tokens),
        "phases": phases,
    }


def update_padding_fraction(tokens: list[dict[str, Any]], ppo_epochs: int) -> float:
    """The share of the positions the update ran that were padding."""
    ran = sum(call.rows * call.length for t in tokens for call in t["calls"] if call.phase == "update")
    real = sum(ppo_epochs * (p + t["new_tokens"]) for t in tokens for p in t["prompt_lengths"])
    return 1 - real / ran


# -------------------------------------------------------------------------------------------------------- the setup
def make_prompts(count: int, min_len: int, max_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(count)]
    # A letter first, so no prompt is only spaces (PromptDataModule refuses blank prompts).
    return [rng.choice(string.ascii_lowercase) + "".join(rng.choices(PROMPT_CHARS, k=n - 1)) for n in lengths]


def make_module_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    policy = policy_config(args, args.model_dir)  # a preset was saved there by main()
    return {
        "policy": policy,
        "lora": LoraConfig(enabled=False) if args.full else LoraConfig(r=args.lora_r, alpha=2 * args.lora_r),
        "generation": GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,  # every response full length: equal token counts in both designs
            engine=args.engine,
            merge_lora=not args.no_merge_lora,
            cast_weights_once=not args.no_cast_weights_once,
        ),
        "ppo": PPOConfig(ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches),
        "reward": CharFractionReward(),
    }


class BenchPPOModule(PPOModule):
    """``PPOModule`` with a choice of design (``configure_model``), decoding a preset's ids (``decode_responses``)."""

    def __init__(self, design: str = "shared", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.design = design

    def configure_model(self) -> None:
        if self.design == "shared" or self.model is not None:
            super().configure_model()
            return
        model = build_separate(self.policy_config, self.lora_config, self.tokenizer)
        self.model = cast_weights(model, self.frozen_dtype)  # as PPOModule.configure_model

    def decode_responses(self, rollout: Rollout) -> list[str]:
        """As ``PPOModule``'s, with a preset's ids past the byte tokenizer folded into its range (the reward needs some
        text; the scores do not change the timed work)."""
        ids = fold_to_tokenizer(rollout.response_ids.tolist(), len(self.tokenizer))
        folded = torch.tensor(ids, dtype=rollout.response_ids.dtype, device=rollout.response_ids.device)
        return super().decode_responses(dataclasses.replace(rollout, response_ids=folded))


def check_full_length(rollout: Rollout, max_new_tokens: int) -> None:
    if rollout.response_ids.shape[1] != max_new_tokens or not bool(rollout.response_mask.all()):
        raise RuntimeError("A response stopped before max_new_tokens; the designs would see different token counts.")


def update_decoders(model: PolicyValueModel) -> list[nn.Module]:
    """The decoders the update trains through: the policy's, and the separate design's critic."""
    decoders = [unwrap_peft(model.lm).get_decoder()]
    if isinstance(model, SeparatePolicyValue):
        decoders.append(model.critic)
    return decoders


def make_trainer(args: argparse.Namespace, device: torch.device, callbacks: list[RLCallback]) -> Trainer:
    """A one-device ``Trainer`` of ``--warmup`` + ``--iterations`` PPO iterations, without logger or checkpoints."""
    return Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16-mixed" else "32-true",  # bf16-true: policy.dtype
        max_steps=args.warmup + args.iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def fit(args: argparse.Namespace, device: torch.device, prompts: list[str], callbacks: list[RLCallback]) -> Trainer:
    """``trainer.fit`` of :class:`BenchPPOModule` on ``prompts``, in order, one ``--batch`` per iteration."""
    module = BenchPPOModule(design=args.design, **make_module_kwargs(args))
    data = PromptDataModule(
        prompts=prompts,
        batch_size=args.batch,
        max_prompt_length=args.prompt_len[1],
        shuffle=False,
        tokenizer=module.tokenizer,
    )
    trainer = make_trainer(args, device, callbacks)
    trainer.fit(module, datamodule=data)
    return trainer


# ------------------------------------------------------------------------------------------------------- callbacks
class IterationTimes(RLCallback):
    """Phase seconds and token counts of every PPO iteration (see the module docstring for the phases)."""

    def __init__(self, max_new_tokens: int, clock: Callable[[], float]) -> None:
        self.max_new_tokens = max_new_tokens
        self.clock = clock
        self.marks: ModeMarks | None = None
        self.iterations: list[dict[str, float]] = []
        self.tokens: list[dict[str, Any]] = []
        self.rollout: dict[str, float] | None = None
        self.result: dict[str, Any] = {}
        """What the run held at its end: shape, generation settings, parameter and optimizer state bytes."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        model = pl_module.model
        if self.marks is None:
            self.marks = ModeMarks(model, self.clock)
            if isinstance(model, SeparatePolicyValue):
                model.clock = self.clock
        self.marks.reset()
        if isinstance(model, SeparatePolicyValue):
            model.critic_seconds.clear()
        self.rollout = None
        self.marks.active = True
        self.started = self.clock()

    def on_rollout_end(
        self, trainer: Trainer, pl_module: LightningModule, rollout: Rollout, samples: RolloutSamples
    ) -> None:
        check_full_length(rollout, self.max_new_tokens)
        self.rollout = self.marks.split(self.started)

    def on_ppo_epoch_end(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        self.clock()  # CUDA: the last optimizer step finishes before the module reads perf/iteration_sec

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        wall = self.clock() - self.started
        self.marks.active = False
        metrics = trainer.callback_metrics
        if self.rollout is None or float(metrics["policy/skipped_updates"]) > 0:
            raise RuntimeError("PPOModule skipped an iteration or an update; its time would not be a normal one.")
        total, rollout = float(metrics["perf/iteration_sec"]), float(metrics["perf/rollout_sec"])
        seconds = dict(self.rollout)
        seconds["score_advantages"] = rollout - sum(self.rollout.values())
        seconds |= {"rollout_score_advantages": rollout, "update": total - rollout, "total": total}
        seconds |= {"update_forward": self.marks.call_seconds["update"], "step_wall": wall}
        model = pl_module.model
        if isinstance(model, SeparatePolicyValue):  # inside old_logprobs_values_forward and update_forward
            for phase, calls in (("rollout", "old_logprobs_values_forward"), ("update", "update")):
                critic = model.critic_seconds[phase]
                seconds[f"{phase}_policy_forward"] = self.marks.call_seconds[calls] - critic
                seconds[f"{phase}_critic_forward"] = critic
        self.iterations.append(seconds)
        self.tokens.append(token_counts(batch["prompt_mask"], self.max_new_tokens, self.marks))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.result = {
            "shape": DecoderShape.from_config(pl_module.model.lm.config),
            "generation": dataclasses.asdict(pl_module.generation),
            "param_bytes": parameter_bytes(pl_module.model),
            "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizers[0]),
        }


class CompiledUpdate(RLCallback):
    """Regional ``torch.compile`` for the update only: from ``on_rollout_end`` to ``on_train_batch_end`` every decoder
    layer the update trains through is replaced by its compiled wrapper (the same parameters), so sampling and the
    scoring forwards stay eager. A layer is compiled on first use and its wrapper kept, so later iterations reuse its
    graphs."""

    def __init__(self) -> None:
        self.compiled: dict[int, nn.Module] = {}
        """Compiled wrapper of each decoder layer, by the layer's id."""
        self.eager: list[tuple[nn.Module, list[nn.Module]]] = []

    def on_rollout_end(
        self, trainer: Trainer, pl_module: LightningModule, rollout: Rollout, samples: RolloutSamples
    ) -> None:
        for decoder in update_decoders(pl_module.model):
            self.eager.append((decoder, list(decoder.layers)))
            for i, layer in enumerate(decoder.layers):
                if id(layer) not in self.compiled:
                    self.compiled[id(layer)] = torch.compile(layer, dynamic=True)
                decoder.layers[i] = self.compiled[id(layer)]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for decoder, layers in self.eager:
            for i, layer in enumerate(layers):
                decoder.layers[i] = layer
        self.eager.clear()


def run(args: argparse.Namespace, device: torch.device, prompts: list[str]) -> dict[str, Any]:
    times = IterationTimes(args.max_new_tokens, make_clock(device))
    compiled = CompiledUpdate() if args.compile_update else None
    fit(args, device, prompts, [times] if compiled is None else [times, compiled])
    return {
        "iterations": times.iterations,
        "tokens": times.tokens,
        **times.result,
        "compiled_layers": 0 if compiled is None else len(compiled.compiled),
    }


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    model = parser.add_argument_group("model (a random Llama with the ByT5 byte tokenizer, vocabulary 384)")
    add_model_arguments(model)
    model.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    model.add_argument("--design", choices=DESIGNS, default="shared", help="shared backbone, or TRL-style models")
    ppo = parser.add_argument_group("PPO iteration")
    ppo.add_argument("--batch", type=int, default=32, help="prompts per rollout")
    ppo.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"), help="bytes")
    ppo.add_argument("--max-new-tokens", type=int, default=32, help="response length (every response has it)")
    ppo.add_argument(
        "--engine",
        choices=("auto", *ENGINES),
        default="auto",
        help="generation.engine; vllm needs vLLM installed (PPOModule builds the engine at the first rollout; the "
        "generate phase then includes pushing the policy into it)",
    )
    ppo.add_argument("--no-merge-lora", action="store_true", help="generation.merge_lora false (sample unmerged)")
    ppo.add_argument(
        "--no-cast-weights-once",
        action="store_true",
        help="generation.cast_weights_once false (bf16-mixed sampling casts the weights at every decode step)",
    )
    ppo.add_argument(
        "--compile-update",
        action="store_true",
        help="experiment: torch.compile every decoder layer (regional, dynamic shapes) for the update; sampling and "
        "scoring stay eager. The first iteration compiles: use --warmup >= 1",
    )
    ppo.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
    ppo.add_argument("--num-minibatches", type=int, default=4, help="optimizer steps per PPO epoch")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--iterations",
        type=int,
        help=f"timed PPO iterations; None: {RUN['iterations']}, or {SWEEP_RUN['iterations']} per sweep run",
    )
    run.add_argument(
        "--warmup",
        type=int,
        help=f"untimed PPO iterations first; None: {RUN['warmup']}, or {SWEEP_RUN['warmup']} per sweep run",
    )
    run.add_argument(
        "--trainer", action="store_true", help="no effect, for older command lines: every run times trainer.fit"
    )
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="32-true; bf16-mixed (bfloat16 autocast, float32 weights); bf16-true (the LM's weights in bfloat16). "
        "None: bf16-mixed on CUDA, 32-true on CPU. Utilization is against a matmul in the matmuls' dtype",
    )
    run.add_argument(
        "--peak-tflops",
        type=float,
        help="the accelerator's peak dense TFLOP/s in the matmuls' dtype (H100 SXM bf16: 989); adds MFU per phase",
    )
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    run.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling, shuffling, LoRA init")
    sweep = parser.add_argument_group("scaling sweep")
    sweep.add_argument(
        "--sweep",
        choices=("none", *SWEEPS),
        default="none",
        help="run the benchmark once per response length (--max-new-tokens) or per --batch, each run in its own "
        "process printing its own JSON line",
    )
    sweep.add_argument(
        "--sweep-values",
        type=int,
        nargs="+",
        help="values to sweep; None: " + "; ".join(f"{k} {' '.join(map(str, v))}" for k, (_, v) in SWEEPS.items()),
    )
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device.startswith("cuda") else "32-true"
    for name, default in (RUN if args.sweep == "none" else SWEEP_RUN).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    if not 1 <= args.prompt_len[0] <= args.prompt_len[1]:
        parser.error("--prompt-len needs 1 <= MIN <= MAX")
    if args.compile_update and args.warmup < 1:
        parser.error("--compile-update needs --warmup >= 1 (the compiling iteration)")
    return args


def summarize(
    args: argparse.Namespace, device: torch.device, result: dict[str, Any], wall: float, rates: list[MatmulRate]
) -> dict[str, Any]:
    timed = result["iterations"][args.warmup :]
    phases = list(dict.fromkeys(k for it in timed for k in it))
    median = {k: statistics.median(it.get(k, 0.0) for it in timed) for k in phases}
    tokens = args.batch * args.max_new_tokens
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "config": {
            "design": args.design,
            "mode": "trainer",
            "preset": args.preset,
            "shape": dataclasses.asdict(result["shape"]),
            "precision": args.precision,
            "batch": args.batch,
            "prompt_len": list(args.prompt_len),
            "max_new_tokens": args.max_new_tokens,
            "generation": result["generation"],
            "ppo_epochs": args.ppo_epochs,
            "num_minibatches": args.num_minibatches,
            "lora_r": "full" if args.full else args.lora_r,
            "engine": args.engine,
            "merge_lora": not args.no_merge_lora,
            "compile_update": args.compile_update,
            "compiled_layers": result["compiled_layers"],
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "seed": args.seed,
        },
        "timed_iterations": len(timed),
        "warmup_iterations": args.warmup,
        "seconds_median": {k: round(v, 4) for k, v in median.items()},
        "total_seconds_each": [round(it["total"], 4) for it in timed],
        "warmup_total_seconds_each": [round(it["total"], 4) for it in result["iterations"][: args.warmup]],
        "iterations_per_sec": round(1.0 / median["total"], 4),
        "generated_tokens_per_sec": {
            "iteration": round(tokens / median["total"], 1),
            **({"generate_phase": round(tokens / median["generate"], 1)} if "generate" in median else {}),
        },
        "peak_rss_mib": round(rss_kib / 1024, 1),
        "cuda_max_allocated_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        ),
        "param_bytes": result["param_bytes"],
        "optimizer_state_bytes": result["optimizer_state_bytes"],
        "utilization": utilization(args, result, timed, rates),
        "wall_seconds": round(wall, 1),
    }


def run_sweep(args: argparse.Namespace, argv: list[str]) -> None:
    """One benchmark run per sweep value, each in a fresh process (its own peak RSS), printing its own JSON line."""
    option, defaults = SWEEPS[args.sweep]
    for value in args.sweep_values or defaults:
        # Later options win: the run gets this script's arguments with the sweep turned off and one value set.
        point = ["--sweep", "none", "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
        subprocess.run([sys.executable, __file__, *argv, *point, option, str(value)], check=True)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM logs to stdout by default; JSON only there
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.sweep != "none":
        run_sweep(args, argv)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    prompts = make_prompts(args.batch * (args.warmup + args.iterations), *args.prompt_len, seed=args.seed)
    dtype = torch.float32 if args.precision == "32-true" else torch.bfloat16
    rates = [matmul_flops_per_sec(device, dtype)]  # before and after the run: their spread shows drift in the machine
    with tempfile.TemporaryDirectory(prefix="lightning_rlhf_bench_") as model_dir:
        if args.preset != "none":
            save_random_model(args.preset, model_dir, args.seed)
        args.model_dir = model_dir
        result = run(args, device, prompts)
    rates.append(matmul_flops_per_sec(device, dtype))
    summary = summarize(args, device, result, time.perf_counter() - started, rates)
    print(json.dumps(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
