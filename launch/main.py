r"""One entry point for every stage of the single round.

    python -m launch.main --config=configs/quickstart.py --mode=simulate
    python -m launch.main --config=configs/quickstart.py --mode=init --workdir=runs/q
    python -m launch.main --config=configs/quickstart.py --mode=site --site=0 --workdir=runs/q
    python -m launch.main --config=configs/quickstart.py --mode=server --workdir=runs/q
    python -m launch.main --config=configs/quickstart.py --mode=downstream --workdir=runs/q

The server on several hosts (one process each; the workdir on a file system all of them see):
    python -m launch.main --config=... --mode=server --workdir=... --distributed  # TPU pod, SLURM
    python -m launch.main --config=... --mode=server --workdir=... --distributed \
        --coordinator=HOST0:1234 --num_processes=N --process_id=I           # any other cluster

Modes:
  init        consortium set-up: draw the frozen head from a secret seed, split the data into
              sites (a simulation of N sites on one machine), write both under the workdir.
  site        stage 1 at one site: encode and encrypt its images into its payload, once.
  server      stage 2: masked sampling distillation over all payloads; exports the body.
  downstream  stage 3 at a site: linear probe, k-NN and fine-tune of head + body + tail.
  simulate    all of the above for every site, then a results table against a random body
              and raw pixels, and the report.
  report      PNGs of the server's training curves and the downstream accuracies (results/).
  privacy     attacks of an honest-but-curious server on payloads made as sites make them
              (config.privacy); writes results/privacy.{json,md} and reconstruction PNGs:
              python -m launch.main --config=configs/privacy_fashion.py --mode=privacy
  study       SMSD against fine-tune only, FedAvg-DINO and centralized DINO (seeds, IID and
              Dirichlet sites, ablations, bytes and FLOPs); resumes; writes results/study.{json,md}
              and PNG figures: python -m launch.main --config=configs/study_fashion.py --mode=study

Workdir layout: consortium/head (never given to the server), partition.json,
sites/site_K/secret.json (a site's permutation key, never sent), payloads/site_K (uploads),
server/ (checkpoints, metrics.jsonl, tensorboard/, body), results/.
Config values can be overridden with --config.x.y=value.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from smsd_jax import checkpoint, consortium, data, downstream as downstream_stage, export
from smsd_jax import distributed, report, server as server_stage, site as site_stage, validate
from smsd_jax.privacy.study import run_privacy
from smsd_jax.study import run_study

MODES = ("simulate", "init", "site", "server", "downstream", "report", "privacy", "study")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py"
                                          "[:variant,...]).", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "simulate", MODES, "Which stage to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where artifacts go (default: config.workdir).")
_SITE = flags.DEFINE_integer("site", 0, "Site id for --mode=site.")
_HEAD = flags.DEFINE_string("head", None, "Head folder (default: WORKDIR/consortium/head).")
_PAYLOADS = flags.DEFINE_list("payloads", None, "Payload folders for --mode=server "
                              "(default: every WORKDIR/payloads/site_*).")
_FINGERPRINT = flags.DEFINE_string(
    "head_fingerprint", None, "For --mode=site: the consortium's head fingerprint (printed by "
    "init); a head that does not match it is refused.")
_BODY = flags.DEFINE_string("body", None, "Body export for --mode=downstream "
                            "(default: WORKDIR/server/body).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run (one process "
                                 "per host) before using any device; for --mode=server.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "With --distributed: HOST:PORT of "
                                   "process 0 (default: detected on TPU pods, SLURM, Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: number of "
                                      "processes (default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's "
                                   "rank, 0 to num_processes - 1 (default: detected).")


class Layout:
    """Where each artifact of a run lives."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir).absolute()
        self.head = self.root / "consortium" / "head"
        self.partition = self.root / "partition.json"
        self.payloads = self.root / "payloads"
        self.server = self.root / "server"
        self.results = self.root / "results"

    def payload(self, site: int) -> Path:
        return self.payloads / f"site_{site}"

    def secret(self, site: int) -> Path:
        return self.root / "sites" / f"site_{site}" / "secret.json"


def init(config, layout: Layout) -> None:
    """Consortium: the head (from a secret seed) and the site split of the data."""
    if layout.head.exists():
        print(f"init: head exists at {layout.head}, kept")
    else:
        seed = config.consortium_seed if config.consortium_seed >= 0 else None
        fingerprint = consortium.init_head(config, layout.head, secret_seed=seed)
        print(f"init: head {fingerprint} written to {layout.head}")
    if not layout.partition.exists():
        labels = data.load_source(config.data, "train").labels
        labels = labels[:config.data.subset] if config.data.subset else labels
        parts = data.partition(labels, config.data.partition, config.data.num_sites,
                               config.seed, alpha=config.data.alpha)
        data.save_partition(layout.partition, parts, dict(
            kind=config.data.partition, alpha=config.data.alpha, seed=config.seed,
            source=config.data.source, histogram=data.label_histogram(
                labels, parts, int(labels.max()) + 1).tolist()))
    checkpoint.read_json(layout.partition)  # fail early on a damaged file


def _site_secret(layout: Layout, site: int) -> int:
    """The site's permutation key: drawn once from the OS, kept at the site, reused on resume."""
    path = layout.secret(site)
    if not path.exists():
        checkpoint.write_json(path, {"secret_seed": secrets.randbits(63)})
        path.chmod(0o600)
    return int(checkpoint.read_json(path)["secret_seed"])


def site(config, layout: Layout, site_id: int, head_dir: Path,
         head_fingerprint: str | None = None) -> dict:
    """Stage 1 for one site."""
    parts, _ = data.load_partition(layout.partition)
    if not 0 <= site_id < len(parts):
        raise ValueError(f"--site={site_id} but {layout.partition} has {len(parts)} sites")
    seed = (config.site.secret_seed + site_id if config.site.secret_seed >= 0
            else _site_secret(layout, site_id))
    source = data.load_source(config.data, "train")
    manifest = site_stage.run_site(config, site_id, source, parts[site_id], head_dir,
                                   layout.payload(site_id), secret_seed=seed,
                                   expected_fingerprint=head_fingerprint)
    print(f"site {site_id}: {manifest['num_images']} images -> {layout.payload(site_id)}")
    return manifest


def server(config, layout: Layout, payload_dirs) -> dict:
    return server_stage.run_server(config, payload_dirs, layout.server)


def downstream(config, layout: Layout, head_dir: Path, body_dir: Path, baselines: bool) -> list:
    """Stage 3: probes of the trained body (and, with `baselines`, random body, raw pixels)."""
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    body, params, _ = export.load_body(body_dir)
    results = []
    if baselines:
        results.append(downstream_stage.evaluate_pixels(config, train, test))
        results.append(downstream_stage.evaluate_body(
            config, head_dir, body, None, train_source=train, test_source=test,
            name="random body"))
    results.append(downstream_stage.evaluate_body(
        config, head_dir, body, params, train_source=train, test_source=test, name="SMSD body"))
    table = downstream_stage.results_table(results, config.downstream.label_fractions)
    layout.results.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(layout.results / "downstream.json", results)
    (layout.results / "results.md").write_text(table + "\n")
    print(table)
    return results


def simulate(config, layout: Layout) -> None:
    """The whole single round for every site on this machine."""
    timings = {}
    t = time.perf_counter()
    init(config, layout)
    timings["init_s"] = time.perf_counter() - t
    parts, _ = data.load_partition(layout.partition)
    t = time.perf_counter()
    manifests = [site(config, layout, k, layout.head) for k in range(len(parts))]
    timings["sites_s"] = time.perf_counter() - t
    t = time.perf_counter()
    final = server(config, layout, [layout.payload(k) for k in range(len(parts))])
    timings["server_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results = downstream(config, layout, layout.head, layout.server / "body", baselines=True)
    timings["downstream_s"] = time.perf_counter() - t
    payload_bytes = [sum(f.stat().st_size for f in layout.payload(k).rglob("*") if f.is_file())
                     for k in range(len(parts))]
    summary = dict(timings=timings, server=final, results=results,
                   payload_bytes_per_site=payload_bytes,
                   images_per_site=[m["num_images"] for m in manifests])
    checkpoint.write_json(layout.results / "simulate.json", summary)
    print(f"\nsingle round: {sum(timings.values()) / 60:.1f} min "
          f"(sites {timings['sites_s']:.0f} s, "
          f"server {timings['server_s']:.0f} s, downstream {timings['downstream_s']:.0f} s); "
          f"each site uploaded once, {np.mean(payload_bytes) / 2**20:.1f} MB on average")
    print(f"teacher entropy at the end: {final['teacher_entropy']:.2f} "
          f"(ln(out_dim) = {final['max_entropy']:.2f} is uniform collapse, 0 one-hot collapse)")
    random, smsd = results[1], results[2]
    gain = lambda probe, frac: 100 * (smsd[probe][frac]["accuracy"]
                                      - random[probe][frac]["accuracy"])
    gains = ", ".join(f"{probe} {frac}: {gain(probe, frac):+.1f}"
                      for probe in ("linear", "knn") for frac in smsd[probe])
    print(f"SMSD body against the random body (accuracy points): {gains}")
    report.draw_report(layout.root)
    print(f"results: {layout.results} (table, JSON, PNG curves)")


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
    try:
        run(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Bad input or a failed health check: the message says what to do; no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py")
    if _DISTRIBUTED.value:  # before anything touches jax devices (check_config does)
        if _MODE.value != "server":
            raise app.UsageError("--distributed is for --mode=server")
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif any(f.present for f in (flags.FLAGS["coordinator"], flags.FLAGS["num_processes"],
                                 flags.FLAGS["process_id"])):
        raise app.UsageError("--coordinator, --num_processes and --process_id need --distributed")
    validate.check_config(config)
    layout = Layout(_WORKDIR.value or config.workdir)
    head_dir = Path(_HEAD.value) if _HEAD.value else layout.head
    mode = _MODE.value
    if mode == "simulate":
        simulate(config, layout)
    elif mode == "init":
        init(config, layout)
    elif mode == "site":
        site(config, layout, _SITE.value, head_dir, _FINGERPRINT.value)
    elif mode == "server":
        dirs = _PAYLOADS.value or sorted(str(p) for p in layout.payloads.glob("site_*"))
        server(config, layout, dirs)
    elif mode == "privacy":
        run_privacy(config, layout.root)
    elif mode == "study":
        run_study(config, layout.root)
    elif mode == "report":
        for path in report.draw_report(layout.root):
            print(f"report: {path}")
    elif mode == "downstream":
        downstream(config, layout, head_dir, Path(_BODY.value or layout.server / "body"),
                   baselines=False)


if __name__ == "__main__":
    app.run(main)
