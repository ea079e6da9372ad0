"""Per-layer precision (GradientAlignedQuantizer.layer_precision / first_last_precision): which
layers get which quantizers, validation, bit-exact save / load of mixed precisions with codes at
the stated widths, effective bits per weight, the model card / ``info`` tables, and quanto export
with per-module types.

Real diffusers UNets with random weights; calibration on the tiny budget of test_serialization.py.
"""

from __future__ import annotations

import fnmatch
import json
import math

import pytest
import torch
from helpers import TINY_BUDGET, fp_pipeline, fp_unet
from optimum.quanto import QConv2d, QLinear, qint4, qint8
from safetensors import safe_open
from test_families import tiny_dit, tiny_sd_unet
from torch import nn

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq import quantize as pipeline_module
from diffusers_gaq.cli import main as cli_main
from diffusers_gaq.config import CONFIG_NAME
from diffusers_gaq.hub import build_model_card
from diffusers_gaq.modeling import load_quantized
from diffusers_gaq.models import family_for
from diffusers_gaq.models.attention import QuantAttnProcessor
from diffusers_gaq.models.wrap import check_layer_patterns, wrap_model
from diffusers_gaq.quant.layers import QuantLayer
from diffusers_gaq.quanto_export import export_to_quanto
from diffusers_gaq.serialization import CODES_KEY, WEIGHTS_NAME
from diffusers_gaq.weight_bits import checkpoint_weight_bits, model_weight_bits

torch.set_num_threads(1)

# Every form of tag, a first-match case (conv1 before its block's pattern), an attention module
# switched off by name, a whole unit with FP weights (time_embedding: nothing to round, and with
# fixed activation steps nothing to learn), and odd widths whose codes straddle bytes.
MIXED = {
    "time_embedding.*": "a8",
    "down_blocks.0.*": "w8",
    "down_blocks.1.resnets.0.conv1": "w6",
    "down_blocks.1.*": "w5a8",
    "mid_block.attentions.0": "fp",
    "mid_block.resnets.0.*": "fp",
    "up_blocks.1.*": "w8a8",
    "up_blocks.*": "w3a6",
}
MIXED_SETTINGS = dict(weight_bits=4, act_bits=8, layer_precision=MIXED, learn_act_scale=False)


def _layer_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _expected(name: str, patterns: dict, default=(4, 8), first_last=("conv_in", "conv_out")):
    """The precedence, written out independently: first matching pattern, then first/last = FP."""
    for pattern, tag in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            return tag
    if name in first_last:
        return "fp"
    return "w%da%d" % default


def _tag_of(model, name: str) -> str:
    module = model.get_submodule(name)
    if not isinstance(module, QuantLayer):
        return "fp"
    w = module.weight_quantizer.bits if module.weight_quantizer is not None else None
    a = module.act_quantizer.bits if module.act_quantizer is not None else None
    return (f"w{w}" if w else "") + (f"a{a}" if a else "")


def _wrap(config: GradientAlignedQuantizer, model=None):
    model = model if model is not None else fp_unet()
    return model, wrap_model(model, config, family_for(model))


def _inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(3, 1, 32, 32, generator=gen), torch.tensor([1, 500, 999])


# ---- which layers get which quantizers ----------------------------------------------------------
def test_patterns_set_exactly_the_layers_they_name(small_unet):
    model, report = _wrap(GradientAlignedQuantizer(layer_precision={"down_blocks.2.*": "w8a16"}))
    names = _layer_names(small_unet)
    for name in names:
        assert _tag_of(model, name) == _expected(name, {"down_blocks.2.*": "w8a16"}), name
    named = [n for n in names if n.startswith("down_blocks.2.")]
    assert len(named) >= 4 and all(report.layer_bits[n] == {"weight_bits": 8, "act_bits": 16} for n in named)
    others = [n for n in names if n not in named and n not in ("conv_in", "conv_out")]
    assert all(report.layer_bits[n] == {"weight_bits": 4, "act_bits": 8} for n in others)


def test_mixed_tags_first_match_wins_and_fp_weights_have_no_quantizer(small_unet):
    model, report = _wrap(GradientAlignedQuantizer(**MIXED_SETTINGS))
    for name in _layer_names(small_unet):
        assert _tag_of(model, name) == _expected(name, MIXED), name
    # first match: conv1 is w6 although "down_blocks.1.*" (w5a8) also matches it, later
    assert report.layer_bits["down_blocks.1.resnets.0.conv1"] == {"weight_bits": 6, "act_bits": None}
    assert report.layer_bits["down_blocks.1.resnets.0.conv2"] == {"weight_bits": 5, "act_bits": 8}
    a8 = model.get_submodule("time_embedding.linear_1")
    assert a8.weight_quantizer is None and a8.act_quantizer.bits == 8
    w8 = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert w8.act_quantizer is None and w8.split_quantizer is None and w8.weight_quantizer.bits == 8
    assert type(model.get_submodule("mid_block.resnets.0.conv1")) is nn.Conv2d  # "fp": not wrapped at all
    assert {"mid_block.resnets.0.conv1", "conv_in", "conv_out"} <= set(report.kept_fp)
    # the attention module named "fp" keeps its processor; its linears keep the global bits
    assert not isinstance(model.mid_block.attentions[0].processor, QuantAttnProcessor)
    assert "mid_block.attentions.0" not in report.attention
    assert report.layer_bits["mid_block.attentions.0.to_q"] == {"weight_bits": 4, "act_bits": 8}
    # the attention cores elsewhere take their module's activation bits
    assert model.up_blocks[1].attentions[0].processor.core.q_quantizer.bits == 8
    assert model.down_blocks[1].attentions[0].processor.core.q_quantizer.bits == 8


def test_keep_fp_overrides_layer_precision():
    config = GradientAlignedQuantizer(keep_fp=("up_blocks.1.resnets.*",), layer_precision={"up_blocks.1.*": "w8a8"})
    model, report = _wrap(config)
    assert type(model.get_submodule("up_blocks.1.resnets.0.conv1")) is nn.Conv2d
    assert "up_blocks.1.resnets.0.conv1" in report.kept_fp
    assert report.layer_bits["up_blocks.1.attentions.0.to_q"] == {"weight_bits": 8, "act_bits": 8}
    # keep_fp on an attention module's name switches its core off, whatever layer_precision says
    model, report = _wrap(GradientAlignedQuantizer(keep_fp=("up_blocks.1.attentions.0",),
                                                   layer_precision={"up_blocks.1.*": "w8a8"}))
    assert "up_blocks.1.attentions.0" not in report.attention and "up_blocks.1.attentions.1" in report.attention


def test_first_last_precision_defaults_to_fp_and_same_turns_it_off():
    model, report = _wrap(GradientAlignedQuantizer())
    assert sorted(report.kept_fp) == ["conv_in", "conv_out"]
    assert type(model.conv_in) is nn.Conv2d and type(model.conv_out) is nn.Conv2d
    _, report = _wrap(GradientAlignedQuantizer(first_last_precision="same"))
    assert report.kept_fp == [] and report.layer_bits["conv_in"] == {"weight_bits": 4, "act_bits": 8}
    _, report = _wrap(GradientAlignedQuantizer(first_last_precision="w8a8"))
    assert report.layer_bits["conv_out"] == {"weight_bits": 8, "act_bits": 8}
    # layer_precision comes before first_last_precision
    _, report = _wrap(GradientAlignedQuantizer(first_last_precision="w8a8", layer_precision={"conv_in": "w6"}))
    assert report.layer_bits["conv_in"] == {"weight_bits": 6, "act_bits": None}


@pytest.mark.parametrize("build, first_last", [
    (tiny_dit, ["pos_embed.proj", "proj_out_2"]),
    (lambda: tiny_dit(legacy=True), ["pos_embed.proj", "proj_out_2"]),
    (tiny_sd_unet, ["conv_in", "conv_out"]),
], ids=["dit", "dit-legacy", "sd-unet"])
def test_families_name_their_first_and_last_layers(build, first_last):
    model = build()
    assert family_for(model).first_last_layers(model) == first_last
    report = wrap_model(model, GradientAlignedQuantizer(), family_for(model))
    assert sorted(report.kept_fp) == sorted(first_last)


def test_activation_tag_under_global_weight_only():
    config = GradientAlignedQuantizer(act_bits=None, layer_precision={"up_blocks.1.*": "w4a8"})
    assert config.quantizes_activations
    model, report = _wrap(config)
    assert report.layer_bits["up_blocks.1.resnets.0.conv1"] == {"weight_bits": 4, "act_bits": 8}
    assert report.layer_bits["down_blocks.0.resnets.0.conv1"] == {"weight_bits": 4, "act_bits": None}
    assert report.attention == ["up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    assert not GradientAlignedQuantizer(act_bits=None).quantizes_activations


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_precision, words", [
    ({"up_blocks.*": "int8"}, ["up_blocks.*", "'int8'", "w<W>a<A>", "'fp'"]),
    ({"up_blocks.*": "w9a8"}, ["up_blocks.*", "'w9a8'", "9-bit weights", "2..8"]),
    ({"up_blocks.*": "w4a2"}, ["up_blocks.*", "'w4a2'", "2-bit activations", "4..16"]),
    ({"up_blocks.*": "a32"}, ["'a32'", "4..16"]),
    ({"up_blocks.*": 8}, ["up_blocks.*", "8", "w<W>a<A>"]),
    ({3: "w8a8"}, ["pattern 3", "fnmatch"]),
    ({"": "w8a8"}, ["pattern ''"]),
])
def test_invalid_layer_precision_is_refused_by_name(layer_precision, words):
    with pytest.raises(ValueError) as e:
        GradientAlignedQuantizer(layer_precision=layer_precision)
    assert "layer_precision" in str(e.value)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


@pytest.mark.parametrize("tag", ["w1", "a99", "int4", "", "same8"])
def test_invalid_first_last_precision_is_refused(tag):
    with pytest.raises(ValueError, match="first_last_precision") as e:
        GradientAlignedQuantizer(first_last_precision=tag)
    assert repr(tag) in str(e.value) and "'same'" in str(e.value)


def test_unknown_pattern_is_refused_with_a_hint(small_unet):
    config = GradientAlignedQuantizer(layer_precision={"up_block.*": "w8a8"})  # typo: up_block
    model = small_unet
    with pytest.raises(ValueError, match=r"pattern 'up_block\.\*' matches no Conv2d / Linear") as e:
        wrap_model(model, config, family_for(model))
    assert "up_blocks." in str(e.value)  # a hint of what the names look like
    assert not any(isinstance(m, QuantLayer) for m in model.modules())  # refused before any wrapping


@pytest.mark.parametrize("option, value", [
    ("layer_precision", {"nomatch*": "w8a8"}),
    ("keep_fp", ("nomatch*",)),
    ("timestep_aware_acts", ("nomatch*",)),
])
def test_every_pattern_field_refuses_a_pattern_that_matches_nothing(small_unet, option, value):
    """One rule for every pattern field: a pattern that matches nothing is refused, never warned about
    or silently ignored."""
    config = GradientAlignedQuantizer(**{option: value, "act_timestep_groups": 2} if option == "timestep_aware_acts"
                                      else {option: value})
    with pytest.raises(ValueError, match=rf"{option} pattern 'nomatch\*' .*matches no") as e:
        check_layer_patterns(small_unet, config, family_for(small_unet))
    assert "down_blocks." in str(e.value) or "conv_in" in str(e.value)  # real names as a hint


def test_cli_refuses_an_unmatched_timestep_aware_pattern_before_sampling(tmp_path, capsys, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("calibration data was sampled before the pattern check")

    monkeypatch.setattr(pipeline_module, "collect_calibration_data", no_sampling)
    code = cli_main(["quantize", "reference", "--budget", "tiny", "--timestep-aware", "nomatch*",
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "timestep_aware_acts pattern 'nomatch*'" in err and "--timestep-aware" in err, err
    assert not (tmp_path / "out").exists()


def test_quantize_pipeline_refuses_an_unknown_pattern_before_sampling(monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("calibration data was sampled before the pattern check")

    monkeypatch.setattr(pipeline_module, "collect_calibration_data", no_sampling)
    config = GradientAlignedQuantizer(layer_precision={"down_blocks.9.*": "w8"}, **TINY_BUDGET)
    with pytest.raises(ValueError, match=r"'down_blocks\.9\.\*' matches no"):
        quantize_pipeline(fp_pipeline(), config, progress=False)


# ---- a calibrated mixed-precision model ------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed():
    """The UNet quantized with MIXED (gradient-aligned reconstruction, tiny budget)."""
    config = GradientAlignedQuantizer(**MIXED_SETTINGS, **TINY_BUDGET)
    return quantize_pipeline(fp_pipeline(), config, progress=False).unet


@pytest.fixture(scope="module")
def mixed_folder(mixed, tmp_path_factory):
    return mixed.save_pretrained(tmp_path_factory.mktemp("mixed") / "unet")


def test_mixed_precision_round_trip_is_bit_exact(mixed, mixed_folder, small_unet):
    loaded = load_quantized(mixed_folder, runtime="simulated")
    for name in _layer_names(small_unet):
        assert _tag_of(loaded, name) == _tag_of(mixed, name) == _expected(name, MIXED), name
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, mixed(x, t).sample)
    assert loaded.gaq_config.layer_precision == MIXED and list(loaded.gaq_config.layer_precision) == list(MIXED)


def test_checkpoint_codes_use_the_stated_bits(mixed_folder):
    qcfg = json.loads((mixed_folder / CONFIG_NAME).read_text())
    assert list(qcfg["config"]["layer_precision"]) == list(MIXED)  # saved in order: first match wins
    layers = qcfg["layers"]
    total = 0
    with safe_open(str(mixed_folder / WEIGHTS_NAME), "pt") as f:
        blob = f.get_slice(CODES_KEY).get_shape()[0]
        for name, entry in layers.items():
            assert (entry["weight_bits"], entry["act_bits"]) == _bits(_expected(name, MIXED)), name
            if entry["weight_bits"] is None:  # FP weight, quantized input: the float weight is stored
                assert "codes_nbytes" not in entry and f"{name}.layer.weight" in f.keys()
                continue
            numel = math.prod(entry["weight_shape"])
            assert entry["codes_nbytes"] == math.ceil(numel * entry["weight_bits"] / 8), name
            assert f"{name}.layer.weight" not in f.keys()
            total += entry["codes_nbytes"]
        for name in qcfg["kept_fp"]:
            assert f"{name}.weight" in f.keys()
    assert total == blob
    assert layers["up_blocks.2.resnets.0.conv1"]["weight_bits"] == 3
    assert layers["time_embedding.linear_1"]["weight_bits"] is None and layers["time_embedding.linear_1"]["act_bits"] == 8


def _bits(tag: str) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of a tag, parsed here independently of the library."""
    w = a = None
    if tag.startswith("w"):
        w = int(tag[1:].split("a")[0])
    if "a" in tag:
        a = int(tag.split("a")[1])
    return w, a


def test_effective_bits_per_weight(mixed, mixed_folder, small_unet):
    fp = small_unet
    total_bits = total = 0
    for name in _layer_names(fp):
        numel = fp.get_submodule(name).weight.numel()
        w, _ = _bits(_expected(name, MIXED))
        total_bits += numel * (w or 32)
        total += numel
    from_model, from_checkpoint = model_weight_bits(mixed), checkpoint_weight_bits(mixed_folder)
    assert from_model == from_checkpoint
    assert from_model.bits_per_weight == pytest.approx(total_bits / total)
    assert from_model.quantized_weights + from_model.fp_weights == total
    qcfg = json.loads((mixed_folder / CONFIG_NAME).read_text())
    assert from_model.packed_bytes == sum(e.get("codes_nbytes", 0) for e in qcfg["layers"].values())


def test_model_card_and_info_show_the_precision_table(mixed, mixed_folder, capsys):
    text = build_model_card(mixed).text
    assert "| fp | FP | FP |" in text and "| w3a6 | 3-bit | 6-bit |" in text and "| a8 | FP | 8-bit |" in text
    assert "| w8 | 8-bit | FP (weight-only) |" in text
    assert "`conv_in`" in text and "Effective bits per weight: **" in text
    bpw = model_weight_bits(mixed).bits_per_weight
    assert f"**{bpw:.2f}**" in text
    assert "Layers by precision: " in text and "a8: time_embedding.linear_1, time_embedding.linear_2" in text
    assert (mixed_folder / "README.md").read_text().count("| w5a8 |") == 1

    assert cli_main(["info", str(mixed_folder)]) == 0
    out = capsys.readouterr().out
    assert "precision:" in out and f"bits/weight:  {bpw:.2f} effective" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "conv_in" in lines["fp"] and "time_embedding.linear_1" in lines["a8"] and "w3a6" in lines
    assert "W32A8" in out  # the a8 layers in the count line


# ---- CLI flags ----------------------------------------------------------------------------------
def test_cli_builds_layer_precision_in_order():
    from diffusers_gaq.cli import CLIError, build_config, build_parser

    args = build_parser().parse_args(["quantize", "reference", "--output", "x", "--layer-precision", "up_blocks.1.*=w8a8",
                                      "--layer-precision", "up_blocks.*=w8", "--first-last-precision", "same"])
    config = build_config(args)
    assert list(config.layer_precision.items()) == [("up_blocks.1.*", "w8a8"), ("up_blocks.*", "w8")]
    assert config.first_last_precision == "same"
    args = build_parser().parse_args(["quantize", "reference", "--output", "x", "--layer-precision", "up_blocks.*"])
    with pytest.raises(CLIError, match="PATTERN=TAG"):
        build_config(args)
    args = build_parser().parse_args(["quantize", "reference", "--output", "x", "--layer-precision", "conv_in=w12"])
    with pytest.raises(ValueError, match="conv_in"):
        build_config(args)


# ---- quanto export with per-module types -----------------------------------------------------------
EXPRESSIBLE = dict(act_bits=8, act_symmetric=True, split_shortcut=False, quantize_attention=False, weighting="uniform",
                   weight_symmetric=True)


def test_quanto_export_uses_per_module_types():
    # 8-bit convolutions only: they dequantize and run the same float op, so the export is exact.
    config = GradientAlignedQuantizer(**dict(TINY_BUDGET, **EXPRESSIBLE), layer_precision={
        "down_blocks.0.resnets.0.conv*": "w8a8", "up_blocks.1.*": "fp"})
    ours = quantize_pipeline(fp_pipeline(), config, progress=False).unet
    exported = export_to_quanto(ours)
    assert isinstance(exported.get_submodule("down_blocks.0.resnets.0.conv1"), QConv2d)
    assert exported.get_submodule("down_blocks.0.resnets.0.conv1").weight_qtype == qint8
    assert exported.get_submodule("down_blocks.1.resnets.0.conv1").weight_qtype == qint4
    lin = exported.get_submodule("time_embedding.linear_1")
    assert isinstance(lin, QLinear) and lin.weight_qtype == qint4 and lin.activation_qtype == qint8
    for name in ("conv_in", "conv_out", "up_blocks.1.resnets.0.conv1", "up_blocks.1.attentions.0.to_q"):
        assert type(exported.get_submodule(name)) in (nn.Conv2d, nn.Linear), name
    x, t = _inputs()
    with torch.no_grad():
        a, b = exported(x, t).sample, ours(x, t).sample
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_quanto_export_refuses_what_it_cannot_express_naming_the_layer(caplog):
    config = GradientAlignedQuantizer(**dict(TINY_BUDGET, **EXPRESSIBLE), method="minmax", layer_precision={
        "down_blocks.0.resnets.0.conv1": "a8", "down_blocks.0.resnets.0.conv2": "w4a6",
        "down_blocks.1.resnets.0.conv1": "w3a8"})
    ours = quantize_pipeline(fp_pipeline(), config, progress=False).unet
    with pytest.raises(ValueError) as e:
        export_to_quanto(ours)
    message = str(e.value)
    for line_start, name in (("  - full-precision weights with a quantized input", "down_blocks.0.resnets.0.conv1"),
                             ("  - activations other than 8-bit", "down_blocks.0.resnets.0.conv2"),
                             ("  - 3-bit weights", "down_blocks.1.resnets.0.conv1")):
        line = next(line for line in message.splitlines() if line.startswith(line_start))
        assert name in line, (name, line)
    # weights only: the a8 layer has nothing left to quantize and stays a plain layer (its input quantizer dropped)
    config2 = GradientAlignedQuantizer(**dict(TINY_BUDGET, **EXPRESSIBLE), method="minmax",
                                       layer_precision={"down_blocks.0.resnets.0.conv1": "a8"})
    ours = quantize_pipeline(fp_pipeline(), config2, progress=False).unet
    with caplog.at_level("WARNING"):
        exported = export_to_quanto(ours, activations=False)
    assert type(exported.get_submodule("down_blocks.0.resnets.0.conv1")) is nn.Conv2d
    assert "dropped" in caplog.text
