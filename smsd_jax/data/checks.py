"""Checks that inputs are what a stage can use, each an `SMSDError` that names what is wrong."""

from __future__ import annotations

import numpy as np

from smsd_jax.errors import SMSDError


def integer_array(values, what: str) -> np.ndarray:
    """`values` as a NumPy array when it is a non-empty 1-D integer array (labels, indices).

    Raises:
      SMSDError: naming `what` (e.g. "labels", "site.name: indices"), the dtype and shape.
    """
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise SMSDError(f"{what} must be a non-empty integer array [N], got {values.dtype} "
                        f"{values.shape}")
    return values


def head_fits(head_shape: tuple[int, int, int], head_dir, source) -> None:
    """`source`'s images are of the shape `(H, W, C)` the head in `head_dir` takes."""
    if tuple(head_shape) != tuple(source.image_shape):
        h, w, c = head_shape
        raise SMSDError(f"{source.name}: images {source.image_shape} do not fit the head in "
                        f"{head_dir} ({h}x{w}x{c})")


def same_task(train, test) -> None:
    """`train` and `test` are both single-label, or both multi-label with the same findings in
    the same order (the tail's outputs are the train split's findings)."""
    names = [getattr(source, "finding_names", None) for source in (train, test)]
    if names[0] != names[1]:
        raise SMSDError(f"{train.name} has findings {names[0]} but {test.name} has {names[1]};"
                        " give both splits the same finding columns (config.data.finding_names)")
