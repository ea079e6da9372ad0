"""Fixtures shared by the test files. The values they are built from live in tests/helpers.py.

Session-scoped fixtures calibrate once for the whole run; tests must not modify what they return
(copy it first, e.g. with ``copy.deepcopy``).
"""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

import pytest
from fake_hub.fixtures import hub_env, local_hub, no_retry_sleep  # noqa: F401  (the fake Hub, for any test)
from helpers import SMALL_UNET_CONFIG, TINY_BUDGET, fp_pipeline, fp_unet, reliability_config, tiny_pipeline

from diffusers_gaq import GradientAlignedQuantizer, cli, quantize_pipeline
from diffusers_gaq import quantize as pipeline_module


@pytest.fixture(scope="session")
def tiny_quantizer() -> Callable[..., GradientAlignedQuantizer]:
    """``tiny_quantizer(weight_bits=4, ...)``: a GradientAlignedQuantizer on helpers.TINY_BUDGET, the
    smallest calibration budget that runs every stage."""
    def make(**settings) -> GradientAlignedQuantizer:
        return GradientAlignedQuantizer(**dict(TINY_BUDGET, **settings))
    return make


@pytest.fixture
def small_unet():
    """A fresh full-precision UNet of SMALL_UNET_CONFIG (seed 0): the test may change it."""
    return fp_unet(SMALL_UNET_CONFIG)


@pytest.fixture(scope="session")
def small_w4a8(tiny_quantizer):
    """(FP pipeline, its W4A8 quantization with the default settings) on SMALL_UNET_CONFIG and the tiny
    budget: test_serialization.py and test_quanto_export.py both need exactly this run."""
    fp = fp_pipeline(SMALL_UNET_CONFIG)
    return fp, quantize_pipeline(fp, tiny_quantizer(weight_bits=4, act_bits=8), progress=False)


@pytest.fixture(scope="session")
def tiny_pipe():
    """The FP pipeline of TINY_UNET_CONFIG (seed 0): what the reliability, checkpointing and verified-load
    tests quantize."""
    return tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_qpipe(tiny_pipe):
    """tiny_pipe quantized once on RELIABILITY_BUDGET, with no checkpoint folder: the run that every
    resumed run must reproduce bit for bit."""
    return quantize_pipeline(tiny_pipe, reliability_config(), progress=False)


@pytest.fixture
def no_sampling():
    """Fails the test if calibration data is collected or a model wrapped: the error had to come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was refused")

    with mock.patch.object(pipeline_module, "collect_calibration_data", forbidden), \
            mock.patch.object(pipeline_module, "wrap_model", forbidden):
        yield


@pytest.fixture
def no_loading():
    """Fails the test if the command line loads a model: the error had to come first."""
    with mock.patch.object(cli.common, "load_pipeline", side_effect=AssertionError("the model was loaded")):
        yield
