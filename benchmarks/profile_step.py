r"""Where the server step's time goes, on this machine: the quickstart's step, op by op.

    python -m benchmarks.profile_step                       # the quickstart's recipe
    python -m benchmarks.profile_step --config=configs/quickstart.py:tiny --steps=3

Builds the server step exactly as `server.run_server` does (`distill.make_distill_step`,
jitted with the state donated, one device) on token sets of the config's payload shape
`[batch, M, K, D]` (real Fashion-MNIST images through a head of the config, so that the
values are the real ones), times `--steps` steps after `--warmup`, then traces `--trace_steps`
more with `jax.profiler` and sums the time of every XLA op of the step by kind:

- matmuls (`dot` / `dot_general` / `convolution` ops), split by their operand shapes;
- attention's small batched matmuls and softmax, layer norms, GELU, the masking gathers;
- the optimizer and EMA (fusions over parameter-shaped arrays), everything else.

Writes `--out` (JSON: images/s, GFLOP/s from XLA's FLOP count, the float32 matmul rate of
this machine at 2048^3 and at the step's own largest matmul shape, and the op table) and
prints the table in Markdown (docs/performance.md quotes it).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from smsd_jax import distill, files, models, ops
from smsd_jax.data import fashion_mnist

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py",
                                          "The config whose server step is profiled.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation included).")
_TRACE = flags.DEFINE_integer("trace_steps", 5, "Steps traced with jax.profiler.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/profile_step_cpu.json", "JSON to write.")
_TIMING_ONLY = flags.DEFINE_bool("timing_only", False, "Time the step only: no FLOP count, "
                                 "matmul rates or trace (benchmarks/step_ab.py's runs).")


def payload_batch(config) -> np.ndarray:
    """One server batch `[batch, M, K, D]` float16: real images through a head of `config`,
    masked and shuffled as a site does (`ops.encrypt`)."""
    n, m = config.server.batch_size, config.site.num_samples
    images = fashion_mnist("train").images[:n].astype(np.float32) / 255.0
    images = (images - config.data.mean) / config.data.std
    head = models.head_from_config(config)
    params = head.init(jax.random.key(0), images[:1])
    tokens = head.apply(params, images)
    tokens = jnp.broadcast_to(tokens[:, None], (n, m, *tokens.shape[1:]))
    sent, _ = ops.encrypt(jax.random.key(1), tokens, config.site.keep)
    return np.asarray(sent, np.float16)


def build_step(config, batch: np.ndarray):
    """`(jitted step, state)` as the server builds them (donated state, one device)."""
    cfg = config.server
    net = models.dino_net_from_config(config)
    steps_per_epoch = 60000 // cfg.batch_size
    total = int(cfg.epochs * steps_per_epoch)
    schedules = distill.make_schedules(cfg, total_steps=total, steps_per_epoch=steps_per_epoch)
    tx = distill.make_optimizer(cfg, schedules)
    state = distill.init_state(jax.random.key(0), net, tx, batch.shape[2:])
    step = jax.jit(distill.make_distill_step(net, tx, schedules, cfg), donate_argnums=0)
    return step, state


def time_steps(step, state, batch, steps: int) -> tuple[list[float], object]:
    """Seconds of each of `steps` steps (each synchronised), and the state after them."""
    key, times = jax.random.key(1), []
    batch = jax.device_put(batch)
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return times, state


def matmul_rate(m: int, k: int, n: int, repeats: int = 10) -> float:
    """GFLOP/s of a float32 `[m, k] @ [k, n]` in XLA on this machine (median of repeats)."""
    a = jax.random.normal(jax.random.key(0), (m, k))
    b = jax.random.normal(jax.random.key(1), (k, n))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


# ---------------------------------------------------------------- the trace

# What an op (or a fusion, by the opcodes it fuses) is in the step: the first kind whose
# opcodes it holds. The optimizer and EMA are recognised by their sqrt (Adam's denominator).
KINDS = [
    ("masking gathers, sorts, top-k", {"gather", "scatter", "sort", "custom-call"}),
    ("random bits (views, stochastic depth)", {"while", "rng-bit-generator"}),
    ("gelu (erf)", {"erf"}),
    ("layer norm", {"rsqrt"}),
    ("softmax (attention, DINO loss)", {"exponential"}),
    ("optimizer + EMA", {"sqrt"}),
    ("other reductions (sums, maxima)", {"reduce"}),
]


def _events(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the perfetto trace `jax.profiler` wrote."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no trace under {trace_dir}")
    with gzip.open(paths[0]) as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def kind_of(name: str, hlo: dict[str, tuple[str, set[str]]]) -> str:
    """What an op of the step is: a matmul (by its shapes), or the first of `KINDS` whose
    opcodes it (a fusion: its fused computation) holds; else elementwise."""
    text, opcodes = hlo.get(name, ("", set()))
    if opcodes & {"dot", "convolution"}:
        shapes = re.findall(r"f32\[([\d,]+)\]", text)
        return "matmul " + " x ".join(shapes[:3])
    for kind, marks in KINDS:
        if opcodes & marks:
            return kind
    return "other elementwise (adds, scales, casts, copies)"


def hlo_ops(compiled) -> dict[str, tuple[str, set[str]]]:
    """Instruction name -> (its line, the opcodes it runs: its own, or for a fusion those of
    the computation it calls), for every instruction of the compiled step's HLO."""
    computations, current, lines = {}, None, {}
    for line in compiled.as_text().splitlines():
        head = re.match(r"\s*%?([\w.\-]+) .*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            computations[current] = set()
            continue
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if match:
            opcode = re.search(r"\s([a-z][\w-]*)\(", match.group(2))
            code = opcode.group(1) if opcode else ""
            lines[match.group(1)] = (match.group(2), code)
            if current is not None:
                computations[current].add(code)
    calls = {name: re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", text)
             for name, (text, _) in lines.items()}
    members = {}  # computation -> its instructions
    current = None
    for line in compiled.as_text().splitlines():
        head = re.match(r"\s*%?([\w.\-]+) .*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            members[current] = []
        elif (match := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)) and current:
            members[current].append(match.group(1))

    def opcodes_of(computation: str, seen: set) -> set[str]:
        if computation in seen:
            return set()
        seen.add(computation)
        found = set(computations.get(computation, set()))
        for inner in members.get(computation, []):
            for c in calls.get(inner, []):
                found |= opcodes_of(c, seen)
        return found

    return {name: (text, {code} | set().union(*(opcodes_of(c, set()) for c in calls[name])))
            for name, (text, code) in lines.items()}


def profile(step, state, batch, steps: int, hlo: dict[str, str]) -> tuple[dict, float, object]:
    """Op time by kind (ms per step) over `steps` traced steps, the traced wall time per step,
    and the state after them."""
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            _, state = time_steps(step, state, batch, steps)
        wall = (time.perf_counter() - start) / steps
        events = _events(trace_dir)
    by_kind = collections.defaultdict(float)
    for e in events:
        name = e["name"].split(":")[0]
        if name in hlo:
            by_kind[kind_of(name, hlo)] += e["dur"] / 1e3 / steps  # us -> ms per step
    return dict(by_kind), wall, state


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    batch = payload_batch(config)
    step, state = build_step(config, batch)
    _, state = time_steps(step, state, batch, _WARMUP.value)
    times, state = time_steps(step, state, batch, _STEPS.value)
    per_step = statistics.median(times)
    n = config.server.batch_size
    if _TIMING_ONLY.value:
        files.write_json(_OUT.value, dict(seconds_per_step=per_step, images_per_s=n / per_step,
                                          step_seconds=times, batch_size=n))
        print(f"{n / per_step:.1f} images/s")
        return
    from smsd_jax import cost  # only the full profile counts FLOPs

    compiled = step.lower(state, batch, jax.random.key(1)).compile()
    flops = cost.compiled_flops(step, state, batch, jax.random.key(1))
    by_kind, traced_wall, state = profile(step, state, batch, _TRACE.value, hlo_ops(compiled))
    traced_ops = sum(by_kind.values())
    rows = sorted(by_kind.items(), key=lambda kv: -kv[1])
    largest = (n * 19, 128, 512)  # a global view's tokens through fc1, the step's largest
    doc = dict(
        config=str(_CONFIG.value.workdir), batch_size=n, payload_shape=list(batch.shape),
        devices=jax.device_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        seconds_per_step=per_step, images_per_s=n / per_step,
        xla_gflop_per_step=flops / 1e9, gflops=flops / per_step / 1e9,
        matmul_gflops_2048=matmul_rate(2048, 2048, 2048),
        matmul_gflops_step_shape=matmul_rate(*largest), step_matmul_shape=list(largest),
        traced_ms_per_step=traced_wall * 1e3, ops_ms_per_step=traced_ops,
        ops=[dict(kind=k, ms_per_step=v, share=v / traced_ops) for k, v in rows])
    files.write_json(_OUT.value, doc)
    print(f"{doc['images_per_s']:.0f} images/s, {doc['gflops']:.1f} GFLOP/s (XLA's count "
          f"{doc['xla_gflop_per_step']:.1f} GFLOP a step); float32 matmul "
          f"{doc['matmul_gflops_2048']:.0f} GFLOP/s at 2048^3, "
          f"{doc['matmul_gflops_step_shape']:.0f} at {largest}")
    print(f"\nTraced: {traced_wall * 1e3:.0f} ms a step, of which XLA ops {traced_ops:.0f} ms\n")
    print("| op kind | ms a step | share |\n|---|---|---|")
    for row in doc["ops"]:
        print(f"| {row['kind']} | {row['ms_per_step']:.1f} | {100 * row['share']:.1f}% |")


if __name__ == "__main__":
    app.run(main)
