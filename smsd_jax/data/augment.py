"""Augmentations as grain transforms: numpy in, numpy out, one record at a time.

Randomness comes only from the `np.random.Generator` that grain hands to
`random_map`; grain derives it from the dataset seed and the element's index, so a
pipeline gives bitwise-identical batches every time it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import grain
import numpy as np

from smsd_jax.errors import SMSDError


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
    """Random flip, translation and contrast of a float32 image [H, W, C] in [0, 1].

    flip: mirror left-right with probability 1/2.
    max_shift: translate by up to this many pixels on each axis, filling with zeros.
    contrast: scale deviations from the per-channel image mean by a factor drawn
      uniformly from [1 - contrast, 1 + contrast].
    As a grain transform it maps a record's "image" and keeps its other keys.
    """

    flip: bool = False
    max_shift: int = 0
    contrast: float = 0.0

    def __post_init__(self):
        if self.max_shift < 0 or not 0 <= self.contrast <= 1:
            raise SMSDError(f"Augment needs max_shift >= 0 and contrast in [0, 1], got {self}.")

    def image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float32 [H, W, C] -> float32 [H, W, C]."""
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.max_shift:
            s = self.max_shift
            dy, dx = rng.integers(-s, s + 1, size=2)
            height, width = image.shape[:2]
            padded = np.pad(image, ((s, s), (s, s), (0, 0)))
            image = padded[s + dy: s + dy + height, s + dx: s + dx + width]
        if self.contrast:
            factor = rng.uniform(1 - self.contrast, 1 + self.contrast)
            mean = image.mean(axis=(0, 1), keepdims=True)
            # Clipped so that augmented inputs stay in the [0, 1] range the head sees at test time.
            image = np.clip((image - mean) * factor + mean, 0.0, 1.0)
        return np.ascontiguousarray(image, np.float32)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, "image": self.image(element["image"], rng)}


def augment_from_config(config: Mapping | Augment | None) -> Augment:
    """An `Augment` from a config mapping with keys flip, max_shift, contrast (None: identity)."""
    if isinstance(config, Augment):
        return config
    config = dict(config or {})
    known = {field.name for field in dataclasses.fields(Augment)}
    if not set(config) <= known:
        raise SMSDError(
            f"unknown augment options {sorted(set(config) - known)}; use {sorted(known)}.")
    return Augment(**config)


class ToFloat(grain.transforms.Map):
    """A record's "image" uint8 [H, W, C] -> float32 [H, W, C] in [0, 1]."""

    def map(self, element: dict) -> dict:
        return {**element, "image": np.asarray(element["image"], np.float32) / np.float32(255)}


@dataclasses.dataclass(frozen=True)
class SiteSamples(grain.transforms.RandomMap):
    """`{"image": float32 [H, W, C], "label"}` -> `{"images": float32 [M, H, W, C]}`.

    M independently augmented copies of one image. The label is dropped on purpose: a
    site's payload never carries labels.
    """

    num_samples: int
    augment: Augment = Augment()

    def __post_init__(self):
        if self.num_samples < 1:
            raise SMSDError(f"num_samples must be >= 1, got {self.num_samples}.")

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        copies = [self.augment.image(image, rng) for _ in range(self.num_samples)]
        return {"images": np.stack(copies)}
