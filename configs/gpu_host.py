r"""ViT-B/16 at 224 px on one multi-GPU host: the server stage, one process, all local GPUs.

Command (payloads already under WORKDIR/payloads/site_*, written by `--mode=site` with this
config at each site; see launch/README.md):
    bash launch/gpu_host.sh --workdir=runs/gpu_host
which runs
    python3 -m launch.main --mode=server --config=configs/gpu_host.py --workdir=runs/gpu_host

Data: a folder of RGB images per site (`--config.data.path=...`, labels CSV as in
configs/cxr_vit_s16.py), resized to 224x224. Head: patch 16 -> 196 tokens of width 768.
Sites: M = 2 samples per image, keep 0.5 (98 tokens). Server: ViT-B (depth 12, 12 heads),
DINO head 2048-2048-256 -> 65,536, bf16 compute, cuDNN attention, global batch 512 split
over every visible GPU (64 per GPU on 8 GPUs, docs/performance.md's reference batch for one H100).
Parameters replicated (`fsdp=False`): ViT-B + DINO head + AdamW state is about 2 GB per GPU.
Hardware: one host with 1-8 NVIDIA GPUs (A100/H100 class); the global batch must be a
multiple of the GPU count.
Expected throughput: not yet measured; run benchmarks/gpu_check.sh.
Expected result: the method's (docs/method.md); not yet measured at this size.
Variants (comma-separated after the path, applied in order): `:runlocal` shrinks it to run on
a laptop CPU in minutes (configs/base.py's, then the tiny model at 64 px, fp32, XLA attention,
batch 128); `:tiny` to seconds (configs/base.py's, then the same CPU model: cuDNN attention
does not run on a CPU).
"""

from configs import base


def _cpu(c):
    """What a CPU runs: the tiny model at 64 px, float32, XLA attention (cuDNN needs a GPU)."""
    c.model.update(size="tiny", dtype="float32", attention="")
    c.data.image_size = 64
    return c


def _runlocal(c):
    """After configs/base.py's runlocal: the CPU model, global batch 128."""
    c = _cpu(c)
    c.server.batch_size = 128
    return c


# configs/tpu_pod.py has the same variants.
OWN = {"runlocal": _runlocal, "tiny": _cpu}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.get_config()
    c.workdir = "runs/gpu_host"
    c.data.update(source="folder", image_size=224, channels=3, mean=0.45, std=0.225,
                  num_sites=4, partition="iid")
    # head_dim 0: tokens at the body's width, 768 = the values of a 16x16 RGB patch (the
    # frontier's rule: no wider than a patch; configs/base.py).
    c.model.update(size="B", patch_size=16, pos_std=0.5, dtype="bfloat16", attention="cudnn",
                   head_dim=0)
    c.site.update(keep=0.5, num_samples=2, batch_size=64, shard_size=4096)
    c.server.update(batch_size=512, num_devices=0, fsdp=False, epochs=100.0, lr=5e-4,
                    warmup_epochs=10, teacher_temp_warmup_epochs=30, checkpoint_every=1000,
                    log_every=50)
    c.downstream.update(label_fractions=(0.01, 0.1, 1.0), batch_size=64, eval_batch_size=256,
                        finetune_epochs=20)
    return base.apply_variants(c, arg, OWN, config=__file__)
