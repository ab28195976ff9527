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

import time
from pathlib import Path

import grain
import jax
import numpy as np
from tqdm import tqdm

from smsd_jax import checkpoints, distill, distributed, export, metrics_log, models, payload
from smsd_jax import keys, sharding
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout


def run_server(config, payload_dirs: list[str | Path] | None, workdir: Layout | str | Path,
               stop_at_step: int = 0) -> dict:
    """Trains the body on the payloads in `payload_dirs` (None: every payload of the work
    directory); writes checkpoints, metrics and the body export under its `server/` folder.
    Returns the last logged metrics, the export's path, the steps trained (`step`) and of the
    whole schedule (`steps`), and what the payload reader held: `reader = {rows_read,
    most_rows_held, bound}` (rows of this process; the bound is `(config.server.prefetch + 1)`
    local batches, whatever the number of images).

    `stop_at_step` > 0: stop there (a checkpoint and the teacher's export at that step), the
    schedules still those of the whole run; running again with a later stop, or none,
    continues the same run (the learning curve probes its checkpoints this way)."""
    cfg = config.server
    primary = distributed.is_primary()
    layout = Layout.of(workdir)
    layout.server.mkdir(parents=True, exist_ok=True)
    if payload_dirs is None:
        payload_dirs = layout.payload_dirs()

    # ---------------------------------------------------------------- Payloads
    # Every shard is checked once, here, by one of the processes; then rows are read from
    # disk as the input pipeline needs them, each process only its own devices' rows.
    manifests, rows = payload.open_payloads(
        payload_dirs, cfg.skip_bad_sites, share=(jax.process_index(), jax.process_count()),
        agree=distributed.any_process)
    first = next(iter(manifests.values()))
    num_images = len(rows)
    per_site = check_heads(config, first)
    demo_keys = keys.warn_if_demo_payloads(manifests.values(), "the server") if primary else \
        any(m.get("keys") == keys.DEMO for m in manifests.values())
    if primary:
        size = num_images * np.prod(rows.shape) * rows.dtype.itemsize
        print(f"server: {num_images} images from {len(manifests)} sites, tokens "
              f"{rows.shape} {rows.dtype} ({size / 2**20:.1f} MB of tokens, streamed from disk)"
              + (", a stem per site" if per_site else ""))

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(cfg.num_devices or None)
    if jax.process_count() > 1 and mesh.size != jax.device_count():
        raise SMSDError(f"config.server.num_devices={cfg.num_devices} but a run of "
                        f"{jax.process_count()} processes uses all {jax.device_count()} "
                        "devices; leave it 0")
    sharding.check_batch_size(cfg.batch_size, mesh)
    if cfg.batch_size > num_images:
        raise SMSDError(f"config.server.batch_size={cfg.batch_size} exceeds the {num_images} "
                        "images received; lower it")
    steps_per_epoch = num_images // cfg.batch_size
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    end_step = min(stop_at_step, total_steps) if stop_at_step > 0 else total_steps

    # ---------------------------------------------------------------- Input pipeline
    # Step s trains on rows [s*B, (s+1)*B) of one shuffled stream (reshuffled every epoch by
    # grain), whatever the number of processes; each process reads only its devices' rows,
    # `cfg.prefetch` batches ahead.
    # With per-site heads each row comes with its site: `(tokens, site)`.
    source = payload.RowsWithSites(rows, payload.row_sites(manifests)) if per_site else rows
    batches = iter(_local_batches(source, config.seed, cfg.batch_size, mesh, cfg.prefetch))

    # ---------------------------------------------------------------- Model and optimizer
    net = models.dino_net_from_config(config)
    if per_site:  # stems of sites 0 .. the highest id received
        stems = 1 + max(m["site_id"] for m in manifests.values())
        net = net.clone(body=net.body.clone(site_stems=stems))
    if net.body.input_dim != first["dim"]:
        raise SMSDError(f"config.model.size={config.model.size!r} with config.model.head_dim="
                        f"{config.model.head_dim} takes tokens of width {net.body.input_dim} "
                        f"but the payloads' tokens have width {first['dim']}; use the size and "
                        "head_dim the consortium's head was made with")
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
    manager = checkpoints.manager(layout.checkpoints, keep=cfg.keep_checkpoints)
    state = checkpoints.restore_latest(manager, state, batches)

    # ---------------------------------------------------------------- Train loop
    start_step = int(state.step)
    if start_step > end_step:
        raise SMSDError(f"config.server's run in {layout.checkpoints} is at step {start_step}, "
                        f"past the stop asked for ({stop_at_step}); stop later, or start a new "
                        "work directory")
    log = metrics_log.MetricsLog(layout.metrics, layout.tensorboard, out_dim=cfg.out_dim,
                                 start_step=start_step, collapse_patience=cfg.collapse_patience,
                                 write=primary)
    pending, last = None, {}
    bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="server",
               disable=not primary)
    tick = time.perf_counter()
    # Rows this process holds: read from disk and not yet trained on, the step's own included.
    local_rows, trained, most_held = len(_local_rows(mesh, cfg.batch_size)), 0, 0
    for step in range(start_step, end_step):
        # Payload dtype (float16) on the wire to the device; the step casts it there.
        local = next(batches)
        most_held = max(most_held, rows.rows_read - trained)
        trained += local_rows
        tokens, sites = local if per_site else (local, None)
        sites = None if sites is None else sharding.put_batch(sites, mesh)
        state, metrics = step_fn(state, sharding.put_batch(tokens, mesh), step_key, sites)
        # Read the previous step's metrics while this one runs (keeps the device busy).
        if pending is not None:
            last = log.check_and_write(*pending, manager.latest_step())
        pending = (step, metrics)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end_step:
            now = time.perf_counter()
            rate = cfg.log_every * cfg.batch_size / max(now - tick, 1e-9)
            tick = now
            log.rate = rate
            log.flush()
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}",
                            H=f"{last.get('teacher_entropy', float('nan')):.2f}",
                            img_s=f"{rate:.0f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end_step:
            checkpoints.save(manager, state, batches)
    if pending is not None:
        last = log.check_and_write(*pending, manager.latest_step())
    bar.close()
    log.close()
    manager.wait_until_finished()

    # ---------------------------------------------------------------- Export
    body_dir = layout.body
    body = distributed.fetch(state.teacher["body"])  # every process: FSDP shards are gathered
    if primary:
        heads = dict(site_ids=sorted(m["site_id"] for m in manifests.values())) if per_site \
            else dict(head_fingerprint=first["head_fingerprint"])
        export.save_body(body_dir, net.body, body, step=int(state.step), sites=len(manifests),
                         images=num_images, keys=keys.label(demo_keys), **heads)
    distributed.barrier("server export")  # every process returns once the export is written
    manager.close()
    reader = dict(rows_read=rows.rows_read, most_rows_held=most_held,
                  bound=(cfg.prefetch + 1) * local_rows)
    return dict(last, body=str(body_dir), step=int(state.step), steps=total_steps,
                images=num_images, reader=reader,
                keys=keys.label(demo_keys))


def check_heads(config, manifest: dict) -> bool:
    """Whether the payloads (`manifest`, one of them: they agree) were encoded with per-site
    heads, as `config.model.per_site_heads` must say too."""
    per_site = payload.heads(manifest) == payload.PER_SITE
    if per_site != bool(config.model.per_site_heads):
        raise SMSDError(f"the payloads were encoded with {payload.heads(manifest)} heads but "
                        f"config.model.per_site_heads={config.model.per_site_heads}; use the "
                        "config the sites encoded with")
    return per_site


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


def _local_batches(rows, seed: int, batch_size: int, mesh, prefetch: int = 0
                   ) -> grain.IterDataset:
    """This process's part of every step's batch: step s is rows [s*B, (s+1)*B) of the
    shuffled stream (the one-process batch), of which this process reads `_local_rows`.

    `rows`: any sequence of token sets by index (`payload.PayloadRows`, or an array), or of
    `(tokens, site)` (`payload.RowsWithSites`: then each batch is `(tokens, sites)`). Up to
    `prefetch` batches are read ahead by one thread (0: each when it is asked for). Its
    iterator's state counts steps (the same on every process), so any process's state
    restores all of them.
    """
    per_device = batch_size // mesh.size
    blocks = (grain.MapDataset.source(rows).seed(seed).shuffle().repeat()
              .batch(per_device, drop_remainder=True))  # block j of step s: s * devices + j
    mine = _local_rows(mesh, batch_size)[::per_device] // per_device
    steps = grain.MapDataset.range(len(blocks) // mesh.size)
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    join = lambda *parts: np.concatenate(parts)
    return steps.map(lambda s: jax.tree.map(join, *[blocks[s * mesh.size + j] for j in mine])
                     ).to_iter_dataset(read)
