"""The embedded reference pipeline, the FID-ref metric and the IDX loader (issue: foundation)."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_gaq.evaluation import PSNR_CAP_DB, fid_reference, frechet_distance, sample_psnr
from diffusers_gaq.reference import load_reference_pipeline
from diffusers_gaq.reference.data import DEFAULT_ROOT, IDXFormatError, load_fashion_mnist, read_idx, to_model_range

torch.set_num_threads(1)
HAVE_DATA = (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def pipe():
    return load_reference_pipeline()


def test_loads_offline_in_a_fresh_process():
    code = ("from diffusers_gaq.reference import load_reference_pipeline;"
            "p = load_reference_pipeline(); print(type(p).__name__, type(p.unet).__name__, p.unet.config.sample_size)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DDIMPipeline", "UNet2DModel", "32"]


def test_samples_have_shape_range_and_are_deterministic(pipe):
    kw = dict(batch_size=3, num_inference_steps=10, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    c = pipe(generator=torch.Generator().manual_seed(2), **kw).images
    assert a.shape == (3, 32, 32, 1)
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_reference_parameters_and_architecture(pipe):
    unet = pipe.unet
    assert sum(p.numel() for p in unet.parameters()) <= 5_000_000
    assert tuple(unet.config.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    # As trained: the attention up block sits at 8x8, one level deeper than google/ddpm-cifar10-32's
    # (recipe.py says why); the block types and code paths are the same.
    assert tuple(unet.config.up_block_types) == ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert unet.config.layers_per_block == 2 and unet.config.in_channels == 1
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.num_train_timesteps == 1000


@needs_data
def test_fid_ref_near_zero_for_real_test_images_and_large_for_noise():
    images, _ = load_fashion_mnist("test")
    real = (to_model_range(images[:2000])[:, 0] + 1) / 2  # [N, 32, 32] in [0, 1]
    fid_real = fid_reference(real)
    rng = np.random.default_rng(0)
    fid_noise = fid_reference(rng.random((500, 32, 32)))
    assert fid_real < 2.0, fid_real
    assert fid_noise > 50 * max(fid_real, 0.1), (fid_real, fid_noise)


def test_fid_ref_large_for_a_broken_model(pipe):
    import copy

    broken = copy.deepcopy(pipe)
    with torch.no_grad():
        broken.unet.conv_out.weight.mul_(-3.0)  # a sign-flipped, blown-up noise prediction
    kw = dict(batch_size=64, num_inference_steps=10, output_type="np")
    good = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    bad = broken(generator=torch.Generator().manual_seed(0), **kw).images
    assert fid_reference(bad) > 3 * fid_reference(good)


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert frechet_distance(mu + 1.0, sigma, mu, sigma) == pytest.approx(8.0, rel=1e-6)


def test_psnr_identical_is_capped_and_drops_with_noise():
    rng = np.random.default_rng(0)
    x = rng.random((4, 32, 32, 1))
    assert sample_psnr(x, x) == PSNR_CAP_DB
    small = sample_psnr(x, np.clip(x + rng.normal(0, 0.01, x.shape), 0, 1))
    large = sample_psnr(x, np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1))
    assert PSNR_CAP_DB > small > large > 10
    with pytest.raises(ValueError, match="same shape"):
        sample_psnr(x, x[:2])


def test_psnr_accepts_pil_lists(pipe):
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    assert sample_psnr(images, images) == PSNR_CAP_DB


def _write_idx(path, header: bytes, payload: bytes, gz=True):
    data = header + payload
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_reader_reads_a_valid_file(tmp_path):
    p = tmp_path / "ok-idx1-ubyte"
    _write_idx(p, bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big"), bytes([1, 2, 3]), gz=False)
    assert read_idx(p, expected_ndim=1).tolist() == [1, 2, 3]


def test_idx_reader_rejects_truncated_file(tmp_path):
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28))
    _write_idx(p, header, bytes(28 * 28 * 10 - 5))
    with pytest.raises(IDXFormatError, match="truncated"):
        read_idx(p)


def test_idx_reader_rejects_bad_magic_and_swapped_files(tmp_path):
    p = tmp_path / "x.gz"
    _write_idx(p, bytes([0, 0, 9, 1]) + (2).to_bytes(4, "big"), bytes(2))
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx(p)
    q = tmp_path / "y.gz"
    _write_idx(q, bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big"), bytes(2))
    with pytest.raises(IDXFormatError, match="dimensions"):
        read_idx(q, expected_ndim=3)


def test_loader_rejects_mislabelled_split(tmp_path):
    images = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, bytes(2 * 28 * 28))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big"), bytes([1, 12]))
    with pytest.raises(IDXFormatError, match="out of range"):
        load_fashion_mnist("test", root=tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big"), bytes([1, 2, 3]))
    with pytest.raises(IDXFormatError, match="do not belong together"):
        load_fashion_mnist("test", root=tmp_path)


def test_loader_names_the_install_command_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
