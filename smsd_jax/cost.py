"""What a method costs: FLOPs of compiled steps, bytes of parameter trees and payloads.

FLOPs are XLA's own count for the compiled computation (`cost_analysis`), so they follow the
real token counts and shapes of a step rather than a formula; they count multiply and add as
two operations.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from smsd_jax import files


def compiled_flops(fn, *args, **kwargs) -> float:
    """FLOPs of one call `fn(*args, **kwargs)` as XLA compiles it (`fn` jitted or not).

    Args may be arrays or `jax.ShapeDtypeStruct`s: nothing runs.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    flops = (cost or {}).get("flops")
    if flops is None:
        raise RuntimeError(f"XLA reported no FLOP count for {getattr(fn, '__name__', fn)}")
    return float(flops)


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree, at its own dtype."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x)))
                   for x in jax.tree.leaves(tree)))


def folder_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (what a site would upload or download)."""
    return int(sum(files.size(f) for f in files.as_path(path).rglob("*") if f.is_file()))
