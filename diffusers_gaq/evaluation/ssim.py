"""SSIM (Wang, Bovik, Sheikh & Simoncelli 2004) between paired images, written here: no weights, no
extra dependency.

Each channel is compared through a Gaussian window (11 x 11, sigma 1.5, as in the paper); images
smaller than the window get the largest odd window that fits, with sigma scaled alike, so that
latent-sized test images still give a value. Statistics are the paper's (population variances,
C1 = (0.01 L)^2, C2 = (0.03 L)^2 with data range L = 1), averaged over every window position that
lies wholly inside the image, then over channels: one value per image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def window_for(height: int, width: int) -> tuple[int, float]:
    """(window size, sigma) used for images of this size."""
    size = min(WINDOW, height, width)
    size -= 1 - size % 2  # odd, so the window has a centre pixel
    if size < 1:
        raise ValueError(f"SSIM needs images of at least 1x1 pixels, got {height}x{width}")
    return size, SIGMA * size / WINDOW


def ssim_per_image(reference: np.ndarray, images: np.ndarray) -> np.ndarray:
    """SSIM of each pair; both arrays float [N, H, W, C] in [0, 1] (evaluation.images_to_array)."""
    if reference.shape != images.shape:
        raise ValueError(f"paired images must have the same shape: {reference.shape} vs {images.shape}")
    _, h, w, c = reference.shape
    size, sigma = window_for(h, w)
    kernel = _window(size, sigma).expand(c, 1, size, size).contiguous()
    x = torch.from_numpy(np.ascontiguousarray(reference.transpose(0, 3, 1, 2))).double()
    y = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).double()

    def blur(t):  # depthwise: every channel with its own copy of the window
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = K1**2, K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).numpy()


def sample_ssim(reference_images, images, per_image: bool = False):
    """Mean SSIM between paired images (PIL lists or arrays in [0, 1], as sample_psnr takes them)."""
    from . import images_to_array

    values = ssim_per_image(images_to_array(reference_images), images_to_array(images))
    return values if per_image else float(values.mean())


__all__ = ["sample_ssim", "ssim_per_image", "window_for"]
