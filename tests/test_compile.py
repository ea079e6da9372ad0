"""torch.compile of a quantized model: the sampling path is one graph (fullgraph=True), a sampling loop
does not recompile, and the compiled model computes what the eager one does.

The model: the tiny UNet (attention, skip concatenations, time embedding) quantized W4A8 with the default
split shortcut and quantized attention, and with timestep-aware activation quantizers everywhere, so
that the timestep-group lookup is in the graph too. Graph capture is checked with the "aot_eager"
backend (fast); Inductor runs once.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_BUDGET, tiny_pipeline
from torch._dynamo.testing import CompileCounterWithBackend

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.modeling import QuantizedUNet2DModel
from diffusers_gaq.quant.quantizers import ActQuantizer
from diffusers_gaq.runtime.layers import IntegerLayer

# DDIM's timesteps for 4 steps of 1000, as the pipeline passes them: 0-dim tensors.
TIMESTEPS = [torch.tensor(t) for t in (999, 749, 499, 249)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders of two calibrated tiny UNets: timestep-aware activations everywhere ("ta"), and none ("plain")."""
    folders = {}
    for name, patterns in (("ta", ("*",)), ("plain", ())):
        config = GradientAlignedQuantizer(**dict(TINY_BUDGET, timestep_aware_acts=patterns))
        qpipe = quantize_pipeline(tiny_pipeline(), config, progress=False)
        folders[name] = tmp_path_factory.mktemp(name)
        qpipe.unet.save_pretrained(folders[name])
    return folders


def _sample(unet, batch: int = 2) -> torch.Tensor:
    size = unet.config.sample_size
    return torch.randn(batch, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))


def _eager_and_compiled(unet, timesteps, backend="aot_eager"):
    """Outputs of the eager and the fullgraph-compiled model at every timestep, and the compile counter."""
    x = _sample(unet)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    with torch.no_grad():
        eager = [unet(x, t).sample for t in timesteps]
        outs = [compiled(x, t).sample for t in timesteps]
    return eager, outs, counter


def _assert_close(eager, outs, rtol: float):
    """Every output within ``rtol`` of the eager output's scale (its largest magnitude)."""
    for e, o in zip(eager, outs):
        torch.testing.assert_close(o, e, rtol=0, atol=rtol * float(e.abs().max()))


def test_simulated_model_is_one_graph_across_timesteps(saved):
    unet = QuantizedUNet2DModel.from_pretrained(saved["ta"], runtime="simulated")
    eager, outs, counter = _eager_and_compiled(unet, TIMESTEPS)
    assert counter.frame_count == 1  # one graph, no recompile over the sampling loop
    # aot_eager runs the captured ops unchanged: the same float operations as eager.
    _assert_close(eager, outs, rtol=1e-6)


def test_loaded_quantizers_know_they_are_calibrated(saved):
    unet = QuantizedUNet2DModel.from_pretrained(saved["ta"], runtime="simulated")
    quantizers = [m for m in unet.modules() if isinstance(m, ActQuantizer)]
    assert quantizers and all(q.is_initialized and bool(q.initialized) for q in quantizers)
    fresh = ActQuantizer(8)
    assert not fresh.is_initialized
    fresh.load_state_dict(dict(fresh.state_dict(), initialized=torch.tensor(True)))
    assert fresh.is_initialized
    fresh.load_state_dict(dict(fresh.state_dict(), initialized=torch.tensor(False)))
    assert not fresh.is_initialized  # the flag follows the loaded buffer, both ways


def test_python_int_timesteps_recompile_at_most_once(saved):
    unet = QuantizedUNet2DModel.from_pretrained(saved["ta"], runtime="simulated")
    eager, outs, counter = _eager_and_compiled(unet, [999, 749, 499, 249])
    assert counter.frame_count <= 2  # the first int is specialised, then it is dynamic
    _assert_close(eager, outs, rtol=1e-6)


def test_integer_runtime_is_one_graph(saved):
    unet = QuantizedUNet2DModel.from_pretrained(saved["plain"])
    assert any(isinstance(m, IntegerLayer) and m.kernel == "onednn" for m in unet.modules())
    eager, outs, counter = _eager_and_compiled(unet, TIMESTEPS)
    assert counter.frame_count == 1
    _assert_close(eager, outs, rtol=1e-6)


def test_timestep_aware_integer_runtime_breaks_the_graph_as_documented(saved):
    """docs/runtime.md: oneDNN's kernel takes the step size as a Python number, so a timestep-aware integer
    layer reads its group as one (a graph break, refused under fullgraph); compiled without fullgraph, it still computes the same."""
    unet = QuantizedUNet2DModel.from_pretrained(saved["ta"])
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):  # .item() or a guard on it
        _eager_and_compiled(unet, TIMESTEPS[:1])
    torch._dynamo.reset()
    x = _sample(unet)
    compiled = torch.compile(unet, backend="aot_eager")
    with torch.no_grad():
        _assert_close([unet(x, TIMESTEPS[0]).sample], [compiled(x, TIMESTEPS[0]).sample], rtol=1e-6)


def test_inductor_matches_eager(saved):
    """Inductor fuses and reorders float operations, so x / s can land on the other side of a rounding
    boundary for a few activations: those move by one step, and the output by far less than a step of
    the output's own range."""
    unet = QuantizedUNet2DModel.from_pretrained(saved["ta"], runtime="simulated")
    eager, outs, counter = _eager_and_compiled(unet, TIMESTEPS[:2], backend="inductor")
    assert counter.frame_count == 1
    _assert_close(eager, outs, rtol=1e-4)
