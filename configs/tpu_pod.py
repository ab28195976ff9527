r"""ViT-B/16 at 224 px on a TPU VM pod slice: the server stage, one process per TPU host.

Command (from your workstation; creates the slice, copies the repo and payloads, runs the
server on every worker, collects the body from worker 0; see launch/README.md):
    PROJECT=my-project ZONE=us-central2-b TPU_TYPE=v4-32 BUCKET=gs://my-bucket/smsd \
        bash launch/tpu_pod.sh
On every worker it runs
    python3 -m launch.main --mode=server --distributed --config=configs/tpu_pod.py \
        --workdir=runs/tpu_pod
(`--distributed` alone: jax.distributed finds the pod's hosts by itself).

Data: a folder of RGB images per site, resized to 224x224 (as configs/gpu_host.py). Head:
patch 16 -> 196 tokens of width 768. Sites: M = 2 samples per image, keep 0.5 (98 tokens).
Server: ViT-B (depth 12, 12 heads), DINO head 2048-2048-256 -> 65,536, bf16 compute (the
TPU's native matmul type), XLA attention, global batch 1024 (DINO's) split over every chip
of the slice (64 per chip on a v4-32's 16 chips); each host streams its own slice of the
payloads. Parameters replicated (`fsdp=False`): about 2 GB of ViT-B + head + AdamW state fits
a v4 chip's 32 GB, and every host then holds the whole teacher for the body export.
Hardware: a TPU v4, v5e or v5p slice; the global batch must be a multiple of its chips.
Expected throughput: not yet measured; run benchmarks/gpu_check.sh.
Expected result: the method's (docs/method.md); not yet measured at this size.
Variants (comma-separated after the path, applied in order): configs/gpu_host.py's:
`:runlocal` shrinks it to run on a laptop CPU in minutes (tiny model, 64 px, fp32, batch 128);
`:tiny` to seconds (the same model, configs/base.py's tiny sizes: batch 16).
"""

from configs import base, gpu_host

VARIANTS = base.variant_names(gpu_host.OWN)


def get_config(arg: str | None = None):
    # The multi-GPU host's experiment; on TPU: XLA attention, DINO's global batch of 1024.
    c = gpu_host.get_config()
    c.workdir = "runs/tpu_pod"
    c.model.attention = ""
    c.server.batch_size = 1024
    return base.apply_variants(c, arg, gpu_host.OWN, config=__file__)
