"""Training checkpoints of the server: Orbax's manager, a fingerprint of the state, and what
to do with a damaged checkpoint.

    manager = checkpoints.manager(workdir / "checkpoints", keep=2)
    state = checkpoints.restore_latest(manager, state, batches)   # or `state` unchanged
    checkpoints.save(manager, state, batches)

A checkpoint holds the training state and, as JSON, the data iterator's state and the state's
fingerprint. On resume the newest checkpoint that restores and matches its fingerprint is
used; a damaged one is set aside as `<step>.damaged` and the one before it is tried.
(What passes between stages, the head, payloads and the body, is in `artifacts`.)
"""

from __future__ import annotations

import hashlib
import os
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from smsd_jax import distributed, files
from smsd_jax.errors import SMSDError


def manager(directory: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """The checkpoint manager of a training run in `directory` (created), keeping `keep`."""
    return ocp.CheckpointManager(files.as_path(directory), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True))


def save(manager: ocp.CheckpointManager, state, batches) -> None:
    """Saves `state` with the iterator state of `batches` and the state's fingerprint.

    Every process calls it (the iterator state is the same on each of them).
    """
    manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(iterator=batches.get_state(),
                                    fingerprint=state_fingerprint(state)))))


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


def state_fingerprint(state) -> str:
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
    damaged = files.as_path(manager.directory) / str(step)
    warnings.warn(f"checkpoint {damaged} is damaged ({why}); kept aside as {damaged}.damaged, "
                  "trying the one before it")
    if distributed.is_primary():
        damaged.rename(damaged.with_name(f"{step}.damaged"))
    distributed.barrier(f"checkpoint {step} set aside")
    manager.reload()


def restore_latest(manager: ocp.CheckpointManager, state, batches):
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
                where = files.as_path(manager.directory) / str(step)
                raise SMSDError(
                    f"checkpoint {where} does not restore ({why}); "
                    "move it away (e.g. to <step>.damaged) and rerun to use the one before it"
                ) from e
            _set_aside(manager, step, why)
            continue
        # Checkpoints written before fingerprints existed are not checked.
        expected = restored.data.get("fingerprint")
        if expected is not None and state_fingerprint(restored.state) != expected:
            _set_aside(manager, step, "the restored arrays do not match the saved fingerprint")
            continue
        batches.set_state(restored.data["iterator"])
        if distributed.is_primary():
            print(f"server: resumed from step {step}")
        return restored.state
    if manager.all_steps():
        raise SMSDError(f"no checkpoint in {manager.directory} can be restored; move the folder "
                        "away to start again from scratch")
    return state
