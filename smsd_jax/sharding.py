"""Device meshes and shardings: one code path for 1 CPU, 8 GPUs or a TPU pod.

The mesh has one axis, "data". Batches are split along it. Parameters, optimizer state and
the teacher are replicated, or (FSDP) each leaf is split along its largest axis that the
device count divides; XLA then gathers them where the step needs them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from smsd_jax.errors import SMSDError

DATA = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D "data" mesh over the first `num_devices` devices (all of them by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise SMSDError(f"asked for {n} devices but {len(devices)} are visible")
    # Auto axes: shardings propagate through the step as in plain jit (make_mesh's default
    # changed to Explicit axes in newer jax).
    return jax.make_mesh((n,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data", other axes whole."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest axis that `n` divides; replicate small or indivisible leaves."""
    if n == 1 or not shape or np.prod(shape) < 2 ** 12:
        return P()
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA
            return P(*spec)
    return P()


def state_sharding(state, mesh: Mesh, fsdp: bool = False):
    """A pytree of `NamedSharding`s for `state` (any pytree of arrays)."""
    n = mesh.shape[DATA]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), n) if fsdp else P()), state)


def check_batch_size(batch_size: int, devices: Mesh | int, name: str = "batch size") -> None:
    """`batch_size` is a positive multiple of the devices of `devices` (a mesh, or a count)."""
    n = devices.shape[DATA] if isinstance(devices, Mesh) else int(devices)
    if batch_size < 1 or batch_size % n:
        raise SMSDError(f"{name}={batch_size}: not divisible by the {n} devices of the mesh; "
                        f"choose a positive multiple of {n}")


def put_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host batch (this process's rows) -> a global array split along "data"."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)
