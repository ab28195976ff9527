"""Artifacts between stages, on disk: Orbax pytrees with a JSON sidecar, written atomically.

An artifact is a folder `<path>/` holding `tree/` (an Orbax checkpoint) and `meta.json`. It is
built under a temporary name beside `<path>` and renamed into place, so a reader sees either
the old complete artifact or the new complete one, never a half-written one. In an object
store (`gs://`, no atomic rename) it is written in place, `meta.json` last: one without it
is incomplete, and reading it says so.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from smsd_jax import files
from smsd_jax.errors import MissingInputError, SMSDError

TREE, META = "tree", "meta.json"


def tree_checksum(tree: Any) -> str:
    """sha256 over the shapes, dtypes and bytes of every leaf, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer of this process alone: an artifact is written by one process and
    read by each process on its own, with no barrier across the processes of a run."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def save_artifact(path: str | os.PathLike, tree: Any, meta: dict) -> None:
    """Saves `tree` (arrays) and `meta` (JSON-able; gets a `checksum` of the tree) at `path`.

    In a multi-process run only process 0 may call it (Orbax writes NumPy arrays from
    process 0 alone).
    """
    if jax.process_index() != 0:
        raise RuntimeError(f"process {jax.process_index()} cannot write the artifact {path}: "
                           "only process 0 writes artifacts")
    path = files.as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Locally: built beside `path`, then renamed over it. In an object store (no atomic
    # rename): written in place, `meta.json` last, so an artifact without it is incomplete.
    local = files.is_local(path)
    if not local and path.exists():
        path.rmtree()
    tmp = files.temporary_name(path) if local else path
    tree = jax.tree.map(np.asarray, jax.device_get(tree))
    with _checkpointer() as ckpt:
        ckpt.save(tmp / TREE, tree)
    files.write_json(tmp / META, {**meta, "checksum": tree_checksum(tree)})
    if local:
        files.replace_dir(tmp, path)


def load_meta(path: str | os.PathLike) -> dict:
    """The `meta.json` of the artifact at `path`."""
    path = files.as_path(path)
    if not (path / META).is_file():
        raise MissingInputError(f"{path} is not an artifact of this project (no {META}); "
                                "check the path, or run the stage that writes it")
    return files.read_json(path / META)


def load_artifact(path: str | os.PathLike) -> tuple[Any, dict]:
    """Restores `(tree, meta)` as NumPy arrays and checks the tree against its checksum."""
    path = files.as_path(path)
    meta = load_meta(path)
    with _checkpointer() as ckpt:
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), ckpt.metadata(path / TREE)
                              .item_metadata)
        tree = ckpt.restore(path / TREE, target)
    if tree_checksum(tree) != meta["checksum"]:
        raise SMSDError(f"{path}: the arrays do not match the checksum in {META}; the artifact "
                        "is damaged: copy or write it again")
    return tree, meta
