"""Stage 2, at the server: masked sampling distillation over all sites' payloads.

Reads top to bottom: payloads, mesh, input pipeline, model and optimizer, sharded state,
update step, checkpoint (resume), train loop, export. Running the same command again resumes
from the last checkpoint, data-iterator state included.

Multi-process (one process per host, after `distributed.initialize`): every process runs this
same function over one mesh of all devices; the global batch of each step is the batch a
single process would use, row for row. Process 0 alone writes metrics, TensorBoard events, the
progress bar and the export; every process takes part in saving and restoring checkpoints,
so `workdir` must be one folder that all of them see (a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from smsd_jax import checkpoint, distill, distributed, export, metrics, models, payload
from smsd_jax import sharding


def run_server(config, payload_dirs: list[str | Path], workdir: str | Path) -> dict:
    """Trains the body on the payloads in `payload_dirs`; writes checkpoints, metrics and the
    body export under `workdir`. Returns the last logged metrics and the export's path."""
    cfg = config.server
    primary = distributed.is_primary()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- Payloads
    if not payload_dirs:
        raise ValueError("no payloads given: pass the folders written by --mode=site")
    manifests, site_tokens = {}, []
    for d in map(str, payload_dirs):
        try:
            manifest = payload.read_manifest(d)
            payload.check_agree({**manifests, d: manifest})
            site_tokens.append(payload.read_tokens(d))  # every shard checked against its sum
            manifests[d] = manifest
        except ValueError as e:
            if not cfg.skip_bad_sites:
                raise
            warnings.warn(f"skipping payload {d}: {e}")
    if not manifests:
        raise ValueError(f"none of the {len(payload_dirs)} payloads could be used")
    first = next(iter(manifests.values()))
    # Every process holds all the tokens (payloads are ~10 KB an image) and reads only the
    # rows of its own devices from them (input pipeline below).
    tokens = np.concatenate(site_tokens)  # [images, M, K, D]
    num_images = len(tokens)
    if primary:
        print(f"server: {num_images} images from {len(manifests)} sites, tokens "
              f"{tokens.shape[1:]} {tokens.dtype} ({tokens.nbytes / 2**20:.1f} MB)")

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(cfg.num_devices or None)
    if jax.process_count() > 1 and mesh.size != jax.device_count():
        raise ValueError(f"config.server.num_devices={cfg.num_devices} but a run of "
                         f"{jax.process_count()} processes uses all {jax.device_count()} "
                         "devices; leave it 0")
    sharding.check_batch_size(cfg.batch_size, mesh)
    if cfg.batch_size > num_images:
        raise ValueError(f"config.server.batch_size={cfg.batch_size} exceeds the {num_images} "
                         "images received; lower it")
    steps_per_epoch = num_images // cfg.batch_size
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))

    # ---------------------------------------------------------------- Input pipeline
    # Step s trains on rows [s*B, (s+1)*B) of one shuffled stream (reshuffled every epoch by
    # grain), whatever the number of processes; each process reads only its devices' rows.
    batches = iter(_local_batches(tokens, config.seed, cfg.batch_size, mesh))

    # ---------------------------------------------------------------- Model and optimizer
    net = models.dino_net_from_config(config)
    if net.body.dim != first["dim"]:
        raise ValueError(f"config.model.size={config.model.size!r} has width {net.body.dim} but "
                         f"the payloads' tokens have width {first['dim']}; use the head's size")
    schedules = distill.make_schedules(cfg, total_steps, steps_per_epoch)
    tx = distill.make_optimizer(cfg, schedules)

    # ---------------------------------------------------------------- Sharded state
    token_shape = (first["tokens"], first["dim"])
    init = lambda key: distill.init_state(key, net, tx, token_shape)
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    state_sh = sharding.state_sharding(abstract, mesh, cfg.fsdp)
    state = jax.jit(init, out_shardings=state_sh)(jax.random.key(config.seed))

    # ---------------------------------------------------------------- Update step
    step_fn = jax.jit(distill.make_distill_step(net, tx, schedules, cfg),
                      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    step_key = jax.random.key(config.seed + 1)

    # ---------------------------------------------------------------- Checkpoint (resume)
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, create=True))
    state = _restore_latest(manager, state, batches)

    def save(state):  # every process; the iterator state is the same on each of them
        manager.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(iterator=batches.get_state(),
                                        fingerprint=_state_fingerprint(state)))))

    # ---------------------------------------------------------------- Train loop
    start_step = int(state.step)
    log = MetricsLog(workdir / "metrics.jsonl", out_dim=cfg.out_dim, start_step=start_step,
                     collapse_patience=cfg.collapse_patience, write=primary)
    pending, last = None, {}
    bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="server",
               disable=not primary)
    tick = time.perf_counter()
    for step in range(start_step, total_steps):
        # Payload dtype (float16) on the wire to the device; the step casts it there.
        batch = sharding.put_batch(next(batches), mesh)
        state, metrics = step_fn(state, batch, step_key)
        # Read the previous step's metrics while this one runs (keeps the device busy).
        if pending is not None:
            last = log.check_and_write(*pending, manager.latest_step())
        pending = (step, metrics)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            now = time.perf_counter()
            rate = cfg.log_every * cfg.batch_size / max(now - tick, 1e-9)
            tick = now
            log.rate = rate
            log.flush()
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}",
                            H=f"{last.get('teacher_entropy', float('nan')):.2f}",
                            img_s=f"{rate:.0f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps:
            save(state)
    if pending is not None:
        last = log.check_and_write(*pending, manager.latest_step())
    bar.close()
    log.close()
    manager.wait_until_finished()

    # ---------------------------------------------------------------- Export
    body_dir = workdir / "body"
    body = distributed.fetch(state.teacher["body"])  # every process: FSDP shards are gathered
    if primary:
        export.save_body(body_dir, net.body, body, step=int(state.step),
                         head_fingerprint=first["head_fingerprint"], sites=len(manifests),
                         images=num_images)
    distributed.barrier("server export")  # every process returns once the export is written
    manager.close()
    return dict(last, body=str(body_dir), steps=total_steps, images=num_images)


def _local_rows(mesh, batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, in the order
    `sharding.put_batch` expects them: its devices' blocks of the "data" axis, ascending.

    With processes in mesh order (CPU, GPU) process p gets rows [p*L, (p+1)*L); a TPU mesh may
    interleave the hosts' devices, which these rows follow too.
    """
    index = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    per_device = batch_size // mesh.size
    starts = sorted({rows.start or 0 for rows, in index.values()})
    return np.concatenate([np.arange(start, start + per_device) for start in starts])


def _local_batches(tokens: np.ndarray, seed: int, batch_size: int, mesh) -> grain.IterDataset:
    """This process's part of every step's batch: step s is rows [s*B, (s+1)*B) of the
    shuffled stream (the one-process batch), of which this process reads `_local_rows`.

    Its iterator's state counts steps (the same on every process), so any process's state
    restores all of them.
    """
    per_device = batch_size // mesh.size
    blocks = (grain.MapDataset.source(tokens).seed(seed).shuffle().repeat()
              .batch(per_device, drop_remainder=True))  # block j of step s: s * devices + j
    mine = _local_rows(mesh, batch_size)[::per_device] // per_device
    steps = grain.MapDataset.range(len(blocks) // mesh.size)
    return steps.map(lambda s: np.concatenate([blocks[s * mesh.size + j] for j in mine])
                     ).to_iter_dataset()


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's finalizer: a one-to-one map of uint32 values that spreads every bit."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """The sum, modulo 2**32, of a hash of each element's bits and position: changing any one
    element changes it (the hash is one-to-one in the bits), moving elements all but surely.
    Integer sums do not depend on the order of addition, so it is exact however the leaf is
    split over devices and processes."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8 bytes: [..., 2]
    position, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        position += jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        stride = stride * bits.shape[axis] % 2**32
    return jnp.sum(_mix(bits ^ _mix(position)), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def _state_fingerprint(state) -> str:
    """A checksum of the training state, the same for any mesh and number of processes.

    Computed where the arrays are (no copy to the host); a collective in a multi-process run:
    every process calls it and gets the same value.
    """
    sums = jax.device_get(_fingerprints(state))  # scalars: replicated, readable everywhere
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return hashlib.sha256("".join(
        f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|{int(value)};"
        for (path, leaf), value in zip(leaves, jax.tree.leaves(sums))).encode()).hexdigest()


def _set_aside(manager: ocp.CheckpointManager, step: int, why: str) -> None:
    """Renames checkpoint `step` to `<step>.damaged` (process 0; every process calls this)."""
    damaged = Path(manager.directory) / str(step)
    warnings.warn(f"checkpoint {damaged} is damaged ({why}); kept aside as {damaged}.damaged, "
                  "trying the one before it")
    if distributed.is_primary():
        os.replace(damaged, damaged.with_name(f"{step}.damaged"))
    distributed.barrier(f"checkpoint {step} set aside")
    manager.reload()


def _restore_latest(manager: ocp.CheckpointManager, state, batches):
    """The newest checkpoint that restores and matches its fingerprint, else `state` unchanged.

    A damaged newest checkpoint is reported and the one before it is used. In a multi-process
    run a checkpoint that fails to restore stops the run instead (a process may fail where
    the others do not, and they cannot agree to go on); a fingerprint mismatch is the same on
    every process and is set aside as in a single-process run.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax / tensorstore errors on damaged files vary by version.
            why = f"{type(e).__name__}: {str(e)[:200]}"
            if jax.process_count() > 1:
                raise ValueError(
                    f"checkpoint {Path(manager.directory) / str(step)} does not restore ({why}); "
                    "move it away (e.g. to <step>.damaged) and rerun to use the one before it"
                ) from e
            _set_aside(manager, step, why)
            continue
        # Checkpoints written before fingerprints existed are not checked.
        expected = restored.data.get("fingerprint")
        if expected is not None and _state_fingerprint(restored.state) != expected:
            _set_aside(manager, step, "the restored arrays do not match the saved fingerprint")
            continue
        batches.set_state(restored.data["iterator"])
        if distributed.is_primary():
            print(f"server: resumed from step {step}")
        return restored.state
    if manager.all_steps():
        raise ValueError(f"no checkpoint in {manager.directory} can be restored; move the folder "
                         "away to start again from scratch")
    return state


def _logged_step(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class MetricsLog:
    """One JSON line of metrics per step; stops the run at the first non-finite loss.

    Every process checks the (global) metrics; only the one made with `write` (process 0)
    writes them, to the file and to TensorBoard.
    """

    def __init__(self, path: Path, out_dim: int, start_step: int, collapse_patience: int,
                 write: bool = True):
        self.path, self.max_entropy, self.rate = path, math.log(out_dim), float("nan")
        self.patience, self.collapsed_steps, self.warned = collapse_patience, 0, False
        self.write, self.events = write, None
        if not write:
            return
        if path.exists():  # A resumed run logs again the steps after its checkpoint.
            checkpoint.write_text(path, "".join(
                line + "\n" for line in path.read_text().splitlines()
                if _logged_step(line) is not None and _logged_step(line) < start_step))
        self.events = metrics.EventWriter(path.parent / "tensorboard")

    def check_and_write(self, step: int, metrics: dict, last_checkpoint) -> dict:
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in row.values()):
            raise FloatingPointError(
                f"non-finite training metrics at step {step}: {row}. The last good checkpoint is "
                f"step {last_checkpoint}; lower the learning rate or use float32, then rerun "
                "(it resumes from there)")
        row.update(step=step, max_entropy=self.max_entropy, images_per_s=self.rate)
        self._watch_collapse(row["teacher_entropy"], step)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.events.scalars(step, {k: v for k, v in row.items() if k != "step"})
        return row

    def flush(self) -> None:
        if self.events:
            self.events.flush()

    def close(self) -> None:
        if self.events:
            self.events.close()

    def _watch_collapse(self, entropy: float, step: int) -> None:
        """Warns once when the teacher's entropy sits near ln(out_dim) (uniform collapse) or
        near 0 (one-hot collapse) for `patience` steps in a row."""
        near_edge = not 0.03 * self.max_entropy < entropy < 0.97 * self.max_entropy
        self.collapsed_steps = self.collapsed_steps + 1 if near_edge else 0
        if self.collapsed_steps >= self.patience and not self.warned:
            self.warned = True
            kind = "uniform" if entropy > self.max_entropy / 2 else "one-hot"
            warnings.warn(f"step {step}: teacher entropy {entropy:.3f} (ln(out_dim) = "
                          f"{self.max_entropy:.3f}) for {self.patience} steps: the teacher looks "
                          f"collapsed ({kind}); check teacher_temp, center_momentum and lr")
