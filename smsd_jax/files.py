"""Every file a stage writes goes through here: written beside its place, then renamed over it.

    files.write_json(path, obj)          # also write_text, write_bytes, save_figure, save_npz
    obj = files.read_json(path)          # a damaged or missing file is an SMSDError naming it

A writer builds the new file under a temporary name in the same folder, flushes and fsyncs
it, then renames it over the old one (`os.replace`, atomic on POSIX): a reader, or a run
killed half-way, sees the old complete file or the new complete one, never a mix. Folders
(artifacts) follow the same rule through `replace_dir`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from smsd_jax.errors import SMSDError


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh hidden name beside `path` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Calls `write(f)` on a temporary binary file beside `path`, then renames it over `path`.

    The folder is created if missing. On any error the temporary file is removed and `path`
    keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    folder = Path(folder)
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
    path = Path(path)
    if not path.is_file():
        raise SMSDError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SMSDError(f"{path} is not valid JSON ({e}); the file is damaged: write it again"
                        ) from e


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Moves the finished folder `tmp` to `path`, keeping the old one until the new is in place.

    `tmp` must be beside `path` (see `temporary_name`).
    """
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old") if path.exists() else None
    if old:
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return path
