r"""ViT-S/16 at 224 px on a chest X-ray data set the user has on disk.

Command (each stage may run on a different machine; see README):
    python3 -m launch.main --config=configs/cxr_vit_s16.py --mode=simulate \
        --config.data.path=/data/cxr --config.data.labels_csv=/data/cxr/train.csv \
        --config.data.test_labels_csv=/data/cxr/test.csv --workdir=runs/cxr

Data: a folder of PNG/JPEG/DICOM chest X-rays with CSVs `path,label` (DICOMs are windowed
with their VOI LUT), resized to 224x224, grayscale. Head: patch 16 -> 196 tokens of width 384
(over-complete for grayscale: 256 pixels per patch < 384; see docs/method.md on privacy).
Sites: M = 2 samples per image, keep 0.5 (98 tokens). Server: ViT-S (depth 12, 6 heads), DINO
out_dim 65,536, bf16 compute, global batch 256, 100 epochs.
Hardware: one 8-GPU host or a TPU VM (global batch split over the "data" mesh axis; set
--config.server.fsdp=True when memory is short).
Expected time and result: not yet measured on this project's hardware (no chest X-ray set
ships with it); the method's paper reports gains over fine-tuning only on CXR tasks.
Variants (comma-separated after the path, applied in order): `:runlocal` shrinks it to run on
a laptop CPU in minutes (configs/base.py's, then a tiny model at 64 px, fp32); `:tiny` to
seconds (configs/base.py's: the tiny model, at 224 px).
"""

from configs import base


def _runlocal(c):
    """After configs/base.py's runlocal: a tiny model at 64 px in float32."""
    c.model.update(size="tiny", patch_size=16, dtype="float32", head_dim=0)
    c.data.image_size = 64
    return c


OWN = {"runlocal": _runlocal}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.get_config()
    c.workdir = "runs/cxr_vit_s16"
    c.data.update(source="folder", image_size=224, channels=1, mean=0.5, std=0.25,
                  num_sites=4, partition="iid")
    # head_dim 256: the values of a 16x16 grayscale patch (no wider than a patch, the
    # frontier's rule; configs/base.py); the body (width 384) learns a stem.
    c.model.update(size="S", patch_size=16, pos_std=0.5, dtype="bfloat16", head_dim=256)
    c.site.update(keep=0.5, num_samples=2, batch_size=64, shard_size=4096)
    c.server.update(batch_size=256, epochs=100.0, lr=5e-4, warmup_epochs=10,
                    teacher_temp_warmup_epochs=30,
                    checkpoint_every=1000, log_every=50)
    c.downstream.update(label_fractions=(0.01, 0.1, 1.0), finetune_fractions=(0.1,),
                        batch_size=64, eval_batch_size=256, finetune_epochs=20)
    c.baselines.update(local_size=96)  # DINO's 96-pixel local crops: 36 tokens at patch 16
    return base.apply_variants(c, arg, OWN, config=__file__)
