"""The comparison study (`--mode=study`): SMSD against its baselines on the same data.

Every method pre-trains the same ViT on the same sites' images (`config.data.subset` of the
train split, split over `config.data.num_sites` sites by each of `config.study.partitions`),
then goes through one downstream protocol (`downstream.evaluate_pretrained`: linear probe and
k-NN on frozen features, and fine-tuning of head + body + tail, at each label fraction):

- smsd: the single round (head -> masked, permuted payloads -> server distillation);
- fedavg_dino: DINO with image multi-crop at each site, weights averaged for R rounds;
- centralized_dino: DINO with image multi-crop on the pooled images (privacy forbids it);
- finetune_only: no pre-training; random head and body trained on the labels.

Matched compute: SMSD's server and centralized DINO see `config.server.epochs` epochs of the
pooled images, FedAvg-DINO `rounds x local_epochs` epochs at each site: the same number of
images. Per image, image multi-crop costs more FLOPs than SMSD's token views; the FLOPs are
measured and reported, not matched. Ablations change one SMSD setting each (`config.study`).

Each run writes `run.json` in its own folder when it is complete; running the command again
skips complete runs, so an interrupted study resumes. Results: `WORKDIR/results/study.json`
(with every run's record), `study.md` and PNG figures (`study.summary`).
`config.study.resume_from=<a study.json>` takes the runs that file records, where their config
is the same (`fingerprint`), instead of running them again: a study spread over machines.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from smsd_jax import baselines, consortium, cost, data, distill, downstream, export, files
from smsd_jax import models, server, site
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from experiments import study_tables as summary_tables

METHODS = ("smsd", "fedavg_dino", "centralized_dino", "finetune_only")
POOLED = ("centralized_dino", "finetune_only")  # do not depend on how the sites split the data
IMAGE_DINO = ("fedavg_dino", "centralized_dino")  # run only for config.study.image_dino_seeds
RUN_FILE = "run.json"
# config.study keys that only say which runs the study holds (`fingerprint`).
PLAN_KEYS = tuple(f"study.{k}" for k in ("seeds", "image_dino_seeds", "partitions", "methods",
                                          "pixels", "ablations", "ablation_seed",
                                          "ablation_partition", "resume_from"))


# ---------------------------------------------------------------- settings of a run


def ablation_config(config, ablation: str):
    """`config` with the one SMSD setting that `ablation` names changed.

    Ablations: `keep=<fraction>` (site.keep), `samples=<M>` (site.num_samples),
    `no_permutation` (site.permute False), `public_head` (the head drawn from a published
    seed: the server could know it; same training, see results/privacy.md for what it leaks).
    """
    c = copy.deepcopy(config)
    name, _, value = ablation.partition("=")
    with c.unlocked():
        if name == "keep" and value:
            c.site.keep = float(value)
        elif name == "samples" and value:
            c.site.num_samples = int(value)
        elif ablation == "no_permutation":
            c.site.permute = False
        elif ablation == "public_head":
            c.consortium_seed = 0  # published: anyone can rebuild the head
        else:
            raise SMSDError(f"config.study.ablations has {ablation!r}; use keep=<fraction>, "
                            "samples=<M>, no_permutation or public_head")
    return c


def seeded(config, seed: int, partition: str):
    """`config` for one seed and partition: data split, label subsets, init and keys."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.seed = seed
        c.data.partition = partition
        if c.consortium_seed < 0:
            raise SMSDError("config.consortium_seed must be >= 0 in a study (a reproducible "
                            "head per seed); it is offset by the seed")
        c.consortium_seed += seed
        c.site.secret_seed = max(c.site.secret_seed, 0) + 100 * seed
    return c


# ---------------------------------------------------------------- SMSD cost


def server_step_flops(config, token_shape: tuple[int, int, int]) -> float:
    """FLOPs of one server step at `config.server.batch_size` on samples `[M, K, D]`."""
    net = models.dino_net_from_config(config)
    schedules = distill.make_schedules(config.server, 1, 1)
    tx = distill.make_optimizer(config.server, schedules)
    state = jax.eval_shape(lambda k: distill.init_state(k, net, tx, token_shape[1:]),
                           jax.random.key(0))
    batch = jax.ShapeDtypeStruct((config.server.batch_size, *token_shape), jnp.float16)
    step = distill.make_distill_step(net, tx, schedules, config.server)
    return cost.compiled_flops(step, state, batch, jax.random.key(0))


def _site_flops_per_image(config, head: models.ViTHead, head_params) -> float:
    """FLOPs a site spends per image: head and encryption of its M samples."""
    m, size, c = config.site.num_samples, config.data.image_size, config.data.channels
    images = jax.ShapeDtypeStruct((1, m, size, size, c), jnp.float32)
    encode = functools.partial(site.encode_batch, head, keep=config.site.keep,
                               mean=config.data.mean, std=config.data.std,
                               shuffle=config.site.permute)
    return cost.compiled_flops(encode, head_params, images, site.image_keys(0, 0, 1))


# ---------------------------------------------------------------- methods


def _run_smsd(config, run_dir: Path, train, parts) -> tuple:
    """The single round into `run_dir`: (head, head params, body, body params, cost)."""
    layout = Layout(run_dir)
    head_dir = layout.head
    if not head_dir.exists():
        consortium.init_head(config, head_dir, secret_seed=config.consortium_seed)
    start = time.perf_counter()
    payload_dirs = [layout.payload(k) for k in range(len(parts))]
    manifests = [site.run_site(config, k, train, idx, head_dir, payload_dirs[k],
                               secret_seed=config.site.secret_seed + k)
                 for k, idx in enumerate(parts)]
    final = server.run_server(config, payload_dirs, layout)
    wall = time.perf_counter() - start
    head, head_params, _ = consortium.load_head(head_dir)
    body, body_params, _ = export.load_body(final["body"])
    m = manifests[0]
    per_image = _site_flops_per_image(config, head, head_params)
    step_flops = server_step_flops(config, (m["num_samples"], m["tokens"], m["dim"]))
    body_bytes = cost.folder_bytes(final["body"])
    spent = dict(
        upload_bytes_per_site=[cost.folder_bytes(d) for d in payload_dirs],
        download_bytes_per_site=[body_bytes] * len(parts),
        client_flops_per_site=[per_image * len(idx) for idx in parts],
        server_flops=step_flops * final["steps"], images_seen=final["steps"] *
        config.server.batch_size, rounds=1, wall_s=wall)
    return head, head_params, body, body_params, spent


def _pretrained_cost(pre: baselines.Pretrained, rounds: int) -> dict:
    return dict(upload_bytes_per_site=list(pre.upload_bytes_per_site),
                download_bytes_per_site=list(pre.download_bytes_per_site),
                client_flops_per_site=list(pre.client_flops_per_site),
                server_flops=pre.server_flops, images_seen=pre.images_seen, rounds=rounds,
                wall_s=pre.wall_s)


def _pretrain_baseline(config, method: str, train, parts) -> tuple:
    """A baseline's pre-training: (head, head params, body, body params, cost)."""
    if method == "fedavg_dino":
        pre, rounds = baselines.pretrain_fedavg(config, train, parts, seed=config.seed), \
            config.baselines.rounds
    elif method == "centralized_dino":
        pre, rounds = baselines.pretrain_centralized(config, train, np.concatenate(parts),
                                                     seed=config.seed, site_indices=parts), 1
    elif method == "finetune_only":
        pre, rounds = baselines.pretrain_none(config, len(parts)), 0
    else:
        raise SMSDError(f"config.study.methods has {method!r}; use any of {METHODS}")
    return pre.head, pre.head_params, pre.body, pre.body_params, _pretrained_cost(pre, rounds)


def run_method(config, method: str, run_dir: Path, train, test) -> dict:
    """Pre-trains with `method`, evaluates downstream; returns the run's record."""
    parts = data.split_sites(train.labels, config.data, config.seed)
    if method == "smsd":
        head, head_params, body, body_params, spent = _run_smsd(config, run_dir, train, parts)
    else:
        head, head_params, body, body_params, spent = _pretrain_baseline(config, method, train,
                                                                        parts)
    # Downstream always runs in float32, whatever the pre-training computed in.
    body = body.clone(dtype=jnp.float32)
    start = time.perf_counter()
    results = downstream.evaluate_pretrained(
        config, head, head_params, body, body_params, train_source=train, test_source=test,
        name=f"{method} {config.data.partition} seed {config.seed}")
    return dict(method=method, partition=config.data.partition, seed=config.seed,
                results=results, cost=spent, downstream_s=time.perf_counter() - start)


# ---------------------------------------------------------------- the plan


def plan(config) -> list[dict]:
    """Every run of the study, in order: `{"kind", "method", "partition", "seed", "ablation",
    "dir"}` (dir relative to the study folder). Pooled methods run once per seed; the image-DINO
    baselines only for the seeds of `config.study.image_dino_seeds`."""
    s = config.study
    runs = []
    for seed in s.seeds:
        for method in s.methods:
            if method in IMAGE_DINO and seed not in s.image_dino_seeds:
                continue
            partitions = ("pooled",) if method in POOLED else s.partitions
            for partition in partitions:
                runs.append(dict(kind="method", method=method, partition=partition, seed=seed,
                                 ablation="", dir=f"{partition}/seed{seed}/{method}"))
        if s.pixels:
            runs.append(dict(kind="pixels", method="raw_pixels", partition="pooled", seed=seed,
                             ablation="", dir=f"pooled/seed{seed}/raw_pixels"))
    for ablation in s.ablations:
        runs.append(dict(kind="ablation", method="smsd", partition=s.ablation_partition,
                         seed=s.ablation_seed, ablation=ablation,
                         dir=f"ablations/{ablation.replace('=', '_')}"))
    return runs


def _execute(config, run: dict, run_dir: Path, train, test) -> dict:
    # A pooled method is given a partition only to build its (unused) site split.
    partition = run["partition"] if run["partition"] != "pooled" else "iid"
    c = seeded(config, run["seed"], partition)
    if run["kind"] == "pixels":
        results = downstream.evaluate_pixels(c, train, test)
        return dict(method="raw_pixels", partition="pooled", seed=run["seed"], results=results,
                    cost=None, downstream_s=0.0)
    if run["ablation"]:
        c = ablation_config(c, run["ablation"])
        if not config.study.ablation_finetune:
            with c.unlocked():
                c.downstream.finetune_fractions = ()
    record = run_method(c, run["method"], run_dir, train, test)
    record["partition"] = run["partition"]
    return record


def _leaves(tree: dict, prefix: str = "") -> dict:
    """A nested dict's leaves by dotted key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def fingerprint(config, run: dict, plan_keys: tuple[str, ...] = ()) -> str:
    """A hash of what `run`'s record depends on: the keys of `config` that differ from the
    project's defaults (`configs/base.py`: so that an option added later at its default, which
    changes no run, keeps the runs recorded before it), without its workdir and the keys that
    only say which runs a plan holds or when it stops (`plan_keys`, dotted: a plan's list of
    seeds or settings, its deadline), and the run itself. A recorded run is taken again
    (`run_plan`'s `kept`) only where its fingerprint is the same."""
    defaults = _leaves(base.get_config().to_dict())
    left_out = ("workdir", *plan_keys)
    tree = {k: v for k, v in _leaves(config.to_dict()).items()
            if not any(k == o or k.startswith(o + ".") for o in left_out)
            and (k not in defaults or v != defaults[k])}
    text = json.dumps([tree, run], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_runs(path: str) -> dict[str, dict]:
    """The records of a plan's results JSON (its "runs", each with its "dir" and
    "fingerprint"), by run folder: runs done before, elsewhere (`run_plan`'s `kept`). An
    empty `path` gives none."""
    if not path:
        return {}
    records = files.read_json(path).get("runs", [])
    return {r["dir"]: r for r in records if "dir" in r and "fingerprint" in r}


def spread(config, runs: list[dict], plan_keys: tuple[str, ...], resume_from: str
           ) -> tuple[list[dict], dict[str, dict]]:
    """A plan that may be spread over machines: `runs`, each with its `fingerprint`, and the
    runs recorded in `resume_from` (`recorded_runs`), for `run_plan`'s `kept`."""
    return ([dict(run, fingerprint=fingerprint(config, run, plan_keys)) for run in runs],
            recorded_runs(resume_from))


def run_plan(runs: list[dict], root: Path, execute, name: str = "study",
             deadline_s: float = 0.0, after=None, kept: dict[str, dict] | None = None
             ) -> list[dict]:
    """Runs each of `runs` (dicts with a "dir" under `root`) with `execute(run, run_dir)`,
    which returns the run's record; a run whose `run.json` exists is kept, so a stopped plan
    resumes. `kept`: records of runs done before elsewhere, by dir (`recorded_runs`: a plan
    spread over machines); a run not done here is taken from there when the two have the
    same "fingerprint" (`fingerprint`; runs without one never are). Each record carries its
    run's "dir" and "fingerprint". Prints a line per run with its time and the ETA.
    `deadline_s` > 0: no run starts after that many seconds (the plan resumes later).
    `after(records)`, if given, is called with the records so far after each run done now
    (to write partial results). Returns the records of the runs done, in order."""
    records, start, spent = [], time.perf_counter(), []
    for i, run in enumerate(runs):
        run_dir = root / run["dir"]
        done = run_dir / RUN_FILE
        old = (kept or {}).get(run["dir"])
        if not done.exists() and old is not None and "fingerprint" in run:
            if old["fingerprint"] == run["fingerprint"]:
                files.write_json(done, old)
            else:
                print(f"{name}: the record of {run['dir']} was made with another config; "
                      "it runs again", flush=True)
        if not done.exists() and deadline_s and time.perf_counter() - start > deadline_s:
            print(f"{name}: deadline of {deadline_s / 60:.0f} min reached; {run['dir']} and "
                  "the runs after it are left for the next call", flush=True)
            continue
        if done.exists():
            record = files.read_json(done)
            print(f"{name} [{i + 1}/{len(runs)}] {run['dir']}: done before, kept")
        else:
            t = time.perf_counter()
            print(f"{name} [{i + 1}/{len(runs)}] {run['dir']} ...", flush=True)
            record = execute(run, run_dir)
            record.update(seconds=time.perf_counter() - t, dir=run["dir"])
            if "fingerprint" in run:
                record["fingerprint"] = run["fingerprint"]
            files.write_json(done, record)
            spent.append(record["seconds"])
            if after is not None:
                after([*records, record])
            left = len(runs) - i - 1
            print(f"{name} [{i + 1}/{len(runs)}] {run['dir']}: {record['seconds']:.0f} s; "
                  f"elapsed {(time.perf_counter() - start) / 60:.1f} min, ETA "
                  f"{left * np.mean(spent) / 60:.1f} min", flush=True)
        records.append(record)
    return records


def run_study(config, workdir: Layout | str | Path) -> dict:
    """Runs (or resumes) every run of `plan(config)`; writes the results and figures."""
    layout = Layout.of(workdir)
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    execute = lambda run, run_dir: dict(_execute(config, run, run_dir, train, test),
                                        ablation=run["ablation"])
    runs, kept = spread(config, plan(config), PLAN_KEYS, config.study.resume_from)
    records = run_plan(runs, layout.study, execute, kept=kept)
    summary = summary_tables.summarize(config, records)
    # The runs' own times: a resumed study counts each run once, where it ran.
    summary.update(wall_s=float(sum(r.get("seconds", 0.0) for r in records)), runs=records)
    paths = summary_tables.write(summary, layout.results)
    for path in paths:
        print(f"study: {path}")
    return summary
