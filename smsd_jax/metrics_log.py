"""TensorBoard event files of scalars per step, without TensorFlow.

    writer = EventWriter(workdir / "server" / "tensorboard")
    writer.scalars(step, {"loss": 3.2, "teacher_entropy": 4.1})
    writer.flush()   # e.g. every config.server.log_every steps
    writer.close()

then `tensorboard --logdir WORKDIR/server/tensorboard`. The records are written with
tensorboardX's synchronous event writer (pure Python, protobuf only): an event written and
flushed is on disk, with no background thread that could still hold it.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2


class EventWriter:
    """Appends scalar summaries to a new event file in `logdir` (created if missing).

    Each writer opens its own file, so a resumed run adds a file beside the old one;
    TensorBoard reads every event file of a folder.
    """

    def __init__(self, logdir: str | os.PathLike):
        logdir = Path(logdir)
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
