"""Every path and every file a stage writes go through here: written beside its place, then
renamed over it.

    root = files.as_path("gs://bucket/run")  # or a local folder: the one path type of a run
    files.write_json(path, obj)          # also write_text, write_bytes, save_figure, save_npz
    obj = files.read_json(path)          # a damaged or missing file is an SMSDError naming it

Paths: a local path is a `pathlib.Path`, made absolute; a URI (`gs://`, `s3://`, `az://`)
is an `etils.epath.Path`, the path type Orbax and TFDS read and write through, so a work
directory may live in a bucket where the machine has credentials. Both have the same
methods; only what a local file system alone offers (fsync, atomic rename, append) is
chosen by `is_local`.

A local writer builds the new file under a temporary name in the same folder, flushes and
fsyncs it, then renames it over the old one (`os.replace`, atomic on POSIX): a reader, or a
run killed half-way, sees the old complete file or the new complete one, never a mix. Folders
(artifacts) follow the same rule through `replace_dir`. An object store writes an object
whole when it is closed, so there a file is written in place, at once.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from etils import epath

from smsd_jax.errors import SMSDError


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on a local (POSIX) file system, not a URI such as `gs://...`."""
    return "://" not in os.fspath(path)


def as_path(p: str | os.PathLike) -> Path:
    """`p` as a run's paths are: a local one absolute (`pathlib.Path`), a URI as given
    (`etils.epath.Path`)."""
    return Path(p).absolute() if is_local(p) else epath.Path(p)


def size(path: str | os.PathLike) -> int:
    """Bytes of the file at `path`."""
    stat = as_path(path).stat()
    return stat.st_size if hasattr(stat, "st_size") else stat.length  # epath: `length`


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh hidden name beside `path` (same folder, so the final rename is atomic)."""
    path = as_path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Calls `write(f)` on a temporary binary file beside `path`, then renames it over `path`
    (in an object store: on an in-memory buffer, then one object).

    The folder is created if missing. On any error the temporary file is removed and `path`
    keeps its old content.
    """
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(path):
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return path
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON with sorted keys, one space of indent (diff-friendly)."""
    return write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def save_figure(path: str | os.PathLike, figure, dpi: int = 100) -> Path:
    """A matplotlib `Figure` as PNG."""
    return atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=dpi))


def write_results(folder: str | os.PathLike, stem: str, summary: Any, text: str,
                  figure) -> list[Path]:
    """A study's `stem.json` (summary), `stem.md` (text) and `stem.png` (figure) in
    `folder`, each printed as it is written."""
    folder = as_path(folder)
    paths = [write_json(folder / f"{stem}.json", summary),
             write_text(folder / f"{stem}.md", text),
             save_figure(folder / f"{stem}.png", figure)]
    for path in paths:
        print(f"{stem}: {path}")
    return paths


def save_npz(path: str | os.PathLike, **arrays) -> Path:
    """`np.savez` of `arrays` (imported here lazily: files.py needs no NumPy otherwise)."""
    import numpy as np
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON at `path`; a missing or damaged file is an `SMSDError` that names it."""
    path = as_path(path)
    if not path.is_file():
        raise SMSDError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SMSDError(f"{path} is not valid JSON ({e}); the file is damaged: write it again"
                        ) from e


def append_text(path: str | os.PathLike, text: str) -> None:
    """Adds `text` at the end of the file at `path` (created if missing). An object store has
    no append: there the object is written again whole, so call it with lines gathered, not
    one by one."""
    path = as_path(path)
    if is_local(path):
        with open(path, "a") as f:
            f.write(text)
    else:
        write_text(path, (path.read_text() if path.exists() else "") + text)


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Moves the finished folder `tmp` to `path`, keeping the old one until the new is in place.

    `tmp` must be beside `path` (see `temporary_name`). Local folders only: an object store
    has no atomic rename (artifacts write in place there, `artifacts.save_artifact`).
    """
    tmp, path = as_path(tmp), as_path(path)
    if not is_local(path):
        raise SMSDError(f"replace_dir({tmp}, {path}): folders are renamed on a local file "
                        "system only")
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old") if path.exists() else None
    if old:
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return path
