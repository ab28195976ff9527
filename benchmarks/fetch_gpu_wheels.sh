#!/usr/bin/env bash
# Downloads into .whl/ what a GPU host's Python lacks, for benchmarks/gpu_check.sh.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # where pip reaches the package index
#   then copy .whl/ into the checkout on the GPU host and run: bash benchmarks/gpu_check.sh
#
# The GPU host is expected to have JAX for CUDA, flax, optax, orbax, chex, torch and timm,
# but not grain, ml-collections, pydicom or tensorboardX (benchmarks/NOTES.md).
# Wheels are for Python 3.12 on x86-64, one version each (two stop the install), at the
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
echo ".whl: $((total / 1024 / 1024)) MiB to copy to the GPU host with the checkout"
