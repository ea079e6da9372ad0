"""Fashion-MNIST from the IDX files that Debian's ``dataset-fashion-mnist`` ships.

Only local files are read: the package never downloads data. The IDX format is
a big-endian header (magic, dimension sizes) followed by raw uint8 values.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass root= / set FASHION_MNIST_ROOT"

# magic number = 0x0000 + dtype code (0x08 = uint8) + number of dimensions
_IDX_UINT8 = 0x08

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class IDXFormatError(ValueError):
    """An IDX file is truncated, mislabelled or otherwise not what its header says."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a uint8 array, checking its header."""
    path = Path(path)
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != _IDX_UINT8:
        raise IDXFormatError(
            f"{path}: bad magic number {raw[:4].hex()} (expected 0000 08 0N for uint8 IDX data); "
            "is this an IDX file?"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXFormatError(
            f"{path}: header says {ndim} dimensions, expected {expected_ndim} "
            "(images have 3, labels 1); are the image and label files swapped?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    payload = len(raw) - header
    if payload != expected:
        raise IDXFormatError(
            f"{path}: header promises shape {shape} ({expected} bytes of data) but the file holds "
            f"{payload}; the file is truncated or corrupt, reinstall it ({INSTALL_HINT})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found under {root}; {INSTALL_HINT}")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels uint8 [N])`` for ``split`` in {"train", "test"}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("FASHION_MNIST_ROOT", DEFAULT_ROOT))
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), expected_ndim=3)
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{root}: {images.shape[0]} {split} images but {labels.shape[0]} labels; the files do not belong together"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise IDXFormatError(f"{root}: label {int(labels.max())} out of range 0-9; mislabelled file")
    return images, labels


def to_model_range(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, size, size] in [-1, 1], zero-padded (background is black)."""
    x = images.astype(np.float32) / 127.5 - 1.0
    pad = (size - x.shape[-1]) // 2
    x = np.pad(x, ((0, 0), (pad, size - x.shape[-1] - pad), (pad, size - x.shape[-2] - pad)), constant_values=-1.0)
    return x[:, None]
