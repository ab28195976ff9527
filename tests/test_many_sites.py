"""A consortium of 64 sites at tiny size: every payload is checked, trained on and counted.

Real images: 1,024 Fashion-MNIST training images split IID over the 64 sites (16 each).
"""

import numpy as np
import pytest

from configs import base
from smsd_jax import cost, consortium, data, export, payload, server, sharding, site
from smsd_jax.layout import Layout

SITES, IMAGES = 64, 1024


@pytest.mark.slow
def test_sixty_four_sites_are_checked_trained_on_and_counted(tmp_path):
    config = base.get_config("tiny")
    config.data.update(num_sites=SITES, partition="iid", subset=IMAGES)
    config.site.update(batch_size=16, shard_size=16)
    config.server.update(epochs=1.0, checkpoint_every=1000)
    layout = Layout(tmp_path)
    consortium.set_up(config, layout)
    parts, _ = data.load_partition(layout.partition)
    source = data.load_source(config.data, "train")  # once, not once a site
    manifests = [site.run_site(config, k, source, parts[k], layout.head, layout.payload(k),
                               secret_seed=k) for k in range(SITES)]
    dirs = layout.payload_dirs()
    assert len(dirs) == SITES and [m["site_id"] for m in manifests] == list(range(SITES))
    assert sum(m["num_images"] for m in manifests) == IMAGES

    # Checked: every site's shard is read and verified.
    manifests_read, rows = payload.open_payloads(dirs)
    assert len(manifests_read) == SITES and len(rows) == IMAGES
    # Trained on: one epoch of the server's stream holds every row of every site once.
    it = iter(server._local_batches(rows, config.seed, config.server.batch_size,
                                    sharding.make_mesh(1)))
    epoch = np.concatenate([next(it) for _ in range(IMAGES // config.server.batch_size)])
    every = np.concatenate([payload.read_tokens(d) for d in dirs])
    as_rows = lambda x: sorted(map(bytes, x.reshape(len(x), -1).view(np.uint8)))
    assert as_rows(epoch) == as_rows(every)
    out = server.run_server(config, None, layout)
    assert out["images"] == IMAGES and out["steps"] == IMAGES // config.server.batch_size
    meta = export.load_body(layout.body)[2]
    assert (meta["sites"], meta["images"]) == (SITES, IMAGES)

    # Counted: each site's upload is its manifest and its shard files, and nothing else.
    for d, m in zip(dirs, manifests):
        shard_bytes = sum((d / s["name"]).stat().st_size for s in m["shards"])
        assert cost.folder_bytes(d) == shard_bytes + (d / payload.MANIFEST).stat().st_size
        assert shard_bytes >= m["num_images"] * 0.5 * np.prod(rows.shape) * 2  # float16 rows

    # One damaged site among the 64 is named.
    (dirs[37] / manifests[37]["shards"][0]["name"]).write_bytes(b"damaged")
    with pytest.raises(ValueError, match=r"site_37 \(site 37\): shard_00000"):
        payload.open_payloads(dirs)
