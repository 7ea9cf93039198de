#!/usr/bin/env bash
# Every GPU table of the README ("Speed", "On a GPU"), one command, on one CUDA GPU:
#
#     bash bench/gpu.sh [STAGES] [LOG_DIR]
#
# STAGES: comma-separated, in the order given (default: all, in this order):
#   train       the training step, `mha`, both layer layouts, next to HF transformers eager and torch.compile
#   decode32    greedy decoding, batch 32, next to openai-whisper and HF generate; also the scanned decoder
#   decode1     greedy decoding, batch 1, likewise; then flax alone: checking every step, XLA for every
#               attention, the layer scan (forcing cuDNN everywhere is refused: a prompt written into the
#               cache at a traced offset is no mask cuDNN takes)
#   tests       python -m pytest -m gpu (cuDNN against the float32 XLA path)
#   mechanisms  the training step of every mechanism, unrolled, flax alone; hybrid's and integrated's also
#               with the encoder's band through XLA's blocks, which decides whether cuDNN's form pays
#   flags       XLA flag candidates, flax alone: CUDA graphs over the decoding loop (command buffers
#               with WHILE and CONDITIONAL), dynamic-slice fusion in the scanned training step, and
#               the unrolled step's products all given to cuBLAS (the deviceless program, read with
#               bench/gpu_program.py, adds biases in cuBLAS's epilogue, where Triton's GEMM fusions
#               take a bias only when it is a parameter of the program, never a layer's slice)
#   profile     flax alone: the longest XLA operations of one decoding call at batch 1 and 32 and of
#               the training step (traces under TRACE_DIR, default /tmp/gpu-traces: too large to
#               bring back); a loop-invariant copy shows as a copy or transpose run once per token
#
# DRY_RUN=1 prints each stage's command instead of running it (tests/test_bench_gpu_program.py
# reads every one with its script's own argument parser, so a lent GPU's minutes never go to a
# misspelt flag).
#
# Each stage writes LOG_DIR/STAGE.log (default LOG_DIR: runs/gpu-bench) and its wall time to
# LOG_DIR/summary.txt. DEADLINE_S (default 540): a stage that would start after that many seconds
# from the start is skipped, so a leased machine's time limit never cuts a stage's table off.
# The whole list takes longer than one 10-minute lease call: split it, e.g. `train,decode32,decode1`
# then `tests,mechanisms,flags`.
#
# Packages a GPU image may lack (openai-whisper, soundfile): `bash bench/gpu.sh wheels` on a machine
# with PyPI saves them under .whl/ for Python 3.12 on x86-64; when .whl/ holds wheels, this script
# installs them into /tmp/site first (no index: for a machine that reaches none).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then
  set -e
  mkdir -p .whl
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl soundfile cffi pycparser more-itertools
  # openai-whisper is published as a source archive only: build its (pure Python) wheel here.
  python3 -m pip wheel --quiet --no-deps -w .whl openai-whisper
  ls .whl
  exit 0
fi

STAGES=${1:-train,decode32,decode1,tests,mechanisms,flags,profile}
LOG_DIR=${2:-runs/gpu-bench}
DEADLINE_S=${DEADLINE_S:-540}
TRACE_DIR=${TRACE_DIR:-/tmp/gpu-traces}
DRY_RUN=${DRY_RUN:-}
PY=${PYTHON:-python3}
SMALL=(--size small --precision bfloat16)
start=$SECONDS

stage() {  # stage NAME COMMAND...: run it unless past the deadline; log its output and wall time
  local name=$1
  shift
  if [ -n "$DRY_RUN" ]; then
    echo "$name:${XLA_FLAGS:+ XLA_FLAGS=$(printf %q "$XLA_FLAGS")} $*"
    return
  fi
  if ((SECONDS - start > DEADLINE_S)); then
    echo "$name: skipped (past DEADLINE_S=$DEADLINE_S)" | tee -a "$LOG_DIR/summary.txt"
    return
  fi
  local began=$SECONDS
  echo "== $name: $*" | tee -a "$LOG_DIR/$name.log"
  "$@" 2>&1 | tee -a "$LOG_DIR/$name.log"
  echo "$name: exit ${PIPESTATUS[0]}, $((SECONDS - began)) s" | tee -a "$LOG_DIR/summary.txt"
}

prepare() {  # the log folder, the environment, the wheels under .whl/, the versions
  mkdir -p "$LOG_DIR"
  export PYTHONUNBUFFERED=1
  # The decoder, the training step and the peers share one GPU: JAX takes what it needs, not 75%.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=.94
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY - <<'EOF' 2>&1 | tee "$LOG_DIR/versions.txt"
import importlib.metadata as m, jax
print("devices:", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "openai-whisper", "soundfile"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
EOF
}

[ -n "$DRY_RUN" ] || prepare

for s in ${STAGES//,/ }; do
  case $s in
    train)
      stage train $PY bench/train_step.py "${SMALL[@]}" --batch 32 --tokens 448 --mechanisms mha --layers both --no-torch-ref
      ;;
    decode32)
      stage decode32 $PY bench/inference.py "${SMALL[@]}" --batch 32 --new-tokens 128 --decode-scan
      ;;
    decode1)
      stage decode1 $PY bench/inference.py "${SMALL[@]}" --batch 1 --new-tokens 128
      stage decode1 $PY bench/inference.py "${SMALL[@]}" --batch 1 --new-tokens 128 --no-hf --no-openai \
        --check-every 1 --attention xla --decode-scan
      ;;
    tests)
      stage tests $PY -m pytest -m gpu -n 0 -p no:cacheprovider
      ;;
    mechanisms)
      stage mechanisms $PY bench/train_step.py "${SMALL[@]}" --batch 32 --tokens 448 --no-torch --layers unrolled \
        --mechanisms mha,biased,memory,dynamic_conv,integrated,hybrid --band cudnn,xla
      ;;
    flags)
      XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
        stage flags $PY bench/inference.py "${SMALL[@]}" --batch 1 --new-tokens 128 --no-hf --no-openai --check-every 1
      XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true" \
        stage flags $PY bench/train_step.py "${SMALL[@]}" --batch 32 --tokens 448 --mechanisms mha --layers scan --no-torch
      XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
        stage flags $PY bench/train_step.py "${SMALL[@]}" --batch 32 --tokens 448 --mechanisms mha --layers unrolled --no-torch
      ;;
    profile)
      for batch in 1 32; do
        stage profile $PY bench/inference.py "${SMALL[@]}" --batch $batch --new-tokens 128 --no-hf --no-openai \
          --repeats 2 --rounds 1 --profile "$TRACE_DIR/decode$batch"
      done
      stage profile $PY bench/train_step.py "${SMALL[@]}" --batch 32 --tokens 448 --mechanisms mha --no-torch \
        --layers unrolled --rounds 1 --profile "$TRACE_DIR/train"
      ;;
    *)
      echo "unknown stage '$s' (train, decode32, decode1, tests, mechanisms, flags, profile)" >&2
      exit 2
      ;;
  esac
done
[ -n "$DRY_RUN" ] && exit 0
echo "== summary ($LOG_DIR/summary.txt, every run so far)"
cat "$LOG_DIR/summary.txt"
