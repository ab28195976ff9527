r"""The server's peak memory and throughput as the payloads grow: 1x, 4x and 16x the
quickstart's images, streamed from disk, beside the whole payload read into memory at 1x.

    python -m benchmarks.server_memory --config=configs/quickstart.py \
        --out=benchmarks/results/server_memory_cpu.json --workdir=/tmp/server_memory

More images come from encoding the built-in data again at each site with other keys (other
masks, permutations and augmentations): copy c of site k has secret seed
`config.site.secret_seed + 1000 * c + k`. Each server run is its own process (`--steps`
steps, checkpoints off), so its peak resident memory is its own (`wait4`); throughput is the
median images/s of its logged windows after the first (compilation). The in-memory run
trains on the same rows through the same input pipeline, from an array that holds them all.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from smsd_jax import consortium, data, files, payload, server, site
from smsd_jax.layout import Layout

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/server_memory.json", "Where to write.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/server_memory", "Payloads and runs go here.")
_SCALES = flags.DEFINE_list("scales", ["1", "4", "16"], "Payload sizes, in quickstart copies.")
_STEPS = flags.DEFINE_integer("steps", 100, "Server steps per run.")
_RUN = flags.DEFINE_string("run", None, "Internal: run one server, 'stream' or 'memory'.")
_PAYLOADS = flags.DEFINE_list("payloads", None, "Internal: the payloads of --run.")


class _InMemoryRows:
    """Every row in one array (the reader before streaming), counted like
    `payload.PayloadRows`: it holds all of them from the start."""

    def __init__(self, tokens: np.ndarray):
        self.tokens, self.shape, self.dtype = tokens, tokens.shape[1:], tokens.dtype
        self.rows_read = len(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]


_open_payloads = payload.open_payloads  # the streaming reader, before `_one_run` replaces it


def _open_in_memory(dirs, skip_bad_sites=False, **share):
    manifests, _ = _open_payloads(dirs, skip_bad_sites, **share)  # the same checks
    return manifests, _InMemoryRows(np.concatenate([payload.read_tokens(d) for d in manifests]))


def _one_run(config, mode: str, dirs: list[str], workdir: str) -> None:
    """The child process: one server run; its result and its own peak resident memory as a
    JSON line on stdout."""
    if mode == "memory":
        payload.open_payloads = _open_in_memory  # what server.run_server calls
    out = server.run_server(config, dirs, workdir)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps({**{k: out[k] for k in ("steps", "images", "reader")},
                                  "peak_rss_mb": peak_mb}))


def _encode_copies(config, layout: Layout, copies: int) -> list[list[str]]:
    """Payload folders of each copy (copy 0 first), encoding those not yet on disk."""
    if not layout.head.exists():
        consortium.set_up(config, layout)
    parts, _ = data.load_partition(layout.partition)
    source = data.load_source(config.data, "train")
    out = []
    for c in range(copies):
        dirs = []
        for k, part in enumerate(parts):
            folder = layout.payloads / f"copy_{c}" / f"site_{k}"
            if not (folder / payload.MANIFEST).exists() or not payload.read_manifest(
                    folder)["complete"]:
                site.run_site(config, k, source, part, layout.head, folder,
                              secret_seed=config.site.secret_seed + 1000 * c + k)
            dirs.append(str(folder))
        out.append(dirs)
    return out


def _measure(mode: str, dirs: list[str], workdir: Path, steps: int, images: int) -> dict:
    batch = _CONFIG.value.server.batch_size
    epochs = steps / (images // batch)
    config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
    cmd = [sys.executable, "-m", "benchmarks.server_memory", *config_args, f"--run={mode}",
           f"--payloads={','.join(dirs)}", f"--workdir={workdir}",
           f"--config.server.epochs={epochs!r}", f"--config.server.checkpoint_every={10**9}",
           "--config.server.log_every=10"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} run failed: {proc.stdout[-2000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith("RESULT "))[7:])
    rates = [json.loads(line)["images_per_s"] for line in
             (workdir / "server" / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if r == r]  # NaN until the first window ends
    windows = sorted(set(rates), key=rates.index)[1:]  # each window's rate, first dropped
    return dict(result, mode=mode, images_per_s=statistics.median(windows))


def main(argv):
    del argv
    config = _CONFIG.value
    if _RUN.value:
        return _one_run(config, _RUN.value, _PAYLOADS.value, _WORKDIR.value)
    scales = sorted(int(s) for s in _SCALES.value)
    layout = Layout(_WORKDIR.value)
    copies = _encode_copies(config, layout, max(scales))
    runs = []
    plan = [("memory", 1)] + [("stream", s) for s in scales]
    for mode, scale in plan:
        dirs = [d for copy in copies[:scale] for d in copy]
        images = sum(payload.read_manifest(d)["num_images"] for d in dirs)
        workdir = layout.root / "runs" / f"{mode}_{scale}x"
        shutil.rmtree(workdir, ignore_errors=True)
        run = dict(_measure(mode, dirs, workdir, _STEPS.value, images), scale=scale,
                   payload_mb=sum(sum(f.stat().st_size for f in Path(d).iterdir())
                                  for d in dirs) / 2**20)
        print(run, flush=True)
        runs.append(run)
    base = next(r for r in runs if r["mode"] == "stream" and r["scale"] == 1)
    memory = runs[0]
    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
        cpu_count=os.cpu_count(), steps=_STEPS.value, batch_size=config.server.batch_size,
        prefetch=config.server.prefetch, runs=runs,
        stream_over_memory_throughput_1x=base["images_per_s"] / memory["images_per_s"],
        peak_rss_growth_1x_to_largest=max(r["peak_rss_mb"] for r in runs
                                          if r["mode"] == "stream") / base["peak_rss_mb"])
    files.write_json(_OUT.value, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
