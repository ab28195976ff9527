"""The server as several processes (one per host on a pod), through the real CLI, on CPU.

2 processes x 2 devices (`--distributed`, collectives over gloo, parameters split by FSDP)
train on the same global batches as 1 process x 4 devices (parameters replicated) and export
the same body; only process 0 logs; a checkpoint they wrote restores in a new pair of
processes. (FSDP against replicated parameters at the server level is this comparison; the
step alone on 8 devices is in tests/test_distill.py.)
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from smsd_jax import checkpoints, export, sharding
from tests.test_pipeline import ROOT, _config, _encode

# 64 images, batch 16: 4 steps an epoch, 8 steps; checkpoints at steps 4 and 8. No local
# views: they change nothing across processes and compiling them costs ~15% of the test.
STEPS = 8
SERVER_FLAGS = ["--config=configs/base.py:tiny", "--mode=server", "--config.server.epochs=2",
                "--config.server.checkpoint_every=4", "--config.server.num_local=0"]
FSDP = "--config.server.fsdp=True"
TIMEOUT_S = 300


def _env(devices: int) -> dict:
    """The environment of a server process with `devices` CPU devices."""
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=" ".join([*xla_flags,
                                    f"--xla_force_host_platform_device_count={devices}"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _server(workdir: Path, payload_dir: Path, processes: int, devices: int,
            *flags: str) -> list[tuple]:
    """The jobs (command, devices, log) of one `--mode=server` run, one a process."""
    cmd = [sys.executable, "-m", "launch.main", *SERVER_FLAGS, f"--workdir={workdir}",
           f"--payloads={payload_dir}", *flags]
    log = lambda i: workdir.parent / f"{workdir.name}.{i}.log"
    if processes == 1:
        return [(cmd, devices, log(0))]
    cmd += ["--distributed", f"--coordinator=localhost:{_free_port()}",
            f"--num_processes={processes}"]
    return [(cmd + [f"--process_id={i}"], devices, log(i)) for i in range(processes)]


def _run(jobs: list[tuple]) -> list[str]:
    """Runs the `(command, devices, log)` jobs all at once; returns their outputs.

    When one fails or time runs out, every one is killed (SIGKILL: jax catches SIGTERM), so
    none is left behind.
    """
    procs = []
    try:
        for cmd, devices, log in jobs:
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=out,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs) or time.monotonic() > deadline:
                break  # one failed (its peers would wait for it) or too slow
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = [log.read_text() for _, _, log in jobs]
    for p, (_, _, log), out in zip(procs, jobs, outputs):
        assert p.returncode == 0, f"{log.name}: rc {p.returncode}\n{out[-4000:]}"
    return outputs


# Each process of a 2-process run: this process's rows of 7 steps' batches, on meshes whose
# "data" axis orders the devices in several ways (TPU meshes may interleave the hosts), put
# together into global arrays; each must be the one-process batch of that step.
_ROWS_CHECK = """
import sys
from smsd_jax import distributed
distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
import grain, jax, numpy as np
from smsd_jax import server, sharding
tokens = np.arange(40, dtype=np.float32)[:, None].repeat(3, 1)
stream = grain.MapDataset.source(tokens).seed(0).shuffle().repeat().batch(8)
for order in ([0, 1, 2, 3], [0, 2, 1, 3], [3, 1, 0, 2]):
    mesh = jax.sharding.Mesh(np.array(jax.devices())[order], ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    batches = iter(server._local_batches(tokens, 0, 8, mesh))
    for step in range(7):
        batch = distributed.fetch(sharding.put_batch(next(batches), mesh))
        assert np.array_equal(batch, stream[step]), (order, step)
print("rows ok")
"""


def _body(workdir: Path) -> list[np.ndarray]:
    return jax.tree.leaves(export.load_body(workdir / "server" / "body")[1])


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "server" / "metrics.jsonl").open()]


@pytest.mark.slow
def test_each_process_reads_its_rows_of_the_one_process_batch(tmp_path):
    port = _free_port()
    cmd = lambda i: [sys.executable, "-c", _ROWS_CHECK, str(port), str(i)]
    outputs = _run([(cmd(i), 2, tmp_path / f"rows.{i}.log") for i in range(2)])
    assert all("rows ok" in out for out in outputs)


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
    payload_dir, _, _ = _encode(tmp_path, _config(), "payload", n=64)
    one, two = tmp_path / "one", tmp_path / "two"
    # FSDP in the pair: parameters split over both processes' devices, small leaves
    # replicated, so saving, restoring and gathering both kinds across processes is exercised.
    # The two runs at once: a pair's processes often wait for each other.
    _, *outputs = _run(_server(one, payload_dir, 1, 4) + _server(two, payload_dir, 2, 2, FSDP))
    # Same global batches: the bodies differ only by the order in which the cross-process
    # (gloo) and in-process reductions add floats (seen: 1.5e-8 at most, losses 2 ulp).
    for a, b in zip(_body(one), _body(two)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    rows = _metrics(two)
    assert [r["step"] for r in rows] == list(range(STEPS))  # one writer: no line twice
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in _metrics(one)],
                               rtol=1e-5)
    assert len(list((two / "server" / "tensorboard").iterdir())) == 1
    assert "step/s" in outputs[0] and "step/s" not in outputs[1]  # one progress bar

    # As if killed after its first checkpoint: a new pair resumes from it, to the same body.
    finished = _body(two)
    checkpoints = two / "server" / "checkpoints"
    for path in (checkpoints / str(STEPS), two / "server" / "body"):
        shutil.rmtree(path)
    outputs = _run(_server(two, payload_dir, 2, 2, FSDP))
    assert f"resumed from step {STEPS // 2}" in outputs[0]
    for a, b in zip(finished, _body(two)):
        np.testing.assert_array_equal(b, a)
    assert [r["step"] for r in _metrics(two)] == list(range(STEPS))
    assert sorted(p.name for p in checkpoints.iterdir()) == [str(STEPS // 2), str(STEPS)]


def test_state_fingerprint_ignores_the_split_and_sees_one_changed_element():
    # What lets every process of a run check a checkpoint it restored: each gets the same
    # value, whether the state is replicated or split (FSDP), and any damage changes it.
    tree = {"w": np.linspace(-1, 1, 64 * 128, dtype=np.float32).reshape(64, 128),
            "b": np.ones(3, np.float16), "step": np.int32(5)}
    mesh = sharding.make_mesh(8)
    put = lambda t, fsdp: jax.device_put(t, sharding.state_sharding(t, mesh, fsdp))
    split = put(tree, True)
    assert not split["w"].sharding.is_fully_replicated
    fingerprint = checkpoints.state_fingerprint(split)
    assert checkpoints.state_fingerprint(put(tree, False)) == fingerprint
    nudged = dict(tree, w=tree["w"].copy())
    nudged["w"][3, 7] = np.nextafter(nudged["w"][3, 7], np.float32(2))
    swapped = dict(tree, w=tree["w"][::-1].copy())
    for other in (nudged, swapped, dict(tree, step=np.int32(6))):
        assert checkpoints.state_fingerprint(put(other, True)) != fingerprint
