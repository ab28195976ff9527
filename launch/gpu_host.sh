#!/usr/bin/env bash
# Stage 2, the server, on one multi-GPU host: one process drives every local GPU (jax.jit over
# a "data" mesh of all of them; one host needs no --distributed). See launch/README.md.
#
#   bash launch/gpu_host.sh --workdir=runs/gpu_host [--payloads=DIR,...] [--config.x.y=V ...]
#
# Arguments go to launch/main.py. Payloads default to WORKDIR/payloads/site_*. CONFIG picks
# another config (default configs/gpu_host.py: ViT-B/16, bf16, cuDNN attention, batch 512).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/gpu_host.py}"

# The latency-hiding scheduler lets XLA overlap the gradient all-reduce across GPUs with the
# backward pass; NVIDIA's JAX containers turn it on by default. Its effect on this step is
# not yet measured (benchmarks/NOTES.md); with one GPU it changes nothing.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# Nothing else shares the cards: JAX may take 90% of each (its default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv
fi
python3 -c "import jax; print('JAX sees', jax.device_count(), jax.devices()[0].device_kind)"
exec python3 -m launch.main --mode=server --config="$CONFIG" "$@"
