"""Metrics people look at: PNGs of a real tiny run, and TensorBoard event files read back."""

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from smsd_jax import metrics_log, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real single round of the tiny config from the CLI (about a minute on 2 cores)."""
    workdir = tmp_path_factory.mktemp("report") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny",
         "--mode=simulate", f"--workdir={workdir}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _check_png(path: Path, min_size=(500, 300)):
    with Image.open(path) as image:
        image.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        pixels = np.asarray(image.convert("L"), np.float32)
    assert pixels.std() > 10  # something is drawn, not a blank canvas


@pytest.mark.slow  # the module's real run
def test_report_of_a_real_run(run, tmp_path):
    paths = report.draw_report(run, tmp_path / "plots")
    assert [p.name for p in paths] == [report.CURVES_PNG, report.DOWNSTREAM_PNG]
    for path in paths:
        _check_png(path)
    # The bars are the results table's numbers.
    results = json.loads((run / "results" / "downstream.json").read_text())
    groups, names, table = report.accuracy_table(results)
    assert names == ["raw pixels", "random body", "SMSD body"]
    assert groups == ["linear 50%", "k-NN 50%", "fine-tune 50%"]
    assert table[2, 0] == pytest.approx(100 * results[2]["linear"]["0.5"]["accuracy"])
    assert math.isnan(table[0, 2])  # raw pixels are not fine-tuned


@pytest.mark.slow  # the module's real run
def test_report_defaults_to_the_results_folder_and_skips_missing_downstream(run, tmp_path):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "metrics.jsonl").write_bytes(
        (run / "server" / "metrics.jsonl").read_bytes())
    paths = report.draw_report(tmp_path)
    assert paths == [tmp_path / "results" / report.CURVES_PNG]
    _check_png(paths[0])


def test_missing_metrics_name_the_path_and_the_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        report.draw_report(tmp_path)
    assert str(tmp_path / "server" / "metrics.jsonl") in str(error.value)
    assert "--mode=server" in str(error.value)


@pytest.mark.slow  # the module's real run
def test_metrics_of_a_live_run_and_a_damaged_file(run, tmp_path):
    lines = (run / "server" / "metrics.jsonl").read_text().splitlines()
    path = tmp_path / "metrics.jsonl"
    # The server is writing its next line: the part is left out.
    path.write_text("\n".join(lines) + "\n" + lines[-1][:20])
    columns = report.read_metrics(path)
    assert len(columns["step"]) == len(lines)
    assert np.all(np.diff(columns["step"]) > 0)
    path.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a JSON object"):
        report.read_metrics(path)


def test_long_runs_are_smoothed():
    values = np.arange(10.0)
    np.testing.assert_allclose(report.moving_average(values, 4), values[3:] - 1.5)
    steps = np.arange(500.0)
    fig = report.training_curves_figure(dict(
        step=steps, loss=np.cos(steps), teacher_entropy=np.ones(500), lr=np.ones(500),
        images_per_s=np.full(500, np.nan), max_entropy=np.full(500, 4.0)))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "ln(out_dim)", "mean of 10 steps"]


# ---------------------------------------------------------------- TensorBoard event files


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: slow, obviously right, independent of the writer."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[event_pb2.Event]:
    """TFRecord framing: uint64 length, masked crc of it, the bytes, masked crc of them."""
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack(
            "<I", data[at + 8:at + 12])
        body = data[at + 12:at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert header_crc == _masked(_crc32c(header)) and body_crc == _masked(_crc32c(body))
        events.append(event_pb2.Event.FromString(body))
        at += 16 + length
    return events


@pytest.mark.slow  # the module's real run
def test_event_file_holds_the_scalars_of_a_real_run(run, tmp_path):
    rows = [json.loads(line) for line in (run / "server" / "metrics.jsonl").open()]
    with metrics_log.EventWriter(tmp_path / "tb") as writer:
        for row in rows:
            writer.scalars(row["step"], {k: v for k, v in row.items() if k != "step"})
        writer.flush()
        (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
        assert len(read_events(path)) == 1 + len(rows)  # flushed: readable while open
    events = read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [row["step"] for row in rows]
    for event, row in zip(events[1:], rows):
        logged = {v.tag: v.simple_value for v in event.summary.value}
        assert set(logged) == set(row) - {"step"}
        for tag, value in logged.items():
            np.testing.assert_allclose(value, np.float32(row[tag]), rtol=1e-6)  # NaN == NaN


def test_two_writers_keep_separate_files(tmp_path):
    for step in (0, 1):
        with metrics_log.EventWriter(tmp_path) as writer:
            writer.scalars(step, {"loss": 1.0})
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2
    assert sorted(read_events(f)[1].step for f in files) == [0, 1]


def test_metrics_do_not_import_tensorflow():
    code = ("import sys, smsd_jax.metrics_log; "
            "sys.exit(any(m.split('.')[0] == 'tensorflow' for m in sys.modules))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
