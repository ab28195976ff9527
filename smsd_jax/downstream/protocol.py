"""The downstream protocol at a site: which images may be labelled, the label fractions,
and each body (or raw pixels) measured by the linear probe, k-NN and fine-tuning on them.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from smsd_jax import consortium, data, models
from smsd_jax.downstream import segmentation
from smsd_jax.downstream.features import (evaluate_model, extract_features,
                                          raw_pixel_features)
from smsd_jax.downstream.finetune import deployable, fit
from smsd_jax.downstream.probes import (Targets, knn_classify, knn_neighbours, label_subset,
                                        linear_probe, validation_split)
from smsd_jax.errors import SMSDError


def labelled_candidates(config, train_source) -> np.ndarray:
    """Indices of `train_source` that the site may label: sorted int64.

    The first `config.data.subset` images when that is > 0 (all otherwise); with
    `config.downstream.site >= 0`, only that site's images in the partition of
    `config.data` (the same split, seed `config.seed`, that the sites are given).
    """
    site = config.downstream.site
    if site < 0:
        return np.arange(data.subset_size(config.data, len(train_source)))
    if site >= config.data.num_sites:
        raise SMSDError(f"config.downstream.site={site} but there are only "
                        f"config.data.num_sites={config.data.num_sites} sites; use -1 for "
                        "the whole train split")
    return data.split_sites(train_source.labels, config.data, config.seed)[site]


def held_out_indices(config, test_source) -> np.ndarray:
    """Indices of the test split: the first `config.data.subset` when that is > 0, else all."""
    return np.arange(data.subset_size(config.data, len(test_source)))


def result_key(fraction: float) -> str:
    """A label fraction as the results' JSON keys spell it: 0.01 -> "0.01"."""
    return f"{fraction:g}"


def _probe_features(config, name: str, train_feats, train_idx, subsets: dict,
                    train: Targets, test_feats, test: Targets, num_classes: int,
                    local: tuple | None = None) -> dict:
    """Linear probe and k-NN at each fraction, on features `train_feats` of `train_idx`.

    Features are `{"linear": [n, F], "knn": [n, D]}` (`features.extract_features`: what
    each probe reads), or one array both read (raw pixels). `subsets` maps each fraction to
    sorted indices contained in the sorted `train_idx`; `train` and `test` are the targets of
    `train_idx` and of the test features. `local`: `(features, Targets)` of a second test
    set, scored by the same fitted probes.
    Returns `{"linear": {fraction: metrics}, "knn": {...}, "labelled": {fraction: count}}`,
    and with `local` its metrics under "local" (`{"linear": ..., "knn": ...}`).
    """
    cfg = config.downstream
    per_probe = lambda f: f if isinstance(f, dict) else {"linear": f, "knn": f}
    train_feats, test_feats = per_probe(train_feats), per_probe(test_feats)
    scored = {what: test_feats[what] if local is None else
              np.concatenate([test_feats[what], per_probe(local[0])[what]])
              for what in ("linear", "knn")}
    probes = {
        "linear": lambda x, y: linear_probe(x, y.labels, scored["linear"],
                                            num_classes=num_classes, steps=cfg.linear_steps,
                                            lr=cfg.linear_lr, seed=config.seed, mask=y.mask),
        "knn": lambda x, y: knn_classify(x, y.labels, scored["knn"], num_classes=num_classes,
                                         k=knn_neighbours(cfg.knn_k, len(y.labels)),
                                         temp=cfg.knn_temp, mask=y.mask),
    }
    num_test = len(test.labels)
    results = {what: {} for what in probes}
    results["labelled"] = {}
    if local is not None:
        results["local"] = {what: {} for what in probes}
    for fraction, idx in subsets.items():
        rows = np.searchsorted(train_idx, idx)
        results["labelled"][result_key(fraction)] = len(idx)
        for what, probe in probes.items():
            start = time.perf_counter()
            scores = probe(train_feats[what][rows], train.take(rows))
            metrics = test.evaluate(scores[:num_test])
            if local is not None:
                results["local"][what][result_key(fraction)] = local[1].evaluate(
                    scores[num_test:])
            if what == "knn":
                metrics["k"] = knn_neighbours(cfg.knn_k, len(idx))
            results[what][result_key(fraction)] = metrics
            _report(name, what, fraction, len(idx), metrics, start)
    return results


def _report(name: str, what: str, fraction: float, count: int, metrics: dict,
            start: float) -> None:
    detail = ""
    if "k" in metrics:
        detail = f" (k={metrics['k']})"
    if metrics.get("val_accuracy"):
        detail = (f" (epoch {metrics['best_epoch']} of {metrics['epochs_run']}, validation "
                  f"{100 * max(metrics['val_accuracy']):.1f}% on {metrics['val_images']})")
    if metrics.get("val_auc"):
        detail = (f" (epoch {metrics['best_epoch']} of {metrics['epochs_run']}, validation "
                  f"mean AUC {metrics['val_auc'][metrics['best_epoch'] - 1]:.3f} on "
                  f"{metrics['val_images']})")
    score = (f"accuracy {100 * metrics['accuracy']:.1f}%, AUC {metrics['auc']:.3f}"
             if "accuracy" in metrics else
             f"mean AUC {metrics['auc']:.3f}, mean AP {metrics['ap']:.3f}")
    print(f"[{name}] {what:8s} {100 * fraction:g}% of labels ({count} images): {score}"
          f"{detail}, {time.perf_counter() - start:.1f} s", flush=True)


def _subsets(config, train_source, candidates: np.ndarray) -> dict:
    """Each label fraction -> its stratified subset of `candidates` (sorted indices; multi-label:
    a random share of them, `label_subset`)."""
    labels = train_source.labels[candidates]
    return {f: candidates[label_subset(labels, f, config.seed)]
            for f in config.downstream.label_fractions}


def evaluate_body(config, head_dir, body: models.ViTBody, body_params, *, train_source,
                  test_source, name: str, **where) -> dict:
    """The downstream protocol for one body at a site whose head is in `head_dir`.

    Args:
      config: uses `config.downstream`, `config.seed`, `config.data` (mean, std, subset,
        and the partition when `config.downstream.site >= 0`).
      head_dir: the site's head (`consortium.init_head`).
      body: the body's module; body_params: its parameters as `export.load_body` returns
        them, or None for a randomly initialised body seeded by `config.seed` (a baseline).
      name: the row's name in results and progress lines.
      **where: `candidates` and `local_idx` of `evaluate_pretrained` (classification only).

    Returns:
      What `evaluate_pretrained` returns; segmentation data: what
      `segmentation.evaluate_pretrained` returns.
    """
    head, head_params, head_meta = consortium.load_head(head_dir)
    if head.dim != body.input_dim:
        raise SMSDError(f"the head in {head_dir} makes tokens of width {head.dim} but the "
                        f"body takes width {body.input_dim}; use the body trained for this head")
    for source in (train_source, test_source):
        data.checks.head_fits(consortium.image_shape(head, head_meta), head_dir, source)
    evaluate = (segmentation.evaluate_pretrained if data.is_segmentation(train_source) else
                evaluate_pretrained)
    return evaluate(config, head, head_params, body, body_params, train_source=train_source,
                    test_source=test_source, name=name, **where)


def evaluate_pretrained(config, head: models.ViTHead, head_params, body: models.ViTBody,
                        body_params, *, train_source, test_source, name: str,
                        candidates: np.ndarray | None = None,
                        local_idx: np.ndarray | None = None) -> dict:
    """Linear probe and k-NN at every `config.downstream.label_fractions`, and fine-tuning of
    head + body + tail at every `config.downstream.finetune_fractions`.

    `head_params` / `body_params` None: randomly initialised from `config.seed` (the
    fine-tune-only baseline). Returns `{"name", "linear": {fraction: {"accuracy", "auc"}},
    "knn": {...}, "finetune": {...}, "labelled": {fraction: count}}`, fractions as strings such
    as "0.01" (JSON-able); a "knn" entry adds the "k" it used (`knn_neighbours`). Multi-label
    data: each entry is `{"auc", "auc_per_finding", "ap", "ap_per_finding"}`
    (`evaluation.evaluate_multilabel`) instead of accuracy and macro AUC.

    Fine-tuning, the same for every body (random included): `validation_split` carves
    `config.downstream.finetune_val_fraction` of each class (multi-label: of the images) out
    of the labelled subset, the rest trains for up to `finetune_epochs` epochs, at least
    `finetune_min_steps` steps (early stop after `finetune_patience` epochs without a better
    validation accuracy, or mean AUC, both scaled up together for a small labelled set:
    `fit`), and the test set scores the parameters of the best validation epoch; a "finetune"
    entry adds `fit`'s info ("best_epoch", "val_accuracy" or "val_auc" per epoch, ...).

    `candidates`: the images that may be labelled (default `labelled_candidates`); `local_idx`:
    images of `train_source` outside them, a second test set (a site's own held-out images),
    scored by the same probes and fine-tuned models under "local".
    """
    data.checks.same_task(train_source, test_source)
    cfg = config.downstream
    model = models.ViTClassifier(head, body, num_classes=train_source.num_classes,
                                 mean=config.data.mean, std=config.data.std,
                                 linear_features=cfg.linear_features)
    images = jnp.zeros((1, *train_source.image_shape))
    params = dict(model.init(jax.random.key(config.seed), images)["params"])
    if head_params is not None:
        params["head"] = head_params
    if body_params is not None:
        params["body"] = body_params

    if candidates is None:
        candidates = labelled_candidates(config, train_source)
    subsets = _subsets(config, train_source, candidates)
    largest = subsets[max(subsets)]  # nested: it holds every smaller subset
    test_idx = held_out_indices(config, test_source)
    start = time.perf_counter()
    extract = functools.partial(extract_features, model, params,
                                batch_size=cfg.eval_batch_size)
    train_feats, test_feats = extract(train_source, largest), extract(test_source, test_idx)
    local = None if local_idx is None else (extract(train_source, local_idx),
                                            Targets.of(train_source, local_idx))
    print(f"[{name}] features of {len(largest)} labelled + {len(test_idx)} test images, "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    results = {"name": name, **_probe_features(
        config, name, train_feats, largest, subsets, Targets.of(train_source, largest),
        test_feats, Targets.of(test_source, test_idx), train_source.num_classes, local)}
    tuning = deployable(model)
    evaluate = functools.partial(evaluate_model, tuning, batch_size=cfg.eval_batch_size)

    results["finetune"] = {}
    for fraction in cfg.finetune_fractions:
        labelled = candidates[label_subset(train_source.labels[candidates], fraction,
                                           config.seed)]
        train_pos, val_pos = validation_split(train_source.labels[labelled],
                                              cfg.finetune_val_fraction, config.seed)
        start = time.perf_counter()
        tuned, info = fit(tuning, params, train_source, labelled[train_pos],
                          epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                          batch_size=cfg.batch_size, seed=config.seed,
                          augment=cfg.get("augment"), val_idx=labelled[val_pos],
                          patience=cfg.finetune_patience, eval_batch_size=cfg.eval_batch_size,
                          max_steps=cfg.finetune_max_steps, min_steps=cfg.finetune_min_steps)
        metrics = {**evaluate(tuned, test_source, test_idx), **info}
        results["finetune"][result_key(fraction)] = metrics
        if local_idx is not None:
            results["local"].setdefault("finetune", {})[result_key(fraction)] = evaluate(
                tuned, train_source, local_idx)
        _report(name, "finetune", fraction, len(labelled), metrics, start)
    return results


def evaluate_pixels(config, train_source, test_source, name: str = "raw pixels", *,
                    candidates: np.ndarray | None = None,
                    local_idx: np.ndarray | None = None) -> dict:
    """Linear probe and k-NN on raw pixels: the dict of `evaluate_body` without "finetune"
    (`candidates` and `local_idx` as in `evaluate_pretrained`)."""
    data.checks.same_task(train_source, test_source)
    if candidates is None:
        candidates = labelled_candidates(config, train_source)
    subsets = _subsets(config, train_source, candidates)
    largest = subsets[max(subsets)]
    test_idx = held_out_indices(config, test_source)
    local = None if local_idx is None else (raw_pixel_features(train_source, local_idx),
                                            Targets.of(train_source, local_idx))
    return {"name": name, **_probe_features(
        config, name, raw_pixel_features(train_source, largest), largest, subsets,
        Targets.of(train_source, largest), raw_pixel_features(test_source, test_idx),
        Targets.of(test_source, test_idx), train_source.num_classes, local)}

