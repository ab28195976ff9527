"""The server's training metrics: one JSON line per step, and TensorBoard events.

    log = MetricsLog(layout.metrics, layout.tensorboard, out_dim=..., start_step=..., ...)
    row = log.check_and_write(step, metrics, last_checkpoint)   # stops at a non-finite loss

`MetricsLog` writes `metrics.jsonl` (what `report` draws) and, through `EventWriter`,
TensorBoard event files of scalars per step, without TensorFlow:

    writer = EventWriter(layout.tensorboard)
    writer.scalars(step, {"loss": 3.2, "teacher_entropy": 4.1})
    writer.flush()   # e.g. every config.server.log_every steps
    writer.close()

then `tensorboard --logdir WORKDIR/server/tensorboard`. The records are written with
tensorboardX's synchronous event writer (pure Python, protobuf only): an event written and
flushed is on disk, with no background thread that could still hold it.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path

import jax

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from smsd_jax import files
from smsd_jax.errors import NotFiniteError


class EventWriter:
    """Appends scalar summaries to a new event file in `logdir` (created if missing).

    Each writer opens its own file, so a resumed run adds a file beside the old one;
    TensorBoard reads every event file of a folder.
    """

    def __init__(self, logdir: str | os.PathLike):
        logdir = files.as_path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        # The file name holds the time in whole seconds: a suffix keeps two writers apart.
        self._events = EventsWriter(str(logdir / "events"),
                                    filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Records each `tag: value` of `values` at `step` (one event)."""
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()])
        self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                 summary=summary))

    def flush(self) -> None:
        """Writes buffered events to disk (and fsyncs)."""
        self._events.flush()

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _logged_step(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class MetricsLog:
    """One JSON line of metrics per step; stops the run at the first non-finite loss.

    Every process checks the (global) metrics; only the one made with `write` (process 0)
    writes them, to the file and to TensorBoard. A local file gets each line as it comes;
    one in an object store (no append) the lines gathered since the last `flush`.
    """

    def __init__(self, path: Path, events_dir: Path, out_dim: int, start_step: int,
                 collapse_patience: int, write: bool = True):
        self.path, self.max_entropy, self.rate = path, math.log(out_dim), float("nan")
        self.patience, self.collapsed_steps, self.warned = collapse_patience, 0, False
        self.write, self.events, self._lines = write, None, []
        if not write:
            return
        if path.exists():  # A resumed run logs again the steps after its checkpoint.
            files.write_text(path, "".join(
                line + "\n" for line in path.read_text().splitlines()
                if _logged_step(line) is not None and _logged_step(line) < start_step))
        self.events = EventWriter(events_dir)

    def check_and_write(self, step: int, metrics: dict, last_checkpoint) -> dict:
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in row.values()):
            raise NotFiniteError(
                f"non-finite training metrics at step {step}: {row}. The last good checkpoint is "
                f"step {last_checkpoint}; lower the learning rate or use float32, then rerun "
                "(it resumes from there)")
        row.update(step=step, max_entropy=self.max_entropy, images_per_s=self.rate)
        self._watch_collapse(row["teacher_entropy"], step)
        if self.write:
            self._lines.append(json.dumps(row) + "\n")
            if files.is_local(self.path):
                self._write_lines()
            self.events.scalars(step, {k: v for k, v in row.items() if k != "step"})
        return row

    def _write_lines(self) -> None:
        if self._lines:
            files.append_text(self.path, "".join(self._lines))
            self._lines = []

    def flush(self) -> None:
        self._write_lines()
        if self.events:
            self.events.flush()

    def close(self) -> None:
        self._write_lines()
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
