"""Seconds per PPO iteration, split by phase, for the shared-backbone design and a TRL-style separate-models design.

Prints one JSON line per run. Two designs at the same model config (``--design``):

- ``shared`` (this package): :func:`lightning_rlhf.models.build_policy`. One backbone serves the policy (LoRA), the
  reference (adapter disabled; a frozen copy with ``--full``) and the critic (value head on the policy's final hidden
  state). Rollout: generate, one forward for old logprobs *and* values, one reference forward. Update: one forward and
  backward per minibatch.
- ``separate`` (TRL-style): the policy LM (LoRA, or full), a frozen copy of the base model as the reference, and a
  critic with its own full backbone and a value head (TRL's ``AutoModelForSequenceClassification`` value model),
  trained jointly with one optimizer. Rollout: generate, a policy forward and a critic forward, a reference forward.
  Update: a policy forward and a critic forward (and both backwards) per minibatch. :class:`SeparatePolicyValue` has
  the call interface of ``PolicyValueModel``, so the same ``generate_rollout`` and ``forward_response`` drive both.

Two modes:

- direct (default): drives one iteration's phases itself and times each. The rollout is the package's own
  ``generate_rollout`` unchanged; forward hooks on the model mark where generation ends and the reference forward
  starts. The update is ``PPOModule._ppo_update``'s computation (the package's ``loss.ppo_objective``, backward,
  the logged grad norm, ``clip_grad_norm_``, AdamW step) without its metric bookkeeping and without Lightning.
- ``--trainer``: whole ``trainer.fit`` iterations of ``PPOModule``; reports its ``perf/iteration_sec`` and
  ``perf/rollout_sec`` metrics and the wall time of each ``training_step`` as a cross-check.

Equal token counts: the rollout is given an EOS id equal to the LM's output size (its vocabulary), which the model
cannot sample: every response is exactly ``--max-new-tokens`` long in both designs. The script checks this. (It
predates ``GenerationConfig.min_new_tokens``, commit 0ca9c78, and keeps the unreachable EOS.)

Models: the tiny random Llama (``--hidden`` ...), or ``--preset`` (:mod:`presets`: a published architecture with random
weights, loaded through ``from_pretrained``). Precision: ``--precision`` (``bf16-mixed`` by default on CUDA).

Utilization: the ``"utilization"`` block gives each phase's model FLOPs (:mod:`lightning_rlhf.flops`: matmuls only,
from the iteration's actual token counts, prompt padding included; also over the real tokens alone) and those FLOPs
per second over the rate of a square matmul measured in this process before and after the run (in the matmuls'
dtype: float32 for ``32-true``, bfloat16 otherwise); with ``--peak-tflops`` also over the accelerator's peak (MFU).

Scaling: ``--sweep length`` (or ``batch``) runs the benchmark once per response length (or batch size), each in its
own process printing its own JSON line, with 2 timed iterations after 1 warm-up unless given.

Run ``python benchmarks/ppo_iteration.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import random
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from presets import add_model_arguments, fold_to_tokenizer, policy_config, save_random_model
from torch import Tensor, nn

from lightning_rlhf import functional as F
from lightning_rlhf.config import PPOConfig
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.flops import (
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
from lightning_rlhf.loss import ppo_objective
from lightning_rlhf.models import (
    HeadFn,
    LoraConfig,
    PolicyConfig,
    PolicyValueModel,
    _attach_lora,
    build_policy,
    final_hidden,
    logits_or_head,
    unwrap_peft,
)
from lightning_rlhf.module import PPOModule
from lightning_rlhf.rewards import CharFractionReward, validate_scores
from lightning_rlhf.rollout import GenerationConfig, generate_rollout
from lightning_rlhf.types import Rollout

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
class SeparatePolicyValue(nn.Module):
    """TRL-style roles in separate networks, behind ``PolicyValueModel``'s call interface.

    ``mode="policy"`` runs the policy LM for the logits and the critic's own backbone for the values (two backbone
    forwards); ``mode="ref"`` runs the frozen reference copy; ``mode="generate"`` samples from the policy. Each backbone
    forward reuses the package's decoder and ``lm_head`` helpers (``final_hidden``, ``logits_or_head``), so a role costs
    exactly what it costs in the shared design and only the number of backbones differs.
    """

    def __init__(self, lm: nn.Module, ref_lm: nn.Module, critic: nn.Module, value_head: nn.Linear) -> None:
        super().__init__()
        self.lm = lm
        """The policy: ``peft.PeftModel`` (LoRA) or the causal LM (full)."""
        self.ref_lm = ref_lm.requires_grad_(False).eval()
        """Frozen copy of the base causal LM."""
        self.critic = critic
        """The critic's own decoder (no ``lm_head``), trained in full as TRL trains its value model."""
        self.value_head = value_head
        """Final hidden state of ``critic`` -> V(s), float32."""
        self.seconds: Counter[str] = Counter()
        """Seconds spent in the policy and the critic part of ``mode="policy"`` calls (read and cleared by callers)."""
        self.clock: Callable[[], float] = time.perf_counter

    def train(self, mode: bool = True) -> SeparatePolicyValue:
        super().train(mode)
        self.ref_lm.eval()
        return self

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        mode: str = "policy",
        logits_slice: tuple[int, int] | None = None,
        packing: bool = False,
        logits_mask: Tensor | None = None,
        head: HeadFn | None = None,
        head_chunk_size: int | None = None,
        **generate_kwargs: Any,
    ) -> tuple[Any, Tensor] | Any:
        attention_mask = attention_mask.long()
        if mode == "generate":
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        if generate_kwargs:
            raise TypeError(f"Unexpected arguments for mode={mode!r}: {sorted(generate_kwargs)}.")
        inputs = (input_ids, attention_mask, logits_slice, packing)

        def outputs(causal_lm: nn.Module, hidden: Tensor) -> Any:  # as PolicyValueModel.forward
            return logits_or_head(causal_lm, hidden, logits_mask, head, head_chunk_size)

        if mode == "ref":
            return outputs(self.ref_lm, final_hidden(self.ref_lm, *inputs))
        started = self.clock()
        policy = unwrap_peft(self.lm)
        logits = outputs(policy, final_hidden(policy, *inputs))
        middle = self.clock()
        # LlamaModel.get_decoder() is the model itself, so final_hidden runs the critic's decoder.
        hidden = final_hidden(self.critic, *inputs)
        values = self.value_head(hidden.float()).squeeze(-1)
        self.seconds["policy"] += middle - started
        self.seconds["critic"] += self.clock() - middle
        return logits, values


def build_separate(cfg: PolicyConfig, lora: LoraConfig, tokenizer: Any) -> SeparatePolicyValue:
    """Policy, reference copy and critic backbone from one random init (the same init ``build_policy`` draws)."""
    full = build_policy(cfg, LoraConfig(enabled=False), tokenizer)  # trainable LM, frozen copy, value head
    critic = copy.deepcopy(full.lm.get_decoder()).requires_grad_(True)
    lm = _attach_lora(full.lm, lora) if lora.enabled else full.lm  # the adapter build_policy attaches
    return SeparatePolicyValue(lm, full.ref_lm, critic, full.value_head)


def build_model(design: str, cfg: PolicyConfig, lora: LoraConfig, tokenizer: Any) -> nn.Module:
    if design == "shared":
        return build_policy(cfg, lora, tokenizer)
    return build_separate(cfg, lora, tokenizer)


# -------------------------------------------------------------------------------------------- parameter accounting
def _unique_bytes(params: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages among ``params`` (a tensor reached twice counts once)."""
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in params}.values())


def role_parameters(model: nn.Module) -> dict[str, list[Tensor]]:
    """The parameters each role reads in a forward: policy, reference and critic."""
    if isinstance(model, SeparatePolicyValue):
        return {
            "policy": list(model.lm.parameters()),
            "reference": list(model.ref_lm.parameters()),
            "critic": [*model.critic.parameters(), *model.value_head.parameters()],
        }
    assert isinstance(model, PolicyValueModel)
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


def parameter_bytes(model: nn.Module) -> dict[str, int]:
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

    ``generate_rollout`` samples (through ``mode="generate"``, or an engine that calls the LM directly), then calls
    the model with ``mode="policy"``, then ``"ref"``; the marks split its wall time into three phases without
    changing the code it runs. The marks also keep every scoring and update call's input shape (for model FLOPs),
    and hooks on the LoRA ``A`` matrices record whether sampling ran the adapter or merged weights (no adapter matmuls).
    """

    def __init__(self, model: nn.Module, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.marks: dict[tuple[str, str], float] = {}
        self.active = False
        self.sampling_adapter_rows = 0
        """Rows the adapters' ``A`` matrices saw before the first policy forward of this rollout."""
        self.calls: list[ModelCall] = []
        model.register_forward_pre_hook(self._start, with_kwargs=True)
        model.register_forward_hook(self._end, with_kwargs=True)
        for name, module in model.named_modules():
            if name.split(".")[-2:-1] == ["lora_A"]:  # peft: <layer>.lora_A.<adapter name>
                module.register_forward_hook(self._adapter)

    def reset(self) -> None:
        """Forget the previous rollout's marks."""
        self.marks.clear()
        self.sampling_adapter_rows = 0
        self.calls.clear()

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
        if self.active:
            self.marks["end", kwargs.get("mode", "policy")] = self.clock()

    def split(self, started: float, ended: float) -> dict[str, float]:
        """Phase seconds: generate (to the end of ``mode="generate"``, cut at the stop token excluded; to the policy
        forward for an engine that calls the LM directly), old logprobs and values (to the start of the reference
        forward), reference (to the end of the rollout)."""
        generated = self.marks.get(("end", "generate"), self.marks["start", "policy"])
        ref_started = self.marks["start", "ref"]
        if not started <= generated <= self.marks["start", "policy"] <= ref_started <= ended:
            raise RuntimeError(f"generate_rollout called the model in an unexpected order: {self.marks}")
        return {
            "generate": generated - started,
            "old_logprobs_values_forward": ref_started - generated,
            "ref_forward": ended - ref_started,
        }


# ------------------------------------------------------------------------------------------------------ model FLOPs
# Conventions of lightning_rlhf.flops: matmuls only, so scoring, advantages, the grad norm and AdamW count 0 FLOPs.
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
    """The phases in order, with the rollout (as ``--trainer`` times it) and the iteration total."""
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
            engine=args.engine,
            merge_lora=not args.no_merge_lora,
            cast_weights_once=not args.no_cast_weights_once,
        ),
        "ppo": PPOConfig(ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches),
        "reward": CharFractionReward(),
    }


def unreachable_eos(model: nn.Module) -> int:
    """A token id the LM cannot sample (one past its logits' columns), so no response stops early."""
    return unwrap_peft(model.lm).get_output_embeddings().weight.shape[0]


def precision_context(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    """``bf16-mixed``: bfloat16 autocast around a whole iteration, as Lightning's precision plugin wraps
    ``training_step``, and like it without autocast's weight-cast cache: the cache keeps a weight's bfloat16 copy until
    the autocast region ends, so after an optimizer step inside the region the next forward would read the old
    weights. ``bf16-true`` holds the LM's weights in bfloat16 instead (``policy.dtype``), without autocast."""
    if args.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


class BenchPPOModule(PPOModule):
    """``PPOModule`` with a choice of design and responses that never stop before ``max_new_tokens``."""

    def __init__(self, design: str = "shared", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.design = design

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_model(self.design, self.policy_config, self.lora_config, self.tokenizer)

    def decode_responses(self, rollout: Rollout) -> list[str]:
        """As ``PPOModule``'s, with a preset's ids past the byte tokenizer folded into its range (the reward needs some
        text; the scores do not change the timed work)."""
        rows = [ids[mask].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)]
        return self.tokenizer.batch_decode(fold_to_tokenizer(rows, len(self.tokenizer)), skip_special_tokens=True)

    def _rollout(self, batch: dict[str, Any]) -> Rollout:
        assert self.model is not None
        return generate_rollout(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            self.generation,
            eos_token_id=unreachable_eos(self.model),
            pad_token_id=self.tokenizer.pad_token_id,
            micro_batch_size=self.ppo.micro_batch_size,
        )


def check_full_length(rollout: Rollout, max_new_tokens: int) -> None:
    if rollout.response_ids.shape[1] != max_new_tokens or not bool(rollout.response_mask.all()):
        raise RuntimeError("A response stopped before max_new_tokens; the designs would see different token counts.")


# ---------------------------------------------------------------------------------------------------- direct mode
def score_and_advantages(module: PPOModule, prompts: list[str], rollout: Rollout, clock: Callable[[], float]):
    """Steps 2-4 of ``PPOModule.training_step`` without the metric bookkeeping; returns (rollout, seconds)."""
    started = clock()
    raw = module.reward(
        prompts,
        module.decode_responses(rollout),
        prompt_ids=rollout.prompt_ids,
        response_ids=rollout.response_ids,
        response_mask=rollout.response_mask,
    )
    scores = module.process_scores(validate_scores(raw, len(rollout), "reward").to(module.device), rollout.ended)
    scored = clock()
    ppo, mask = module.ppo, rollout.response_mask
    kl = torch.where(mask, F.kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, ppo.kl_estimator), 0.0)
    rewards = F.token_rewards(scores, kl, mask, module.kl_ctl.value)
    advantages, returns = F.gae(rewards, rollout.old_values, mask, ppo.gamma, ppo.gae_lambda)
    if ppo.whiten_advantages:
        advantages = F.masked_whiten(advantages, mask)
    rollout = dataclasses.replace(
        rollout, scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns
    )
    return rollout, {"score": scored - started, "advantages": clock() - scored}


def minibatch_loss(module: PPOModule, part: Rollout) -> Tensor:
    """``PPOModule._loss`` without the metric bookkeeping: the package's own ``ppo_objective``."""
    return ppo_objective(module.model, part, module.ppo, module.generation.temperature).loss


def ppo_update(
    module: PPOModule, rollout: Rollout, optimizer: torch.optim.Optimizer, clock: Callable[[], float]
) -> dict[str, float]:
    """``PPOModule._ppo_update`` at its defaults (one micro-batch per minibatch, no early stop) outside Lightning.

    Returns:
        Seconds per sub-phase, summed over the minibatches.
    """
    ppo = module.ppo
    params = [p for group in optimizer.param_groups for p in group["params"]]
    seconds: Counter[str] = Counter()
    for _ in range(ppo.ppo_epochs):
        for minibatch in rollout.minibatches(ppo.num_minibatches, module.shuffle_generator):
            t0 = clock()
            loss = minibatch_loss(module, minibatch)
            t1 = clock()
            loss.backward()
            t2 = clock()
            # PPOModule._grad_norm (logged as policy/grad_norm), read on the host with the loss for the skip check.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if not (math.isfinite(float(grad_norm)) and math.isfinite(float(loss.detach()))):
                raise RuntimeError("non-finite loss or gradient norm; the timing would not be of a normal update")
            if ppo.max_grad_norm is not None:  # clipped with the norm just computed, as PPOModule (commit 11b7ae1)
                torch.nn.utils.clip_grads_with_norm_(params, ppo.max_grad_norm, grad_norm)
            t3 = clock()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = clock()
            seconds.update(forward_loss=t1 - t0, backward=t2 - t1, grad_norm_clip=t3 - t2, optimizer_step=t4 - t3)
    return dict(seconds)


_COMPILED: dict[int, nn.Module] = {}
"""Compiled wrapper of each decoder layer (by id), built on first use so later iterations reuse its graphs."""


@contextlib.contextmanager
def compiled_layers(model: nn.Module) -> Iterator[None]:
    """Regional ``torch.compile``: every decoder layer of every backbone (the policy's, and the separate design's
    critic) replaced by its compiled wrapper for the body, and put back afterwards (sampling stays eager)."""
    decoders = [unwrap_peft(model.lm).get_decoder()]
    if isinstance(model, SeparatePolicyValue):
        decoders.append(model.critic)
    originals = [list(decoder.layers) for decoder in decoders]
    try:
        for decoder in decoders:
            for i, layer in enumerate(decoder.layers):
                if id(layer) not in _COMPILED:
                    _COMPILED[id(layer)] = torch.compile(layer, dynamic=True)
                decoder.layers[i] = _COMPILED[id(layer)]
        yield
    finally:
        for decoder, layers in zip(decoders, originals, strict=True):
            for i, layer in enumerate(layers):
                decoder.layers[i] = layer


def run_direct(args: argparse.Namespace, device: torch.device, prompts: list[str]) -> dict[str, Any]:
    module = BenchPPOModule(design=args.design, **make_module_kwargs(args))
    module.configure_model()
    module.to(device).train()
    optimizer = module.configure_optimizers()
    module.shuffle_generator.manual_seed(args.seed)
    clock = make_clock(device)
    marks = ModeMarks(module.model, clock)
    if isinstance(module.model, SeparatePolicyValue):
        module.model.clock = clock
    data = PromptDataModule(prompts=prompts, batch_size=args.batch, shuffle=False, tokenizer=module.tokenizer)
    data.setup("fit")
    eos, pad = unreachable_eos(module.model), module.tokenizer.pad_token_id
    iterations: list[dict[str, float]] = []
    tokens: list[dict[str, Any]] = []
    for batch in data.train_dataloader():
        prompt_ids, prompt_mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
        module.model.zero_grad(set_to_none=True)
        seconds: dict[str, float] = {}
        split = getattr(module.model, "seconds", None)
        marks.reset()
        with precision_context(args, device):
            started = clock()
            marks.active = True
            rollout = generate_rollout(
                module.model, prompt_ids, prompt_mask, module.generation, eos_token_id=eos, pad_token_id=pad
            )
            rolled = clock()
            seconds |= marks.split(started, rolled)
            if split is not None:  # the separate design's policy and critic forwards inside old_logprobs_values_forward
                seconds |= {f"rollout_{k}_forward": v for k, v in split.items()}
                split.clear()
            check_full_length(rollout, args.max_new_tokens)
            rollout, score_seconds = score_and_advantages(module, batch["prompts"], rollout, clock)
            seconds |= score_seconds
            update_started = clock()
            with compiled_layers(module.model) if args.compile_update else contextlib.nullcontext():
                update_seconds = ppo_update(module, rollout, optimizer, clock)
            seconds["update"] = clock() - update_started
        marks.active = False
        tokens.append(token_counts(prompt_mask, rollout.response_ids.shape[1], marks))
        seconds |= {f"update_{k}": v for k, v in update_seconds.items()}
        if split is not None:
            seconds |= {f"update_{k}_forward": v for k, v in split.items()}
            split.clear()
        seconds["total"] = clock() - started
        iterations.append(seconds)
    return {
        "iterations": iterations,
        "tokens": tokens,
        "shape": DecoderShape.from_config(module.model.lm.config),
        "generation": dataclasses.asdict(module.generation),
        "param_bytes": parameter_bytes(module.model),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "compiled_layers": len(_COMPILED),
    }


# --------------------------------------------------------------------------------------------------- trainer mode
def run_trainer(args: argparse.Namespace, device: torch.device, prompts: list[str]) -> dict[str, Any]:
    from lightning.pytorch import Callback, Trainer

    iterations: list[dict[str, float]] = []
    tokens: list[dict[str, Any]] = []
    clock = make_clock(device)

    class IterationTimes(Callback):
        marks: ModeMarks | None = None

        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.marks = self.marks or ModeMarks(pl_module.model, clock)
            self.marks.reset()
            self.marks.active = True
            self.started = clock()

        def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            wall = clock() - self.started
            self.marks.active = False
            # Responses are max_new_tokens long: checked below.
            tokens.append(token_counts(batch["prompt_mask"], args.max_new_tokens, self.marks))
            metrics = trainer.callback_metrics
            total, rollout = float(metrics["perf/iteration_sec"]), float(metrics["perf/rollout_sec"])
            if float(metrics["rollout/response_len"]) != args.max_new_tokens:
                raise RuntimeError("A response stopped before max_new_tokens.")
            iterations.append(
                {"rollout_score_advantages": rollout, "update": total - rollout, "total": total, "step_wall": wall}
            )

    module = BenchPPOModule(design=args.design, **make_module_kwargs(args))
    data = PromptDataModule(prompts=prompts, batch_size=args.batch, shuffle=False)
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16-mixed" else "32-true",  # bf16-true: policy.dtype
        max_steps=args.warmup + args.iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[IterationTimes()],
    )
    trainer.fit(module, datamodule=data)
    return {
        "iterations": iterations,
        "tokens": tokens,
        "shape": DecoderShape.from_config(module.model.lm.config),
        "generation": dataclasses.asdict(module.generation),
        "param_bytes": parameter_bytes(module.model),
        "optimizer_state_bytes": optimizer_state_bytes(module.optimizers().optimizer),
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
    ppo.add_argument("--engine", choices=("auto", "cached", "hf"), default="auto", help="generation.engine")
    ppo.add_argument("--no-merge-lora", action="store_true", help="generation.merge_lora false (sample unmerged)")
    ppo.add_argument(
        "--no-cast-weights-once",
        action="store_true",
        help="generation.cast_weights_once false (bf16-mixed sampling casts the weights at every decode step)",
    )
    ppo.add_argument(
        "--compile-update",
        action="store_true",
        help="experiment (direct mode): torch.compile every decoder layer (regional, dynamic shapes) for the update; "
        "sampling and scoring stay eager. The first iteration compiles: use --warmup >= 1",
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
    run.add_argument("--trainer", action="store_true", help="time trainer.fit iterations of PPOModule instead")
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
    if args.compile_update and (args.trainer or args.warmup < 1):
        parser.error("--compile-update needs direct mode (no --trainer) and --warmup >= 1 (the compiling iteration)")
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
            "mode": "trainer" if args.trainer else "direct",
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
            "compiled_layers": result.get("compiled_layers", 0),
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
        result = (run_trainer if args.trainer else run_direct)(args, device, prompts)
    rates.append(matmul_flops_per_sec(device, dtype))
    summary = summarize(args, device, result, time.perf_counter() - started, rates)
    print(json.dumps(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
