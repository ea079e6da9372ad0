"""SSIM written here (diffusers_gaq/evaluation/ssim.py) against a direct, loop-by-loop evaluation of Wang et al.'s
formula, and its basic properties."""

import numpy as np
import pytest

from diffusers_gaq.evaluation.ssim import K1, K2, sample_ssim, ssim_per_image, window_for


def _direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two [H, W] images, window position by window position, with the same Gaussian window."""
    size, sigma = window_for(*x.shape)
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mx, my = (w * a).sum(), (w * b).sum()
            vx, vy = (w * (a - mx) ** 2).sum(), (w * (b - my) ** 2).sum()
            cov = (w * (a - mx) * (b - my)).sum()
            values.append(((2 * mx * my + K1**2) * (2 * cov + K2**2)) / ((mx**2 + my**2 + K1**2) * (vx + vy + K2**2)))
    return float(np.mean(values))


@pytest.mark.parametrize("size", [16, 7])  # the paper's 11x11 window, and one shrunk to fit a small image
def test_matches_the_formula_window_by_window(size):
    rng = np.random.default_rng(0)
    x = rng.random((3, size, size, 2))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    got = ssim_per_image(x, y)
    want = [np.mean([_direct_ssim(x[n, ..., c], y[n, ..., c]) for c in range(2)]) for n in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_identical_images_score_one_and_noise_lowers_it():
    rng = np.random.default_rng(1)
    x = rng.random((4, 32, 32, 1))
    assert sample_ssim(x, x) == pytest.approx(1.0)
    scores = [sample_ssim(x, np.clip(x + rng.normal(0, s, x.shape), 0, 1)) for s in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2]


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        sample_ssim(np.zeros((2, 8, 8, 1)), np.zeros((2, 8, 9, 1)))
