"""Segmentation: masks from a real MRI atlas and a PNG folder, the dense tail, Dice, the CLI.

Real data: Debian's mricron-data (the Colin27 T1 scan and the AAL atlas on its grid).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel
import numpy as np
import pytest
from PIL import Image

from configs import segment_mri
from smsd_jax import data, models
from smsd_jax.downstream import segmentation
from smsd_jax.data import masks
from smsd_jax.errors import SMSDError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(segment_mri.TEMPLATES)


@pytest.fixture(scope="module")
def mri():
    config = segment_mri.get_config()
    return config, data.load_source(config.data, "train"), data.load_source(config.data, "test")


def test_unpatchify_inverts_patchify():
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    np.testing.assert_array_equal(segmentation.unpatchify(models.patchify(x, 4), 4), x)


def test_mri_slices_are_split_by_hemisphere_with_every_class_in_both(mri):
    config, train, test = mri
    assert train.class_names == test.class_names == ("background", *masks.AAL_LOBES)
    for source in (train, test):
        assert source.images.dtype == np.uint8 and source.image_shape == (56, 56, 1)
        # Every lobe and structure is in both splits: the hemispheres mirror each other.
        assert set(np.unique(source.masks)) == set(range(8)), source.name
    # Left hemisphere to train, right to test, nothing within the gap of the other side.
    atlas = np.asarray(nibabel.load(config.data.atlas).dataobj)
    extent = np.flatnonzero(atlas.reshape(len(atlas), -1).max(axis=1) > 0)
    train_x = masks.position_split(extent, "train", (0.5, 1.0), 3)
    test_x = masks.position_split(extent, "test", (0.5, 1.0), 3)
    assert len(train_x) == len(train) and len(test_x) == len(test)
    assert train_x.max() + 3 < test_x.min() and len(train_x) + len(test_x) + 3 == len(extent)


def test_an_atlas_on_another_grid_is_refused():
    with pytest.raises(SMSDError, match="JHU-WhiteMatter-labels-2mm.*not the scan's.*resample"):
        masks.nifti_slices(str(TEMPLATES / "ch2.nii.gz"),
                           str(TEMPLATES / "JHU-WhiteMatter-labels-2mm.nii.gz"), "train",
                           image_size=56, class_names=[f"c{i}" for i in range(49)])


def test_dice_and_iou_follow_their_definitions_on_real_masks(mri):
    _, train, _ = mri
    truth = train.masks
    pred = np.roll(truth, 2, axis=2)  # the atlas shifted two pixels: partly right
    metrics = segmentation.segmentation_metrics(segmentation.confusion(pred, truth, 8),
                                                train.class_names)
    for k, name in enumerate(train.class_names):
        a, b = truth == k, pred == k
        inter = np.logical_and(a, b).sum()
        assert metrics["dice"][name] == pytest.approx(2 * inter / (a.sum() + b.sum()))
        assert metrics["iou"][name] == pytest.approx(inter / np.logical_or(a, b).sum())
    assert metrics["mean_dice"] == pytest.approx(
        np.mean([metrics["dice"][n] for n in train.class_names[1:]]))
    assert 0.0 < metrics["mean_dice"] < 1.0
    perfect = segmentation.segmentation_metrics(segmentation.confusion(truth, truth, 9),
                                                (*train.class_names, "absent"))
    assert perfect["dice"]["absent"] is None and perfect["mean_dice"] == 1.0


def test_dice_ce_loss_is_least_for_the_true_masks(mri):
    _, train, _ = mri
    truth = jnp.asarray(train.masks[:8], jnp.int32)
    loss = lambda m: float(segmentation.dice_ce_loss(30.0 * jax.nn.one_hot(m, 8), truth))
    assert loss(truth) < 0.01
    assert loss(jnp.roll(truth, 2, axis=2)) > loss(truth) + 0.1


@pytest.mark.slow
def test_the_tail_learns_lobes_from_raw_pixels_and_position(mri):
    config, train, test = mri
    config.downstream.segment_steps = 200
    trained = segmentation.evaluate_pixels(config, train, test)["segment"]
    config.downstream.segment_steps = 1
    untrained = segmentation.evaluate_pixels(config, train, test)["segment"]
    # Right-hemisphere slices segmented from the left's: far better than the first step.
    assert trained["mean_dice"] > 0.35 and trained["mean_dice"] > untrained["mean_dice"] + 0.2


def _write_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def test_a_mask_folder_reads_real_slices_and_refuses_bad_masks(mri, tmp_path):
    _, train, _ = mri
    for i in range(4):
        _write_png(tmp_path / "images" / f"slice{i}.png", train.images[i, ..., 0])
        _write_png(tmp_path / "masks" / f"slice{i}.png", train.masks[i])
    source = masks.mask_folder(str(tmp_path), 56, 1, train.class_names)
    np.testing.assert_array_equal(source.images, train.images[:4])
    np.testing.assert_array_equal(source.masks, train.masks[:4])

    _write_png(tmp_path / "masks" / "slice3.png", train.masks[3][:50])
    with pytest.raises(SMSDError, match=r"slice3\.png: mask is 56x50 but its image"):
        masks.mask_folder(str(tmp_path), 56, 1, train.class_names)
    _write_png(tmp_path / "masks" / "slice3.png", np.full((56, 56), 9))
    with pytest.raises(SMSDError, match=r"slice3\.png: class id 9 is outside \[0, 8\)"):
        masks.mask_folder(str(tmp_path), 56, 1, train.class_names)
    (tmp_path / "masks" / "slice3.png").unlink()
    with pytest.raises(SMSDError, match="without a mask.*slice3"):
        masks.mask_folder(str(tmp_path), 56, 1, train.class_names)


def test_segmentation_needs_a_mask_source():
    config = segment_mri.get_config()
    config.data.source = "fashion_mnist"
    with pytest.raises(SMSDError, match="segmentation reads masks from one of"):
        data.load_source(config.data, "train")
    config.data.update(source="mask_folder", path="/tmp", test_path="")
    with pytest.raises(SMSDError, match="config.data.test_path is empty"):
        data.load_source(config.data, "test")


@pytest.mark.slow
def test_segmentation_from_the_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.main", "--config=configs/segment_mri.py:tiny",
         "--mode=simulate", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "downstream.json").read_text())
    assert [r["name"] for r in results] == ["raw pixels", "random body", "SMSD body"]
    for r in results:
        dice = r["segment"]["dice"]
        assert r["segment"]["classes"] == ["background", *masks.AAL_LOBES] and \
            set(dice) == set(r["segment"]["classes"])
        assert all(0.0 <= v <= 1.0 for v in dice.values() if v is not None)
        assert r["segment"]["images"] == {"train": 70, "test": 73}
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| SMSD body |" in table and "mean Dice" in table and "Dice deep_grey" in table
    png = tmp_path / "results" / "downstream_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(Dice x 100): mean Dice" in proc.stdout
