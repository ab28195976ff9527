"""How predictions are scored and named: accuracy, ROC AUC (Mann-Whitney), the probes' titles.

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
