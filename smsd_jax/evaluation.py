"""How predictions are scored and named: accuracy, ROC AUC (Mann-Whitney), average
precision, the multi-label metrics per finding, the probes' titles.

Pure NumPy and SciPy, no I/O: used by the downstream stage, the privacy audit (how well an
attack tells pairs apart), the report and the study's tables.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from smsd_jax.errors import SMSDError

# The downstream probes, in the order the tables show them, with their titles.
PROBES = {"linear": "linear", "knn": "k-NN", "finetune": "fine-tune"}


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    The Mann-Whitney form over average ranks.

    Args:
      scores: `[n]` higher means "more likely positive".
      labels: `[n]` booleans (or 0/1), with both classes present.
    """
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if scores.shape != labels.shape or n_pos == 0 or n_neg == 0:
        raise SMSDError(f"roc_auc needs scores and labels of the same shape with both classes; "
                        f"got {scores.shape} scores, {n_pos} positives, {n_neg} negatives")
    ranks = stats.rankdata(scores)  # average ranks: ties count one half
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(scores, labels) -> float:
    """Macro one-vs-rest ROC AUC of `scores [n, C]` for integer `labels [n]`.

    Per class, `roc_auc` of that class's column against membership of the class. Classes
    absent from `labels` have no positives and are skipped; NaN when no class has both
    positives and negatives.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise SMSDError(f"scores {scores.shape} and labels {labels.shape} must be [n, C], [n]")
    aucs = [roc_auc(scores[:, c], labels == c) for c in np.unique(labels)
            if np.any(labels != c)]
    return float(np.mean(aucs)) if aucs else float("nan")


def accuracy(scores, labels) -> float:
    """Fraction of rows of `scores [n, C]` whose largest entry is at `labels [n]`."""
    return float(np.mean(np.argmax(np.asarray(scores), axis=-1) == np.asarray(labels)))


def evaluate_scores(scores, labels) -> dict:
    """`{"accuracy", "auc"}` (Python floats) of `scores [n, C]` against `labels [n]`."""
    return {"accuracy": accuracy(scores, labels), "auc": macro_auc(scores, labels)}


def average_precision(scores, labels) -> float:
    """Average precision: `sum_n (R_n - R_{n-1}) P_n`, the precision at each threshold weighted
    by the recall it adds, over the distinct scores from the highest down (tied scores are
    one threshold): scikit-learn's `average_precision_score`.

    Args:
      scores: `[n]` higher means "more likely positive".
      labels: `[n]` booleans (or 0/1), with at least one positive.
    """
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    if scores.shape != labels.shape or not labels.any():
        raise SMSDError(f"average_precision needs scores and labels of the same shape with a "
                        f"positive; got {scores.shape} scores, {int(labels.sum())} positives")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # each threshold's end
    true_pos = np.cumsum(labels)[last]
    precision, recall = true_pos / (last + 1), true_pos / labels.sum()
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def evaluate_multilabel(scores, labels, mask, finding_names) -> dict:
    """Per-finding and mean ROC AUC and average precision of `scores [n, F]` against 0/1
    `labels [n, F]`, each finding over the images whose label of it is known (`mask` 1).

    Returns:
      `{"auc", "auc_per_finding": {name: value}, "ap", "ap_per_finding": {...}}` (Python
      floats): a finding without both classes among its known labels has None (JSON null) for
      both; "auc" and "ap" are the means over the findings that have both, NaN when none has.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    known = np.asarray(mask) > 0
    if scores.ndim != 2 or labels.shape != scores.shape or known.shape != scores.shape:
        raise SMSDError(f"scores {scores.shape}, labels {labels.shape} and mask {known.shape} "
                        "must all be [n, F]")
    if len(finding_names) != scores.shape[1]:
        raise SMSDError(f"{len(finding_names)} finding names for {scores.shape[1]} findings")
    result = {"auc_per_finding": {}, "ap_per_finding": {}}
    for f, name in enumerate(finding_names):
        y, s = labels[known[:, f], f] > 0, scores[known[:, f], f]
        both = y.any() and not y.all()
        result["auc_per_finding"][name] = roc_auc(s, y) if both else None
        result["ap_per_finding"][name] = average_precision(s, y) if both else None
    for metric in ("auc", "ap"):
        values = [v for v in result[f"{metric}_per_finding"].values() if v is not None]
        result[metric] = float(np.mean(values)) if values else float("nan")
    return result


def headline_metric(results: list[dict]) -> str:
    """What tables and figures show of downstream `results` (`downstream.evaluate_body`):
    "accuracy", "auc" (the mean AUC over findings) when they are multi-label, or "dice" (the
    mean Dice over foreground classes) for segmentation."""
    if any("segment" in r for r in results):
        return "dice"
    entries = [m for r in results for p in PROBES for m in r.get(p, {}).values()]
    return "auc" if any("auc_per_finding" in m for m in entries) else "accuracy"
