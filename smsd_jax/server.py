"""Stage 2, at the server: masked sampling distillation over all sites' payloads.

Reads top to bottom: payloads, mesh, input pipeline, model and optimizer, sharded state,
update step, checkpoint (resume), train loop, export. Running the same command again resumes
from the last checkpoint, data-iterator state included.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from smsd_jax import checkpoint, distill, export, metrics, models, payload, sharding


def run_server(config, payload_dirs: list[str | Path], workdir: str | Path) -> dict:
    """Trains the body on the payloads in `payload_dirs`; writes checkpoints, metrics and the
    body export under `workdir`. Returns the last logged metrics and the export's path."""
    cfg = config.server
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
    tokens = np.concatenate(site_tokens)  # [images, M, K, D]
    num_images = len(tokens)
    print(f"server: {num_images} images from {len(manifests)} sites, tokens "
          f"{tokens.shape[1:]} {tokens.dtype} ({tokens.nbytes / 2**20:.1f} MB)")

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(cfg.num_devices or None)
    sharding.check_batch_size(cfg.batch_size, mesh)
    if cfg.batch_size > num_images:
        raise ValueError(f"config.server.batch_size={cfg.batch_size} exceeds the {num_images} "
                         "images received; lower it")
    steps_per_epoch = num_images // cfg.batch_size
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))

    # ---------------------------------------------------------------- Input pipeline
    # Each process streams its own slice; per-epoch reshuffle is grain's.
    local_batch = cfg.batch_size // jax.process_count()
    dataset = (grain.MapDataset.source(tokens).seed(config.seed).shuffle().repeat()
               [jax.process_index()::jax.process_count()]
               .batch(local_batch, drop_remainder=True).to_iter_dataset())
    batches = iter(dataset)

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

    def save(state):
        manager.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(iterator=batches.get_state(),
                                        checksum=_state_checksum(state)))))

    # ---------------------------------------------------------------- Train loop
    start_step = int(state.step)
    log = MetricsLog(workdir / "metrics.jsonl", out_dim=cfg.out_dim, start_step=start_step,
                     collapse_patience=cfg.collapse_patience)
    pending, last = None, {}
    bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="server")
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
            log.events.flush()
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}",
                            H=f"{last.get('teacher_entropy', float('nan')):.2f}",
                            img_s=f"{rate:.0f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps:
            save(state)
    if pending is not None:
        last = log.check_and_write(*pending, manager.latest_step())
    bar.close()
    log.events.close()
    manager.wait_until_finished()

    # ---------------------------------------------------------------- Export
    body_dir = workdir / "body"
    export.save_body(body_dir, net.body, jax.device_get(state.teacher["body"]),
                     step=int(state.step), head_fingerprint=first["head_fingerprint"],
                     sites=len(manifests), images=num_images)
    manager.close()
    return dict(last, body=str(body_dir), steps=total_steps, images=num_images)


def _state_checksum(state) -> str | None:
    """Checksum of the training state; None where one process cannot see all of it."""
    if jax.process_count() > 1:
        return None
    return checkpoint.tree_checksum(jax.device_get(state))


def _restore_latest(manager: ocp.CheckpointManager, state, batches):
    """The newest checkpoint that restores and matches its checksum, else `state` unchanged.

    A damaged newest checkpoint is reported and the one before it is used.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            expected = restored.data["checksum"]
            if expected is not None and _state_checksum(restored.state) != expected:
                raise ValueError("the restored arrays do not match the saved checksum")
        except Exception as e:  # Orbax / tensorstore errors on damaged files vary by version.
            damaged = Path(manager.directory) / str(step)
            warnings.warn(f"checkpoint {damaged} is damaged ({type(e).__name__}: "
                          f"{str(e)[:200]}); kept aside as {damaged}.damaged, trying the one "
                          "before it")
            os.replace(damaged, damaged.with_name(f"{step}.damaged"))
            manager.reload()
            continue
        batches.set_state(restored.data["iterator"])
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
    """One JSON line of metrics per step; stops the run at the first non-finite loss."""

    def __init__(self, path: Path, out_dim: int, start_step: int, collapse_patience: int):
        self.path, self.max_entropy, self.rate = path, math.log(out_dim), float("nan")
        self.patience, self.collapsed_steps, self.warned = collapse_patience, 0, False
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
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.events.scalars(step, {k: v for k, v in row.items() if k != "step"})
        return row

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
