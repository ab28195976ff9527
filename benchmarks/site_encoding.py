r"""Stage 1 on a folder of 224 x 224 medical images: images/s per core and peak memory of a
site encoding them, DICOM and PNG; written as JSON.

    python -m benchmarks.site_encoding --out=benchmarks/results/site_encoding_cpu.json

Real pixels: 224 x 224 crops at seeded random places of pydicom-data's uncompressed
radiographs and scans (two CR chest-size plates, an MR and a CT slice), written to disk first
as DICOM (the source's own dataset with the crop as its pixels, so windowing and
MONOCHROME1 apply as for the original) and as PNG (the crop after that windowing). Each
folder is then encoded by `site.run_site` with configs/cxr_vit_s16.py's head and site
settings (patch 16, 98 of 196 tokens of width 256, M = 2, float16) in its own process, whose
own peak resident memory is reported; images/s is over the whole encoding (reading and
decoding, augmenting, the head, masked sampling, permutation, writing), divided by the cores.
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from absl import app, flags
from PIL import Image
from pydicom.data import get_testdata_file

from smsd_jax import files

_OUT = flags.DEFINE_string("out", "benchmarks/results/site_encoding.json", "Where to write.")
_IMAGES = flags.DEFINE_integer("images", 1024, "Crops per folder (DICOM and PNG each).")
_RUN = flags.DEFINE_string("run", None, "Internal: encode this folder in this process.")
SOURCES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "MR2_UNCR.dcm", "693_UNCR.dcm")
SIZE = 224


def write_crops(folder: Path, count: int, seed: int = 0) -> dict[str, Path]:
    """`count` crops as DICOM files and as PNG files, each kind with its `labels.csv`
    (label: which source image); returns {"dicom": folder, "png": folder}."""
    from smsd_jax.data import sources
    rng = np.random.default_rng(seed)
    out = {kind: folder / kind for kind in ("dicom", "png")}
    rows = {kind: [] for kind in out}
    for d in out.values():
        d.mkdir(parents=True, exist_ok=True)
    originals = [pydicom.dcmread(get_testdata_file(name, download=False)) for name in SOURCES]
    for i in range(count):
        k = i % len(originals)
        ds = originals[k]
        pixels = ds.pixel_array
        y = rng.integers(0, pixels.shape[0] - SIZE + 1)
        x = rng.integers(0, pixels.shape[1] - SIZE + 1)
        crop = copy.deepcopy(ds)
        crop.PixelData = np.ascontiguousarray(pixels[y:y + SIZE, x:x + SIZE]).tobytes()
        crop.Rows, crop.Columns = SIZE, SIZE
        name = f"crop_{i:05d}"
        crop.save_as(out["dicom"] / f"{name}.dcm")
        windowed = sources.read_pixels(str(out["dicom"] / f"{name}.dcm"))  # as a site reads it
        Image.fromarray(windowed).save(out["png"] / f"{name}.png")
        rows["dicom"].append((f"{name}.dcm", k))
        rows["png"].append((f"{name}.png", k))
    for kind, d in out.items():
        with open(d / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows[kind]])
    return out


def _encode(folder: str) -> None:
    """The child process: head + site encoding of `folder`; one JSON line on stdout."""
    from configs import cxr_vit_s16
    from smsd_jax import cost, consortium, data, site
    config = cxr_vit_s16.get_config()
    config.data.update(path=folder, labels_csv=f"{folder}/labels.csv", num_sites=1)
    source = data.load_source(config.data, "train")
    with tempfile.TemporaryDirectory() as tmp:
        consortium.init_head(config, f"{tmp}/head", secret_seed=0)
        start = time.perf_counter()
        manifest = site.run_site(config, 0, source, np.arange(len(source)), f"{tmp}/head",
                                 f"{tmp}/payload", secret_seed=1)
        seconds = time.perf_counter() - start
        payload_bytes = cost.folder_bytes(f"{tmp}/payload")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(dict(
        images=len(source), seconds=seconds, images_per_s=len(source) / seconds,
        images_per_s_per_core=len(source) / seconds / os.cpu_count(), peak_rss_mb=peak_mb,
        payload_bytes_per_image=payload_bytes / len(source),
        tokens=[manifest["num_samples"], manifest["tokens"], manifest["dim"]])))


def main(argv):
    del argv
    if _RUN.value:
        return _encode(_RUN.value)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_crops(Path(tmp), _IMAGES.value)
        for kind, folder in folders.items():
            proc = subprocess.run([sys.executable, "-m", "benchmarks.site_encoding",
                                   f"--run={folder}"], stdout=subprocess.PIPE, text=True,
                                  check=True)
            results[kind] = json.loads(next(line for line in proc.stdout.splitlines()
                                            if line.startswith("RESULT "))[7:])
            results[kind]["bytes_on_disk_per_image"] = sum(
                f.stat().st_size for f in folder.iterdir() if f.suffix != ".csv") / _IMAGES.value
            print(kind, results[kind], flush=True)
    doc = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
               cpu_count=os.cpu_count(), image_size=SIZE, sources=list(SOURCES),
               config="configs/cxr_vit_s16.py", **results)
    files.write_json(_OUT.value, doc)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    app.run(main)
