"""diffusers' own loading path on a saved quantized model (issue 16): the base class's
`from_pretrained` returns the quantized model itself (on the integer runtime, as diffusers_gaq's own loader gives it) after
`import diffusers_gaq`, and refuses, naming diffusers_gaq, without it; never FP-looking random weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from test_families import CASES, TINY, build_pipeline, example, raw_output

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.modeling import QuantizedModelMixin, load_quantized, save_quantized_pipeline
from diffusers_gaq.models import family_for
from diffusers_gaq.runtime import is_integer_runtime
from diffusers_gaq.serialization import quantized_state_dict

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (quantized pipeline, its saved folder), built on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            qpipe = quantize_pipeline(build_pipeline(kind), GradientAlignedQuantizer(**TINY), progress=False)
            cache[kind] = (qpipe, save_quantized_pipeline(qpipe, tmp_path_factory.mktemp(kind) / "pipeline"))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["class_conditional", "dit", "sd"])
def test_base_class_from_pretrained_gives_the_quantized_model(kind, saved):
    qpipe, folder = saved(kind)
    component = CASES[kind][0]
    model = getattr(qpipe, component)
    base = type(model).__mro__[2]  # Quantized<Base> -> QuantizedModelMixin -> <Base>
    loaded = base.from_pretrained(folder, subfolder=component)
    assert isinstance(loaded, QuantizedModelMixin) and isinstance(loaded, base)
    assert type(loaded) is type(model)
    # Loaded for inference: the integer runtime, the same model diffusers_gaq's own loader gives.
    assert is_integer_runtime(loaded)
    own = load_quantized(folder / component)
    x, t, cond = example(model, family_for(model))
    with torch.no_grad():
        assert torch.equal(raw_output(loaded, x, t, cond), raw_output(own, x, t, cond))
    simulated = load_quantized(folder / component, runtime="simulated")
    a, b = quantized_state_dict(model), quantized_state_dict(simulated)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if kind != "class_conditional":  # diffusers' own pipeline classes load through DiffusionPipeline too
        pipe = DiffusionPipeline.from_pretrained(folder)
        with torch.no_grad():
            assert torch.equal(raw_output(getattr(pipe, component), x, t, cond), raw_output(own, x, t, cond))


def test_options_that_cannot_apply_are_refused_naming_the_call(saved):
    _, folder = saved("class_conditional")
    from diffusers import UNet2DModel

    with pytest.raises(ValueError, match=r"device_map=.* is not supported .*QuantizedUNet2DModel\.from_pretrained"):
        UNet2DModel.from_pretrained(folder, subfolder="unet", device_map="cpu")


def test_without_the_import_diffusers_refuses_the_folder(saved):
    _, folder = saved("class_conditional")
    code = ("import sys\nfrom diffusers import UNet2DModel\n"
            f"UNet2DModel.from_pretrained({str(folder)!r}, subfolder='unet')\n"
            "print('loaded', 'diffusers_gaq' in sys.modules)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd="/")
    assert r.returncode != 0, r.stdout
    assert "Unknown quantization type, got diffusers_gaq" in r.stderr
