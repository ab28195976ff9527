"""Multi-process runs: one process per host (TPU VM pod, multi-GPU hosts; CPU in tests).

    distributed.initialize()                                 # TPU pod, SLURM, Open MPI
    distributed.initialize("10.0.0.1:1234", 2, process_id)   # anything else

must run before anything touches jax devices. Afterwards `jax.devices()` lists every
process's devices and a jitted step runs over all of them; each process feeds its own rows
of a batch (`sharding.put_batch`). Process 0 is the primary: it alone writes logs and exports.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from smsd_jax.errors import SMSDError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to the others of the run (wraps `jax.distributed.initialize`).

    Args:
      coordinator: `host:port` of process 0, reachable from every process; None lets jax
        detect it (TPU pods, SLURM, Open MPI), as it does for the two below.
      num_processes: how many processes take part.
      process_id: this process's rank, in `[0, num_processes)`.
    """
    if num_processes is not None and num_processes < 1:
        raise SMSDError(f"--num_processes={num_processes}: must be at least 1")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise SMSDError(f"--process_id={process_id}: must be 0 or more and less than "
                        f"--num_processes={num_processes}")
    # On CPU, collectives across processes need an implementation (gloo ships with jaxlib);
    # it is read when the CPU backend starts, so it is set before anything can start it. An
    # explicit choice (e.g. JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is kept.
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def is_primary() -> bool:
    """True in process 0 (and in a single-process run)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def fetch(tree):
    """The arrays of `tree` as NumPy arrays, whole, on every process.

    A collective: every process must call it. Arrays split across processes (FSDP) are
    gathered first; `jax.device_get` alone needs every shard on this process.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def any_process(flags) -> list[bool]:
    """Element-wise OR of a list of booleans over every process (the list itself in a
    single-process run). A collective: every process must call it with a list of one length."""
    flags = np.asarray(flags, bool)
    if jax.process_count() == 1:
        return flags.tolist()
    gathered = multihost_utils.process_allgather(flags.astype(np.int32))  # [processes, n]
    return np.asarray(gathered).reshape(-1, len(flags)).any(0).tolist()
