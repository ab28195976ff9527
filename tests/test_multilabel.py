"""Multi-label classification on real pixels: sources (MedMNIST .npz, folder + findings CSV of
real DICOMs), per-finding metrics, masked loss, probes, fine-tuning, the table and the CLI.

No multi-label medical file is installed here, so the .npz holds real Fashion-MNIST images
with findings that are *attributes derived from the class* (a Coat is upper-body wear and
outerwear, a Sneaker is footwear, ...): the labels are true of every image, and an image can
have two at once, as a chest X-ray can.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from configs import base
from smsd_jax import data, downstream, evaluation, models, validate
from smsd_jax.errors import SMSDError

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.286, 0.353
# Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal,
# 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot. Each finding: the classes it is true of.
FINDINGS = {"upper_body": (0, 2, 4, 6), "outerwear": (2, 4), "footwear": (5, 7, 9),
            "trousers": (1,), "bag": (8,)}


def attributes(labels):
    """0/1 [N, 5]: the findings of each image, from its class."""
    return np.stack([np.isin(labels, classes) for classes in FINDINGS.values()], 1).astype(
        np.uint8)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """A MedMNIST-layout .npz of real Fashion-MNIST images with the derived findings:
    600 train, 100 val (the next train images) and 300 test images."""
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    path = tmp_path_factory.mktemp("npz") / "fashionattributes.npz"
    np.savez(path, train_images=train.images[:600, ..., 0],
             train_labels=attributes(train.labels[:600]),
             val_images=train.images[600:700, ..., 0], val_labels=attributes(train.labels[600:700]),
             test_images=test.images[:300, ..., 0], test_labels=attributes(test.labels[:300]))
    return str(path)


def read(npz, split):
    return data.medmnist_npz(npz, split, multilabel=True, finding_names=list(FINDINGS))


# ---------------------------------------------------------------- sources


def test_multilabel_npz_is_read_with_labels_mask_and_names(npz):
    train = data.fashion_mnist("train")
    for split, size in (("train", 600), ("val", 100), ("test", 300)):
        source = read(npz, split)
        assert data.is_multilabel(source) and len(source) == size
        assert source.finding_names == tuple(FINDINGS) and source.num_classes == 5
        assert source.labels.shape == source.mask.shape == (size, 5)
        assert source.labels.dtype == source.mask.dtype == np.float32
        assert np.all(source.mask == 1)  # MedMNIST labels are all known
    source = read(npz, "train")
    record = source[4]  # a Coat? whatever it is, its findings follow from its class
    np.testing.assert_array_equal(record["image"][..., 0], train.images[4, ..., 0])
    np.testing.assert_array_equal(record["label"], attributes(train.labels[4:5])[0])
    assert set(record) == {"image", "label", "mask"}
    assert not data.is_multilabel(train)
    unnamed = data.medmnist_npz(npz, "test", multilabel=True)
    assert unnamed.finding_names == tuple(f"finding_{i}" for i in range(5))
    # A batch through the downstream pipeline carries labels and mask.
    batch = next(iter(data.labelled_dataset(source, np.arange(8), batch_size=8, seed=0)))
    assert batch["label"].shape == batch["mask"].shape == (8, 5)


def test_multilabel_npz_refuses_class_ids_and_wrong_names(npz, tmp_path):
    train = data.fashion_mnist("train")
    ids = tmp_path / "ids.npz"  # class ids in 3 columns: not 0/1 findings
    np.savez(ids, train_images=train.images[:10, ..., 0],
             train_labels=np.repeat(train.labels[:10, None], 3, axis=1))
    with pytest.raises(SMSDError, match=r"ids\.npz: train_labels\[\d+, 0\] is \d"):
        data.medmnist_npz(str(ids), "train", multilabel=True)
    with pytest.raises(SMSDError, match="5 findings need as many distinct names"):
        data.medmnist_npz(npz, "train", multilabel=True, finding_names=["a", "b"])
    with pytest.raises(SMSDError, match="task=multilabel"):  # single-label reading refuses
        data.medmnist_npz(npz, "train")


def dicom(name):
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not installed: pip install pydicom-data"
    return path


# Real clinical DICOMs from pydicom-data (CR chest and leg, CT, MR, NM), with CheXpert-style
# cells: 1, 0, empty (not mentioned), -1 (uncertain), and CheXpert's "1.0"/"-1.0" spelling.
DICOM_ROWS = [
    ("RG1_UNCI.dcm", "1", "", "-1"),
    ("RG3_UNCR.dcm", "0", "1.0", ""),
    ("693_UNCI.dcm", "-1.0", "0", "1"),
    ("MR2_UNCI.dcm", "", "-1", "0.0"),
    ("JPEG2000_UNC.dcm", "1", "1", "-1"),
]
CSV_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion")


def write_findings_csv(path, rows, columns=("path",) + CSV_FINDINGS):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


@pytest.mark.parametrize("policy, uncertain", [("ignore", (0, 0)), ("zeros", (0, 1)),
                                               ("ones", (1, 1))])
def test_multilabel_csv_of_real_dicoms_follows_the_uncertainty_policy(tmp_path, policy,
                                                                       uncertain):
    root = os.path.dirname(dicom("RG1_UNCI.dcm"))
    csv_path = write_findings_csv(tmp_path / "findings.csv", DICOM_ROWS)
    source = data.multilabel_image_folder(root, csv_path, image_size=32, uncertain=policy)
    assert data.is_multilabel(source) and source.finding_names == CSV_FINDINGS
    # The documented reading of each cell: 1 -> (1, known), 0 -> (0, known), empty -> not
    # mentioned (0, known), -1 -> the policy's (label, mask).
    cell = {"1": (1, 1), "1.0": (1, 1), "0": (0, 1), "0.0": (0, 1), "": (0, 1),
            "-1": uncertain, "-1.0": uncertain}
    expected = np.array([[cell[c] for c in row[1:]] for row in DICOM_ROWS], np.float32)
    np.testing.assert_array_equal(source.labels, expected[..., 0])
    np.testing.assert_array_equal(source.mask, expected[..., 1])
    record = source[0]  # the real chest radiograph, decoded
    assert record["image"].shape == (32, 32, 1) and record["image"].std() > 20
    np.testing.assert_array_equal(record["mask"], expected[0, :, 1])


def test_multilabel_csv_picks_finding_columns_and_refuses_bad_cells(tmp_path):
    root = os.path.dirname(dicom("RG1_UNCI.dcm"))
    rows = [(path, "F", *cells) for path, *cells in DICOM_ROWS]  # a "Sex" column, as CheXpert
    wide = write_findings_csv(tmp_path / "wide.csv", rows, ("path", "Sex") + CSV_FINDINGS)
    with pytest.raises(SMSDError, match=r"wide\.csv: row 1 \(line 2\), column 'Sex'.*'F'"):
        data.multilabel_image_folder(root, wide, 32)
    picked = data.multilabel_image_folder(root, wide, 32, finding_names=["Effusion", "Atelectasis"])
    assert picked.finding_names == ("Effusion", "Atelectasis")
    np.testing.assert_array_equal(picked.labels[:, 0], [0, 0, 1, 0, 0])  # Effusion, ignore
    np.testing.assert_array_equal(picked.mask[:, 0], [0, 1, 1, 1, 0])
    with pytest.raises(SMSDError, match=r"missing \['Edema'\]"):
        data.multilabel_image_folder(root, wide, 32, finding_names=["Edema"])
    bad = [list(row) for row in DICOM_ROWS]
    bad[2][2] = "2"
    path = write_findings_csv(tmp_path / "two.csv", bad)
    with pytest.raises(SMSDError, match=r"two\.csv: row 3 \(line 4\), column 'Cardiomegaly' "
                                        r"holds '2'"):
        data.multilabel_image_folder(root, path, 32)
    missing = write_findings_csv(tmp_path / "missing.csv", [("absent.dcm", "1", "0", "0")])
    with pytest.raises(FileNotFoundError, match="absent.dcm"):
        data.multilabel_image_folder(root, missing, 32)


def test_config_chooses_the_multilabel_source_and_refuses_class_partitions(npz):
    config = base.get_config("tiny")
    config.data.update(source="medmnist", path=npz, task="multilabel", partition="iid",
                       finding_names=tuple(FINDINGS))
    validate.check_config(config)
    source = data.load_source(config.data, "test")
    assert data.is_multilabel(source) and source.finding_names == tuple(FINDINGS)
    parts = data.split_sites(source.labels, config.data, seed=0)  # iid: only N matters
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(256))
    hist = data.label_histogram(source.labels, parts, 5)
    np.testing.assert_array_equal(hist.sum(0), source.labels[:256].sum(0))
    for kind in ("dirichlet", "label"):
        config.data.partition = kind
        with pytest.raises(SMSDError, match=f"partition kind '{kind}'.*use 'iid'"):
            validate.check_config(config)
        with pytest.raises(SMSDError, match="no single class per image"):
            data.partition(source.labels, kind, 4, seed=0)
    config.data.update(partition="iid", source="fashion_mnist")
    with pytest.raises(SMSDError, match="has one class per image"):
        validate.check_config(config)
    config.data.update(source="folder", uncertain="maybe")
    with pytest.raises(SMSDError, match="config.data.uncertain='maybe'"):
        validate.check_config(config)


# ---------------------------------------------------------------- metrics and loss


def test_average_precision_against_hand_computed_values():
    # scikit-learn's documented example: thresholds 0.8 (P 1, R 1/2), 0.4 (P 1/2, R 1/2),
    # 0.35 (P 2/3, R 1): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert evaluation.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == (
        pytest.approx(5 / 6))
    # A tie of a positive and a negative is one threshold: P 1/2 at R 1.
    assert evaluation.average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert evaluation.average_precision([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == (
        pytest.approx(0.5 * 1 + 0.5 * 2 / 3))
    # Without ties: the mean over positives of the precision at each positive's rank.
    rng = np.random.default_rng(0)
    scores, labels = rng.random(200), rng.random(200) < 0.3
    ranks = np.argsort(np.argsort(-scores)) + 1  # 1 = highest score
    at_positives = np.sort(ranks[labels])
    reference = np.mean(np.arange(1, labels.sum() + 1) / at_positives)
    assert evaluation.average_precision(scores, labels) == pytest.approx(reference, abs=1e-12)
    with pytest.raises(SMSDError, match="positive"):
        evaluation.average_precision([0.2, 0.3], [0, 0])


def test_evaluate_multilabel_scores_only_known_labels_per_finding():
    rng = np.random.default_rng(1)
    labels = (rng.random((100, 3)) < 0.4).astype(np.float32)
    scores = labels + rng.normal(0, 0.8, size=labels.shape)
    mask = (rng.random((100, 3)) < 0.7).astype(np.float32)
    labels[:, 2] = mask[:, 2]  # finding 2: every known label positive, no AUC
    labels *= mask
    names = ("a", "b", "c")
    result = evaluation.evaluate_multilabel(scores, labels, mask, names)
    for f, name in enumerate(names[:2]):
        known = mask[:, f] > 0
        assert result["auc_per_finding"][name] == pytest.approx(
            evaluation.roc_auc(scores[known, f], labels[known, f]))
        assert result["ap_per_finding"][name] == pytest.approx(
            evaluation.average_precision(scores[known, f], labels[known, f]))
    assert result["auc_per_finding"]["c"] is None and result["ap_per_finding"]["c"] is None
    assert result["auc"] == pytest.approx(np.mean([result["auc_per_finding"][n] for n in "ab"]))
    assert result["ap"] == pytest.approx(np.mean([result["ap_per_finding"][n] for n in "ab"]))
    # Unknown entries play no part: change their scores and labels, nothing moves.
    unknown = mask == 0
    scores2, labels2 = scores.copy(), labels.copy()
    scores2[unknown], labels2[unknown] = 100.0, 1.0
    assert evaluation.evaluate_multilabel(scores2, labels2, mask, names) == result
    json.dumps(result)


def test_masked_bce_ignores_masked_entries_in_loss_and_gradient():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = (rng.random((6, 4)) < 0.5).astype(np.float32)
    mask = (rng.random((6, 4)) < 0.6).astype(np.float32)
    value_and_grad = jax.value_and_grad(downstream.masked_binary_cross_entropy)
    loss, grad = value_and_grad(logits, labels, mask)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert float(loss) == pytest.approx((bce * mask).sum() / mask.sum(), rel=1e-5)
    flipped = np.where(mask > 0, labels, 1 - labels)  # every masked label changed
    loss2, grad2 = value_and_grad(logits, flipped, mask)
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(grad2, grad)
    assert np.all(np.asarray(grad)[mask == 0] == 0)
    assert float(downstream.masked_binary_cross_entropy(logits, labels, 0 * mask)) == 0.0


# ---------------------------------------------------------------- probes and subsets


@pytest.fixture(scope="module")
def pixels(npz):
    """Raw pixels and targets of the 600 train and 300 test images of the .npz."""
    train, test = read(npz, "train"), read(npz, "test")
    return (downstream.raw_pixel_features(train, np.arange(600)), train,
            downstream.raw_pixel_features(test, np.arange(300)), test)


def test_multilabel_linear_probe_on_real_pixels_finds_every_attribute(pixels):
    x_train, train, x_test, test = pixels
    scores = downstream.linear_probe(x_train, train.labels, x_test, num_classes=5, steps=100,
                                     lr=1e-2, mask=train.mask)
    assert scores.shape == (300, 5) and np.all((scores >= 0) & (scores <= 1))
    assert scores.sum(1).max() > 1.5  # a sigmoid per finding, not a softmax: a Coat has two
    result = evaluation.evaluate_multilabel(scores, test.labels, test.mask, test.finding_names)
    assert set(result["auc_per_finding"]) == set(FINDINGS)
    assert result["auc"] > 0.8
    assert min(result["auc_per_finding"].values()) > 0.7
    # An unknown training label is left out: hiding every "bag" label leaves that finding
    # untrained (its weights stay near their N(0, 0.01^2) start), the others learn.
    hidden = train.mask.copy()
    hidden[:, 4] = 0
    blind = downstream.linear_probe(x_train, train.labels * hidden, x_test, num_classes=5,
                                    steps=100, lr=1e-2, mask=hidden)
    blind = evaluation.evaluate_multilabel(blind, test.labels, test.mask, test.finding_names)
    assert blind["auc_per_finding"]["bag"] < result["auc_per_finding"]["bag"] - 0.1
    assert blind["auc_per_finding"]["footwear"] > 0.8


def test_multilabel_knn_is_a_weighted_vote_of_the_known_neighbours(pixels):
    x_train, train, x_test, test = pixels
    scores = downstream.knn_classify(x_train, train.labels, x_test, num_classes=5, k=10,
                                     mask=train.mask)
    result = evaluation.evaluate_multilabel(scores, test.labels, test.mask, test.finding_names)
    assert result["auc"] > 0.8
    # The same neighbours and weights as the single-label k-NN: with every label known, the
    # score of a finding is the single-label vote for "positive" on that finding alone.
    single = downstream.knn_classify(x_train, train.labels[:, 2].astype(np.int32), x_test,
                                     num_classes=2, k=10)
    np.testing.assert_allclose(scores[:, 2], single[:, 1], atol=1e-6)
    # Hand-made neighbours: query 0 is nearest to train points 0 (known positive) and 1
    # (unknown), query 1 to points 1 and 2, where point 2 is unknown too: no evidence, 0.5.
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [-1.0, -0.1]])
    labels = np.array([[1.0], [0.0], [0.0], [0.0]])
    mask = np.array([[1.0], [0.0], [0.0], [1.0]])
    queries = np.array([[1.0, 0.2], [-0.5, 1.0]])
    out = downstream.knn_classify(feats, labels, queries, num_classes=1, k=2, mask=mask)
    np.testing.assert_allclose(out[:, 0], [1.0, 0.5], atol=1e-6)


def test_multilabel_subsets_are_a_seeded_nested_fraction_of_the_images(npz):
    labels = read(npz, "train").labels  # [600, 5]
    small = downstream.label_subset(labels, 0.01, seed=3)
    large = downstream.label_subset(labels, 0.1, seed=3)
    assert (len(small), len(large)) == (6, 60) and set(small) <= set(large)
    assert np.all(np.diff(large) > 0)
    np.testing.assert_array_equal(small, downstream.label_subset(labels, 0.01, seed=3))
    assert not np.array_equal(small, downstream.label_subset(labels, 0.01, seed=4))
    assert len(downstream.label_subset(labels[:20], 0.01, seed=0)) == 1  # at least one
    tr, val = downstream.validation_split(labels[large], 0.1, seed=3)
    assert len(val) == 6 and len(tr) == 54 and not set(tr) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, val])), np.arange(60))


# ---------------------------------------------------------------- fine-tuning and table


@pytest.mark.slow
def test_multilabel_fit_selects_by_validation_auc_and_learns(npz):
    train, test = read(npz, "train"), read(npz, "test")
    model = models.ViTClassifier(models.ViTHead(28, 4, 32), models.ViTBody(32, 2, 2), 5,
                                 mean=MEAN, std=STD)
    params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]
    before = downstream.evaluate_model(model, params, test, np.arange(300), batch_size=100)
    best, info = downstream.fit(model, params, train, np.arange(256), epochs=4, lr=3e-3,
                                batch_size=32, seed=0, val_idx=np.arange(256, 336),
                                eval_batch_size=80)
    assert len(info["val_auc"]) == 4 and "val_accuracy" not in info
    assert info["best_epoch"] == 1 + int(np.argmax(info["val_auc"]))  # no ties expected
    after = downstream.evaluate_model(model, best, test, np.arange(300), batch_size=100)
    assert set(after) == {"auc", "auc_per_finding", "ap", "ap_per_finding"}
    assert after["auc"] > max(0.7, before["auc"] + 0.2)  # 32 steps: 0.37 -> 0.76 here


def test_multilabel_results_table_shows_mean_auc_labelled_as_such():
    entry = lambda auc: {"auc": auc, "auc_per_finding": {"a": auc}, "ap": 0.5,
                         "ap_per_finding": {"a": 0.5}}
    results = [{"name": "raw pixels", "linear": {"0.5": entry(0.9123)}},
               {"name": "SMSD body", "linear": {"0.5": entry(0.8)},
                "finetune": {"0.5": entry(0.75)}}]
    lines = downstream.results_table(results, fractions=(0.5,)).splitlines()
    assert lines[0] == "| features / method | linear 50% mean AUC | fine-tune 50% mean AUC |"
    assert lines[2] == "| raw pixels | 0.912 | - |"
    assert lines[3] == "| SMSD body | 0.800 | 0.750 |"
    assert evaluation.headline_metric(results) == "auc"


def _cli(*args, workdir):
    return [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny",
            f"--workdir={workdir}", *args]


@pytest.mark.slow
def test_multilabel_round_from_the_cli_writes_per_finding_results(npz, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    overrides = ["--config.data.source=medmnist", f"--config.data.path={npz}",
                 "--config.data.task=multilabel",
                 f"--config.data.finding_names={tuple(FINDINGS)!r}"]
    refused = subprocess.run(_cli("--mode=init", *overrides, workdir=tmp_path / "no"),
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "use 'iid'" in refused.stderr  # default: dirichlet
    workdir = tmp_path / "run"
    result = subprocess.run(_cli("--mode=simulate", *overrides, "--config.data.partition=iid",
                                 workdir=workdir), cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results" / "downstream.json").read_text())
    assert [r["name"] for r in results] == ["raw pixels", "random body", "SMSD body"]
    for r in results:
        for probe in ("linear", "knn", "finetune"):
            for metrics in r.get(probe, {}).values():
                assert set(metrics["auc_per_finding"]) == set(FINDINGS)
                assert set(metrics["ap_per_finding"]) == set(FINDINGS)
                assert 0 <= metrics["auc"] <= 1 and 0 <= metrics["ap"] <= 1
    assert results[0]["linear"]["0.5"]["auc"] > 0.8  # raw pixels find the attributes
    assert "val_auc" in results[2]["finetune"]["0.5"]
    table = (workdir / "results" / "results.md").read_text()
    assert "linear 50% mean AUC" in table and "| SMSD body |" in table
    assert (workdir / "results" / "downstream_accuracy.png").exists()
    partition = json.loads((workdir / "partition.json").read_text())
    assert np.array(partition["meta"]["histogram"]).shape == (4, 5)
