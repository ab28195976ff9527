"""Segmentation data: images with a class for every pixel (`SegmentationSource`).

    mask_folder(root, image_size, channels, class_names)   # root/images/* + root/masks/*.png
    nifti_slices(image_path, atlas_path, split, ...)       # a 3-D scan and its atlas, sliced

Class 0 is the background in both. A mask's pixel value is its class. Images are padded to a
square (centred, with zeros) and resized to `image_size`; masks go through the same steps with
nearest-neighbour resampling, so no new class values appear. Records are `{"image": uint8
[S, S, C], "mask": uint8 [S, S], "label": int32 []}`; the label is the image's most frequent
foreground class (0 if it has none). It is used only to split images over sites and pick
labelled subsets; the site's payload never holds labels or masks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from smsd_jax.data import sources
from smsd_jax.errors import MissingInputError, SMSDError, require

SPLITS = ("train", "test")
_PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")

# An approximate grouping of the AAL atlas's 116 regions into 7 lobes and structures, by
# the prefix of each region's name (ours, for a task of a few classes; AAL itself names
# regions, not lobes). A region no group names stays background.
AAL_LOBES = {
    "frontal": ("Precentral", "Frontal", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory",
                "Rectus", "Paracentral_Lobule"),
    "parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus"),
    "temporal": ("Temporal", "Heschl", "Fusiform"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital"),
    "limbic": ("Cingulum", "Hippocampus", "ParaHippocampal", "Amygdala", "Insula"),
    "deep_grey": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum", "Vermis"),
}


def dominant_class(masks: np.ndarray) -> np.ndarray:
    """masks `[N, H, W]` -> int32 `[N]`: each mask's most frequent class other than 0 (0 when
    it is all background)."""
    flat = masks.reshape(len(masks), -1).astype(np.int64)
    counts = np.stack([np.bincount(m, minlength=int(flat.max()) + 1) for m in flat])
    counts[:, 0] = 0
    return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), 0).astype(np.int32)


class SegmentationSource:
    """In-memory images uint8 `[N, H, W, C]` with masks `[N, H, W]` of class ids in
    `[0, len(class_names))`, class 0 the background."""

    multilabel = False
    segmentation = True

    def __init__(self, images: np.ndarray, masks: np.ndarray, class_names: Sequence[str],
                 name: str):
        images, masks = sources._check_images(images, name), np.asarray(masks)
        sources._check_count(len(images), len(masks), name)
        if masks.shape != images.shape[:3]:
            raise SMSDError(f"{name}: masks {masks.shape} do not match images {images.shape}; "
                            "give one [H, W] mask per image")
        if len(class_names) < 2:
            raise SMSDError(f"{name}: class_names {tuple(class_names)} must name the background"
                            " (class 0) and at least one structure")
        bad = np.flatnonzero(masks.reshape(len(masks), -1).max(axis=1) >= len(class_names))
        if bad.size:
            raise SMSDError(f"{name}: mask {bad[0]} has class {masks[bad[0]].max()}, outside "
                            f"[0, {len(class_names)}) = the classes {tuple(class_names)}")
        self.images = sources._read_only(images)
        self.masks = sources._read_only(masks.astype(np.uint8))
        self.labels = sources._read_only(dominant_class(self.masks))
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.name = name
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "mask": self.masks[index],
                "label": np.int32(self.labels[index])}


def is_segmentation(source) -> bool:
    """Whether `source` gives a class per pixel (`SegmentationSource`)."""
    return bool(getattr(source, "segmentation", False))


# ---------------------------------------------------------------- resizing


def _square(values: np.ndarray) -> np.ndarray:
    """`[H, W, ...]` padded with zeros, centred, to `[S, S, ...]` with S = max(H, W)."""
    h, w = values.shape[:2]
    side = max(h, w)
    pad = [((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2,
                                                           side - w - (side - w) // 2)]
    return np.pad(values, pad + [(0, 0)] * (values.ndim - 2))


def resize_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 `[H, W]` or `[H, W, 3]` -> uint8 `[size, size, channels]` (square pad, bilinear)."""
    picture = Image.fromarray(_square(image)).convert("L" if channels == 1 else "RGB")
    picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(picture).reshape(size, size, channels)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[H, W]` of class ids -> `[size, size]` (square pad, nearest: no new values)."""
    picture = Image.fromarray(_square(mask.astype(np.uint8)))
    return np.asarray(picture.resize((size, size), Image.Resampling.NEAREST))


# ---------------------------------------------------------------- a folder of PNG masks


def _stems(folder: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.lower().endswith(suffixes)}


def _read_mask(path: str) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            if picture.mode not in ("L", "P", "I", "I;16", "1"):
                raise SMSDError(f"{path}: mask has mode {picture.mode}; save it as a one-channel"
                                " PNG whose pixel values are class ids (0 = background)")
            return np.asarray(picture).astype(np.int64)
    except OSError as e:
        raise SMSDError(f"{path}: cannot read the mask ({e}); fix or remove it.") from e


def mask_folder(root: str, image_size: int, channels: int,
                class_names: Sequence[str]) -> SegmentationSource:
    """Images in `root/images/` (PNG, JPEG or DICOM) with masks of the same name in
    `root/masks/` (one-channel PNG, pixel value = class id, same height and width as the
    image).

    Raises:
      MissingInputError: a folder is missing, or an image has no mask (or a mask no image).
      SMSDError: a mask whose size differs from its image's, or with a class id outside
        `class_names`.
    """
    sources._check_size(image_size, channels)
    folders = [os.path.join(root, "images"), os.path.join(root, "masks")]
    for folder in folders:
        if not os.path.isdir(folder):
            raise MissingInputError(f"{folder} not found: a mask folder holds images/ and "
                                    "masks/ with one mask PNG per image, of the same name")
    images, masks = _stems(folders[0], _PICTURES), _stems(folders[1], (".png",))
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise MissingInputError(f"{root}: {len(unmatched)} images without a mask or masks "
                                f"without an image, e.g. {unmatched[:5]}; give each image in "
                                "images/ a PNG of the same name in masks/")
    if not images:
        raise MissingInputError(f"{folders[0]}: no images found")
    out_images, out_masks = [], []
    for stem in images:
        pixels, mask = sources.read_pixels(images[stem]), _read_mask(masks[stem])
        if mask.shape != pixels.shape[:2]:
            raise SMSDError(f"{masks[stem]}: mask is {mask.shape[1]}x{mask.shape[0]} but its "
                            f"image {images[stem]} is {pixels.shape[1]}x{pixels.shape[0]}; "
                            "a mask must have its image's height and width")
        if mask.max() >= len(class_names):
            raise SMSDError(f"{masks[stem]}: class id {mask.max()} is outside [0, "
                            f"{len(class_names)}) = {tuple(class_names)}; fix the mask or "
                            "config.data.class_names")
        out_images.append(resize_image(pixels, image_size, channels))
        out_masks.append(resize_mask(mask, image_size))
    return SegmentationSource(np.stack(out_images), np.stack(out_masks), class_names,
                              name=os.path.basename(os.path.normpath(root)))


# ---------------------------------------------------------------- a NIfTI scan and its atlas


def _load_nifti(path: str):
    if not os.path.isfile(path):
        raise MissingInputError(f"NIfTI file {path} not found")
    nibabel = require("nibabel", "medical")
    try:
        return nibabel.load(path)
    except Exception as e:  # nibabel raises several types for a bad file
        raise SMSDError(f"{path}: cannot read it as NIfTI ({e})") from e


def atlas_names(path: str) -> dict[int, str]:
    """An atlas's label file (lines `index name [code]`, as FSL/MRIcron ship them) -> names."""
    if not os.path.isfile(path):
        raise MissingInputError(f"atlas label file {path} not found")
    names = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not parts[0].isdigit():
                raise SMSDError(f"{path}, line {number}: {line.strip()!r} is not "
                                "'<index> <name> [...]'")
            names[int(parts[0])] = parts[1]
    return names


def group_lut(names: Mapping[int, str], groups: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Atlas index -> class id (1 + the group's position; 0 for a region no group names)."""
    lut = np.zeros(max(names) + 1, np.uint8)
    for index, name in names.items():
        for k, prefixes in enumerate(groups.values()):
            if name.startswith(tuple(prefixes)):
                lut[index] = k + 1
                break
    return lut


def position_split(extent: np.ndarray, split: str, test_block: Sequence[float],
                   gap: int) -> np.ndarray:
    """Slice indices of `split`: test is the block `test_block` (fractions of `extent`, the
    slices that hold labels); train is the rest less `gap` slices each side of the block, so
    no training slice neighbours a test slice."""
    if split not in SPLITS:
        raise SMSDError(f"split={split!r}; use one of {SPLITS}")
    low, high = test_block
    if not 0.0 <= low < high <= 1.0:
        raise SMSDError(f"config.data.test_block={tuple(test_block)} must be two fractions "
                        "0 <= low < high <= 1 of the labelled slices")
    n = len(extent)
    first, last = int(low * n), max(int(high * n), int(low * n) + 1)
    if split == "test":
        return extent[first:last]
    return np.concatenate([extent[:max(first - gap, 0)], extent[last + gap:]])


def nifti_slices(image_path: str, atlas_path: str, split: str, *, image_size: int,
                 class_names: Sequence[str] | None = None,
                 groups: Mapping[str, Sequence[str]] | None = None, labels_path: str = "",
                 axis: int = 0, test_block: Sequence[float] = (0.5, 1.0),
                 gap: int = 3) -> SegmentationSource:
    """2-D slices along `axis` of a 3-D scan, with the classes of an atlas on the same grid.

    Classes: with `groups` (names -> prefixes of the atlas's region names in `labels_path`),
    class k + 1 is the k-th group (`group_lut`), 0 the rest; without, the atlas's own values
    are the classes (`class_names` names them, background first). Intensities are scaled to
    uint8 by the 99.5th percentile of the scan's non-zero voxels. Slices without labels are
    left out; the rest are split by position (`position_split`). The defaults cut sagittal
    slices (axis 0 runs left to right in RAS scans such as MNI templates) and test on the
    second half, one hemisphere, training on the other, less `gap` slices at the midline.

    Raises:
      SMSDError: the atlas's grid (shape and affine) is not the scan's; an atlas value
        without a class.
    """
    scan, atlas = _load_nifti(image_path), _load_nifti(atlas_path)
    if scan.shape[:3] != atlas.shape[:3] or not np.allclose(scan.affine, atlas.affine,
                                                            atol=1e-3):
        raise SMSDError(
            f"{atlas_path}: the atlas's grid (shape {atlas.shape[:3]}, voxel-to-world affine "
            f"{np.round(atlas.affine, 2).tolist()}) is not the scan's {image_path} (shape "
            f"{scan.shape[:3]}, affine {np.round(scan.affine, 2).tolist()}); resample the atlas "
            "onto the scan's grid first (nearest neighbour)")
    volume = np.asarray(scan.dataobj, np.float32)
    labels = np.asarray(atlas.dataobj).astype(np.int64)
    if volume.ndim != 3:
        raise SMSDError(f"{image_path}: a 3-D scan is needed, got shape {volume.shape}")
    if groups:
        names = ("background", *groups)
        labels = group_lut(atlas_names(labels_path), groups)[np.clip(labels, 0, None)]
    else:
        names = tuple(class_names or ())
        if labels.max() >= len(names):
            raise SMSDError(f"{atlas_path}: atlas value {labels.max()} has no class in "
                            f"class_names {names}; name every value, background first, or "
                            "group the regions (config.data.label_groups)")
    scale = np.percentile(volume[volume > 0], 99.5) if (volume > 0).any() else 1.0
    volume = np.clip(volume / scale * 255.0, 0, 255).astype(np.uint8)
    volume, labels = np.moveaxis(volume, axis, 0), np.moveaxis(labels, axis, 0)
    extent = np.flatnonzero(labels.reshape(len(labels), -1).max(axis=1) > 0)
    chosen = position_split(extent, split, test_block, gap)
    # Rotated so that the first in-plane axis runs top to bottom as the image is shown.
    images = np.stack([resize_image(np.rot90(volume[i]), image_size, 1) for i in chosen])
    masks = np.stack([resize_mask(np.rot90(labels[i]), image_size) for i in chosen])
    stem = os.path.basename(image_path).split(".")[0]
    return SegmentationSource(images, masks, names, name=f"{stem} {split} slices")
