"""FedAvg-DINO: each site runs image DINO on its raw images for E local epochs per round; the
server averages the sites' students, teachers and DINO centres, weighted by image count;
R rounds (docs/method.md, "Baselines"). Simulated: the sites train one after another in this
process, all with one jitted step.

Choices:
- One schedule clock for all sites: round r covers global steps `[r*S, (r+1)*S)`, S being the
  largest site's local steps per round, and every site starts round r at step r*S. So the
  learning rate, weight decay, teacher momentum and temperature, and the last-layer freeze
  follow the global step count across rounds, as in one DINO run of R*E epochs; a smaller
  site stops earlier within each round's stretch of the schedules.
- Each site keeps its optimizer state (Adam's moments) from round to round: hospitals
  persist between rounds (cross-silo), keeping it costs no bytes, and it avoids an Adam
  restart at every round. With one site, FedAvg-DINO is then exactly centralized DINO over
  R*E epochs.
- Sites of different sizes share the batch size and drop their last partial batch; a site
  with fewer images than one batch is an error.
- Bytes: each round each site downloads the global student, teacher and centre, and uploads
  its own (`cost.tree_bytes`). FLOPs: each site's steps (XLA's count) at the site; the
  averaging (a multiply and an add per site per value) at the server.
"""

from __future__ import annotations

import functools
import operator
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smsd_jax import cost, distill
from smsd_jax.baselines import image_dino
from smsd_jax.errors import SMSDError


@jax.jit
def weighted_average(trees: list, weights: jax.Array):
    """`sum_k weights[k] * trees[k] / sum(weights)`, leaf by leaf, in each leaf's dtype.

    Args:
      trees: K pytrees of one structure.
      weights: `[K]` non-negative, not all zero (a site's image count).
    """
    weights = jnp.asarray(weights, jnp.float32)
    weights = weights / jnp.sum(weights)

    def average(*leaves):
        total = functools.reduce(operator.add, (w * x for w, x in zip(weights, leaves)))
        return total.astype(leaves[0].dtype)

    return jax.tree.map(average, *trees)


def at_clock(state: distill.DistillState, step: int) -> distill.DistillState:
    """`state` with its schedules at global `step`: `state.step` and the optimizer's schedule
    counts (learning rate, weight decay). Adam's own count, which corrects the bias of the
    site's moments, stays the site's."""
    not_adam = lambda path, _: getattr(path[-1], "tuple_name", "") != "ScaleByAdamState"
    # NumPy scalars, each sent to the device as its own buffer: the step donates its state,
    # and one buffer cannot be donated twice.
    opt_state = optax.tree_utils.tree_set(state.opt_state, not_adam, count=np.int32(step))
    return state.replace(step=np.int32(step), opt_state=opt_state)


def pretrain_fedavg(config, source, site_indices: list[np.ndarray], *, seed: int
                    ) -> image_dino.Pretrained:
    """FedAvg-DINO over the sites' images `source[site_indices[k]]`.

    `config.baselines`: rounds (R), local_epochs (E), the multi-crop; `config.server`: the
    DINO hyperparameters and batch size (those of SMSD's server). Prints one line per round.

    Raises:
      ValueError: no sites, or a site with fewer images than one batch (named).
      FloatingPointError: a non-finite loss (names the round and site).
    """
    start = time.perf_counter()
    cfg, b = config.server, config.baselines
    if not site_indices:
        raise SMSDError("pretrain_fedavg needs at least one site's indices")
    sizes = [len(indices) for indices in site_indices]
    per_epoch = image_dino.batches_per_epoch(sizes, cfg.batch_size,
                                           [f"site {k}" for k in range(len(sizes))])
    local_steps = [max(1, int(round(b.local_epochs * n))) for n in per_epoch]  # per round
    clock = max(local_steps)
    print(f"fedavg: {len(sizes)} sites of {sizes} images, {b.rounds} rounds x "
          f"{b.local_epochs:g} local epochs (config.server.epochs={cfg.epochs:g})")
    dino = image_dino.build(config, total_steps=b.rounds * clock,
                            steps_per_epoch=max(per_epoch), seed=seed)
    shared = (dino.state.student, dino.state.teacher, dino.state.center)
    shared_bytes = cost.tree_bytes(shared)
    opt_states = [jax.tree.map(jnp.copy, dino.state.opt_state) for _ in sizes]
    history, done_images = [], 0
    for r in range(b.rounds):
        tick, trained, rows = time.perf_counter(), [], []
        for k, indices in enumerate(site_indices):
            # Copies: the step donates its state, and every site starts from the same model.
            student, teacher, center = jax.tree.map(jnp.copy, shared)
            state = distill.DistillState(step=0, student=student, teacher=teacher,
                                         opt_state=opt_states[k], center=center)
            data_seed, key = image_dino.site_seeds(seed, k)
            images = image_dino.batches(config, source, indices, seed=data_seed,
                                        start=r * local_steps[k], stop=(r + 1) * local_steps[k])
            state, metrics = image_dino.train(dino, at_clock(state, r * clock), images, key,
                                              where=f"FedAvg-DINO round {r + 1}, site {k}")
            opt_states[k] = state.opt_state
            trained.append((state.student, state.teacher, state.center))
            rows.append(image_dino.summary(metrics))
        shared = weighted_average(trained, jnp.asarray(sizes, jnp.float32))
        round_images = cfg.batch_size * sum(local_steps)
        done_images += round_images
        row = {m: float(np.average([x[m] for x in rows], weights=sizes)) for m in rows[0]}
        row.update(round=r + 1, site_loss=[x["loss"] for x in rows],
                   images_per_s=round_images / (time.perf_counter() - tick))
        history.append(row)
        print(image_dino.progress("fedavg: round", r + 1, b.rounds, row,
                                  time.perf_counter() - start, cfg.out_dim))
    num_values = sum(int(np.size(x)) for x in jax.tree.leaves(shared))
    return image_dino.from_teacher(
        config, shared[1], images_seen=done_images, steps=b.rounds * sum(local_steps),
        server_flops=float(b.rounds * 2 * len(sizes) * num_values),
        client_flops_per_site=[dino.step_flops * b.rounds * s for s in local_steps],
        upload_bytes_per_site=[b.rounds * shared_bytes] * len(sizes),
        download_bytes_per_site=[b.rounds * shared_bytes] * len(sizes),
        wall_s=time.perf_counter() - start, history=history)
