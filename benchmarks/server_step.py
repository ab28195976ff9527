r"""The server's distillation step against a PyTorch peer, timed in one process on one card.

    python -m benchmarks.server_step --size=S,B --out=benchmarks/results/server_step_gpu.json
    python -m benchmarks.server_step --size=B --impls=jax,jax:cudnn,eager --find_batch
    python -m benchmarks.server_step --size=S --parts=full/jax,full/eager,masked/jax \
        --time_budget_s=150
    python -m benchmarks.server_step        # no GPU: a small4 smoke run on CPU

What is timed (docs/performance.md, "The server step"), for each size, view mode and
implementation, in
the order of `--parts` (by default every `--modes` x `--impls`, mode by mode):
- `jax` (and `jax:xla`, `jax:cudnn`, the same with `config.model.attention` set): the project's
  own step, `distill.make_distill_step`, jitted with the state donated and sharded by
  `smsd_jax.sharding` over the visible devices as `server.py` runs it, computing in
  `config.model.dtype` (bfloat16);
- `eager` / `compile`: the PyTorch peer (`benchmarks/torch_peer.py`): timm's ViT blocks and a
  DINO head equal to ours, the same DINO step, bf16 autocast, eager or `torch.compile`.
Both take the server's input, token sets `[batch, M, K, D]` as in a payload. The tokens are
random: a throughput benchmark depends on shapes, not values.

View modes: "full" (every token: keep 1.0, global_keep 1.0, no local views; the setting of
docs/performance.md's reference table) and "masked" (the project's defaults from
configs/base.py: site keep 0.5, global_keep 0.75, local_keep 0.25, num_local local views).

Reported per entry: images/s (the median of `--windows` timed windows of `--steps` steps after
`--warmup` steps, each window ended by a device synchronisation), model FLOPs from the real
token counts (`FLOPS_FORMULA`), MFU against the card's bf16 matmul rate measured here in JAX,
peak memory, and for the JAX step XLA's own FLOP count (`cost.compiled_flops`) and
compile time. Ratios project/peer come from the same process. The JSON at `--out` is
rewritten after every part, so a run stopped by a time limit keeps what it finished. Without
a GPU, every default shrinks to a CPU smoke run (small4, float32, out_dim 1024), marked so.

JSON: `date`, `device` ("cpu" or the card's `device_kind`), `platform`, `device_count`, the
versions (`python`, `jax`, `flax`, `optax`, `torch`, `timm`; null without the peer),
`xla_flags`, `note`, `settings`, `matmul` (`n`, `dtype`, `seconds`, `tflops`, `torch_tflops`),
`flops_formula`, `elapsed_s`, and `results`, one per size and mode: `size`, `mode`,
`image_size`, `patch_size`, `dim`, `depth`, `heads`, `tokens`, `out_dim`,
`model_flops_per_image`, `jax` {"default" | "xla" | "cudnn": entry} and `peer` {"eager" |
"compile": entry} or "skipped: <why>". An entry is "skipped: time budget spent", {"error"},
or: `batch_size`, `images_per_s`, `seconds_per_step`, `window_seconds_per_step`, `warmup_s`,
`model_flops_per_step`, `model_tflops`, `mfu` (`batches_tried` with --find_batch); a JAX
entry adds `compile_s`, `loss`, `attention`, `dtype`, `devices`, `fsdp`,
`xla_flops_per_step`, `xla_over_formula`, `xla_step_bytes_per_device`, `peak_bytes_in_use`,
`ratio_vs_eager`, `ratio_vs_compile`; a peer entry `loss`, `teacher_entropy`, `compiled`,
`autocast`, `optimizer`, `peak_bytes`.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import time
import traceback

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from configs import base
from smsd_jax import cost, distill, files, models, ops, sharding

START = time.perf_counter()  # --time_budget_s counts from here

# size -> (image size, patch size, default batch). S and B at the reference batches of
# docs/performance.md.
SIZES = {"S": (224, 16, 128), "B": (224, 16, 64), "small4": (28, 4, 8)}
MODES = ("full", "masked")
# What a part times. "jax" keeps config.model.attention; "jax:X" sets it to X.
IMPLS = ("jax", "jax:xla", "jax:cudnn", "eager", "compile")

FLOPS_FORMULA = (
    "model FLOPs per image = 3 * sum over student views of F(K_v) + sum over teacher views of "
    "F(K_v); F(K) = L * T * (24 D^2 + 4 T D) + H with T = K + 1 (the view's tokens and the "
    "class token), L layers of width D: 24 D^2 = qkv 6 D^2 + proj 2 D^2 + MLP 16 D^2 and "
    "4 T D = QK^T + AV, per token and layer, multiply and add counted as 2; H = 2 (D h + "
    "(n - 2) h^2 + h b + b o), the DINO head (n layers, hidden h, bottleneck b, o prototypes). "
    "Student views: 2 global + num_local local, factor 3 = forward + backward; teacher views: "
    "2 global, forward only. Loss, optimizer, EMA and layer norms are not counted.")

_SIZE = flags.DEFINE_list("size", [], "ViT sizes among S, B, small4 (default: S,B on an "
                          "accelerator, small4 on CPU).")
_MODES = flags.DEFINE_list("modes", list(MODES), "View modes, in order: full, masked.")
_IMPLS = flags.DEFINE_list("impls", ["jax", "eager", "compile"], "What to time per size and "
                           f"mode, in the order given, among {', '.join(IMPLS)}.")
_PARTS = flags.DEFINE_list("parts", [], "mode/impl pairs in the order to run them, e.g. "
                           "full/jax,full/eager,masked/jax (default: every --modes x --impls, "
                           "mode by mode). With --time_budget_s, put first what matters most.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (default: S 128, B 64, small4 8).")
_FIND_BATCH = flags.DEFINE_bool("find_batch", False, "Double the batch from --batch_size until "
                                "out of memory (or --max_batch); keep the best images/s.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 2048, "Largest batch --find_batch tries.")
_DTYPE = flags.DEFINE_string("dtype", "", "config.model.dtype (default: bfloat16; float32 on "
                             "CPU, where bfloat16 is emulated); the peer autocasts to it.")
_FSDP = flags.DEFINE_bool("fsdp", False, "config.server.fsdp: split parameters over devices.")
_NUM_LOCAL = flags.DEFINE_integer("num_local", -1, "Local views in masked mode (-1: base's).")
_OUT_DIM = flags.DEFINE_integer("out_dim", 0, "DINO prototypes (0: configs/base.py's 65536; "
                                "1024 on CPU, as configs/quickstart.py).")
_WARMUP = flags.DEFINE_integer("warmup", 0, "Untimed steps first (0: 3 on GPU, 1 on CPU).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per timed window (0: 10 on GPU, 2 on CPU).")
_WINDOWS = flags.DEFINE_integer("windows", 0, "Timed windows (0: 5 on GPU, 3 on CPU).")
_MATMUL = flags.DEFINE_integer("matmul_size", 0, "n of the n^3 matmul in --dtype that measures "
                               "the card's rate (0: 8192 on GPU, 512 on CPU).")
_BUDGET = flags.DEFINE_float("time_budget_s", 0.0, "Start no part that, taking as long as its "
                             "last like part, would end later than this many seconds after "
                             "start (0: no limit).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/server_step.json", "JSON output path.")


# ---------------------------------------------------------------------------- Setting up


def bench_config(size: str, mode: str, batch: int, settings: dict, attention: str | None = None):
    """`configs/base.py` at one size and view mode; the JAX step reads only this."""
    image_size, patch_size, _ = SIZES[size]
    c = base.get_config()
    c.data.update(image_size=image_size, channels=3)
    # Tokens at the body's width (head_dim 0): the step of the body alone, the one the PyTorch
    # peer (a timm ViT, no stem) takes; a stem adds one [K, head_dim, D] matmul per token.
    c.model.update(size=size, patch_size=patch_size, dtype=settings["dtype"], head_dim=0)
    if attention is not None:
        c.model.attention = attention
    c.server.update(batch_size=batch, fsdp=settings["fsdp"], out_dim=settings["out_dim"])
    if settings["num_local"] >= 0:
        c.server.num_local = settings["num_local"]
    if mode == "full":
        c.site.keep = 1.0
        c.server.update(global_keep=1.0, num_local=0)
    return c


def token_counts(config) -> dict:
    """Tokens per sample and per global / local view, as the site and the step form them."""
    n = (config.data.image_size // config.model.patch_size) ** 2
    k = ops.num_kept(n, config.site.keep)
    s = config.server
    return dict(patches=n, sample=k, num_samples=config.site.num_samples,
                global_view=ops.num_kept(k, s.global_keep), num_local=s.num_local,
                local_view=ops.num_kept(k, s.local_keep) if s.num_local else 0)


def samples_shape(config, batch: int) -> tuple[int, int, int, int]:
    """The server's input `[batch, M, K, D]`."""
    t = token_counts(config)
    return batch, t["num_samples"], t["sample"], models.preset(config.model.size)["dim"]


def model_flops_per_image(config) -> float:
    """`FLOPS_FORMULA` for one image of `config`'s step."""
    p, s, t = models.preset(config.model.size), config.server, token_counts(config)
    d, depth = p["dim"], p["depth"]
    widths = [d] + [s.hidden_dim] * (models.DINOHead.num_layers - 1) + [s.bottleneck_dim]
    head = 2 * sum(a * b for a, b in zip(widths, widths[1:])) + 2 * s.bottleneck_dim * s.out_dim

    def view(tokens: int) -> float:
        seq = tokens + 1
        return depth * seq * (24 * d * d + 4 * seq * d) + head

    student = 2 * view(t["global_view"]) + t["num_local"] * view(t["local_view"])
    teacher = 2 * view(t["global_view"])
    return float(3 * student + teacher)


# ---------------------------------------------------------------------------- Measuring


def measure(run_steps, sync, warmup: int, steps: int, windows: int) -> dict:
    """Median seconds per step over `windows` timed windows, after `warmup` untimed steps."""
    t = time.perf_counter()
    run_steps(warmup)
    sync()
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        run_steps(steps)
        sync()
        times.append((time.perf_counter() - t) / steps)
    return dict(seconds_per_step=statistics.median(times), window_seconds_per_step=times,
                warmup_s=warmup_s)


def add_rates(entry: dict, batch: int, flops_per_image: float, matmul_tflops: float) -> dict:
    """images/s, achieved model TFLOP/s and MFU of a timed entry."""
    seconds = entry["seconds_per_step"]
    entry.update(batch_size=batch, images_per_s=batch / seconds,
                 model_flops_per_step=flops_per_image * batch)
    entry["model_tflops"] = entry["model_flops_per_step"] / seconds / 1e12
    entry["mfu"] = entry["model_tflops"] / matmul_tflops
    return entry


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemoryError", "out of memory",
                                   "Out of memory"))


def best_batch(try_batch, start: int, find: bool, max_batch: int, deadline: float) -> dict:
    """`try_batch(start)`; with `find`, batches doubled until OOM: the best images/s."""
    if not find:
        return try_batch(start)
    best, tried, batch = None, [], start
    while batch <= max_batch:
        try:
            entry = try_batch(batch)
        except Exception as e:  # noqa: BLE001 - an OOM ends the search; anything else fails
            if not is_oom(e):
                raise
            tried.append(dict(batch_size=batch, result="out of memory"))
            break
        finally:
            gc.collect()
        tried.append(dict(batch_size=batch, images_per_s=entry["images_per_s"]))
        if best is None or entry["images_per_s"] > best["images_per_s"]:
            best = entry
        if time.perf_counter() > deadline:
            tried.append(dict(batch_size=2 * batch, result="not tried: time budget spent"))
            break
        batch *= 2
    if best is None:
        raise RuntimeError(f"out of memory already at batch {start}; lower --batch_size")
    return {**best, "batches_tried": tried}


def device_peak_bytes() -> int | None:
    """Largest `peak_bytes_in_use` of this process's devices so far (None where unreported)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def jax_matmul_tflops(n: int, dtype: str, calls: int = 10, windows: int = 5) -> dict:
    """The card's matmul rate: an `n^3` product of random `dtype` matrices, `calls` back to
    back per timed window (so dispatch hides behind the card), median over `windows`."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(calls):
            c = matmul(a, b)
        c.block_until_ready()
        times.append((time.perf_counter() - t) / calls)
    seconds = statistics.median(times)
    return dict(n=n, dtype=dtype, seconds=seconds, tflops=2 * n ** 3 / seconds / 1e12)


# ---------------------------------------------------------------------------- The JAX step


def time_jax(config, batch: int, timing: dict, matmul_tflops: float) -> dict:
    """The project's step at global batch `batch`, set up as `server.run_server` sets it up."""
    config.server.batch_size = batch
    cfg = config.server
    net = models.dino_net_from_config(config)
    mesh = sharding.make_mesh(cfg.num_devices or None)
    sharding.check_batch_size(batch, mesh)
    schedules = distill.make_schedules(cfg, total_steps=1000, steps_per_epoch=100)
    tx = distill.make_optimizer(cfg, schedules)
    shape = samples_shape(config, batch)
    init = lambda key: distill.init_state(key, net, tx, shape[2:])
    state_sh = sharding.state_sharding(jax.eval_shape(init, jax.random.key(0)), mesh, cfg.fsdp)
    state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
    # float16, as payloads arrive; the step casts.
    samples = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float16),
                      out_shardings=sharding.batch_sharding(mesh))(jax.random.key(1))
    step = jax.jit(distill.make_distill_step(net, tx, schedules, cfg),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    key = jax.random.key(2)
    start = time.perf_counter()
    compiled = step.lower(state, samples, key).compile()
    compile_s = time.perf_counter() - start
    # Same arguments: answered from the compilation just made, not compiled again.
    xla_flops = cost.compiled_flops(step, state, samples, key)
    memory = compiled.memory_analysis()
    holder = [state, None]

    def run_steps(n):
        for _ in range(n):
            holder[0], holder[1] = compiled(holder[0], samples, key)
        jax.block_until_ready(holder)

    entry = measure(run_steps, lambda: None, **timing)
    loss = float(holder[1]["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"the JAX step's loss is {loss} at batch {batch}")
    add_rates(entry, batch, model_flops_per_image(config), matmul_tflops)
    # cost_analysis counts one device's program; replicated work then counts on every device.
    xla_total = xla_flops * mesh.size
    entry.update(
        compile_s=compile_s, loss=loss, attention=config.model.attention or "default",
        dtype=config.model.dtype, devices=mesh.size, fsdp=cfg.fsdp,
        xla_flops_per_step=xla_total,
        xla_over_formula=xla_total / entry["model_flops_per_step"],
        xla_step_bytes_per_device=None if memory is None else int(
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
        peak_bytes_in_use=device_peak_bytes())
    return entry


# ---------------------------------------------------------------------------- The PyTorch peer


def load_peer(platform_name: str):
    """(the torch_peer module, a torch device), or (None, why the peer is skipped)."""
    try:
        from benchmarks import torch_peer  # noqa: PLC0415 - torch only where asked for
    except ImportError as e:
        return None, f"skipped: {getattr(e, 'name', None) or e} not installed"
    device = torch_peer.device_for(platform_name)
    if device is None:
        return None, f"skipped: torch cannot run where JAX runs ({platform_name})"
    return torch_peer, device


def time_peer(torch_peer, config, batch: int, device, compiled: bool, timing: dict,
              matmul_tflops: float) -> dict:
    """The PyTorch peer's step at `batch`, timed like the JAX one."""
    peer = torch_peer.PeerStep(config, samples_shape(config, batch), device, compiled)
    try:
        entry = measure(peer.run_steps, peer.sync, **timing)
        entry.update(peer.report())
    finally:
        peer.close()
    return add_rates(entry, batch, model_flops_per_image(config), matmul_tflops)


# ---------------------------------------------------------------------------- Driver


class Run:
    """One benchmark run: its JSON document, its time budget, and the parts it times."""

    def __init__(self, out: str, budget_s: float, doc: dict):
        self.out, self.doc = out, doc
        self.deadline = START + budget_s if budget_s else float("inf")
        self.durations = {}  # part kind -> seconds its last run took

    def part(self, kind: str, family: str, fn):
        """`fn()`, unless it would end past the budget, taking as long as the last part of its
        kind (or else of its family) did; an error is recorded, not raised."""
        expected = self.durations.get(kind, self.durations.get(family, 0.0))
        if time.perf_counter() + expected > self.deadline:
            return "skipped: time budget spent"
        start = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
            traceback.print_exc()
            return dict(error=f"{type(e).__name__}: {str(e)[:800]}")
        finally:
            self.durations[kind] = self.durations[family] = time.perf_counter() - start
            gc.collect()

    def save(self) -> None:
        for result in self.doc["results"]:
            add_ratios(result)
        self.doc["elapsed_s"] = time.perf_counter() - START
        files.write_json(self.out, self.doc)


def add_ratios(result: dict) -> None:
    """project / peer images/s, for each JAX entry against each measured peer entry."""
    peer = result["peer"] if isinstance(result["peer"], dict) else {}
    for entry in result["jax"].values():
        if not isinstance(entry, dict) or "images_per_s" not in entry:
            continue
        for name in ("eager", "compile"):
            other = peer.get(name)
            if isinstance(other, dict) and "images_per_s" in other:
                entry[f"ratio_vs_{name}"] = entry["images_per_s"] / other["images_per_s"]


def resolve_settings(on_cpu: bool) -> dict:
    """The flags, each default filled in for an accelerator or for a CPU smoke run."""
    pick = lambda flag, accelerator, cpu: flag.value or (cpu if on_cpu else accelerator)
    parts = _PARTS.value or [f"{m}/{i}" for m in _MODES.value for i in _IMPLS.value]
    settings = dict(
        sizes=pick(_SIZE, ["S", "B"], ["small4"]), parts=parts,
        batch_size=_BATCH.value, find_batch=_FIND_BATCH.value, max_batch=_MAX_BATCH.value,
        dtype=pick(_DTYPE, "bfloat16", "float32"),
        out_dim=pick(_OUT_DIM, base.get_config().server.out_dim, 1024), fsdp=_FSDP.value,
        num_local=_NUM_LOCAL.value, matmul_size=pick(_MATMUL, 8192, 512),
        time_budget_s=_BUDGET.value,
        timing=dict(warmup=pick(_WARMUP, 3, 1), steps=pick(_STEPS, 10, 2),
                    windows=pick(_WINDOWS, 5, 3)))
    unknown = [s for s in settings["sizes"] if s not in SIZES]
    if unknown:
        raise app.UsageError(f"--size: unknown {unknown}; choose among {list(SIZES)}")
    for part in parts:
        mode, _, impl = part.partition("/")
        if mode not in MODES or impl not in IMPLS:
            raise app.UsageError(f"part {part!r}: want MODE/IMPL with MODE among {MODES} and "
                                 f"IMPL among {IMPLS}")
    return settings


def header(settings: dict, on_cpu: bool) -> dict:
    """The JSON document's head: card, versions, settings, the card's matmul rate."""
    device = jax.devices()[0]
    note = "random tokens of the payload's shape (throughput depends on shapes, not values)"
    if on_cpu:
        note = (f"CPU smoke run: no GPU visible, so {settings['sizes']} at tiny batches in "
                f"{settings['dtype']} on {os.cpu_count()} CPU cores (out_dim "
                f"{settings['out_dim']}); not comparable to docs/performance.md's GPU numbers; "
                + note)
    print(f"server_step benchmark on {device.device_kind} ({jax.default_backend()}, "
          f"{jax.device_count()} devices): {note}", flush=True)
    matmul = jax_matmul_tflops(settings["matmul_size"], settings["dtype"])
    print(f"{matmul['dtype']} matmul {matmul['n']}^3: {matmul['tflops']:.2f} TFLOP/s", flush=True)
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device="cpu" if on_cpu else device.device_kind, platform=jax.default_backend(),
        device_count=jax.device_count(), host=platform.node(), cpu_count=os.cpu_count(),
        python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
        optax=optax.__version__, torch=None, timm=None,
        xla_flags=os.environ.get("XLA_FLAGS", ""), note=note, settings=settings,
        matmul=matmul, flops_formula=FLOPS_FORMULA, results=[])


def result_for(run: Run, size: str, mode: str, settings: dict, peer_missing: str | None) -> dict:
    """The entry of `results` for one size and view mode, made on first use."""
    for result in run.doc["results"]:
        if (result["size"], result["mode"]) == (size, mode):
            return result
    config = bench_config(size, mode, settings["batch_size"] or SIZES[size][2], settings)
    result = dict(size=size, mode=mode, image_size=config.data.image_size,
                  patch_size=config.model.patch_size, **models.preset(size),
                  tokens=token_counts(config), out_dim=config.server.out_dim,
                  model_flops_per_image=model_flops_per_image(config), jax={},
                  peer=peer_missing or {})
    run.doc["results"].append(result)
    return result


def bench(run: Run, size: str, settings: dict, torch_peer, peer_device) -> None:
    """Every part of `settings["parts"]` at one size, each into its mode's entry."""
    batch = settings["batch_size"] or SIZES[size][2]
    rate, timing = run.doc["matmul"]["tflops"], settings["timing"]
    parts = [p.partition("/")[::2] for p in settings["parts"]]
    if settings["find_batch"]:  # the peer first: JAX's memory pool never shrinks
        parts.sort(key=lambda part: part[1].startswith("jax"))
    for mode, impl in parts:
        result = result_for(run, size, mode, settings,
                            None if torch_peer is not None else peer_device)
        if impl.startswith("jax"):
            attention = impl.partition(":")[2] or None
            try_batch = lambda b, a=attention, m=mode: time_jax(
                bench_config(size, m, b, settings, a), b, timing, rate)
            entries, name = result["jax"], attention or "default"
        elif torch_peer is not None:
            try_batch = lambda b, i=impl, m=mode: time_peer(
                torch_peer, bench_config(size, m, b, settings), b, peer_device,
                i == "compile", timing, rate)
            entries, name = result["peer"], impl
        else:
            continue
        # A JAX part with another attention takes about as long as the first JAX part.
        family = "jax" if impl.startswith("jax") else impl
        entries[name] = run.part(impl, family, lambda: best_batch(
            try_batch, batch, settings["find_batch"], settings["max_batch"], run.deadline))
        run.save()
        print(summary_line(size, mode, impl, entries[name]), flush=True)


def summary_line(size: str, mode: str, impl: str, entry) -> str:
    head = f"{size:>6} {mode:>6} {impl:<10}"
    if not isinstance(entry, dict) or "images_per_s" not in entry:
        return f"{head} {entry if isinstance(entry, str) else entry.get('error')}"
    text = (f"{head} batch {entry['batch_size']:>5} {entry['images_per_s']:>9.1f} img/s  "
            f"MFU {100 * entry['mfu']:5.1f}%")
    if "xla_over_formula" in entry:
        text += (f"  XLA/formula FLOPs {entry['xla_over_formula']:.2f}"
                 f"  compile {entry['compile_s']:.0f} s")
    return text


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Read when JAX starts its GPU client (just below), not at import: JAX's memory pool grows
    # as needed instead of taking 75% of the card up front, so the PyTorch peer gets memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    on_cpu = jax.default_backend() == "cpu"
    settings = resolve_settings(on_cpu)
    doc = header(settings, on_cpu)
    if any(not p.partition("/")[2].startswith("jax") for p in settings["parts"]):
        torch_peer, peer_device = load_peer(jax.default_backend())
    else:
        torch_peer, peer_device = None, "skipped: not asked for (--impls)"
    if torch_peer is not None:
        doc.update(torch_peer.versions())
        doc["matmul"]["torch_tflops"] = torch_peer.matmul_tflops(
            settings["matmul_size"], peer_device, settings["dtype"])
    else:
        print(f"PyTorch peer {peer_device}", flush=True)
    run = Run(_OUT.value, settings["time_budget_s"], doc)
    for size in settings["sizes"]:
        bench(run, size, settings, torch_peer, peer_device)
    run.save()
    print(f"wrote {_OUT.value} ({doc['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(app.run(main))
