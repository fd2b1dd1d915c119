"""Data for the reproductions: scikit-learn's bundled digits (offline) and synthetic generators."""

from __future__ import annotations

import numpy as np

from ..data import digits_images


def digits(num: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 digits (1797 samples, bundled with scikit-learn): ``(x, labels)``, ``x`` of shape ``(n, 64)``.

    ``num`` samples drawn without replacement (all, shuffled, when ``None``); pixels standardised
    (zero mean, unit variance per pixel over the whole set; constant pixels left at 0).
    """
    images, labels = digits_images()
    x = images.reshape(len(images), -1).astype(np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    order = np.random.default_rng(seed).permutation(len(labels))
    if num is not None:
        if not 0 < num <= len(labels):
            raise ValueError(f"digits has {len(labels)} samples; asked for {num}")
        order = order[:num]
    return x[order], labels[order]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (the ``‖x‖ = 1`` assumption of the ReLU-DEQ theorems)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """``(n,)`` integer labels to a ``(classes, n)`` one-hot matrix (samples as columns)."""
    return np.eye(classes)[labels].T


def random_projection(x: np.ndarray, width: int, seed: int = 0) -> np.ndarray:
    """Fixed features ``φ(x) = R x`` with ``R ~ N(0, 1/d)`` of shape ``width × d``; returns ``width × n``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((width, x.shape[1])) / np.sqrt(x.shape[1]) @ x.T


def gaussian_inputs(num: int, dim: int, seed: int = 0) -> np.ndarray:
    """``num`` inputs ``x ~ N(0, I_d)``, shape ``(num, dim)``."""
    return np.random.default_rng(seed).standard_normal((num, dim))


def teacher_labels(x: np.ndarray, classes: int, noise: float, seed: int = 0) -> np.ndarray:
    """Labels ``argmax(T x + noise·Gumbel)`` of a random linear teacher ``T`` (noise keeps classes overlapping)."""
    rng = np.random.default_rng(seed)
    logits = x @ rng.standard_normal((x.shape[1], classes)) + noise * rng.gumbel(size=(len(x), classes))
    return logits.argmax(1)


def binary_digits(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num`` digits as unit-norm inputs ``(d=64, n)`` with targets ``+1`` (even digit) / ``−1`` (odd)."""
    x, labels = digits(num, seed)
    return unit_rows(x).T, np.where(labels % 2 == 0, 1.0, -1.0)


def sphere_with_random_signs(num: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num`` Gaussian inputs scaled to the unit sphere ``(dim, n)`` with random ``±1`` targets."""
    x = unit_rows(gaussian_inputs(num, dim, seed)).T
    return x, np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=num)
