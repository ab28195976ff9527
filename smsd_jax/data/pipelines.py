"""The grain pipelines of the stages: a site's images to encode, and labelled batches.

    site_dataset(source, indices, num_samples=M, augment=..., batch_size=..., seed=...)
    labelled_dataset(source, indices, batch_size=..., seed=..., augment=None)

Both read `source[indices]` in order through grain; the augmentations are `augment`'s, so a
pipeline gives bitwise-identical batches every time it runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import grain

from smsd_jax.data import checks
from smsd_jax.data.augment import Augment, augment_from_config, SiteSamples, ToFloat
from smsd_jax.data.sources import Source
from smsd_jax.errors import SMSDError


class _Subset:
    """The records of `source` at `indices`, in that order (a grain random-access source)."""

    def __init__(self, source: Source, indices):
        indices = checks.integer_array(indices, f"{source.name}: indices")
        if indices.min() < 0 or indices.max() >= len(source):
            raise SMSDError(
                f"{source.name}: indices span [{indices.min()}, {indices.max()}] but the source"
                f" has {len(source)} records; was the partition made for this source?")
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return self._indices.size

    def __getitem__(self, index: int) -> dict:
        return self._source[int(self._indices[index])]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise SMSDError(f"batch_size must be >= 1, got {batch_size}.")


def site_dataset(source: Source, indices, *, num_samples: int, augment: Mapping | Augment | None,
                 batch_size: int, seed: int) -> grain.MapDataset:
    """Batches `{"images": float32 [b, M, H, W, C]}` over `indices` in order, for encoding.

    No shuffle (a site encodes each image once): batch i holds indices[i*b:(i+1)*b], the
    last batch may be smaller. The augmentation of the j-th image depends only on `seed`
    and j, so re-running gives identical batches.
    """
    _check_batch_size(batch_size)
    samples = SiteSamples(num_samples, augment_from_config(augment))
    return (grain.MapDataset.source(_Subset(source, indices)).seed(seed)
            .map(ToFloat()).random_map(samples).batch(batch_size))


def labelled_dataset(source: Source, indices, *, batch_size: int, seed: int,
                     augment: Mapping | Augment | None = None, shuffle: bool = False,
                     num_epochs: int | None = 1,
                     drop_remainder: bool = False) -> grain.MapDataset:
    """Batches `{"image": float32 [b, H, W, C], "label": int32 [b]}` for fine-tuning/probes.

    `shuffle` draws a new order each epoch; `num_epochs=None` repeats forever. Call
    `.to_iter_dataset()` on the result for prefetching.
    """
    _check_batch_size(batch_size)
    ds = grain.MapDataset.source(_Subset(source, indices)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs).map(ToFloat())
    if augment:
        ds = ds.random_map(augment_from_config(augment))
    return ds.batch(batch_size, drop_remainder=drop_remainder)
