"""LoRA adapters on a quantized Stable Diffusion-style UNet, through diffusers' own calls: the adapter
runs beside the quantized layers (quantized_layer(x) + lora_B(lora_A(x)) * scaling), on the simulated
model and on the integer runtime; weighting, disabling and unloading work; what would have no effect or
would lose the calibration (targets inside a wrapper, fusing, saving with an adapter) is refused.

The LoRA is made here: peft's LoraConfig on the FP UNet with random, nonzero lora_A and lora_B, saved
with StableDiffusionPipeline.save_lora_weights as a training script does. Nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from test_families import TINY, build_pipeline

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.modeling import load_quantized, save_quantized_pipeline
from diffusers_gaq.quant.layers import QuantConv2d, QuantLinear
from diffusers_gaq.runtime.layers import IntegerConv2d, IntegerLinear

torch.set_num_threads(1)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]
# The LoRA's change to the output, through the quantized model, may differ from its change through the FP
# model by what quantization changes: the adapter reads inputs computed by quantized layers upstream, and
# its output passes quantized layers downstream. That is of the order of the base model's own relative
# error (about 1% at W8, weight-only, on this model); the bound allows 3 times it, far below the 1 an
# ignored adapter gives. (At W8A8 this tiny random model's own error is about 35%, too coarse to bound
# the delta by: there the integer runtime is compared with the simulated model instead.)
DELTA_BOUND_FACTOR = 3.0
PRECISIONS = {"w8": dict(act_bits=None), "w8a8": dict(act_bits=8)}
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(FP pipeline, W8 quantized pipeline, LoRA folder, input, {precision: quantized pipeline})."""
    pipe = build_pipeline("sd")
    qpipes = {name: quantize_pipeline(pipe, GradientAlignedQuantizer(**dict(TINY, weighting="uniform", **extra)),
                                      progress=False) for name, extra in PRECISIONS.items()}
    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(3)
    # init_lora_weights=False: lora_B random as well as lora_A (peft's default starts lora_B at zero).
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    # Text states from the pipeline's encoder, as calibration saw them (random states fall outside the
    # calibrated activation ranges).
    states = pipe.encode_prompt(["a red fox", "a lighthouse"], "cpu", 1, False)[0]
    torch.manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), states)
    return pipe, qpipes["w8"], folder, inputs, qpipes


def run(unet, inputs) -> torch.Tensor:
    x, t, states = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=states).sample


def lora_delta(pipe, folder, inputs, **load) -> tuple[torch.Tensor, torch.Tensor]:
    """(output before loading, change the LoRA makes) on a copy of ``pipe``."""
    pipe = copy.deepcopy(pipe)
    before = run(pipe.unet, inputs)
    pipe.load_lora_weights(folder, adapter_name="style", **load)
    return before, run(pipe.unet, inputs) - before


def test_lora_on_the_quantized_unet_changes_it_as_on_the_fp_unet(sd):
    pipe, qpipe, folder, inputs, _ = sd
    fp, delta_fp = lora_delta(pipe, folder, inputs)
    q, delta_q = lora_delta(qpipe, folder, inputs)
    base_error = rel(q, fp)
    assert rel(delta_fp, fp) > 0.1  # the LoRA matters
    assert rel(delta_q, delta_fp) < DELTA_BOUND_FACTOR * base_error < 0.3, (rel(delta_q, delta_fp), base_error)


def test_each_adapted_layer_adds_the_lora_branch_to_the_quantized_layer(sd):
    _, qpipe, folder, _, _ = sd
    qpipe = copy.deepcopy(qpipe)
    qpipe.load_lora_weights(folder, adapter_name="style")
    for name, cls in ((f"{ATTN1}.to_q", QuantLinear), ("down_blocks.0.resnets.0.conv1", QuantConv2d)):
        layer = qpipe.unet.get_submodule(name)
        assert type(layer.base_layer) is cls  # at the original name, around the wrapper, not its inner layer
        x = torch.randn(3, 5, 16) if cls is QuantLinear else torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            lora = layer.lora_B["style"](layer.lora_A["style"](x)) * layer.scaling["style"]
            assert torch.equal(layer(x), layer.base_layer(x) + lora)
            assert lora.abs().max() > 0


# (precision, runtime, kernel of the loaded layers)
RUNTIMES = [("w8", "auto", "dequantize"), ("w8a8", "auto", "onednn"), ("w8a8", "dequantize", "dequantize")]


@pytest.mark.parametrize("precision, runtime, kernel", RUNTIMES)
def test_lora_on_the_integer_runtime(sd, precision, runtime, kernel, tmp_path):
    pipe, _, folder, inputs, qpipes = sd
    qpipe = copy.deepcopy(qpipes[precision])
    qpipe.unet.save_pretrained(tmp_path / "unet")
    unet = load_quantized(tmp_path / "unet", runtime=runtime)
    to_q = unet.get_submodule(f"{ATTN1}.to_q")
    assert isinstance(to_q, IntegerLinear) and to_q.kernel == kernel  # oneDNN needs quantized inputs
    before = run(unet, inputs)
    unet.load_lora_adapter(folder, prefix="unet", weight_name=WEIGHT_NAME, adapter_name="style")
    assert isinstance(unet.get_submodule("down_blocks.0.resnets.0.conv1").base_layer, IntegerConv2d)
    adapted = run(unet, inputs)
    q = run(qpipe.unet, inputs)
    qpipe.load_lora_weights(folder, adapter_name="style")
    q_adapted = run(qpipe.unet, inputs)
    if kernel == "dequantize":  # bit-identical to the simulated layers, and the LoRA branch the same float ops
        assert torch.equal(adapted, q_adapted)
    else:
        # oneDNN sums in another float order; the last-bit differences flip a few activation roundings
        # downstream, which this tiny W8A8 model amplifies (its base output differs by about as much).
        assert rel(adapted - before, q_adapted - q) < 0.15
    if precision == "w8":
        fp, delta_fp = lora_delta(pipe, folder, inputs)
        assert rel(adapted - before, delta_fp) < DELTA_BOUND_FACTOR * rel(q, fp)
    unet.unload_lora()
    assert type(unet.get_submodule(f"{ATTN1}.to_q")) is IntegerLinear
    assert torch.equal(run(unet, inputs), before)


def test_weights_disable_and_unload(sd):
    pipe, qpipe, folder, inputs, _ = sd
    qpipe, fp_pipe = copy.deepcopy(qpipe), copy.deepcopy(pipe)
    fp_pipe.load_lora_weights(folder, adapter_name="style")
    fp_pipe.set_adapters("style", adapter_weights=0.5)
    unet = qpipe.unet
    before = run(unet, inputs)
    layer_x = torch.randn(3, 5, 16)
    qpipe.load_lora_weights(folder, adapter_name="style")
    layer = unet.get_submodule(f"{ATTN1}.to_q")
    with torch.no_grad():
        base = layer.base_layer(layer_x)
        full_layer = layer(layer_x) - base
    full = run(unet, inputs)
    qpipe.set_adapters("style", adapter_weights=0.5)
    with torch.no_grad():  # LoRA is linear in its scale: exactly half at a layer, up to float rounding
        torch.testing.assert_close(layer(layer_x) - base, 0.5 * full_layer, rtol=1e-5, atol=1e-6)
    half = run(unet, inputs)
    # Through the network not half (the layers after an adapter are not linear), but what the FP model gives.
    fp_before, fp_half = run(pipe.unet, inputs), run(fp_pipe.unet, inputs)
    assert rel(half - before, fp_half - fp_before) < DELTA_BOUND_FACTOR * rel(before, fp_before)
    assert not torch.equal(half, full)
    qpipe.disable_lora()
    assert torch.equal(run(unet, inputs), before)
    qpipe.enable_lora()
    assert torch.equal(run(unet, inputs), half)
    qpipe.unload_lora_weights()
    assert torch.equal(run(unet, inputs), before)
    assert type(unet.get_submodule(f"{ATTN1}.to_q")) is QuantLinear
    # delete_adapters: peft's layers stay, with no adapter, computing the quantized layer alone.
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), "other")
    assert not torch.equal(run(unet, inputs), before)
    unet.delete_adapters("other")
    assert torch.equal(run(unet, inputs), before)


def test_add_adapter_by_the_original_names_trains_beside_the_quantized_layers(sd):
    _, qpipe, _, inputs, _ = sd
    unet = copy.deepcopy(qpipe.unet)
    before = run(unet, inputs)
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "conv1"]))  # lora_B starts at zero
    assert torch.equal(run(unet, inputs), before)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for n, p in unet.named_parameters():
        if n.endswith("lora_B.default.weight"):
            torch.nn.init.normal_(p)
    assert not torch.equal(run(unet, inputs), before)


@pytest.mark.parametrize("target", ["to_q.layer", "layer"])
def test_targets_inside_a_wrapper_are_refused(sd, target):
    _, qpipe, _, inputs, _ = sd
    unet = copy.deepcopy(qpipe.unet)
    before = run(unet, inputs)
    with pytest.raises(ValueError, match=r"no effect.*without '\.layer'"):
        unet.add_adapter(LoraConfig(r=2, target_modules=[target]))
    assert not getattr(unet, "peft_config", None) and not any(hasattr(m, "lora_A") for m in unet.modules())
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))  # the model is usable as it was
    assert torch.equal(run(unet, inputs), before)


def test_a_lora_file_naming_inner_layers_is_refused(sd):
    pipe, qpipe, folder, inputs, _ = sd
    unet = copy.deepcopy(qpipe.unet)
    before = run(unet, inputs)
    fp_unet = copy.deepcopy(pipe.unet)
    fp_unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    state = {k.replace(".to_q.", ".to_q.layer."): v for k, v in get_peft_model_state_dict(fp_unet).items()}
    with pytest.raises(ValueError, match=r"target_modules=\['to_q'\]"):
        unet.load_lora_adapter(state, prefix=None, adapter_name="inner")
    assert not any(hasattr(m, "lora_A") for m in unet.modules())
    assert torch.equal(run(unet, inputs), before)


def test_dora_is_refused(sd):
    _, qpipe, _, _, _ = sd
    unet = copy.deepcopy(qpipe.unet)
    with pytest.raises(ValueError, match="DoRA"):
        unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))


def test_fuse_is_refused_and_changes_nothing(sd):
    _, qpipe, folder, inputs, _ = sd
    qpipe = copy.deepcopy(qpipe)
    qpipe.load_lora_weights(folder, adapter_name="style")
    loaded = run(qpipe.unet, inputs)
    with pytest.raises(ValueError, match="requantize"):
        qpipe.fuse_lora(lora_scale=0.7)
    with pytest.raises(ValueError, match="requantize"):
        qpipe.unet.fuse_lora()
    assert torch.equal(run(qpipe.unet, inputs), loaded)


def test_saving_with_an_adapter_is_refused_and_the_adapter_saves_alone(sd, tmp_path):
    pipe, qpipe, folder, inputs, _ = sd
    qpipe = copy.deepcopy(qpipe)
    qpipe.load_lora_weights(folder, adapter_name="style")
    loaded = run(qpipe.unet, inputs)
    with pytest.raises(ValueError, match="LoRA layers"):
        qpipe.unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="LoRA layers"):
        save_quantized_pipeline(qpipe, tmp_path / "pipe")
    assert not (tmp_path / "unet").exists() and not (tmp_path / "pipe").exists()
    qpipe.unet.save_lora_adapter(tmp_path / "adapter", adapter_name="style")
    qpipe.unload_lora_weights()
    qpipe.unet.save_pretrained(tmp_path / "unet")
    unet = load_quantized(tmp_path / "unet", runtime="simulated")
    unet.load_lora_adapter(tmp_path / "adapter", prefix=None, weight_name=WEIGHT_NAME, adapter_name="style")
    assert torch.equal(run(unet, inputs), loaded)
