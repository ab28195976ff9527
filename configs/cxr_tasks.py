r"""One body, three tasks at a site: a diagnosis, findings from a CSV, and a lung mask.

configs/cxr_vit_s16.py's single round (ViT-S/16 at 224 px on a chest X-ray folder), then stage
3 on three tasks of the site's own data with the same head and body (smsd_jax/tasks.py):
- `diagnosis`: single-label, the pre-training folder's own CSV (`path,label`);
- `findings`: multi-label, a CheXpert-style CSV (`path` and one column per finding: 1, 0,
  empty for unknown, -1 for uncertain, ignored here: `uncertain="ignore"`); mean AUC and AUC
  per finding;
- `lungs`: segmentation, folders of images/ and masks/ (one-channel PNG, pixel value = class
  id); Dice and IoU per class.

Command, after the server's body is back at the site (README, "One body, several tasks"):
    python3 -m launch.main --config=configs/cxr_tasks.py --mode=downstream --workdir=runs/cxr \
        --config.data.path=/data/cxr --config.data.labels_csv=/data/cxr/train.csv \
        --config.data.test_labels_csv=/data/cxr/test.csv \
        --config.downstream.tasks.findings.data.path=/data/cxr \
        --config.downstream.tasks.findings.data.labels_csv=/data/cxr/findings_train.csv \
        --config.downstream.tasks.findings.data.test_labels_csv=/data/cxr/findings_test.csv \
        --config.downstream.tasks.lungs.data.path=/data/lungs/train \
        --config.downstream.tasks.lungs.data.test_path=/data/lungs/test
(`--mode=simulate` runs the whole single round first, on `config.data`.) Results: one table per
task in `results/results.md`, every row with its task in `results/downstream.json`, and
`results/downstream_accuracy_<task>.png`.

Data: the user's own; none ships with the project (tests/test_tasks.py runs the same three
kinds of task on real pixels: Fashion-MNIST classes, findings that follow from them, and brain
lobes on a real MRI). Hardware and time: as configs/cxr_vit_s16.py; stage 3 adds a
fine-tune per task and fraction. Expected result: not measured (no chest X-ray set here).
Variants (comma-separated after the path, applied in order): `:runlocal` (a laptop CPU),
`:tiny` (seconds); configs/cxr_vit_s16.py's.
"""

from configs import base, cxr_vit_s16

VARIANTS = cxr_vit_s16.VARIANTS
# CheXpert's five competition findings.
FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion")


def get_config(arg: str | None = None):
    c = cxr_vit_s16.get_config()
    c.workdir = "runs/cxr_tasks"
    c.downstream.tasks = {
        "diagnosis": {},  # config.data's labels
        "findings": {"data": dict(task="multilabel", source="folder", path="", labels_csv="",
                                  test_labels_csv="", finding_names=FINDINGS,
                                  uncertain="ignore")},
        # Masks are scored on every labelled image (no label fractions); a tail per patch.
        "lungs": {"data": dict(task="segmentation", source="mask_folder", path="",
                               test_path="", class_names=("background", "lung")),
                  "downstream": dict(segment_steps=1000)},
    }
    return base.apply_variants(c, arg, cxr_vit_s16.OWN, config=__file__)
