"""Per-site heads, measured: what they cost in accuracy, and what one leaked head reveals.

    python -m launch.main --config=configs/per_site_heads.py --mode=per_site_heads   # resumes

Two single rounds on the same data with the same budget and seeds (`simulate`): one head
shared by every site (the default), and a head of its own at every site
(`config.model.per_site_heads`: the server learns a stem per site). Accuracy: each round's
downstream table (per-site heads: site 0's head and stem), and the linear probe and k-NN
through every site's own head and stem.

Leaks: the server is handed one site's head (it leaked) and attacks, with it, the real
payload of every site on disk (its first `config.heads.images_per_site` images, every sample):
  direct          the leaked head's linear-Gaussian attack (`attacks.linear_gaussian`, its patch
                  prior from public test images) on the tokens as sent: positions, then the
                  kept patches;
  through stems   first maps the victim site's tokens into the leaked head's token space with
                  the server's own trained stems (the affine map that the two stems agree
                  through: `stem_map`), then the same attack. The stems are trained to bring
                  every site into one body, so they are the server's best bridge between
                  heads.
Each is scored against what the site holds (its augmented samples; the positions its key
gives), up to a left-right mirror as in the privacy study, beside the public mean image. The
shared round is attacked the same way: there, one leaked head opens every site.
Writes WORKDIR/results/per_site_heads.{json,md,png}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from smsd_jax import consortium, data, downstream, export, files, models, ops, payload, simulate
from smsd_jax import site
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from smsd_jax.privacy import attacks
from experiments import privacy_audit as audit

ROUNDS = {"shared": False, "per_site": True}  # round name -> config.model.per_site_heads
ATTACKS = ("direct", "through_stems")
TRAINED, RANDOM = "SMSD body", "random body"  # their rows in downstream.json


@dataclasses.dataclass
class Victim:
    """What one site sent and the truth only it holds, for its first images' samples."""
    sent: np.ndarray       # [S, K, D] float32: the payload's rows as read from disk
    positions: np.ndarray  # [S, K] the patch each sent token came from (from the site's key)
    images: np.ndarray     # [S, H, W, C] in [0, 1]: the augmented samples the site encoded


def victim(config, layout: Layout, site_id: int, count: int) -> Victim:
    """Site `site_id`'s first `count` images in its payload in `layout`, with their truth.

    The truth is rebuilt as the site made it (its images and augmentation, its key); for a
    payload without token noise the tokens of its head at those positions must be the sent
    ones (to float16 rounding), or the rebuild is wrong and this stops.
    """
    cfg, m = config.site, config.site.num_samples
    manifest = payload.read_manifest(layout.payload(site_id))
    count = min(count, manifest["num_images"])
    parts, _ = data.load_partition(layout.partition)
    source = data.load_source(config.data, "train")
    images = np.asarray(data.site_dataset(source, parts[site_id], num_samples=m,
                                          augment=dict(cfg.augment), batch_size=count,
                                          seed=config.seed)[0]["images"])
    keys = site.image_keys(site.secret_seed(config, layout, site_id), 0, count)
    n = manifest["num_patches"]
    ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None], (m, n, 1))
    positions = np.asarray(jax.vmap(lambda key: ops.encrypt(key, ids, cfg.keep,
                                                            cfg.permute)[1])(keys))
    sent = payload.read_tokens(layout.payload(site_id))[:count].astype(np.float32)
    images = images.reshape(count * m, *images.shape[2:])
    out = Victim(sent.reshape(count * m, *sent.shape[2:]), positions.reshape(count * m, -1),
                 images)
    if "noise" not in manifest:
        head, params, _ = consortium.load_head(consortium.site_head(config, layout, site_id,
                                                                    draw=False))
        tokens = head.apply({"params": params}, (images - config.data.mean) / config.data.std)
        rebuilt = np.take_along_axis(np.asarray(tokens), out.positions[..., None], axis=1)
        if not np.allclose(rebuilt, out.sent, rtol=2e-3, atol=2e-3):
            raise SMSDError(f"site {site_id}'s payload in {layout.payload(site_id)} is not what "
                            "its images and key give; run the round again with this config")
    return out


def stem_map(stems: dict, victim_site: int, leaked_site: int) -> tuple[np.ndarray, np.ndarray]:
    """`(A, b)` taking a token `t` of `victim_site` to `t A + b` in `leaked_site`'s token
    space, where the stems agree: `(t A + b) K_l + c_l = t K_v + c_v` in least squares, for
    stems `t -> t K + c` (`stems`: the body's `{"kernel" [S, Dh, D], "bias" [S, D]}`)."""
    kernel, bias = (np.asarray(stems[k], np.float64) for k in ("kernel", "bias"))
    inverse = np.linalg.pinv(kernel[leaked_site])  # [D, Dh]
    return kernel[victim_site] @ inverse, (bias[victim_site] - bias[leaked_site]) @ inverse


@dataclasses.dataclass
class _Public:
    """The server's public data: a patch prior and the public mean image's scores."""
    prior: attacks.PatchPrior
    flips: bool


def _public(config) -> _Public:
    augment = config.site.augment
    public = audit.augment_copies(audit.sample_images(config, "test", config.heads.num_public,
                                                      config.seed + 2),
                                  1, augment, config.seed + 3)[:, 0]
    public = (public - config.data.mean) / config.data.std
    prior = attacks.fit_patch_prior(np.asarray(models.patchify(public, config.model.patch_size)))
    return _Public(prior, data.augment_from_config(augment).flip)


def attack(config, public: _Public, head_params, victim_: Victim) -> dict:
    """A server holding `head_params` attacks `victim_`'s tokens: position accuracy, PSNR and
    SSIM of the rebuilt samples."""
    kernel, offsets = attacks.head_matrices(head_params)
    model = attacks.linear_gaussian(kernel, offsets, public.prior,
                                    ridge=config.heads.prior_ridge)
    order = "free" if config.site.permute else "sorted"
    found, rebuilt = audit.linear_attack(config, model, victim_.sent,
                                         lambda s: attacks.assign_positions(s, order),
                                         public.prior.mean)
    n = (config.data.image_size // config.model.patch_size) ** 2
    return dict(position_accuracy=audit.mirror_accuracy(found, victim_.positions, n,
                                                        public.flips),
                **audit.image_quality(rebuilt, victim_.images, public.flips))


def _mapped(victim_: Victim, a: np.ndarray, b: np.ndarray) -> Victim:
    return dataclasses.replace(victim_, sent=(victim_.sent @ a + b).astype(np.float32))


def leaks(config, layout: Layout, public: _Public, per_site: bool) -> dict:
    """`{attack: [[scores of leaked head j on site i's payload for i] for j]}` for one round;
    a shared head is one head: its row is every site."""
    parts, _ = data.load_partition(layout.partition)
    sites = range(len(parts))
    victims = [victim(config, layout, i, config.heads.images_per_site) for i in sites]
    heads = [consortium.load_head(consortium.site_head(config, layout, j, draw=False))[1]
             for j in (sites if per_site else [0])]
    out = {"direct": [[attack(config, public, h, v) for v in victims] for h in heads]}
    if per_site:
        stems = export.load_body(layout.body)[1]["stem"]
        out["through_stems"] = [[attack(config, public, h, _mapped(v, *stem_map(stems, i, j)))
                                 for i, v in enumerate(victims)] for j, h in enumerate(heads)]
    mean_image = audit.to_pixels(config, public.prior.mean[None, :0], np.zeros((1, 0), int),
                                 public.prior.mean)
    out["mean_image"] = [audit.image_quality(np.broadcast_to(mean_image, v.images.shape),
                                             v.images, public.flips) for v in victims]
    out["chance"] = 1.0 / public.prior.mean.shape[0]
    return out


def site_probes(config, layout: Layout) -> list[dict]:
    """Linear probe and k-NN of the per-site round's body through each site's own head and
    stem (`downstream.at_site`), on `config.data`'s test split."""
    body, params, _ = export.load_body(layout.body)
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    probes = config.copy_and_resolve_references()
    probes.downstream.finetune_fractions = ()
    out = []
    for k in range(body.site_stems):
        head_dir, site_body, site_params = downstream.at_site(config, layout, body, params, k)
        out.append(downstream.evaluate_body(probes, head_dir, site_body, site_params,
                                            train_source=train, test_source=test,
                                            name=f"site {k}'s head and stem"))
    return out


PROBES = ("linear", "knn", "finetune")


def _accuracies(row: dict) -> dict:
    """`{"linear 0.01": accuracy, ...}` of a downstream row (every probe it has)."""
    return {f"{probe} {f}": 100 * row[probe][f]["accuracy"]
            for probe in PROBES for f in row.get(probe, {})}


def run_site_heads(config, workdir: Layout | str) -> dict:
    """Both rounds (each resumed if its `results/simulate.json` exists), their accuracies and
    their leaks; writes `results/per_site_heads.{json,md,png}` of `workdir`."""
    layout = Layout.of(workdir)
    public, summary = _public(config), dict(config=config.heads.to_dict(), rounds={})
    for name, per_site in ROUNDS.items():
        run_config = config.copy_and_resolve_references()
        run_config.model.per_site_heads = per_site
        run = Layout(layout.root / name)
        if not (run.results / "simulate.json").exists():
            print(f"heads: the {name} round into {run.root}", flush=True)
            simulate.run_simulation(run_config, run)
        rows = {r["name"]: r for r in files.read_json(run.downstream_json)}
        entry = dict(accuracy=_accuracies(rows[TRAINED]), random=_accuracies(rows[RANDOM]),
                     leaks=leaks(run_config, run, public, per_site))
        if per_site:
            entry["site_accuracy"] = [_accuracies(r) for r in site_probes(run_config, run)]
        summary["rounds"][name] = entry
    files.write_results(layout.results, "per_site_heads", summary, markdown(summary),
                        figure(summary))
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _matrix(rows: list[list[dict]], key: str, fmt) -> list[str]:
    sites = len(rows[0])
    out = ["| leaked head | " + " | ".join(f"site {i}" for i in range(sites)) + " |",
           "|---|" + "---|" * sites]
    for j, row in enumerate(rows):
        name = "the shared head" if len(rows) == 1 else f"site {j}'s"
        out.append(f"| {name} | " + " | ".join(fmt(cell[key]) for cell in row) + " |")
    return out


def markdown(summary: dict) -> str:
    """The report: accuracy of both rounds, then each round's leaks, as tables."""
    shared, per_site = (summary["rounds"][name] for name in ROUNDS)
    # In probe order, fractions ascending: the same from a run as from the JSON (sorted keys).
    columns = sorted(shared["accuracy"], key=lambda c: (PROBES.index(c.split()[0]),
                                                       float(c.split()[1])))
    row = lambda name, values: f"| {name} | " + " | ".join(f"{values[c]:.1f}"
                                                           for c in columns) + " |"
    out = ["# Per-site heads: the accuracy they cost, what one leaked head reveals", "",
           "## Accuracy at the same budget and seed", "",
           "Each body is probed through a site's head (and stem): the random body beside it "
           "has the same head, so the two rows of a round differ only by training.", "",
           "| heads | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
           row("one shared head: SMSD body", shared["accuracy"]),
           row("one shared head: random body", shared["random"]),
           row("per-site, site 0's head and stem: SMSD body", per_site["accuracy"]),
           row("per-site, site 0's head: random body", per_site["random"])]
    sites = per_site["site_accuracy"]
    probe_columns = [c for c in columns if c in sites[0]]
    spread = lambda c: np.std([s[c] for s in sites], ddof=1) if len(sites) > 1 else 0.0
    cells = [f"{np.mean([s[c] for s in sites]):.1f} +- {spread(c):.1f}" for c in probe_columns]
    out += [f"| per-site, mean +- std over the {len(sites)} sites' heads and stems | "
            + " | ".join(cells + ["-"] * (len(columns) - len(cells))) + " |", ""]
    for name in ROUNDS:  # not the JSON's sorted order
        leaked = summary["rounds"][name]["leaks"]
        out += [f"## What a leaked head reveals: {name.replace('_', '-')} heads", "",
                f"Position accuracy (chance {_pct(leaked['chance'])}); rows: the head the "
                "server holds; columns: the payload it attacks.", ""]
        for attack_name in ATTACKS:
            if attack_name in leaked:
                out += [f"{attack_name.replace('_', ' ')}:", "",
                        *_matrix(leaked[attack_name], "position_accuracy", _pct), ""]
        mean_image = ", ".join(f"{m['psnr']:.1f}" for m in leaked["mean_image"])
        out += [f"PSNR dB of the rebuilt samples, direct (the public mean image: {mean_image} "
                "dB at sites 0, 1, ...):", "",
                *_matrix(leaked["direct"], "psnr", lambda x: f"{x:.1f}"), ""]
    return "\n".join(out) + "\n"


def figure(summary: dict) -> Figure:
    """Position accuracy of each leaked head on each site's payload: the shared head, then
    per-site heads direct and through the stems."""
    panels = [("one shared head", summary["rounds"]["shared"]["leaks"]["direct"])]
    per_site = summary["rounds"]["per_site"]["leaks"]
    panels += [(f"per-site heads, {a.replace('_', ' ')}", per_site[a]) for a in ATTACKS]
    fig = Figure(figsize=(4 * len(panels), 3.8), layout="constrained")
    for k, (title, rows) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        values = np.array([[100 * c["position_accuracy"] for c in row] for row in rows])
        image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (j, i), v in np.ndenumerate(values):
            ax.text(i, j, f"{v:.0f}", ha="center", va="center",
                    color="white" if v < 50 else "black")
        names = [str(j) for j in range(len(rows))] if len(rows) > 1 else ["shared"]
        ax.set(title=title, xlabel="payload of site", ylabel="leaked head of site",
               xticks=range(values.shape[1]), yticks=range(len(rows)), yticklabels=names)
    fig.colorbar(image, ax=fig.axes, label="positions recovered (%)")
    return fig
