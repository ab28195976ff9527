"""How much an attack on a payload recovered: image quality, position and grouping scores.

Pure NumPy, no I/O. Images are grayscale in [0, 1]: `[H, W]`, `[B, H, W]` or `[B, H, W, 1]`;
image metrics return one value per image (`[B]`, or a float for a single `[H, W]` image).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import optimize

from smsd_jax.errors import SMSDError

# Wang, Bovik, Sheikh, Simoncelli (2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _as_batch(x: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """`[H, W]` / `[B, H, W]` / `[B, H, W, 1]` -> (`[B, H, W]` float64, was a single image)."""
    x = np.asarray(x, np.float64)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        return x[None], True
    if x.ndim != 3:
        raise SMSDError(f"{name} has shape {x.shape}; expected grayscale images [H, W], "
                        "[B, H, W] or [B, H, W, 1]")
    return x, False


def _pair(x, y) -> tuple[np.ndarray, np.ndarray, bool]:
    (x, single), (y, _) = _as_batch(x, "x"), _as_batch(y, "y")
    if x.shape != y.shape:
        raise SMSDError(f"x {x.shape} and y {y.shape} must have the same shape")
    return x, y, single


def psnr(x, y, data_range: float = 1.0):
    """Peak signal-to-noise ratio in dB, `10 log10(data_range^2 / MSE)`, per image.

    Identical images give `inf`.
    """
    x, y, single = _pair(x, y)
    mse = np.mean((x - y) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(data_range ** 2 / mse)
    return float(out[0]) if single else out


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of `[B, H, W]` with the 1-D window `g` on both axes."""
    x = sliding_window_view(x, len(g), axis=1) @ g
    return sliding_window_view(x, len(g), axis=2) @ g


def ssim(x, y, data_range: float = 1.0):
    """Structural similarity (Wang et al. 2004) per image: mean of the SSIM map.

    The map uses an 11x11 Gaussian window (sigma 1.5) over the 'valid' region (no padding, as
    in the reference MATLAB code), population (co)variances, C1 = (0.01 L)^2, C2 = (0.03 L)^2.

    Args:
      x, y: images `[H, W]`, `[B, H, W]` or `[B, H, W, 1]`, at least 11 pixels a side.
      data_range: L, the dynamic range of the pixel values (1 for [0, 1]).
    """
    x, y, single = _pair(x, y)
    if min(x.shape[1:]) < SSIM_WINDOW:
        raise SMSDError(f"images of {x.shape[1:]} pixels are smaller than the {SSIM_WINDOW}x"
                        f"{SSIM_WINDOW} SSIM window; use images at least that large")
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA)
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    out = ssim_map.mean(axis=(1, 2))
    return float(out[0]) if single else out


def position_accuracy(pred, true) -> float:
    """Fraction of tokens whose predicted grid position equals the true one (any equal shapes)."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise SMSDError(f"predicted positions {pred.shape} and true positions {true.shape} "
                        "must have the same shape")
    return float(np.mean(pred == true))


def cluster_purity(assignments, true_positions) -> float:
    """Purity of a grouping: each group counts its most common true position, over all tokens.

    1.0 when every group holds a single position. Assigning each token its own group also gives
    1.0, so compare groupings with the same number of groups.

    Args:
      assignments: group id of each token (non-negative ints, any shape).
      true_positions: true grid position of each token (non-negative ints, same shape).
    """
    table, total = _contingency(assignments, true_positions)
    return float(table.max(axis=1).sum() / total)


def grouping_accuracy(assignments, true_positions) -> float:
    """How well tokens are grouped by position, the groups unnamed: each group matched to at
    most one position and each position to at most one group (the best such matching), the
    share of all tokens whose group is matched to their own position.

    1.0 when the groups are the positions under other names; about 1/N for N groups drawn
    at random; a token in no group (assignment -1) counts as wrong. Unlike `cluster_purity`,
    many small groups do not score high: a position's tokens count only in one group.

    Args:
      assignments: group id of each token (ints >= -1, any shape).
      true_positions: true grid position of each token (non-negative ints, same shape).
    """
    table, total = _contingency(assignments, true_positions)
    rows, cols = optimize.linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / total)


def _contingency(assignments, true_positions) -> tuple[np.ndarray, int]:
    """`[groups, positions]` token counts of a grouping (tokens in group -1 left out), and
    the number of tokens."""
    a, t = np.asarray(assignments).ravel(), np.asarray(true_positions).ravel()
    if a.shape != t.shape or a.size == 0:
        raise SMSDError(f"assignments ({np.shape(assignments)}) and true positions "
                        f"({np.shape(true_positions)}) must be non-empty and of the same shape")
    grouped = a >= 0
    table = np.zeros((max(a.max(), 0) + 1, t.max() + 1), np.int64)
    np.add.at(table, (a[grouped], t[grouped]), 1)
    return table, a.size
