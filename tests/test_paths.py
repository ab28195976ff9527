"""One path type for a run: local folders, or URIs such as `gs://bucket/run` (etils.epath).

No bucket is reachable here: the object-store paths run against fsspec's in-memory file
system standing in for the `gcs` protocol that epath uses for `gs://` (objects written
whole, no append, no atomic rename). What only a real bucket can show (Orbax and
ArrayRecord's own GCS clients, credentials) is untested here; README says so.
"""

import json

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from smsd_jax import files, metrics_log, payload
from smsd_jax.layout import Layout


@pytest.fixture
def bucket():
    fsspec.register_implementation("gcs", MemoryFileSystem, clobber=True)
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    yield epath.Path("gs://test-bucket/run")
    MemoryFileSystem.store.clear()


def test_a_local_path_is_absolute_and_a_uri_stays_a_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = files.as_path("runs/q")
    assert local.is_absolute() and local == tmp_path / "runs" / "q" and files.is_local(local)
    remote = Layout("gs://bucket/run")
    assert not files.is_local(remote.root)
    assert str(remote.payload(3)) == "gs://bucket/run/payloads/site_3"
    assert str(remote.site_head(1)) == "gs://bucket/run/sites/site_1/head"
    assert str(remote.metrics) == "gs://bucket/run/server/metrics.jsonl"


def test_files_in_an_object_store_are_written_whole(bucket):
    path = bucket / "results" / "summary.json"
    files.write_json(path, {"a": 1})
    assert files.read_json(path) == {"a": 1} and files.size(path) == len(path.read_bytes())

    def fails(f):
        f.write(b'{"half": ')
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        files.atomic_write(path, fails)
    assert files.read_json(path) == {"a": 1}  # nothing of the failed write reached the object
    path.write_text("{not json")
    with pytest.raises(ValueError, match="summary.json is not valid JSON"):
        files.read_json(path)


def test_metrics_reach_an_object_store_at_each_flush(bucket, tmp_path):
    path = bucket / "server" / "metrics.jsonl"
    log = metrics_log.MetricsLog(path, tmp_path / "events", out_dim=16, start_step=0,
                                 collapse_patience=100)
    metrics = dict(loss=np.float32(2.0), teacher_entropy=np.float32(2.5))
    log.check_and_write(0, metrics, None)
    log.check_and_write(1, metrics, None)
    assert not path.exists()  # gathered: an object store has no append
    log.flush()
    log.check_and_write(2, metrics, None)
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_a_payload_shard_is_copied_up_whole_with_its_checksum(bucket, tmp_path):
    tokens = np.arange(4 * 2 * 3 * 5, dtype=np.float16).reshape(4, 2, 3, 5)
    new = lambda: payload.new_manifest(site_id=0, num_images=4, num_samples=2, tokens=3, dim=5,
                                       dtype="float16", head_fingerprint="f", keep=0.5,
                                       num_patches=6)
    remote = payload.write_shard(bucket / "payloads" / "site_0", new(), tokens)
    local = payload.write_shard(tmp_path / "site_0", new(), tokens)
    shard = remote["shards"][0]
    assert remote["complete"] and shard == local["shards"][0]
    stored = bucket / "payloads" / "site_0" / shard["name"]
    assert stored.read_bytes() == (tmp_path / "site_0" / shard["name"]).read_bytes()
    assert payload.file_checksum(stored) == shard["checksum"]
    assert payload.read_manifest(bucket / "payloads" / "site_0") == remote
