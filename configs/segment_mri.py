r"""Segmentation of brain lobes on a real T1 MRI: the single round, then a Dice tail at a site.

    python -m launch.main --config=configs/segment_mri.py --mode=simulate

Data (Debian's mricron-data, `apt-get install mricron-data`): the Colin27 T1 scan (`ch2`, 1 mm,
181 x 217 x 181) and the AAL atlas on the same grid, its 116 regions grouped into 7 lobes and
structures (`data.masks.AAL_LOBES`, our grouping by region name) plus background. Sagittal
slices, padded to a square and resized to 56 x 56: the left hemisphere's (70 slices) are the
sites' images and the labelled training set, the right hemisphere's (73) the test set, 3
slices at the midline unused. Head: patch 4 (196 tokens of width 16); 2 IID sites, M = 4
samples per image; the quickstart's DINO settings at batch 32. Downstream: a linear tail per
patch on the frozen token features, Dice + cross-entropy
(smsd_jax/downstream/segmentation.py), beside the random body and the same tail on raw
pixels; Dice and IoU per class in `results/downstream.json` and `results/results.md`.

One brain is very little data for self-supervision: this config shows the segmentation path
on real anatomy with expert labels, not what SMSD gains on a consortium's scans. For your own
data: `data.source="mask_folder"` with `data.path` and `data.test_path` (folders with images/
and masks/) and `data.class_names`, or another scan and atlas here.

Variants: `:runlocal` (a minute), `:tiny` (seconds; tests); configs/base.py's, then this
file's sizes.
"""

from configs import base, quickstart
from smsd_jax.data import masks

TEMPLATES = "/usr/share/mricron/templates"


def _tiny(c):
    c.server.update(batch_size=16, epochs=2.0)
    c.site.update(batch_size=32, shard_size=64)
    c.downstream.update(segment_steps=20, eval_batch_size=64)
    return c


def _runlocal(c):
    c.server.update(epochs=20.0, checkpoint_every=50)
    c.site.update(batch_size=35, shard_size=35)  # base's runlocal 256 does not divide 35
    return c


OWN = {"tiny": _tiny, "runlocal": _runlocal}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.demo_keys(quickstart.get_config())  # a study on public data: reproducible keys
    c.workdir = "runs/segment_mri"
    c.data.update(source="nifti", task="segmentation", path=f"{TEMPLATES}/ch2.nii.gz",
                  atlas=f"{TEMPLATES}/aal.nii.gz", atlas_labels=f"{TEMPLATES}/aal.nii.txt",
                  label_groups=tuple(masks.AAL_LOBES.items()), slice_axis=0, test_block=(0.5, 1.0),
                  slice_gap=3, image_size=56, channels=1,
                  mean=0.223, std=0.235,  # of the training slices (scaled to [0, 1])
                  num_sites=2, partition="iid", subset=0)
    c.site.update(num_samples=4, batch_size=35, shard_size=35)
    c.server.update(batch_size=32, epochs=200.0, checkpoint_every=100, log_every=10)
    c.downstream.update(segment_steps=500, segment_lr=1e-2, eval_batch_size=128)
    return base.apply_variants(c, arg, OWN, config=__file__)
