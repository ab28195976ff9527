# Sourced by the scripts that run on the GPU machine: installs the wheels carried in .whl/
# (benchmarks/fetch_gpu_wheels.sh) as the device README says, and links the carried
# Fashion-MNIST where smsd_jax.data looks for it. Run from the repository's root.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
if [ ! -e /usr/share/datasets/fashion-mnist ] && [ -d .whl/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && ln -s "$PWD/.whl/fashion-mnist" /usr/share/datasets/
fi
