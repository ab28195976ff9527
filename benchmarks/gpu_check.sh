#!/usr/bin/env bash
# The GPU check: one command of under 8 minutes on a GPU host (benchmarks/NOTES.md). First,
# on any machine where pip reaches PyPI, then copy .whl/ into the checkout on the GPU host:
#     bash benchmarks/fetch_gpu_wheels.sh
# then, on the GPU host, in the checkout:
#     bash benchmarks/gpu_check.sh
#
# 1. installs the wheels in .whl/ (grain, ml-collections, ...: benchmarks/gpu_env.sh), and
#    links the copied Fashion-MNIST where the tests look for it;
# 2. env.txt: nvidia-smi, versions, what JAX sees;
# 3. tests.log: the project's model and distillation tests on the GPU (not the 8-device test);
# 4. server_step_S.{json,log}, server_step_B.{json,log}: benchmarks/server_step.py for ViT-S/16
#    and ViT-B/16 at 224 px, the project's step against the PyTorch peer, in the order of
#    PARTS (what matters most first: docs/performance.md's full-token comparison, then the masked views,
#    then cuDNN attention), each size within its share of the time left;
# 5. summary.txt: one line per timed part, and the tests' result.
# Everything goes to $OUT (default /tmp/gpu_check), flat, 7 files. GPU_CHECK_SECONDS (default
# 460) is the whole budget.
set -uo pipefail  # not -e: one failing stage must not stop the others
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL="${GPU_CHECK_SECONDS:-460}"
left() { echo $((START + TOTAL - $(date +%s))); }
min() { echo $(($1 < $2 ? $1 : $2)); }
PARTS="full/jax,full/eager,full/compile,masked/jax,masked/eager,full/jax:cudnn"
PARTS="$PARTS,masked/jax:cudnn,masked/compile"

# ---------------------------------------------------------------- 1. Wheels and data
source benchmarks/gpu_env.sh

# ---------------------------------------------------------------- 2. The machine
{
  date -u +%FT%TZ
  nvidia-smi
  python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "grain",
             "ml_collections", "pydicom", "tensorboardX", "torch", "timm"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # one missing package must not hide the others
        print(name, "FAILED:", type(e).__name__, e)
import jax, torch
print("jax devices:", jax.devices(), "| backend:", jax.default_backend())
print("torch cuda:", torch.cuda.is_available(), torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---------------------------------------------------------------- 3. Tests on the GPU
# conftest.py picks the CPU unless JAX_PLATFORMS says otherwise. The tests compare with
# float32 references, so matmuls run at full float32 precision rather than TF32.
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout -k 5 "$(min 90 "$(left)")" python3 -m pytest tests/test_models.py \
  tests/test_distill.py -q -k "not eight_devices" -p no:cacheprovider --durations=5 \
  >"$OUT/tests.log" 2>&1
echo "pytest exit status $? after $(($(date +%s) - START)) s" >>"$OUT/tests.log"
tail -12 "$OUT/tests.log"

# ---------------------------------------------------------------- 4. Benchmarks
bench() {  # size, seconds for it; a part still running 25 s past them is stopped
  local size=$1 budget=$2
  if [ "$budget" -lt 40 ]; then
    echo "$size: skipped, only $budget s left" | tee "$OUT/server_step_$size.log"
    return
  fi
  timeout -k 10 "$((budget + 25))" python3 -m benchmarks.server_step --size="$size" \
    --parts="$PARTS" --time_budget_s="$budget" --out="$OUT/server_step_$size.json" \
    2>&1 | tee "$OUT/server_step_$size.log"
}
bench S "$(min 150 $(( ($(left) - 20) / 2 - 25 )))"
bench B "$(( $(left) - 35 ))"

# ---------------------------------------------------------------- 5. Summary
{
  echo "gpu_check $(date -u +%FT%TZ), $(($(date +%s) - START)) s"
  grep -hE "matmul|^ *[A-Za-z0-9]+ +(full|masked) |skipped, only" "$OUT"/server_step_*.log
  grep -h "passed\|failed\|pytest exit" "$OUT/tests.log"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
