"""The data set a config names: `load_source(config.data, split)`."""

from __future__ import annotations

from smsd_jax.data import masks, sources
from smsd_jax.errors import SMSDError

SOURCES = ("fashion_mnist", "medmnist", "folder", "tfds", "mask_folder", "nifti")
# config.data.task: one class per image, F binary findings per image (the sources that read
# them: medmnist, folder), or a class per pixel (mask_folder, nifti: only those).
TASKS = ("single_label", "multilabel", "segmentation")
MULTILABEL_SOURCES = ("medmnist", "folder")
SEGMENTATION_SOURCES = ("mask_folder", "nifti")


def check_task(data) -> None:
    """`config.data.task` is known and, when multi-label, its source reads findings."""
    if data.task not in TASKS:
        raise SMSDError(f"config.data.task={data.task!r} is unknown; use one of {TASKS}")
    if data.task == "multilabel" and data.source not in MULTILABEL_SOURCES:
        raise SMSDError(f"config.data.task='multilabel' but config.data.source={data.source!r}"
                        f" has one class per image; multi-label sources: {MULTILABEL_SOURCES}")
    if (data.task == "segmentation") != (data.source in SEGMENTATION_SOURCES):
        raise SMSDError(f"config.data.task={data.task!r} with config.data.source="
                        f"{data.source!r}: segmentation reads masks from one of "
                        f"{SEGMENTATION_SOURCES}, and only segmentation does")
    if data.uncertain not in sources.UNCERTAIN_POLICIES:
        raise SMSDError(f"config.data.uncertain={data.uncertain!r} is unknown; use one of "
                        f"{tuple(sources.UNCERTAIN_POLICIES)}")


def load_source(data, split: str) -> sources.Source:
    """The `split` ("train" or "test") of the data set described by `config.data`.

    `config.data.task="multilabel"` reads a `MultiLabelSource` (findings `data.finding_names`,
    uncertain cells by `data.uncertain`); "segmentation" a `masks.SegmentationSource`.

    Raises:
      ValueError: an unknown source or task, or images whose shape is not the config's.
    """
    check_task(data)
    multilabel = data.task == "multilabel"
    names = tuple(data.finding_names) or None
    if data.source == "fashion_mnist":
        src = sources.fashion_mnist(split, data.path or sources.FASHION_MNIST_ROOT)
    elif data.source == "medmnist":
        src = sources.medmnist_npz(data.path, split, multilabel=multilabel, finding_names=names)
    elif data.source == "folder":
        csv = data.labels_csv if split == "train" else data.test_labels_csv
        src = (sources.multilabel_image_folder(data.path, csv, data.image_size, data.channels,
                                               names, data.uncertain) if multilabel else
               sources.image_folder(data.path, csv, data.image_size, data.channels))
    elif data.source == "mask_folder":
        root = data.path if split == "train" else data.test_path
        if not root:
            raise SMSDError(f"config.data.{'path' if split == 'train' else 'test_path'} is "
                            f"empty: give the {split} split's folder of images/ and masks/")
        src = masks.mask_folder(root, data.image_size, data.channels, tuple(data.class_names))
    elif data.source == "nifti":
        src = masks.nifti_slices(
            data.path, data.atlas, split, image_size=data.image_size,
            class_names=tuple(data.class_names), groups=dict(data.label_groups),
            labels_path=data.atlas_labels, axis=data.slice_axis,
            test_block=tuple(data.test_block), gap=data.slice_gap)
    elif data.source == "tfds":
        src = sources.tfds_source(data.tfds_name, split, data_dir=data.path or None)
    else:
        raise SMSDError(f"config.data.source={data.source!r} is unknown; use one of {SOURCES}")
    want = (data.image_size, data.image_size, data.channels)
    if tuple(src.image_shape) != want:
        raise SMSDError(
            f"{src.name}: images are {src.image_shape} but config.data asks for {want}; set "
            f"--config.data.image_size and --config.data.channels to match the data")
    return src
