# Sourced by the scripts that run on a GPU host: installs the wheels copied into .whl/
# (benchmarks/fetch_gpu_wheels.sh) into /tmp/site, and links the copied Fashion-MNIST where
# smsd_jax.data looks for it. Run from the repository's root.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
if [ ! -e /usr/share/datasets/fashion-mnist ] && [ -d .whl/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && ln -s "$PWD/.whl/fashion-mnist" /usr/share/datasets/
fi
