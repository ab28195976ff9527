#!/usr/bin/env bash
# Downloads into .whl/ what the GPU machine's image lacks, for benchmarks/gpu_check.sh.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # here, where pip reaches the package index
#   then, through the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
#
# The image has jax 0.11.2 (CUDA), flax, optax, orbax, chex, torch and timm, but not grain,
# ml-collections, pydicom or tensorboardX (the device README's KINDS.md lists what it has).
# Wheels are for its Python 3.12 on x86-64, one version each (two stop the install), at the
# versions pyproject.toml resolves to here. Also copies Fashion-MNIST (31 MB) into
# .whl/fashion-mnist for the tests that read real images; --no-data leaves it out.
# .whl/ is git-ignored; nothing here is committed.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  grain==0.2.18          # smsd_jax.data (the tests import it)
  array-record==0.8.6    # grain's need
  portpicker==1.6.0      # grain's need
  ml-collections==1.1.0  # configs/
  pydicom==3.0.2         # smsd_jax.data.sources
  tensorboardX==2.6.5    # smsd_jax.metrics_log (launch.main --mode=server)
)
FASHION_MNIST=/usr/share/datasets/fashion-mnist

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
if [ "${1:-}" != "--no-data" ]; then
  if [ ! -d "$FASHION_MNIST" ]; then
    echo "no $FASHION_MNIST here: install dataset-fashion-mnist or pass --no-data" >&2
    exit 1
  fi
  cp -r "$FASHION_MNIST" .whl/fashion-mnist
fi
ls -l .whl
total=$(du -sb .whl | cut -f1)
echo ".whl: $((total / 1024 / 1024)) MiB (a device call carries at most 64 MiB with the tree)"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
  echo "error: .whl is over 48 MiB; the working tree must travel too" >&2
  exit 1
fi
