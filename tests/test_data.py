"""Data layer on real data: Debian's Fashion-MNIST and pydicom-data's clinical DICOMs.

Nothing here may reach the network: an autouse fixture makes any socket connect fail.
"""

import csv
import gzip
import io
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from smsd_jax import data

NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a data test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def train():
    return data.fashion_mnist("train")


def dicom(name):
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not installed: pip install pydicom-data"
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return str(path)


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_shapes_labels_and_balance(train):
    test = data.fashion_mnist("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.image_shape == test.image_shape == (28, 28, 1)
    assert train.num_classes == NUM_CLASSES and len(train.class_names) == NUM_CLASSES
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(NUM_CLASSES, 6000))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(NUM_CLASSES, 1000))
    record = train[123]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (28, 28, 1)
    assert record["label"].dtype == np.int32 and record["label"] == train.labels[123]
    assert record["image"].std() > 10  # a real garment, not a blank
    with pytest.raises(ValueError):  # cached arrays are shared: writes must fail
        record["image"][0, 0, 0] = 1


def test_fashion_mnist_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("train", root=str(tmp_path))


def test_fashion_mnist_rejects_a_corrupt_idx_header(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(bytes([0, 0, 9, 3]) + bytes(64))  # type 0x09 is int8, not uint8
    with pytest.raises(ValueError, match="magic"):
        data.fashion_mnist("test", root=str(tmp_path))


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, np.int32), "uint8"),
    (np.zeros((4, 8, 8, 2), np.uint8), np.zeros(4, np.int32), "C 1 or 3"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int32), "channel axis"),
    (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(3, np.int32), "4 images but 3 labels"),
    (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 10]), "outside"),
    (np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int32), "empty"),
])
def test_array_source_validates(images, labels, message):
    with pytest.raises(ValueError, match=message):
        data.ArraySource(images, labels, NUM_CLASSES, "toy")


# ---------------------------------------------------------------- MedMNIST


def write_medmnist(path, train, size, rgb, label_width=1):
    """Writes real Fashion-MNIST images in MedMNIST's .npz layout: a stand-in, since no
    MedMNIST file is installed here. Images [N, H, W] or [N, H, W, 3], labels [N, k]."""
    arrays = {}
    for split, start in (("train", 0), ("val", 30), ("test", 40)):
        images = train.images[start:start + 10, ..., 0]
        if size != 28:
            images = np.stack(
                [np.asarray(Image.fromarray(im).resize((size, size))) for im in images])
        if rgb:
            images = np.repeat(images[..., None], 3, axis=-1)
        arrays[f"{split}_images"] = images
        labels = train.labels[start:start + 10, None].astype(np.uint8)
        arrays[f"{split}_labels"] = np.repeat(labels, label_width, axis=1)
    np.savez(path, **arrays)
    return str(path), arrays


@pytest.mark.parametrize("size, rgb", [(28, False), (64, True)])
def test_medmnist_npz_reads_each_split(tmp_path, train, size, rgb):
    path, arrays = write_medmnist(tmp_path / f"fakemnist_{size}.npz", train, size, rgb)
    channels = 3 if rgb else 1
    for split in ("train", "val", "test"):
        source = data.medmnist_npz(path, split)
        assert len(source) == 10 and source.image_shape == (size, size, channels)
        # One class count for all splits, from the largest label in the file.
        largest = max(arrays[f"{s}_labels"].max() for s in ("train", "val", "test"))
        assert source.num_classes == 1 + largest
        np.testing.assert_array_equal(source.labels, arrays[f"{split}_labels"][:, 0])
        image = arrays[f"{split}_images"][3]
        np.testing.assert_array_equal(source[3]["image"], image.reshape(size, size, channels))


def test_medmnist_refuses_multilabel_and_missing_keys(tmp_path, train):
    path, _ = write_medmnist(tmp_path / "chest.npz", train, 28, False, label_width=14)
    with pytest.raises(ValueError, match="multi-label"):
        data.medmnist_npz(path, "train")
    np.savez(tmp_path / "partial.npz", train_images=train.images[:5, ..., 0])
    with pytest.raises(ValueError, match="no array 'train_labels'"):
        data.medmnist_npz(str(tmp_path / "partial.npz"), "train")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        data.medmnist_npz(str(tmp_path / "absent.npz"))


# ---------------------------------------------------------------- image folders


def test_image_folder_png_with_class_names(tmp_path, train):
    rows = []
    for i in range(12):
        name = f"img_{i}.png"
        Image.fromarray(train.images[i, ..., 0]).save(tmp_path / name)
        rows.append((name, train.class_names[train.labels[i]]))
    csv_path = write_csv(tmp_path / "labels.csv", rows)

    source = data.image_folder(str(tmp_path), csv_path, image_size=28, channels=1)
    present = sorted({label for _, label in rows})
    assert source.class_names == tuple(present) and source.num_classes == len(present)
    assert [source.class_names[k] for k in source.labels] == [label for _, label in rows]
    np.testing.assert_array_equal(source[5]["image"], train.images[5])  # same size: lossless
    assert source[5]["label"].dtype == np.int32

    rgb = data.image_folder(str(tmp_path), csv_path, image_size=40, channels=3)
    image = rgb[5]["image"]
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # gray copied to all channels
    # grain multiprocessing pickles sources into its workers.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(rgb))[5]["image"], image)


def test_image_folder_integer_labels_and_fixed_class_names(tmp_path, train):
    for i in range(3):
        Image.fromarray(train.images[i, ..., 0]).save(tmp_path / f"{i}.png")
    ints = write_csv(tmp_path / "ints.csv", [(f"{i}.png", int(train.labels[i])) for i in range(3)])
    source = data.image_folder(str(tmp_path), ints, image_size=28)
    np.testing.assert_array_equal(source.labels, train.labels[:3])
    assert source.num_classes == train.labels[:3].max() + 1 and source.class_names is None
    bom = tmp_path / "bom.csv"  # as saved by spreadsheet programs
    bom.write_text("path,label\n0.png,3\n", encoding="utf-8-sig")
    assert list(data.image_folder(str(tmp_path), str(bom), 28).labels) == [3]
    # A site that lacks some classes passes the consortium's names to keep the same ids.
    names = write_csv(tmp_path / "names.csv", [("0.png", "Sneaker"), ("1.png", "Bag")])
    fixed = data.image_folder(str(tmp_path), names, 28, class_names=train.class_names)
    assert fixed.num_classes == NUM_CLASSES and list(fixed.labels) == [7, 8]


def test_image_folder_reports_all_missing_files_and_bad_csvs(tmp_path, train):
    Image.fromarray(train.images[0, ..., 0]).save(tmp_path / "here.png")
    rows = [("here.png", 0)] + [(f"gone_{i:02d}.png", 1) for i in range(12)]
    with pytest.raises(FileNotFoundError) as error:
        data.image_folder(str(tmp_path), write_csv(tmp_path / "l.csv", rows), 28)
    message = str(error.value)
    assert "12 of 13" in message and "gone_00.png" in message and "gone_09.png" in message
    assert "gone_11.png" not in message  # the list is capped at 10, the count is not

    (tmp_path / "noheader.csv").write_text("here.png,0\n")
    with pytest.raises(ValueError, match="header"):
        data.image_folder(str(tmp_path), str(tmp_path / "noheader.csv"), 28)
    with pytest.raises(ValueError, match="no rows"):
        data.image_folder(str(tmp_path), write_csv(tmp_path / "empty.csv", []), 28)
    with pytest.raises(ValueError, match="outside"):
        data.image_folder(str(tmp_path), write_csv(tmp_path / "neg.csv", [("here.png", -1)]), 28)


def test_image_folder_real_chest_xray_dicom(tmp_path):
    # RG1_UNCI.dcm: a real chest radiograph (CR, MONOCHROME1, 1955 x 1841, 16-bit,
    # window 15000/30000); RG3_UNCR.dcm: a real leg radiograph (CR, MONOCHROME1).
    xray = dicom("RG1_UNCI.dcm")
    root = os.path.dirname(xray)
    csv_path = write_csv(tmp_path / "cxr.csv", [("RG1_UNCI.dcm", "chest"), ("RG3_UNCR.dcm", "leg")])
    source = data.image_folder(root, csv_path, image_size=64, channels=1)
    assert source.class_names == ("chest", "leg")
    for i in range(2):
        image = source[i]["image"]
        assert image.shape == (64, 64, 1) and image.dtype == np.uint8
        assert int(image.max()) - int(image.min()) > 150 and image.std() > 20

    # MONOCHROME1 stores dense tissue as low values: after inversion the output must be
    # anti-correlated with the stored pixels.
    stored = pydicom.dcmread(xray).pixel_array.astype(np.float32)
    stored = np.asarray(Image.fromarray(stored).resize((64, 64), Image.Resampling.BILINEAR))
    correlation = np.corrcoef(stored.ravel(), source[0]["image"].ravel().astype(np.float32))[0, 1]
    assert correlation < -0.9


def test_image_folder_refuses_non_image_and_multiframe_dicoms(tmp_path):
    plan = dicom("rtplan.dcm")  # a real RT plan: no pixel data
    rows = [("rtplan.dcm", 0)]
    source = data.image_folder(os.path.dirname(plan), write_csv(tmp_path / "p.csv", rows), 32)
    with pytest.raises(ValueError, match=r"rtplan\.dcm.*no pixel data"):
        source[0]
    movie = dicom("emri_small.dcm")  # a real 10-frame MR
    rows = [("emri_small.dcm", 0)]
    source = data.image_folder(os.path.dirname(movie), write_csv(tmp_path / "m.csv", rows), 32)
    with pytest.raises(ValueError, match=r"emri_small\.dcm.*multi-frame"):
        source[0]


def test_16_bit_png_keeps_its_range(tmp_path):
    # X-ray PNGs are often 16-bit; write one from the real chest X-ray's stored pixels.
    stored = pydicom.dcmread(dicom("RG1_UNCI.dcm")).pixel_array  # uint16, 803..26512
    Image.fromarray(stored).save(tmp_path / "cxr16.png")
    assert Image.open(tmp_path / "cxr16.png").mode.startswith("I;16")
    image = data.load_image(str(tmp_path / "cxr16.png"), 64, 1)
    assert int(image.max()) - int(image.min()) > 150  # not clipped to a constant 255


def test_dicom_window_is_applied():
    # MR_small.dcm (real MR, 64 x 64) stores 127..2145 with window 600/1600: values above
    # 1400 must saturate at white, which plain min/max scaling would not do.
    image = data.load_image(dicom("MR_small.dcm"), 64, 1)
    assert (image == 255).mean() > 0.03


def test_colour_dicom_becomes_gray_or_rgb():
    ultrasound = dicom("US1_UNCR.dcm")  # a real ultrasound, RGB
    rgb = data.load_image(ultrasound, 48, 3)
    gray = data.load_image(ultrasound, 48, 1)
    assert rgb.shape == (48, 48, 3) and gray.shape == (48, 48, 1) and gray.std() > 10


# ---------------------------------------------------------------- partitions


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "label"])
def test_partitions_are_disjoint_covering_and_seeded(train, kind):
    parts = data.partition(train.labels, kind, num_sites=4, seed=0, alpha=0.5)
    assert len(parts) == 4
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(train)))  # disjoint + covering
    assert all(np.all(np.diff(part) > 0) for part in parts)  # sorted
    again = data.partition(train.labels, kind, num_sites=4, seed=0, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = data.partition(train.labels, kind, num_sites=4, seed=1, alpha=0.5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_is_non_iid_and_label_split_separates_classes(train):
    def spread(parts):
        hist = data.label_histogram(train.labels, parts, NUM_CLASSES)
        shares = hist / hist.sum(axis=1, keepdims=True)
        return shares.std(axis=0).mean()

    iid = data.iid_partition(train.labels, 4, seed=0)
    dirichlet = data.dirichlet_partition(train.labels, 4, alpha=0.5, seed=0, min_size=100)
    assert spread(iid) < 0.01 and spread(dirichlet) > 10 * spread(iid)
    assert min(len(p) for p in dirichlet) >= 100
    by_label = data.label_partition(train.labels, 3, seed=0)
    hist = data.label_histogram(train.labels, by_label, NUM_CLASSES)
    np.testing.assert_array_equal((hist > 0).sum(axis=0), np.ones(NUM_CLASSES))  # 1 site/class


def test_partition_errors(train):
    with pytest.raises(ValueError, match="unknown partition kind"):
        data.partition(train.labels, "by_hospital", 4, seed=0)
    for num_sites in (0, len(train) + 1):
        with pytest.raises(ValueError, match="num_sites"):
            data.partition(train.labels, "iid", num_sites, seed=0)
    with pytest.raises(ValueError, match="number of classes"):
        data.label_partition(train.labels, 11, seed=0)
    with pytest.raises(ValueError, match="draws"):  # needs a perfectly even split
        data.dirichlet_partition(train.labels[:40], 4, alpha=0.01, seed=0, min_size=10)


def test_save_load_partition_round_trip(tmp_path, train):
    parts = data.partition(train.labels, "dirichlet", 3, seed=2, alpha=0.5)
    meta = {"kind": "dirichlet", "alpha": 0.5, "seed": 2, "source": train.name}
    path = tmp_path / "sites" / "partition.json"
    data.save_partition(str(path), parts, meta)
    loaded, loaded_meta = data.load_partition(str(path))
    assert loaded_meta == meta and len(loaded) == 3
    assert all(np.array_equal(a, b) for a, b in zip(parts, loaded))
    assert os.listdir(path.parent) == ["partition.json"]  # no temp file left behind
    (tmp_path / "other.json").write_text('{"sites": []}')
    with pytest.raises(ValueError, match="not a partition file"):
        data.load_partition(str(tmp_path / "other.json"))


# ---------------------------------------------------------------- pipelines

AUGMENT = {"flip": True, "max_shift": 3, "contrast": 0.4}


def test_site_dataset_shapes_order_determinism_and_no_labels(train):
    indices = np.array([5, 17, 3, 42, 8, 99, 1000, 7, 30, 11])

    def make(seed, augment=AUGMENT):
        return data.site_dataset(train, indices, num_samples=3, augment=augment, batch_size=4,
                                 seed=seed)

    batches = list(make(0))
    assert [b["images"].shape for b in batches] == [(4, 3, 28, 28, 1)] * 2 + [(2, 3, 28, 28, 1)]
    assert all(set(b) == {"images"} and b["images"].dtype == np.float32 for b in batches)
    rerun = list(make(0))
    assert all(np.array_equal(a["images"], b["images"]) for a, b in zip(batches, rerun))
    assert not np.array_equal(batches[0]["images"], make(1)[0]["images"])
    copies = batches[0]["images"][0]
    assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])
    # Without augmentation every copy is the image itself, in the order of `indices`.
    plain = np.concatenate([b["images"] for b in make(0, augment=None)])
    expected = train.images[indices].astype(np.float32) / 255
    np.testing.assert_array_equal(plain, np.repeat(expected[:, None], 3, axis=1))


def test_augment_is_a_flip_or_shift_of_the_image(train):
    image = train.images[0].astype(np.float32) / 255
    rng = np.random.default_rng(0)
    flips = [data.Augment(flip=True).image(image, rng) for _ in range(20)]
    assert all(np.array_equal(f, image) or np.array_equal(f, image[:, ::-1]) for f in flips)
    assert any(not np.array_equal(f, image) for f in flips)
    shifted = data.Augment(max_shift=2).image(image, rng)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    crops = [padded[y:y + 28, x:x + 28] for y in range(5) for x in range(5)]
    assert any(np.array_equal(shifted, crop) for crop in crops)
    contrasted = data.Augment(contrast=0.5).image(image, rng)
    assert contrasted.min() >= 0 and contrasted.max() <= 1 and not np.array_equal(contrasted, image)
    with pytest.raises(ValueError, match="unknown augment options"):
        data.site_dataset(train, [0], num_samples=1, augment={"rotate": 10}, batch_size=1, seed=0)


def test_labelled_dataset_batches_match_the_source(train):
    indices = np.arange(100, 150)
    ds = data.labelled_dataset(train, indices, batch_size=16, seed=0)
    batches = list(ds)
    assert [len(b["label"]) for b in batches] == [16, 16, 16, 2]
    assert batches[0]["image"].shape == (16, 28, 28, 1) and batches[0]["image"].dtype == np.float32
    assert batches[0]["label"].dtype == np.int32
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, train.labels[indices])
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]),
                                  train.images[indices].astype(np.float32) / 255)

    shuffled = data.labelled_dataset(train, indices, batch_size=10, seed=0, shuffle=True,
                                     num_epochs=2, drop_remainder=True, augment=AUGMENT)
    labels = np.concatenate([b["label"] for b in shuffled])
    assert len(labels) == 100 and not np.array_equal(labels[:50], train.labels[indices])
    np.testing.assert_array_equal(np.sort(labels[:50]), np.sort(train.labels[indices]))
    infinite = data.labelled_dataset(train, indices, batch_size=10, seed=0, num_epochs=None)
    assert next(iter(infinite.to_iter_dataset()))["image"].shape == (10, 28, 28, 1)


# ---------------------------------------------------------------- TFDS


@pytest.mark.slow
def test_importing_the_data_package_does_not_import_tfds():
    code = "import sys, smsd_jax.data; assert 'tensorflow_datasets' not in sys.modules"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def test_tfds_missing_data_set_errors_are_clear(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="no data set 'no_such_set_xyz'"):
        data.tfds_source("no_such_set_xyz", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build mnist"):
        data.tfds_source("mnist", "train", data_dir=str(tmp_path))


def test_tfds_source_reads_a_prepared_array_record_set(tmp_path, train):
    tfds = pytest.importorskip("tensorflow_datasets")

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="PNG")
        return buffer.getvalue()  # encoded here: TFDS would need TensorFlow to encode arrays

    # A real TFDS array_record data set (first 24 Fashion-MNIST images) prepared offline,
    # then read back from files only, as on a machine that received a prepared data set.
    with tfds.core.registered.skip_registration():
        class SmsdFashionSubset(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(train.class_names))}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(24):
                    yield i, {"image": png(train.images[i]), "label": int(train.labels[i])}

        SmsdFashionSubset(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))

    source = data.tfds_source("smsd_fashion_subset", "train", data_dir=str(tmp_path))
    assert len(source) == 24 and source.num_classes == NUM_CLASSES
    assert source.image_shape == (28, 28, 1)
    # TFDS stores examples in hashed-key order: match each record to its original image.
    originals = train.images[:24].reshape(24, -1)
    for i in range(len(source)):
        record = source[i]
        match = np.flatnonzero((originals == record["image"].reshape(1, -1)).all(axis=1))
        assert match.size == 1 and record["label"] == train.labels[match[0]] == source.labels[i]
        assert record["label"].dtype == np.int32
    np.testing.assert_array_equal(np.sort(source.labels), np.sort(train.labels[:24]))
    batches = data.site_dataset(source, np.arange(24), num_samples=2, augment=None,
                                batch_size=8, seed=0)
    assert batches[0]["images"].shape == (8, 2, 28, 28, 1)
