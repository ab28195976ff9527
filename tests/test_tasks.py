"""One body, several downstream tasks (`config.downstream.tasks`): the overrides, their
checks, and one single round from the CLI scored on three kinds of task at once.

Real pixels: Fashion-MNIST's classes (single-label), findings that follow from those classes
(multi-label, as in test_multilabel.py), and brain lobes on Debian's real T1 MRI with the AAL
atlas (segmentation, as in test_segmentation.py), all at the quickstart head's 28 x 28.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import cxr_tasks, quickstart, segment_mri
from smsd_jax import data, tasks, validate
from smsd_jax.data import masks
from smsd_jax.errors import SMSDError
from test_multilabel import FINDINGS, attributes

ROOT = Path(__file__).resolve().parents[1]


def test_each_task_overrides_data_and_downstream_only_for_itself():
    c = quickstart.get_config()
    c.downstream.tasks = {"same": {}, "masks": {
        "data": {"task": "segmentation", "source": "mask_folder", "path": "/x"},
        "downstream": {"segment_steps": 7}}}
    (n0, masks), (n1, same) = tasks.task_configs(c)
    assert (n0, n1) == ("masks", "same")  # in name order
    assert same.data.to_dict() == c.data.to_dict() and not same.downstream.tasks
    assert masks.data.source == "mask_folder" and masks.data.path == "/x"
    assert masks.data.image_size == c.data.image_size  # the rest is config.data's
    assert masks.downstream.segment_steps == 7 and c.downstream.segment_steps == 500
    assert c.data.source == "fashion_mnist"  # the config itself is untouched
    assert tasks.task_configs(quickstart.get_config()) == [("", quickstart.get_config())]


@pytest.mark.parametrize("entry, match", [
    ({"server": {"epochs": 1.0}}, r"tasks.bad: \['server'\] cannot be set per task"),
    ({"data": {"pth": "/x"}}, r"tasks.bad.data: \['pth'\] are not keys of config.data"),
])
def test_a_task_that_overrides_an_unknown_key_is_refused(entry, match):
    c = quickstart.get_config()
    c.downstream.tasks = {"bad": entry}
    with pytest.raises(SMSDError, match=match):
        tasks.task_configs(c)


def test_a_task_at_another_image_size_than_the_head_is_refused():
    c = quickstart.get_config()
    mri = segment_mri.get_config().data.to_dict()  # 56 x 56; the quickstart's head takes 28
    c.downstream.tasks = {"lobes": {"data": mri}}
    with pytest.raises(SMSDError, match="tasks.lobes: config.data.image_size=56.*takes 28x28"):
        validate.check_config(c)
    c.downstream.tasks.lobes.data.update(image_size=28, task="single_label")
    with pytest.raises(SMSDError, match="tasks.lobes: config.data.task='single_label'.*nifti"):
        validate.check_config(c)


def test_the_shipped_example_has_a_task_of_each_kind():
    c = cxr_tasks.get_config()
    validate.check_config(c)
    kinds = {name: task.data.task for name, task in tasks.task_configs(c)}
    assert kinds == {"diagnosis": "single_label", "findings": "multilabel",
                     "lungs": "segmentation"}


def test_rows_are_grouped_by_task_in_order():
    rows = [{"name": "a", "task": "t2"}, {"name": "b", "task": "t1"}, {"name": "c", "task": "t2"}]
    assert tasks.by_task(rows) == {"t2": [rows[0], rows[2]], "t1": [rows[1]]}
    assert tasks.by_task([{"name": "a"}]) == {"": [{"name": "a"}]}


CONFIG = '''
from configs import quickstart

def get_config():
    c = quickstart.get_config("tiny")
    c.downstream.tasks = {{
        "classes": {{}},
        "attributes": {{"data": dict(source="medmnist", task="multilabel", path={npz!r},
                                     finding_names={findings!r})}},
        "lobes": {{"data": {lobes!r}, "downstream": dict(segment_steps=20)}},
    }}
    return c
'''


@pytest.mark.slow
def test_one_body_three_tasks_from_the_cli(tmp_path):
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    npz = tmp_path / "attributes.npz"
    np.savez(npz, train_images=train.images[:300, ..., 0],
             train_labels=attributes(train.labels[:300]),
             val_images=train.images[300:350, ..., 0],
             val_labels=attributes(train.labels[300:350]),
             test_images=test.images[:200, ..., 0], test_labels=attributes(test.labels[:200]))
    lobes = {key: value for key, value in segment_mri.get_config().data.to_dict().items()
             if key not in ("num_sites", "partition")}
    lobes.update(image_size=28)
    config = tmp_path / "three_tasks.py"
    config.write_text(CONFIG.format(npz=str(npz), findings=tuple(FINDINGS), lobes=lobes))
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.main", f"--config={config}", "--mode=simulate",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((workdir / "results" / "downstream.json").read_text())
    groups = tasks.by_task(results)
    assert list(groups) == ["attributes", "classes", "lobes"]  # name order
    for rows in groups.values():
        assert [r["name"] for r in rows] == ["raw pixels", "random body", "SMSD body"]
    smsd = {task: rows[-1] for task, rows in groups.items()}
    assert 0.0 <= smsd["classes"]["linear"]["0.5"]["accuracy"] <= 1.0
    assert set(smsd["attributes"]["linear"]["0.5"]["auc_per_finding"]) == set(FINDINGS)
    assert "val_auc" in smsd["attributes"]["finetune"]["0.5"]
    assert smsd["lobes"]["segment"]["classes"][1:] == list(masks.AAL_LOBES)
    assert all(0.0 <= v <= 1.0 for v in smsd["lobes"]["segment"]["dice"].values()
               if v is not None)
    # Raw pixels are the same features whichever body: they find the findings.
    assert groups["attributes"][0]["linear"]["0.5"]["auc"] > 0.8

    table = (workdir / "results" / "results.md").read_text()
    for heading in ("## classes (single_label, fashion_mnist)",
                    "## attributes (multilabel, medmnist)", "## lobes (segmentation, nifti)"):
        assert heading in table
    assert "mean AUC" in table and "mean Dice" in table
    for task in groups:
        png = workdir / "results" / f"downstream_accuracy_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for task in groups:
        assert f"SMSD body against the random body on {task} (" in proc.stdout

