r"""Throughput of the two hot paths on this machine, written as JSON.

    python -m benchmarks.pipeline --config=configs/quickstart.py --out=benchmarks/results/pipeline_cpu.json

- server step: images/s of the jitted distillation step (all views, teacher, DINO head,
  loss, AdamW, EMA) at the config's batch size; median of several timed repeats.
- site encoding: images/s per process (grain pipeline with M augmented copies, head,
  masked sampling, permutation, cast) and payload bytes per image against raw image bytes.
Medians of repeats measured in one process; compare only numbers from the same run.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from smsd_jax import consortium, data, distill, files, models, ops, payload, site

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/pipeline.json", "Where to write JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_STEPS = flags.DEFINE_integer("steps", 5, "Server steps per repeat.")


def _median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_server_step(config, repeats: int, steps: int) -> dict:
    cfg = config.server
    net = models.dino_net_from_config(config)
    n = (config.data.image_size // config.model.patch_size) ** 2
    k = ops.num_kept(n, config.site.keep)
    schedules = distill.make_schedules(cfg, total_steps=1000, steps_per_epoch=100)
    tx = distill.make_optimizer(cfg, schedules)
    state = distill.init_state(jax.random.key(0), net, tx, (k, net.body.input_dim))
    step = jax.jit(distill.make_distill_step(net, tx, schedules, cfg), donate_argnums=0)
    # Real payload-like inputs are not needed for timing: the step's cost depends on shapes.
    samples = jax.random.normal(jax.random.key(1), (cfg.batch_size, config.site.num_samples, k,
                                                    net.body.input_dim))
    holder = [state]

    def run():
        for _ in range(steps):
            holder[0], metrics = step(holder[0], samples, jax.random.key(2))
        jax.block_until_ready(metrics)

    seconds = _median_time(run, repeats) / steps
    return dict(batch_size=cfg.batch_size, seconds_per_step=seconds,
                images_per_s=cfg.batch_size / seconds, tokens_per_sample=k,
                global_keep=cfg.global_keep, local_keep=cfg.local_keep, num_local=cfg.num_local,
                model=config.model.size, dtype=config.model.dtype, out_dim=cfg.out_dim)


def bench_site_encoding(config, repeats: int, num_images: int = 4096) -> dict:
    source = data.load_source(config.data, "train")
    indices = np.arange(min(num_images, len(source)))
    config.site.shard_size = config.site.batch_size * max(1, len(indices) // config.site.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        consortium.init_head(config, f"{tmp}/head", secret_seed=0)
        run_id = [0]

        def run():
            run_id[0] += 1
            site.run_site(config, 0, source, indices, f"{tmp}/head", f"{tmp}/p{run_id[0]}",
                          secret_seed=1)

        seconds = _median_time(run, repeats)
        out = f"{tmp}/p{run_id[0]}"
        payload_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out)
                            for f in fs)
        manifest = payload.read_manifest(out)
    raw_bytes = int(np.prod(source.image_shape))  # uint8 pixels of one image
    return dict(images=len(indices), seconds=seconds, images_per_s=len(indices) / seconds,
                images_per_s_per_core=len(indices) / seconds / os.cpu_count(),
                payload_bytes_per_image=payload_bytes / len(indices), raw_bytes_per_image=raw_bytes,
                num_samples=manifest["num_samples"], tokens=manifest["tokens"],
                dim=manifest["dim"], dtype=manifest["dtype"])


def main(argv):
    del argv
    config = _CONFIG.value
    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
        device_count=jax.device_count(), cpu_count=os.cpu_count(), host=platform.node(),
        jax=jax.__version__,
        server_step=bench_server_step(config, _REPEATS.value, _STEPS.value),
        site_encoding=bench_site_encoding(config, _REPEATS.value))
    files.write_json(_OUT.value, result)
    print(result)


if __name__ == "__main__":
    app.run(main)
