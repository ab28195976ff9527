"""The payload format: what one site uploads, once, and the server's streaming reader of it.

    <payload>/manifest.json               format, site id, counts, shapes, dtype, head
                                          fingerprint ("heads": "per_site" when the site
                                          drew its own head), the token noise if any (with
                                          differential privacy: its epsilon per image),
                                          per-shard checksums, and whether the upload is
                                          complete
    <payload>/shard_00000.array_record    one record per image: its tokens [M, K, D], raw
                                          bytes of the manifest's dtype, zstd-compressed

Token sets only: no pixels, labels, positions, permutation keys or head weights.

The server reads rows, not payloads: `open_payloads` checks every shard once (its sha256,
streamed) and returns `PayloadRows`, a grain data source that reads each row from disk when
the input pipeline asks for it. A run holds the rows its prefetch buffer holds, whatever the
number of images. ArrayRecord with one record per group is built for this (random access by
index, what grain reads natively); Orbax stays the format of the pytrees that pass between
stages (the head, checkpoints, the body), which are read whole. `benchmarks/payload_read.py`
measures both ways of reading payload rows.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath

from smsd_jax import files, keys
from smsd_jax.errors import SMSDError

FORMAT = "smsd-payload/2"
OLD_FORMATS = {"smsd-payload/1": "Orbax shards, read whole"}
MANIFEST = "manifest.json"
# Fields every payload of one training run must agree on (with per-site heads, all but the
# head's fingerprint).
AGREE = ("heads", "head_fingerprint", "num_samples", "tokens", "dim", "dtype")
SHARED, PER_SITE = "shared", "per_site"  # a manifest's "heads"; one without the field: shared
# One record per group: any row is read alone (grain warns on other group sizes).
WRITER_OPTIONS = "group_size:1,zstd:3"
_CHUNK = 1 << 20  # bytes per read when checksumming a shard


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.array_record"


def new_manifest(site_id: int, num_images: int, num_samples: int, tokens: int, dim: int,
                 dtype: str, head_fingerprint: str, keep: float, num_patches: int,
                 noise: dict | None = None, per_site_head: bool = False,
                 key_label: str = keys.SECRET) -> dict:
    """A payload's manifest before its first shard. `noise`: the site's token noise settings
    (`site.noise_settings`); None (no noise) leaves the field out. `per_site_head`: the site
    encoded with its own head (`"heads": "per_site"`; left out for the shared head).
    `key_label`: `keys.DEMO` when the head or the site's key is public (`keys.label`)."""
    extra = ({} if noise is None else {"noise": noise}) | (
        {"heads": PER_SITE} if per_site_head else {})
    return dict(format=FORMAT, site_id=site_id, num_images=num_images, num_samples=num_samples,
                tokens=tokens, dim=dim, dtype=dtype, head_fingerprint=head_fingerprint,
                keep=keep, num_patches=num_patches, keys=key_label, **extra, shards=[],
                complete=False)


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (memory does not grow with the file)."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while piece := f.read(_CHUNK):
            digest.update(piece)
    return digest.hexdigest()


def write_shard(path: str | Path, manifest: dict, tokens: np.ndarray) -> dict:
    """Writes the next shard (`tokens [n, M, K, D]`, one record per image) under a temporary
    name, renames it into place, then writes the manifest that lists it: a crash loses at
    most the shard being written. A payload in an object store (`gs://`): the shard is
    written to a local temporary file (ArrayRecord writes local files), then copied up."""
    path = files.as_path(path)
    path.mkdir(parents=True, exist_ok=True)
    name = shard_name(len(manifest["shards"]))
    local = files.is_local(path)
    tmp = files.temporary_name(path / name if local else Path(tempfile.gettempdir()) / name)
    try:
        writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        for row in tokens:
            writer.write(np.ascontiguousarray(row).tobytes())
        writer.close()
        with open(tmp, "rb") as f:  # on disk before it takes its name, as files.atomic_write
            os.fsync(f.fileno())
        checksum = file_checksum(tmp)
        if local:
            os.replace(tmp, path / name)
        else:
            (path / name).write_bytes(tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    entry = dict(name=name, num_images=int(tokens.shape[0]), checksum=checksum)
    manifest = {**manifest, "shards": [*manifest["shards"], entry]}
    written = sum(s["num_images"] for s in manifest["shards"])
    manifest["complete"] = written == manifest["num_images"]
    files.write_json(path / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = files.as_path(path)
    manifest = files.read_json(path / MANIFEST) if (path / MANIFEST).exists() else None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found in OLD_FORMATS:
        raise SMSDError(f"{path} is a payload of format {found} ({OLD_FORMATS[found]}), which "
                        f"this version does not read; encode the site again with --mode=site "
                        f"(the same secret seed gives the same tokens) to write {FORMAT}")
    if found != FORMAT:
        raise SMSDError(f"{path} is not a payload of this project (no {MANIFEST} of format "
                        f"{FORMAT}); point to a folder written by --mode=site")
    return manifest


def check_agree(manifests: dict[str, dict]) -> None:
    """All payloads complete and made with the same head and shapes, or a ValueError naming
    the site that differs."""
    first_name, first = next(iter(manifests.items()))
    for name, m in manifests.items():
        if not m["complete"]:
            raise SMSDError(f"payload {name} (site {m['site_id']}) is incomplete: "
                            f"{sum(s['num_images'] for s in m['shards'])} of {m['num_images']}"
                            " images; run that site's --mode=site again to finish it")
        for field in AGREE:
            if field == "head_fingerprint" and heads(first) == PER_SITE:
                continue
            if m.get(field, SHARED) != first.get(field, SHARED):
                raise SMSDError(
                    f"payload {name} (site {m['site_id']}) has {field}={m.get(field, SHARED)!r}"
                    f" but {first_name} (site {first['site_id']}) has "
                    f"{first.get(field, SHARED)!r}; every site must encode with the "
                    "consortium's kind of head (shared or per-site) and the same site settings")


def heads(manifest: dict) -> str:
    """"shared" (the consortium's head) or "per_site" (the site's own)."""
    return manifest.get("heads", SHARED)


def verify_shards(path: str | Path, manifest: dict, mine=lambda i: True
                  ) -> list[tuple[str, int]]:
    """Checks the shards `i` of the payload at `path` for which `mine(i)` holds against the
    manifest: present, the sha256 it lists, and as many records as images. Returns every
    shard's `(path, images)`, in order.

    Raises:
      SMSDError: naming the payload, its site and the shard, and what to do.
    """
    out = []
    for i, shard in enumerate(manifest["shards"]):
        shard_path = files.as_path(path) / shard["name"]
        out.append((str(shard_path), shard["num_images"]))
        if not mine(i):
            continue
        where = f"payload {path} (site {manifest['site_id']}): {shard['name']}"
        if not shard_path.is_file():
            raise SMSDError(f"{where} is missing; ask the site to send its payload again")
        if file_checksum(shard_path) != shard["checksum"]:
            raise SMSDError(f"{where} does not match the checksum in {MANIFEST}; ask site "
                            f"{manifest['site_id']} to send it again")
        try:
            reader = ArrayRecordReader(str(shard_path))
            count = reader.num_records()
            reader.close()
        except Exception as e:  # a file with the right bytes but not ArrayRecord
            raise SMSDError(f"{where} cannot be read ({type(e).__name__}: {str(e)[:300]}); "
                            "ask the site to send its payload again") from e
        if count != shard["num_images"]:
            raise SMSDError(f"{where} holds {count} records but {MANIFEST} lists "
                            f"{shard['num_images']}; ask the site to send it again")
    return out


class PayloadRows(grain.sources.RandomAccessDataSource):
    """The token sets of several payloads as one sequence of rows read from disk: row i is
    image i of the `shards` (`(path, images)` each, in order), `[M, K, D]` of `dtype`.

    Nothing is held but the shards' record indices (8 bytes a row) and the rows being read;
    `rows_read` counts every row read since it was made (the input pipeline's buffer holds
    at most the rows read and not yet trained on).
    """

    def __init__(self, shards: list[tuple[str, int]], shape: tuple[int, ...], dtype: str):
        # `path[0:n]`: the record count from the manifest, so no file is opened until read.
        self._records = grain.sources.ArrayRecordDataSource(
            [f"{path}[0:{n}]" for path, n in shards])
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.rows_read, self._count = 0, threading.Lock()  # prefetch reads in a thread

    def __len__(self) -> int:
        return len(self._records)

    def _decode(self, record: bytes) -> np.ndarray:
        return np.frombuffer(record, self.dtype).reshape(self.shape)

    def _counted(self, n: int) -> None:
        with self._count:
            self.rows_read += n

    def __getitem__(self, index) -> np.ndarray:
        self._counted(1)
        return self._decode(self._records[index])

    def __getitems__(self, indices) -> list[np.ndarray]:
        self._counted(len(indices))
        return [self._decode(r) for r in self._records.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"PayloadRows({len(self)} rows of {self.shape} {self.dtype})"


class RowsWithSites(grain.sources.RandomAccessDataSource):
    """Each row of `rows` with the site that sent it, `(tokens, site)`: the server's source
    with per-site heads, where a row goes through its site's stem. `sites`: one id per row
    (`row_sites`), held in memory (4 bytes a row)."""

    def __init__(self, rows: PayloadRows, sites: np.ndarray):
        if len(sites) != len(rows):
            raise SMSDError(f"{len(sites)} site ids for {len(rows)} payload rows")
        self.rows, self.sites = rows, np.asarray(sites, np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> tuple[np.ndarray, np.int32]:
        return self.rows[index], self.sites[index]

    def __getitems__(self, indices) -> list[tuple[np.ndarray, np.int32]]:
        return list(zip(self.rows.__getitems__(indices), self.sites[np.asarray(indices)]))


def row_sites(manifests: dict[str, dict]) -> np.ndarray:
    """The site id of every row of `open_payloads`'s `PayloadRows`, in its order."""
    return np.concatenate([np.full(m["num_images"], m["site_id"], np.int32)
                           for m in manifests.values()])


def _row_shape(manifest: dict) -> tuple[int, int, int]:
    return manifest["num_samples"], manifest["tokens"], manifest["dim"]


def read_tokens(path: str | Path) -> np.ndarray:
    """All token sets of one payload, `[images, M, K, D]`, each shard checked first (for
    attacks, tests and notebooks; the server streams rows instead: `open_payloads`)."""
    manifest = read_manifest(path)
    rows = PayloadRows(verify_shards(path, manifest), _row_shape(manifest), manifest["dtype"])
    return np.stack(rows.__getitems__(range(len(rows))))


def open_payloads(payload_dirs, skip_bad_sites: bool = False, *,
                  share: tuple[int, int] = (0, 1), agree=None
                  ) -> tuple[dict[str, dict], PayloadRows]:
    """Every site's payload for training: `({folder: manifest}, PayloadRows)`.

    Each payload must be complete and agree with the others (`check_agree`); each shard is
    checked once, here (`verify_shards`). A payload that fails stops the run naming its site,
    or, with `skip_bad_sites`, is left out with a warning.

    Several processes split the reading: with `share=(p, P)` this process checks the shards
    p, p + P, ... (counted over all payloads), and `agree(bad)`, an OR over processes of one
    flag per payload (`distributed.any_process`), tells every process which payloads another
    process found damaged, so that all of them train on the same payloads.
    """
    if not payload_dirs:
        raise SMSDError("no payloads given: pass the folders written by --mode=site")
    process, processes = share
    manifests = {}
    for d in map(str, payload_dirs):  # the manifests: the same on every process
        try:
            manifest = read_manifest(d)
            check_agree({**manifests, d: manifest})
            manifests[d] = manifest
        except SMSDError as e:
            if not skip_bad_sites:
                raise
            warnings.warn(f"skipping payload {d}: {e}")
    shard_paths, errors, first_shard = {}, {}, 0
    for d, manifest in manifests.items():  # the shards: each process checks its share
        mine = lambda i, first=first_shard: (first + i) % processes == process
        try:
            shard_paths[d] = verify_shards(d, manifest, mine)
        except SMSDError as e:
            errors[d] = e
        first_shard += len(manifest["shards"])
    bad = (agree or list)([d in errors for d in manifests])
    for d, is_bad in zip(list(manifests), bad):
        if not is_bad:
            continue
        error = errors.get(d) or SMSDError(
            f"payload {d} (site {manifests[d]['site_id']}): a shard failed its check in another "
            "process of this run (that process's log names it); ask the site to send it again")
        if not skip_bad_sites:
            raise error
        warnings.warn(f"skipping payload {d}: {error}")
        del manifests[d]
    if not manifests:
        raise SMSDError(f"none of the {len(payload_dirs)} payloads could be used")
    first = next(iter(manifests.values()))
    return manifests, PayloadRows([p for d in manifests for p in shard_paths[d]],
                                  _row_shape(first), first["dtype"])
