"""Random-access image sources for grain (`grain.MapDataset.source(src)`).

Every source has `__len__`, `__getitem__(i)` returning
`{"image": uint8 [H, W, C], "label": int32 []}` with C in {1, 3}, and the attributes
`num_classes`, `image_shape` (H, W, C), `labels` (int32 [N], so partitioning reads no
pixels) and `name`. Nothing here downloads: every source reads files already on disk.

A multi-label source (`MultiLabelSource`: F binary findings per image, some unknown) has
`multilabel = True`, records `{"image", "label": float32 [F], "mask": float32 [F]}`,
`labels` float32 [N, F] (0 where unknown), `mask` float32 [N, F] (1 = known),
`finding_names` and `num_classes` = F; `is_multilabel(source)` tells the two kinds apart.
"""

from __future__ import annotations

import csv
import functools
import gzip
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from smsd_jax.errors import MissingInputError, SMSDError, require

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DICOM_SUFFIXES = (".dcm", ".dicom")
_MAX_LISTED = 10
# What a multi-label CSV's uncertain cell (-1) becomes: (label, mask); CheXpert's U-Ignore,
# U-Zeros and U-Ones.
UNCERTAIN_POLICIES = {"ignore": (0.0, 0.0), "zeros": (0.0, 1.0), "ones": (1.0, 1.0)}


class Source(Protocol):
    """What every source provides; records are `{"image": uint8 [H, W, C], "label": int32 []}`."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    labels: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def _record(image: np.ndarray, label) -> dict[str, np.ndarray]:
    return {"image": image, "label": np.int32(label)}


def is_multilabel(source) -> bool:
    """Whether `source` gives F binary findings per image (`MultiLabelSource`), not a class."""
    return bool(getattr(source, "multilabel", False))


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise SMSDError(
            f"{where}: {bad.size} labels outside [0, {num_classes}), first at index {bad[0]}"
            f" (label {labels[bad[0]]}); fix the labels or pass the right num_classes.")


def _check_images(images, name: str) -> np.ndarray:
    """`images` as an array when it is uint8 [N, H, W, C] with C 1 or 3."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise SMSDError(
            f"{name}: images must be uint8 [N, H, W, C] with C 1 or 3, got {images.dtype}"
            f" {images.shape}; add a channel axis with images[..., None] for grayscale.")
    return images


def _check_count(num_images: int, num_labels: int, name: str) -> None:
    if num_images != num_labels:
        raise SMSDError(f"{name}: {num_images} images but {num_labels} labels; they must match.")
    if num_images == 0:
        raise SMSDError(f"{name}: the data set is empty; check the file or split.")


def _read_only(values: np.ndarray) -> np.ndarray:
    # Records are views into these arrays, which may be shared through a cache:
    # read-only views make an in-place transform fail loudly instead of corrupting them.
    view = values.view()
    view.flags.writeable = False
    return view


class ArraySource:
    """In-memory source over `images` uint8 [N, H, W, C] (C 1 or 3) and `labels` int [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, name: str,
                 class_names: Sequence[str] | None = None):
        images, labels = _check_images(images, name), np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise SMSDError(
                f"{name}: labels must be integers [N], got {labels.dtype} {labels.shape}.")
        _check_count(len(images), len(labels), name)
        if class_names is not None and len(class_names) != num_classes:
            raise SMSDError(f"{name}: {len(class_names)} class names for {num_classes} classes.")
        _check_labels(labels, num_classes, name)
        self.images = _read_only(images)
        self.labels = labels.astype(np.int32)
        self.labels.flags.writeable = False
        self.num_classes = int(num_classes)
        self.name = name
        self.class_names = None if class_names is None else tuple(class_names)
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return _record(self.images[index], self.labels[index])


class MultiLabelSource:
    """F binary findings per image, each known or not (a chest X-ray's 14 findings).

    `images` is uint8 [N, H, W, C] or a lazy sequence of such images (`ImageFiles`) of shape
    `image_shape`; `labels` 0/1 [N, F] with 0 wherever `mask` [N, F] is 0 (unknown: left out
    of loss and metrics). Records: `{"image": uint8 [H, W, C], "label": float32 [F],
    "mask": float32 [F]}`.
    """

    multilabel = True

    def __init__(self, images, labels, mask, finding_names: Sequence[str], name: str,
                 image_shape: tuple[int, int, int] | None = None):
        if image_shape is None:
            images = _check_images(images, name)
            image_shape = images.shape[1:]
        labels, mask = np.asarray(labels, np.float32), np.asarray(mask, np.float32)
        if labels.ndim != 2 or labels.shape[1] == 0 or mask.shape != labels.shape:
            raise SMSDError(f"{name}: labels and mask must both be [N, F] with F >= 1 findings,"
                            f" got {labels.shape} and {mask.shape}.")
        _check_count(len(images), len(labels), name)
        for what, values in (("labels", labels), ("mask", mask)):
            if not np.isin(values, (0.0, 1.0)).all():
                raise SMSDError(f"{name}: multi-label {what} must be 0 or 1, found "
                                f"{values[~np.isin(values, (0.0, 1.0))][0]}.")
        if np.any(labels > mask):
            raise SMSDError(f"{name}: a label of 1 where the mask says unknown; store unknown"
                            " labels as 0 with mask 0.")
        names = tuple(str(n) for n in finding_names)
        if len(names) != labels.shape[1] or len(set(names)) != len(names):
            raise SMSDError(f"{name}: {labels.shape[1]} findings need as many distinct names,"
                            f" got {names}.")
        self.images = _read_only(images) if isinstance(images, np.ndarray) else images
        self.labels, self.mask = _read_only(labels), _read_only(mask)
        self.finding_names = names
        self.num_classes = len(names)
        self.image_shape = tuple(image_shape)
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index],
                "mask": self.mask[index]}


# ---------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads a gzip IDX file of uint8 values with `ndim` dimensions (the MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    # Magic: two zero bytes, type 0x08 (uint8), number of dimensions.
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 8, ndim]):
        raise SMSDError(
            f"{path}: not a uint8 IDX file with {ndim} dimensions (magic {data[:4].hex()});"
            " the file is corrupt: reinstall dataset-fashion-mnist.")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != np.prod(shape):
        raise SMSDError(
            f"{path}: header says {shape} = {np.prod(shape)} values but the file holds"
            f" {values.size}; the file is truncated: reinstall dataset-fashion-mnist.")
    return values.reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached: the site, server and downstream stages of one process all read it.
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [os.path.join(root, f"{prefix}-{kind}-idx{n}-ubyte.gz")
             for kind, n in (("images", 3), ("labels", 1))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingInputError(
            f"Fashion-MNIST not found: missing {', '.join(missing)}. Install it with"
            " `sudo apt-get install dataset-fashion-mnist` (Debian package, installs to"
            f" {FASHION_MNIST_ROOT}) or pass root= the folder holding the IDX .gz files."
            " Nothing is downloaded.")
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise SMSDError(f"{root}: {len(images)} images but {len(labels)} labels in split"
                        f" {split!r}; reinstall dataset-fashion-mnist.")
    return images[..., None], labels


def fashion_mnist(split: str = "train", root: str = FASHION_MNIST_ROOT) -> ArraySource:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist`: uint8 [N, 28, 28, 1], 10 classes.

    N is 60,000 for "train" and 10,000 for "test".
    """
    if split not in ("train", "test"):
        raise SMSDError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}.")
    images, labels = _fashion_mnist_arrays(os.path.abspath(root), split)
    return ArraySource(images, labels, 10, f"fashion_mnist/{split}", FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------- MedMNIST


def medmnist_npz(path: str, split: str = "train", multilabel: bool = False,
                 finding_names: Sequence[str] | None = None) -> ArraySource | MultiLabelSource:
    """A MedMNIST `.npz` (any size: 28/64/128/224; grayscale or RGB).

    The file holds `{split}_images` uint8 [N, H, W] or [N, H, W, 3] and `{split}_labels`.
    Single-label (the default): labels [N, 1]; `num_classes` is the largest label over all
    splits in the file plus one, so the train, val and test sources of one file agree.
    `multilabel`: labels 0/1 [N, F] (ChestMNIST's 14 findings), every entry known, read as
    a `MultiLabelSource` whose findings are `finding_names` (default "finding_0", ...; a
    MedMNIST file does not name them).
    """
    if split not in ("train", "val", "test"):
        raise SMSDError(f"MedMNIST split must be 'train', 'val' or 'test', got {split!r}.")
    if not os.path.isfile(path):
        raise MissingInputError(
            f"MedMNIST file {path} not found. Copy the .npz (e.g. pneumoniamnist.npz or"
            " pneumoniamnist_64.npz from the MedMNIST release) onto this machine; nothing is"
            " downloaded.")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in arrays:
            raise SMSDError(
                f"{path} has no array {key!r} (it has {sorted(arrays)}); a MedMNIST file holds"
                " train/val/test _images and _labels: check the file and the split.")
    label_keys = [k for k in arrays if k.endswith("_labels")]
    images = arrays[f"{split}_images"]
    if images.ndim == 3:
        images = images[..., None]
    name = f"{os.path.splitext(os.path.basename(path))[0]}/{split}"
    if multilabel:
        return _medmnist_multilabel(path, arrays, label_keys, split, images, name,
                                    finding_names)
    for key in label_keys:
        if arrays[key].ndim == 2 and arrays[key].shape[1] > 1:
            raise SMSDError(
                f"{path}: {key} has shape {arrays[key].shape}, a multi-label task (like"
                " ChestMNIST); read it as one with --config.data.task=multilabel"
                " (medmnist_npz(..., multilabel=True)).")
    labels = arrays[f"{split}_labels"].reshape(-1)
    num_classes = 1 + max(int(arrays[k].max(initial=0)) for k in label_keys)
    return ArraySource(images, labels.astype(np.int32), num_classes, name)


def _medmnist_multilabel(path: str, arrays: dict, label_keys: list[str], split: str,
                         images: np.ndarray, name: str,
                         finding_names: Sequence[str] | None) -> MultiLabelSource:
    """`medmnist_npz(multilabel=True)`: every split's labels 0/1 [N, F], one F for all."""
    widths = {key: arrays[key].shape[1] if arrays[key].ndim == 2 else None for key in label_keys}
    if len(set(widths.values())) != 1 or None in widths.values():
        raise SMSDError(f"{path}: multi-label labels must be [N, F] with one F in every split, "
                        f"got { {k: arrays[k].shape for k in label_keys} }.")
    labels = arrays[f"{split}_labels"]
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise SMSDError(f"{path}: {split}_labels[{row}, {column}] is {labels[row, column]};"
                        " multi-label findings must be 0 or 1 (is this a single-label file?"
                        " then leave config.data.task single_label).")
    names = finding_names or [f"finding_{i}" for i in range(labels.shape[1])]
    return MultiLabelSource(images, labels, np.ones(labels.shape, np.float32), names, name)


# ---------------------------------------------------------------- image folders


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scales any numeric array to uint8 by its own min and max (a constant image gives 0)."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((values - low) * scale).astype(np.uint8)


def _read_dicom(path: str) -> np.ndarray:
    """Decodes one single-frame DICOM to uint8 [H, W] (monochrome) or [H, W, 3] (colour).

    Monochrome: modality LUT (rescale slope/intercept), then VOI LUT or window
    centre/width as the file prescribes, min/max to uint8, and MONOCHROME1 inverted so
    that bright always means dense.
    """
    pydicom = require("pydicom", "medical")
    require("pydicom.pixels", "medical")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as e:
        raise SMSDError(f"{path}: cannot read the image ({e}); fix or remove the file.") from e
    if "PixelData" not in ds:
        raise SMSDError(
            f"{path}: DICOM has no pixel data (modality {ds.get('Modality', 'unknown')},"
            f" SOP class {ds.get('SOPClassUID', 'unknown')}); remove it from the labels CSV.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SMSDError(
            f"{path}: multi-frame DICOM ({frames} frames) is not supported; export the frame"
            " you want as its own file.")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises several types for missing codecs
        raise SMSDError(
            f"{path}: cannot decode pixel data (transfer syntax"
            f" {ds.file_meta.get('TransferSyntaxUID', 'unknown')}): {e}. Install a pydicom"
            " decoder plugin (e.g. pip install pylibjpeg pylibjpeg-openjpeg) or convert the"
            " file to an uncompressed syntax.") from e
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = pydicom.pixels.apply_modality_lut(pixels, ds)
        image = _to_uint8(pydicom.pixels.apply_voi_lut(values, ds))
        return 255 - image if photometric == "MONOCHROME1" else image
    if photometric == "PALETTE COLOR":
        pixels = pydicom.pixels.apply_color_lut(pixels, ds)
    # pydicom already returns YBR colour data converted to RGB.
    return pixels if pixels.dtype == np.uint8 else _to_uint8(pixels)


def _read_picture(path: str) -> np.ndarray:
    """Decodes a PNG/JPEG (any PIL format) to uint8 [H, W] or [H, W, 3]."""
    with Image.open(path) as picture:
        if picture.mode in ("L", "RGB"):
            return np.asarray(picture)
        if picture.mode.startswith(("I", "F")):
            # 16-bit and float images (common for X-rays): PIL's convert would clip at 255.
            return _to_uint8(np.asarray(picture))
        return np.asarray(picture.convert("RGB"))


def read_pixels(path: str) -> np.ndarray:
    """Decodes a PNG/JPEG/DICOM file to uint8 [H, W] or [H, W, 3], at its own size."""
    try:
        is_dicom = path.lower().endswith(_DICOM_SUFFIXES)
        return _read_dicom(path) if is_dicom else _read_picture(path)
    except OSError as e:
        raise SMSDError(f"{path}: cannot read the image ({e}); fix or remove the file.") from e


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
    """Reads a PNG/JPEG/DICOM file into uint8 [image_size, image_size, channels].

    The whole image is resized (bilinear, no crop) and converted gray <-> RGB as asked.
    """
    picture = Image.fromarray(read_pixels(path)).convert("L" if channels == 1 else "RGB")
    picture = picture.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(picture).reshape(image_size, image_size, channels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _parse_labels(raw: list[str], class_names: Sequence[str] | None,
                  where: str) -> tuple[np.ndarray, tuple[str, ...] | None, int]:
    """CSV label strings -> (ids int32 [N], class names or None, num_classes).

    All integers: they are the ids. Otherwise they are class names, numbered in sorted
    order, or in the order of `class_names` when given.
    """
    integers = all(_is_int(s) for s in raw)
    names = tuple(class_names) if class_names is not None else (
        None if integers else tuple(sorted(set(raw))))
    if integers:
        ids = np.array([int(s) for s in raw], np.int32)
    else:
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise SMSDError(
                f"{where}: labels {unknown[:_MAX_LISTED]} are not in class_names {names}.")
        ids = np.array([index[s] for s in raw], np.int32)
    num_classes = len(names) if names is not None else int(ids.max()) + 1
    _check_labels(ids, num_classes, where)
    return ids, names, num_classes


def _check_size(image_size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise SMSDError(f"channels must be 1 or 3, got {channels}.")
    if image_size < 1:
        raise SMSDError(f"image_size must be positive, got {image_size}.")


def _listed_files(root: str, paths: list[str], labels_csv: str) -> list[str]:
    """`paths` (relative to `root`) joined to it, when every file exists (all missing named)."""
    joined = [os.path.join(root, path) for path in paths]
    missing = [p for p in joined if not os.path.isfile(p)]
    if missing:
        raise MissingInputError(
            f"{labels_csv}: {len(missing)} of {len(paths)} listed files do not exist under"
            f" {root}: {missing[:_MAX_LISTED]}{' ...' if len(missing) > _MAX_LISTED else ''};"
            " fix the paths (relative to root) or remove the rows.")
    return joined


class ImageFolderSource:
    """Lazy source over image files listed in a CSV; decodes on `__getitem__`.

    Records: `{"image": uint8 [image_size, image_size, channels], "label": int32 []}`.
    """

    def __init__(self, root: str, labels_csv: str, image_size: int, channels: int = 1,
                 class_names: Sequence[str] | None = None):
        _check_size(image_size, channels)
        rows = self._read_csv(labels_csv)
        self.paths = _listed_files(root, [path for path, _ in rows], labels_csv)
        self.labels, self.class_names, self.num_classes = _parse_labels(
            [label for _, label in rows], class_names, labels_csv)
        self.labels.flags.writeable = False
        self.image_shape = (image_size, image_size, channels)
        self.name = os.path.splitext(os.path.basename(labels_csv))[0]

    @staticmethod
    def _read_csv(labels_csv: str) -> list[tuple[str, str]]:
        if not os.path.isfile(labels_csv):
            raise MissingInputError(f"labels CSV {labels_csv} not found.")
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with open(labels_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise SMSDError(
                    f"{labels_csv}: needs a header row with columns 'path' and 'label', got"
                    f" {reader.fieldnames}.")
            rows = [((row["path"] or "").strip(), (row["label"] or "").strip()) for row in reader]
        empty = [i + 2 for i, (path, label) in enumerate(rows) if not path or not label]
        if empty:
            raise SMSDError(f"{labels_csv}: empty path or label on lines {empty[:_MAX_LISTED]}.")
        if not rows:
            raise SMSDError(f"{labels_csv}: no rows after the header; list at least one image.")
        return rows

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        height, _, channels = self.image_shape
        return _record(load_image(self.paths[index], height, channels), self.labels[index])


class ImageFiles:
    """The images at `paths`, decoded on `__getitem__` to uint8 [image_size, image_size, channels]
    (`load_image`): the lazy images of a `MultiLabelSource`."""

    def __init__(self, paths: Sequence[str], image_size: int, channels: int):
        _check_size(image_size, channels)
        self.paths, self.image_size, self.channels = list(paths), image_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return load_image(self.paths[index], self.image_size, self.channels)


def _finding_cell(text: str, uncertain: tuple[float, float]) -> tuple[float, float] | None:
    """One CSV cell -> (label, mask), or None when it is not a finding value."""
    if not text:
        return 0.0, 1.0  # not mentioned: negative (CheXpert's reading of a blank)
    try:
        value = float(text)
    except ValueError:
        return None
    return {1.0: (1.0, 1.0), 0.0: (0.0, 1.0), -1.0: uncertain}.get(value)


def _read_findings_csv(labels_csv: str, finding_names: Sequence[str] | None, uncertain: str
                       ) -> tuple[list[str], tuple[str, ...], np.ndarray, np.ndarray]:
    """A CSV with a `path` column and one column per finding -> (paths, names, labels, mask).

    The finding columns are `finding_names` in that order, or every column but `path`.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise SMSDError(f"uncertain={uncertain!r} is not a policy for -1 cells; use one of "
                        f"{sorted(UNCERTAIN_POLICIES)}.")
    if not os.path.isfile(labels_csv):
        raise MissingInputError(f"labels CSV {labels_csv} not found.")
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        names = tuple(finding_names) if finding_names else tuple(c for c in header if c != "path")
        absent = [c for c in ("path", *names) if c not in header]
        if absent or not names:
            raise SMSDError(f"{labels_csv}: needs a header row with a 'path' column and the "
                            f"finding columns; missing {absent or 'any finding column'} in "
                            f"{header}.")
        rows = [{key: (row.get(key) or "").strip() for key in ("path", *names)}
                for row in reader]
    if not rows:
        raise SMSDError(f"{labels_csv}: no rows after the header; list at least one image.")
    empty = [i + 2 for i, row in enumerate(rows) if not row["path"]]
    if empty:
        raise SMSDError(f"{labels_csv}: empty path on lines {empty[:_MAX_LISTED]}.")
    policy = UNCERTAIN_POLICIES[uncertain]
    cells = [[_finding_cell(row[name], policy) for name in names] for row in rows]
    bad = [(i, j) for i, row in enumerate(cells) for j, cell in enumerate(row) if cell is None]
    if bad:
        i, j = bad[0]
        raise SMSDError(
            f"{labels_csv}: row {i + 1} (line {i + 2}), column {names[j]!r} holds "
            f"{rows[i][names[j]]!r} ({len(bad)} such cells); a finding is 1 (positive), "
            "0 (negative), -1 (uncertain) or empty (not mentioned): fix the cells, or list the"
            " finding columns in finding_names (config.data.finding_names).")
    values = np.array(cells, np.float32)  # [N, F, 2]: (label, mask)
    return [row["path"] for row in rows], names, values[..., 0], values[..., 1]


def multilabel_image_folder(root: str, labels_csv: str, image_size: int, channels: int = 1,
                            finding_names: Sequence[str] | None = None,
                            uncertain: str = "ignore") -> MultiLabelSource:
    """Folder of PNG/JPEG/DICOM files with a CheXpert/NIH-style CSV: a `path` column
    (relative to `root`) and one column per finding (`finding_names` picks and orders them;
    default every other column).

    A cell is 1 (positive), 0 (negative), empty (not mentioned: 0, known, as CheXpert reads a
    blank) or -1 (uncertain), which `uncertain` decides: "ignore" (mask 0: out of loss and
    metrics), "zeros" (0) or "ones" (1). "1.0", "0.0", "-1.0" (CheXpert's spelling) are the
    same values; anything else is refused naming the file, row and column.
    """
    paths, names, labels, mask = _read_findings_csv(labels_csv, finding_names, uncertain)
    images = ImageFiles(_listed_files(root, paths, labels_csv), image_size, channels)
    return MultiLabelSource(images, labels, mask, names,
                            os.path.splitext(os.path.basename(labels_csv))[0],
                            image_shape=(image_size, image_size, channels))


def image_folder(root: str, labels_csv: str, image_size: int, channels: int = 1,
                 class_names: Sequence[str] | None = None) -> ImageFolderSource:
    """Folder of PNG/JPEG/DICOM files with a CSV `path,label` (paths relative to `root`).

    Labels are integer ids, or class names mapped to ids in sorted order (or in the
    order of `class_names`, which sites pass so that they all agree on the ids).
    """
    return ImageFolderSource(root, labels_csv, image_size, channels, class_names)


# ---------------------------------------------------------------- TFDS


class TfdsSource:
    """Wraps a `tfds.data_source` (array_record, no TensorFlow) into the common record."""

    def __init__(self, data_source, name: str, num_classes: int,
                 image_shape: tuple[int, int, int], image_key: str, label_key: str):
        self._data_source = data_source
        self._image_key, self._label_key = image_key, label_key
        self.name, self.num_classes, self.image_shape = name, num_classes, image_shape

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._data_source[index]
        image = np.asarray(record[self._image_key], np.uint8).reshape(self.image_shape)
        return _record(image, record[self._label_key])

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """int32 [N]. Costs one pass that decodes every image: TFDS cannot skip the image
        feature without TensorFlow. Computed on first use and kept."""
        labels = np.array([self._data_source[i][self._label_key] for i in range(len(self))],
                          np.int32)
        _check_labels(labels, self.num_classes, self.name)
        return labels


def tfds_source(name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                label_key: str = "label") -> TfdsSource:
    """A TFDS data set already prepared in array_record format under `data_dir`.

    Never downloads. Prepare it where there is network with
    `tfds build NAME --file_format=array_record --data_dir=DIR` and copy DIR here.
    """
    import tensorflow_datasets as tfds  # optional dependency, heavy to import

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise SMSDError(
            f"TFDS has no data set {name!r} (neither registered nor prepared under"
            f" data_dir={data_dir}); check the name and data_dir.") from None
    try:
        data_source = builder.as_data_source(split=split)
    except Exception as e:  # TFDS raises many types here; the usual cause is checked below
        if builder.is_prepared():
            raise
        raise MissingInputError(
            f"TFDS data set {name!r} is not prepared under {builder.data_dir}. Nothing is"
            f" downloaded: on a machine with network run `tfds build {name}"
            " --file_format=array_record --data_dir=DIR`, copy DIR here and pass data_dir=DIR."
        ) from e
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise SMSDError(f"TFDS {name!r} has no feature {key!r} (it has {list(features)});"
                            " pass image_key= and label_key=.")
    shape = tuple(features[image_key].shape)
    dtype = getattr(features[image_key], "np_dtype", None)
    if dtype != np.uint8 or len(shape) != 3 or None in shape or shape[-1] not in (1, 3):
        raise SMSDError(f"TFDS {name!r} images are {dtype} {shape}; only fixed-size uint8"
                        " [H, W, 1|3] images are supported: use image_folder otherwise.")
    num_classes = getattr(features[label_key], "num_classes", None)
    if num_classes is None:
        raise SMSDError(f"TFDS {name!r} feature {label_key!r} is not a ClassLabel; pass a"
                        " label_key that is.")
    return TfdsSource(data_source, f"{name}/{split}", num_classes, shape, image_key, label_key)
