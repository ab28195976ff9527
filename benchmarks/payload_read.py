r"""How fast payload rows read back, stored as ArrayRecord (the payload format) or as Orbax
shards (the format before it), on the same real tokens; written as JSON.

    python -m benchmarks.payload_read --config=configs/quickstart.py \
        --out=benchmarks/results/payload_read_cpu.json

The site stage encodes `--images` Fashion-MNIST images once (the config's head and site
settings, shards of `--shard_size`); the same tokens are then also saved as Orbax artifacts
of the same shards. Measured for each: bytes on disk per image, rows/s reading every row in
order, and rows/s of the server's access pattern: random batches of `--batch` rows from a
shuffle of all images. An Orbax shard can only be restored whole, so a random batch costs
every shard it touches; ArrayRecord reads each row alone. Medians of `--repeats`, one process.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from smsd_jax import cost, artifacts, consortium, data, files, payload, site

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/payload_read.json", "Where to write JSON.")
_IMAGES = flags.DEFINE_integer("images", 16384, "Images encoded.")
_SHARD = flags.DEFINE_integer("shard_size", 4096, "Images per shard (both formats).")
_BATCH = flags.DEFINE_integer("batch", 128, "Rows per random batch (the server's batch).")
_BATCHES = flags.DEFINE_integer("batches", 20, "Random batches per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")


def _median_rate(fn, rows: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return rows / statistics.median(times)


def _orbax_shards(folder: str, tokens: np.ndarray, shard_size: int) -> list[str]:
    paths = []
    for i in range(0, len(tokens), shard_size):
        path = os.path.join(folder, f"shard_{i // shard_size:05d}")
        artifacts.save_artifact(path, {"tokens": tokens[i:i + shard_size]}, {})
        paths.append(path)
    return paths


def main(argv):
    del argv
    config = _CONFIG.value
    config.site.shard_size = _SHARD.value
    source = data.load_source(config.data, "train")
    n, batch, shard_size = min(_IMAGES.value, len(source)), _BATCH.value, _SHARD.value
    rng = np.random.default_rng(0)
    batches = [rng.permutation(n)[:batch] for _ in range(_BATCHES.value)]
    with tempfile.TemporaryDirectory() as tmp:
        consortium.init_head(config, f"{tmp}/head", secret_seed=0)
        site.run_site(config, 0, source, np.arange(n), f"{tmp}/head", f"{tmp}/ar", secret_seed=1)
        _, rows = payload.open_payloads([f"{tmp}/ar"])
        tokens = payload.read_tokens(f"{tmp}/ar")
        orbax = _orbax_shards(f"{tmp}/orbax", tokens, shard_size)

        def orbax_all():
            return np.concatenate([artifacts.load_artifact(p)[0]["tokens"] for p in orbax])

        def orbax_random():
            for idx in batches:
                touched = sorted(set(idx // shard_size))
                whole = {s: artifacts.load_artifact(orbax[s])[0]["tokens"] for s in touched}
                np.stack([whole[i // shard_size][i % shard_size] for i in idx])

        def ar_all():
            return np.stack(rows.__getitems__(range(n)))

        def ar_random():
            for idx in batches:
                np.stack(rows.__getitems__(idx.tolist()))

        assert np.array_equal(orbax_all(), ar_all())  # the same tokens both ways
        random_rows, repeats = batch * len(batches), _REPEATS.value
        result = dict(
            date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
            cpu_count=os.cpu_count(), images=n, shard_size=shard_size, batch=batch,
            row_bytes=int(tokens[0].nbytes), row_shape=list(tokens.shape[1:]),
            dtype=str(tokens.dtype),
            array_record=dict(
                bytes_per_image=cost.folder_bytes(f"{tmp}/ar") / n,
                rows_per_s_in_order=_median_rate(ar_all, n, repeats),
                rows_per_s_random_batches=_median_rate(ar_random, random_rows, repeats)),
            orbax=dict(
                bytes_per_image=cost.folder_bytes(f"{tmp}/orbax") / n,
                rows_per_s_in_order=_median_rate(orbax_all, n, repeats),
                rows_per_s_random_batches=_median_rate(orbax_random, random_rows, repeats)))
    files.write_json(_OUT.value, result)
    print(result)


if __name__ == "__main__":
    app.run(main)
