"""Splitting one labelled data set into sites (hospitals).

A partition is a list of sorted int64 index arrays, one per site, disjoint and covering
every index. Every split is a pure function of the labels and the seed. Multi-label data
(labels [N, F]) has no class per image to split by: only "iid" takes it (`check_kind`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from smsd_jax import files
from smsd_jax.data import checks
from smsd_jax.errors import SMSDError

_DIRICHLET_TRIES = 100


def _check_sites(num_images: int, num_sites: int) -> None:
    if not 1 <= num_sites <= num_images:
        raise SMSDError(f"num_sites must be in [1, {num_images}] (the number of images),"
                        f" got {num_sites}.")


def _check(labels, num_sites: int) -> np.ndarray:
    labels = checks.integer_array(labels, "labels")
    _check_sites(labels.size, num_sites)
    return labels


def check_kind(kind: str, multilabel: bool) -> None:
    """A split of `kind` can be made of single-label (`multilabel` False) or multi-label data."""
    if multilabel and kind in ("dirichlet", "label"):
        raise SMSDError(f"partition kind {kind!r} splits sites by class, and multi-label data"
                        " has no single class per image; use 'iid' (config.data.partition=iid).")


def iid_partition(labels, num_sites: int, seed: int) -> list[np.ndarray]:
    """Uniformly random sites of (almost) equal size; labels [N] (or multi-label [N, F]) only
    give N."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        labels = checks.integer_array(labels, "labels")
    _check_sites(len(labels), num_sites)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def _dirichlet_once(labels: np.ndarray, num_sites: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    parts = [[] for _ in range(num_sites)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_sites, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * members.size).astype(int)
        for site, chunk in enumerate(np.split(members, cuts)):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def dirichlet_partition(labels, num_sites: int, alpha: float, seed: int,
                        min_size: int = 10) -> list[np.ndarray]:
    """Non-IID sites: each class is spread over sites with proportions ~ Dir(alpha).

    Small alpha (0.1-0.5) gives sites dominated by a few classes; large alpha tends to
    IID. Draws again until every site holds at least `min_size` images.
    """
    labels = _check(labels, num_sites)
    if alpha <= 0:
        raise SMSDError(f"alpha must be > 0, got {alpha}.")
    if num_sites * min_size > labels.size:
        raise SMSDError(f"{num_sites} sites x min_size {min_size} exceeds the {labels.size}"
                        " images; lower num_sites or min_size.")
    rng = np.random.default_rng(seed)
    for _ in range(_DIRICHLET_TRIES):
        parts = _dirichlet_once(labels, num_sites, alpha, rng)
        if min(part.size for part in parts) >= min_size:
            return parts
    raise SMSDError(
        f"no Dirichlet(alpha={alpha}) split of {labels.size} images into {num_sites} sites"
        f" gave every site >= {min_size} images in {_DIRICHLET_TRIES} draws; raise alpha or"
        " lower num_sites or min_size.")


def label_partition(labels, num_sites: int, seed: int) -> list[np.ndarray]:
    """Each site gets all images of its own disjoint group of classes."""
    labels = _check(labels, num_sites)
    classes = np.unique(labels)
    if num_sites > classes.size:
        raise SMSDError(f"label partition needs num_sites <= number of classes present"
                        f" ({classes.size}), got {num_sites}.")
    groups = np.array_split(np.random.default_rng(seed).permutation(classes), num_sites)
    return [np.flatnonzero(np.isin(labels, group)) for group in groups]


def partition(labels, kind: str, num_sites: int, seed: int, alpha: float = 0.5,
              min_size: int = 10) -> list[np.ndarray]:
    """Dispatches to the `kind` of split: "iid", "dirichlet" (uses alpha, min_size) or "label".

    Multi-label `labels [N, F]`: "iid" only (`check_kind`).
    """
    check_kind(kind, np.ndim(labels) == 2)
    if kind == "iid":
        return iid_partition(labels, num_sites, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_sites, alpha, seed, min_size)
    if kind == "label":
        return label_partition(labels, num_sites, seed)
    raise SMSDError(f"unknown partition kind {kind!r}; use 'iid', 'dirichlet' or 'label'.")


def subset_size(data_config, n: int) -> int:
    """How many of a split's `n` images a run uses: the first `data_config.subset` (all when
    it is 0)."""
    return min(n, data_config.subset) if data_config.subset > 0 else n


def split_sites(labels, data_config, seed: int) -> list[np.ndarray]:
    """The sites of a simulation: the first `data_config.subset` images (all when 0), split
    into `data_config.num_sites` sites by `data_config.partition` (and `alpha`)."""
    labels = np.asarray(labels)
    pooled = labels[:subset_size(data_config, len(labels))]
    return partition(pooled, data_config.partition, data_config.num_sites, seed,
                     alpha=data_config.alpha)


def save_partition(path: str | os.PathLike, parts: list[np.ndarray], meta: dict) -> None:
    """Writes `{"meta": meta, "sites": [[indices...], ...]}` as JSON, atomically (`files`):
    a reader (another stage, maybe on another host) never sees a half-written file."""
    content = {"meta": meta, "sites": [np.asarray(part).tolist() for part in parts]}
    files.write_text(path, json.dumps(content))


def load_partition(path: str | os.PathLike) -> tuple[list[np.ndarray], dict]:
    """Reads a file written by `save_partition`: (index arrays int64, meta)."""
    content = files.read_json(path)
    if not isinstance(content, dict) or not {"meta", "sites"} <= set(content):
        raise SMSDError(f"{path} is not a partition file (needs keys 'meta' and 'sites');"
                        " write it with save_partition.")
    return [np.asarray(site, np.int64) for site in content["sites"]], content["meta"]


def label_histogram(labels, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Images per site and class: int64 [num_sites, num_classes]. Multi-label `labels [N, F]`
    (F = num_classes): known positives per site and finding."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise SMSDError(f"labels have {labels.shape[1]} findings, not {num_classes}.")
        return np.stack([labels[part].sum(0) for part in parts]).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise SMSDError(f"labels span [{labels.min()}, {labels.max()}], outside"
                        f" [0, {num_classes}); pass the right num_classes.")
    return np.stack([np.bincount(labels[part], minlength=num_classes) for part in parts])
