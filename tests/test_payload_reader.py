"""The server's streaming payload reader: rows read from disk as training needs them, in the
batches the whole payload in memory would give, with a buffer that does not grow with it.

Real payloads: Fashion-MNIST images encoded by the site stage (tests/test_pipeline.py).
"""

import numpy as np
import pytest

from smsd_jax import files, payload, server, sharding
from tests.test_pipeline import _config, _encode


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """Two sites' payloads of 8 shards each (32 images a shard)."""
    tmp = tmp_path_factory.mktemp("payloads")
    config = _config(shard_size=32, batch_size=32)
    a, _, _ = _encode(tmp, config, "site_a", n=256)
    b, _, _ = _encode(tmp, config, "site_b", n=256, site_id=1)
    return config, [a, b]


def _batches(rows, mesh, steps, prefetch=0):
    it = iter(server._local_batches(rows, 3, 16, mesh, prefetch))
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("devices", [1, 8])
def test_streamed_batches_equal_the_in_memory_batches_row_for_row(payloads, devices):
    _, dirs = payloads
    manifests, rows = payload.open_payloads(dirs)
    in_memory = np.concatenate([payload.read_tokens(d) for d in dirs])
    assert len(rows) == len(in_memory) == 512 and len(manifests) == 2
    mesh = sharding.make_mesh(devices)
    steps = 2 * 512 // 16 + 5  # past two epochs: grain reshuffles each one
    streamed, held = _batches(rows, mesh, steps, prefetch=2), _batches(in_memory, mesh, steps)
    for s, (x, y) in enumerate(zip(streamed, held)):
        np.testing.assert_array_equal(x, y, err_msg=f"step {s}")
    # The first epoch's batches hold every image once: a permutation, not a resampling.
    first = np.concatenate(streamed[:32]).reshape(512, -1)
    assert len(np.unique(first, axis=0)) == len(np.unique(in_memory.reshape(512, -1), axis=0))


def test_the_reader_holds_only_its_prefetch_buffer(payloads):
    _, dirs = payloads
    _, rows = payload.open_payloads(dirs)
    prefetch, batch = 2, 16
    bound = (prefetch + 1) * batch
    assert len(rows) >= 10 * bound  # the payload is many times the buffer
    it = iter(server._local_batches(rows, 3, batch, sharding.make_mesh(1), prefetch))
    most = 0
    for step in range(2 * len(rows) // batch):
        next(it)
        held = rows.rows_read - step * batch  # read and not yet trained on, this one included
        assert held >= batch  # every batch comes from disk, none from a cache
        most = max(most, held)
    assert most <= bound and rows.rows_read <= 2 * len(rows) + prefetch * batch


@pytest.mark.slow
def test_a_server_run_reads_each_step_from_disk_within_its_bound(payloads, tmp_path):
    config, dirs = payloads
    config = config.copy_and_resolve_references()
    config.server.update(prefetch=1, epochs=2.0)
    out = server.run_server(config, dirs, tmp_path / "server")
    reader, batch = out["reader"], config.server.batch_size
    assert reader["bound"] == 2 * batch and out["images"] >= 8 * reader["bound"]
    assert batch <= reader["most_rows_held"] <= reader["bound"]
    assert out["steps"] * batch <= reader["rows_read"] <= (out["steps"] + 1) * batch


def test_a_shard_that_is_not_array_record_is_named(tmp_path):
    site, _, _ = _encode(tmp_path, _config(), "site", n=32)
    manifest = payload.read_manifest(site)
    shard = site / manifest["shards"][0]["name"]
    shard.write_bytes(b"not an array record file")
    manifest["shards"][0]["checksum"] = payload.file_checksum(shard)  # the checksum agrees
    files.write_json(site / payload.MANIFEST, manifest)
    with pytest.raises(ValueError, match=r"site 0\): shard_00000.array_record cannot be read"):
        payload.open_payloads([site])


def test_processes_split_the_checksums_and_agree_on_a_damaged_site(tmp_path):
    config = _config(shard_size=32, batch_size=32)
    good, _, _ = _encode(tmp_path, config, "site_a", n=64)  # shards 0, 1 of the run
    bad, _, _ = _encode(tmp_path, config, "site_b", n=64, site_id=1)  # shards 2, 3
    (bad / payload.shard_name(1)).write_bytes(b"damaged")  # shard 3: process 1 of 2 reads it
    dirs = [good, bad]
    _, rows = payload.open_payloads(dirs, share=(0, 2))  # process 0 does not read it
    assert len(rows) == 128
    with pytest.raises(ValueError, match=r"site_b \(site 1\): shard_00001.array_record does "
                                         "not match the checksum"):
        payload.open_payloads(dirs, share=(1, 2))
    # Told by the other process (the OR over processes), process 0 refuses the site too ...
    told = lambda bad_flags: [True if i == 1 else f for i, f in enumerate(bad_flags)]
    with pytest.raises(ValueError, match="site 1.*failed its check in another process"):
        payload.open_payloads(dirs, share=(0, 2), agree=told)
    # ... or skips it with skip_bad_sites, as process 1 does: both train on site_a alone.
    for share, agree in (((0, 2), told), ((1, 2), None)):
        with pytest.warns(UserWarning, match="skipping payload .*site_b"):
            manifests, rows = payload.open_payloads(dirs, True, share=share, agree=agree)
        assert list(manifests) == [str(good)] and len(rows) == 64


@pytest.mark.parametrize("devices", [1, 8])
def test_rows_with_their_sites_are_the_same_batches_and_each_rows_site(payloads, devices):
    # Per-site heads: each row comes with the site that sent it, and the tokens stay the
    # batches of the plain reader, row for row.
    _, dirs = payloads
    manifests, rows = payload.open_payloads(dirs)
    sites = payload.row_sites(manifests)
    np.testing.assert_array_equal(sites, np.repeat([0, 1], 256))
    mesh = sharding.make_mesh(devices)
    labelled = _batches(payload.RowsWithSites(rows, sites), mesh, 40)
    plain = _batches(rows, mesh, 40)
    index = _batches(np.arange(len(rows)), mesh, 40)  # which row each batch holds
    for (tokens, batch_sites), expected, rows_in in zip(labelled, plain, index):
        np.testing.assert_array_equal(tokens, expected)
        assert batch_sites.dtype == np.int32
        np.testing.assert_array_equal(batch_sites, sites[rows_in])
    assert {s for _, b in labelled for s in b.tolist()} == {0, 1}
    with pytest.raises(ValueError, match="511 site ids for 512 payload rows"):
        payload.RowsWithSites(rows, sites[:-1])
