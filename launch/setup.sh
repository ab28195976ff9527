#!/usr/bin/env bash
# Installs what smsd-jax needs on a fresh Debian/Ubuntu machine: the built-in data set
# (Debian's dataset-fashion-mnist) and the Python packages. `setup.sh test` adds test tools and
# the tests' MRI (Debian's mricron-data).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
fi

# The tests' real MRI (Colin27 T1 and the AAL atlas on its grid, for segmentation).
if [ "${1:-}" = "test" ] && [ ! -f /usr/share/mricron/templates/ch2.nii.gz ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mricron-data
fi

# The Python packages are listed once, in pyproject.toml.
extras="[all]"
[ "${1:-}" = "test" ] && extras="[test]"
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
