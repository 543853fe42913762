#!/usr/bin/env bash
# The GPU benchmarks of issue 23 in one run, on one H100/H200 (about 10 minutes), from the repo root
# with the package installed:
#
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.log     # on the GPU
#   bash benchmarks/gpu.sh --dry-run              # (or DRY_RUN=1) every step on the CPU at the tiny preset
#
# 1. prefill: LLaVA-1.5-7B, bf16, V = 576 / 2304 / 2880; self (cuDNN via attention_impl auto),
#    composite, cross, and the vision tower; transformers' LLaVA (SDPA) and the PyTorch composite
#    port beside them when torch is importable (prefill.py --torch).
# 2. train step: LLaVA-1.5 stage 1 (projector trained, tower and LLM frozen) at the full 7B shape,
#    bf16 parameters, remat full, 32 rows of 576 visual + 128 text tokens (the recipe's 256 rows over
#    8 GPUs): tokens/s and MFU, self and composite. Memory: 7.06B parameters x 2 B = 14.1 GB; AdamW
#    moments of the 21M projector weights only; no gradients of frozen weights; remat full keeps one
#    layer input per layer, 32 x 704 x 4096 x 2 B x 32 layers = 5.9 GB; one layer's recompute
#    (MLP 3 x 0.5 GB, scores and probabilities 32 x 32 x 704^2 in f32 with their gradients, ~8 GB)
#    and the f32 logits (0.5 GB) -> about 30 GB of 80.
# 3. decode: TTFT, ms/token and tokens/s of greedy decoding at batch 1 / 8 / 32 after V = 576 / 2304
#    prompts, every mode (benchmarks/decode.py), beside transformers' generate when torch is importable.
#
# Each step prints a header, its command and its time (or FAILED: the next steps still run, and the
# script exits 1 at the end); the total wall time comes last.
# WITH_TORCH=auto|1|0: the PyTorch rows of steps 1 and 3 when torch and transformers import (auto,
# the default), always, or never.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's ee_mllm_jax, whatever is installed
PYTHON=${PYTHON:-python}
WITH_TORCH=${WITH_TORCH:-auto}
if [ "$DRY_RUN" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""  # JAX and torch on the CPU
  # Compile fast (LLVM at -O0): the dry run checks the plumbing, shapes and compiles, not speed.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
fi
START=$(date +%s)

echo "=== gpu.sh $( [ "$DRY_RUN" = 1 ] && echo "DRY RUN (CPU, tiny preset)" || echo "(one GPU, LLaVA-1.5-7B)" ) ==="
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || echo "nvidia-smi -L failed"
else
  echo "nvidia-smi: not found"
fi
"$PYTHON" - "$DRY_RUN" <<'EOF'
import sys
import jax
devices = jax.devices()
print(f"jax {jax.__version__}: {devices} ({devices[0].device_kind})")
if sys.argv[1] != "1" and devices[0].platform != "gpu":
  sys.exit(f"gpu.sh: JAX sees no GPU (platform {devices[0].platform!r}); install jax[cuda12] or run "
           "`bash benchmarks/gpu.sh --dry-run` to check the steps on the CPU")
EOF

STEP=0
FAILED=()
step() {  # step TITLE CMD...: header, command, run, time; a failed step is reported, the next ones run
  local title=$1; shift
  STEP=$((STEP + 1))
  local t0 rc=0
  t0=$(date +%s)
  echo
  echo "=== [$STEP/3] $title ==="
  echo "\$ $*"
  "$@" || rc=$?
  if [ "$rc" = 0 ]; then
    echo "--- [$STEP/3] $title: $(( $(date +%s) - t0 )) s"
  else
    echo "--- [$STEP/3] $title: FAILED (exit $rc) after $(( $(date +%s) - t0 )) s"
    FAILED+=("$STEP")
  fi
}

if [ "$DRY_RUN" = 1 ]; then
  PREFILL_SHAPE=(--preset tiny --dtype bfloat16 --visual 16 32 --repeats 1 --cross-every 2
                 --resampler-latents 4 --resampler-depth 1)
  TRAIN_SHAPE=(--preset=tiny --batch=2 --text_len=8 --steps=1)
  DECODE_SHAPE=(--preset tiny --dtype bfloat16 --visual 16 --batch 1 2 --new-tokens 2 --repeats 1 --cross-every 2
                --resampler-latents 4 --resampler-depth 1)
else
  PREFILL_SHAPE=(--preset llava-1.5-7b --dtype bfloat16 --visual 576 2304 2880)
  TRAIN_SHAPE=(--preset=llava-1.5-7b --batch=32 --text_len=128 --steps=5)
  DECODE_SHAPE=(--preset llava-1.5-7b --dtype bfloat16 --visual 576 2304 --batch 1 8 32 --new-tokens 32)
fi

case "$WITH_TORCH" in
  auto) if "$PYTHON" -c "import torch, transformers" 2>/dev/null; then WITH_TORCH=1; else
          WITH_TORCH=0; echo "note: torch / transformers not importable: no PyTorch rows"; fi ;;
  0|1) ;;
  *) echo "gpu.sh: WITH_TORCH must be auto, 0 or 1, got $WITH_TORCH" >&2; exit 2 ;;
esac
PREFILL_TORCH=(); DECODE_TORCH=(--skip-torch)
[ "$WITH_TORCH" = 1 ] && PREFILL_TORCH=(--torch) && DECODE_TORCH=()

# JAX preallocates 75% of the GPU unless told not to; torch shares the device in steps 1 and 3.
XLA_PYTHON_CLIENT_PREALLOCATE=false step "prefill table (self / composite / cross; bf16)" \
  "$PYTHON" benchmarks/prefill.py "${PREFILL_SHAPE[@]}" "${PREFILL_TORCH[@]}"

step "stage-1 train step (projector only; bf16 params, remat full): tokens/s and MFU" \
  "$PYTHON" benchmarks/train_step.py "${TRAIN_SHAPE[@]}" --num_images=1 --dtype=bfloat16 \
  --param_dtype=bfloat16 --remat=full --trainable=projector/

XLA_PYTHON_CLIENT_PREALLOCATE=false step "decode: TTFT, ms/token, tokens/s (greedy; every mode)" \
  "$PYTHON" benchmarks/decode.py "${DECODE_SHAPE[@]}" "${DECODE_TORCH[@]}"

TOTAL=$(( $(date +%s) - START ))
echo
echo "=== total wall time: $TOTAL s ($(( TOTAL / 60 )) min $(( TOTAL % 60 )) s) ==="
if [ "$DRY_RUN" != 1 ] && [ "$TOTAL" -gt 600 ]; then
  echo "note: over the 10-minute budget"
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu.sh: step(s) ${FAILED[*]} failed" >&2
  exit 1
fi
