"""The data set a config names: `load_source(config.data, split)`."""

from __future__ import annotations

from smsd_jax.data import sources
from smsd_jax.errors import SMSDError

SOURCES = ("fashion_mnist", "medmnist", "folder", "tfds")


def load_source(data, split: str) -> sources.Source:
    """The `split` ("train" or "test") of the data set described by `config.data`.

    Raises:
      ValueError: an unknown source, or images whose shape is not the config's.
    """
    if data.source == "fashion_mnist":
        src = sources.fashion_mnist(split, data.path or sources.FASHION_MNIST_ROOT)
    elif data.source == "medmnist":
        src = sources.medmnist_npz(data.path, split)
    elif data.source == "folder":
        csv = data.labels_csv if split == "train" else data.test_labels_csv
        src = sources.image_folder(data.path, csv, data.image_size, data.channels)
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
