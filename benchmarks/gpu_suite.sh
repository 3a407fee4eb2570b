#!/usr/bin/env bash
# The GPU numbers of benchmarks/README.md: Qwen2-0.5B shapes (random weights), bfloat16, one GPU.
#
#   bash benchmarks/gpu_suite.sh STAGES [OUT_DIR]
#
# STAGES: comma-separated, from tests (GPU tests), update (PPO iteration by phase, both designs), rollout (sampling
# engines vs plain generate), more (larger batch, bf16 weights, trainer.fit cross-check), packing (ppo.packing
# against padding, responses of 1-128 tokens), compile (regional torch.compile of the update, paired with eager),
# chunks (ppo.lm_head_chunk_size: peak memory and time of one update micro-batch), profile (profiler tables of one PPO
# epoch's update, LoRA and full), vllm (generation.engine vllm, which needs `pip install 'lightning-rlhf[vllm]'`:
# sampling beside the cached engine, then a whole PPO iteration with each engine, with nvidia-smi's peak memory);
# "all" runs every stage. Stages that have not run on a GPU yet: more, packing, compile, chunks, profile, vllm. With a
# 15-minute device budget, run "tests,packing,compile" as one command (about 10 minutes at most by the limits below),
# "chunks,more" in the next lease, "vllm" alone in a third (12.5 minutes at most, about 5 expected).
# Each run's JSON line goes to OUT_DIR/<stage>.jsonl (default benchmarks/out), its log to OUT_DIR/<stage>.log. A run
# that fails or overruns its time limit is logged and the next one starts.
set -uo pipefail
cd "$(dirname "$0")/.."
stages=",${1:-all},"
has() { [[ $stages == *",$1,"* || $stages == ",all," ]]; }
out=${2:-${OUT:-benchmarks/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PRESET=${PRESET:-qwen2-0.5b}  # qwen2-tiny: a quick CPU check of this script
# Qwen2-0.5B at an RLHF-sized batch: 64 prompts of 64-128 tokens, 128 new tokens, 4 epochs x 4 minibatches.
MODEL=(--preset "$PRESET" --prompt-len 64 128 --max-new-tokens 128 --peak-tflops 989)

bench() {  # bench STAGE LIMIT_SECONDS SCRIPT ARGS...
  local stage=$1 limit=$2
  shift 2
  echo "=== $(date +%T) $*" | tee -a "$out/$stage.log"
  timeout "$limit" python3 "$@" >>"$out/$stage.jsonl" 2>>"$out/$stage.log" || echo "FAILED ($?): $*" | tee -a "$out/$stage.log"
  tail -c 600 "$out/$stage.jsonl"; echo
}

bench_gpu_memory() {  # as bench, with nvidia-smi's memory.used sampled every 0.5 s and its peak logged: it counts
  # vLLM's weights and KV cache whichever allocator holds them (sleep mode's go through vLLM's own CuMem pool)
  local stage=$1 samples="$out/$1.memory_used_mib" sampler=
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$samples" &
    sampler=$!
  fi
  bench "$@"
  if [[ -n $sampler ]]; then
    kill "$sampler"; wait "$sampler" 2>/dev/null
    echo "peak nvidia-smi memory.used: $(sort -n "$samples" | tail -n 1) MiB" | tee -a "$out/$stage.log"
  fi
}

if has tests; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/env.txt"
  python3 -c "import torch, transformers, peft, lightning; print(torch.__version__, transformers.__version__, peft.__version__, lightning.__version__)" | tee -a "$out/env.txt"
  timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_generation.py 2>&1 | tail -n 30 | tee "$out/tests.log"
fi


if has update; then
  # One PPO iteration by phase, this package's design and the TRL-style one, LoRA and full fine-tuning.
  for design in shared separate; do
    bench update 120 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 3 --warmup 1 --design $design
    bench update 120 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 3 --warmup 1 --design $design --full
  done
fi

if has rollout; then
  # Sampling engines vs plain generate: bf16 weights (bf16-true), then bf16 autocast over float32 weights.
  bench rollout 150 benchmarks/generation.py --preset "$PRESET" --batch 64 --prompt-len 64 128 --max-new-tokens 128 --repeats 3
  bench rollout 150 benchmarks/generation.py --preset "$PRESET" --batch 64 --prompt-len 64 128 --max-new-tokens 128 --repeats 3 --stop-fraction 0.01
  bench rollout 150 benchmarks/generation.py --preset "$PRESET" --batch 64 --prompt-len 64 128 --max-new-tokens 128 --repeats 3 --precision bf16-mixed
fi

if has more; then
  # Larger minibatches (256 prompts: 64 per minibatch), LoRA over bf16 weights.
  bench more 150 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 256 --iterations 2 --warmup 1
  bench more 150 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 256 --iterations 2 --warmup 1 --full
  bench more 120 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 3 --warmup 1 --precision bf16-true
  # generation.cast_weights_once (bf16-mixed sampling casts the weights once per rollout) on and off, same machine.
  bench more 120 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 2 --warmup 1 --no-cast-weights-once
  bench more 120 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 2 --warmup 1
fi

if has packing; then
  # Scoring and one update epoch, packed vs padded, bf16 weights; responses uniform in 1..128 and full length.
  bench packing 200 benchmarks/packing.py --preset "$PRESET" --batch 64 --prompt-len 64 128 --max-new-tokens 128 \
    --lengths uniform full --repeats 3 --precision bf16-true
fi

if has compile; then
  # Experiment: regional torch.compile of the decoder layers for the update (sampling stays eager), paired with eager.
  bench compile 240 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 2 --warmup 1 --compile-update
  bench compile 150 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 2 --warmup 1
fi

if has chunks; then
  # One update micro-batch of 16 x 512 response tokens (8192 x 151,936 logits), bf16 weights: peak CUDA memory and time.
  bench chunks 240 benchmarks/lm_head_chunks.py --preset "$PRESET" --precision bf16-true --batch 16 --prompt-len 64 128 \
    --max-new-tokens 512 --chunks none 2048 512 --repeats 3
fi

if has profile; then
  # One epoch of 4 minibatches keeps the trace small enough to summarize in a few minutes (16 did not finish in 100 s).
  for ft in "" --full; do
    echo "=== $(date +%T) profile $ft" | tee -a "$out/profile.log"
    timeout 300 python3 benchmarks/profile_phases.py "${MODEL[@]}" --batch 64 --ppo-epochs 1 $ft >>"$out/profile.txt" 2>>"$out/profile.log" \
      || echo "FAILED ($?): profile $ft" | tee -a "$out/profile.log"
  done
  grep "#####" "$out/profile.txt"
fi

if has vllm; then
  # generation.engine vllm, bf16 (generation.py: bf16-true; ppo_iteration.py: bf16-mixed, the engine in bfloat16).
  # Targets: vllm >= 10x the cached engine's tokens/s; a whole PPO iteration < 3 s (12-15 s with cached so far, the
  # cached run here pairs it on this machine). The iteration's generate phase includes the policy's push into the
  # engine and its wake-up from sleep mode; parameter bytes per role and peak CUDA memory are in the JSON line, the
  # device's peak (vLLM's share included) in vllm.log. PRESET=qwen2-tiny cannot check this stage on a CPU: its head
  # size 16 is below vLLM's CPU minimum of 32 (the package says so at the engine's start).
  if python3 -c "import vllm; print('vllm', vllm.__version__)" | tee -a "$out/env.txt"; then
    bench_gpu_memory vllm 300 benchmarks/generation.py --preset "$PRESET" --batch 64 --prompt-len 64 128 \
      --max-new-tokens 128 --repeats 3 --variants cached_merged vllm
    bench_gpu_memory vllm 300 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 2 --warmup 1 --engine vllm
    bench_gpu_memory vllm 150 benchmarks/ppo_iteration.py "${MODEL[@]}" --batch 64 --iterations 2 --warmup 1 --engine cached
  else
    echo "SKIPPED: vLLM is not installed (pip install 'lightning-rlhf[vllm]')" | tee -a "$out/vllm.log"
  fi
fi
