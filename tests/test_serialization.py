"""Saving and loading quantized UNets and pipelines: bit-exact round trips, packed 4-bit storage,
and clear errors for folders that are not (or no longer) valid diffusers-gaq checkpoints.

Everything is real: diffusers models with random weights, quantize_pipeline on a tiny budget,
files on disk. Three models are built once for the module (about 20 s on one core; the W4A8 one is
conftest's small_w4a8, shared with test_quanto_export.py).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DiffusionPipeline
from helpers import SMALL_UNET_CONFIG, fp_pipeline
from safetensors import safe_open

from diffusers_gaq import quantize_pipeline
from diffusers_gaq.config import CONFIG_NAME
from diffusers_gaq.modeling import QuantizedUNet2DModel, load_quantized, load_quantized_pipeline
from diffusers_gaq.quant.layers import QuantLayer
from diffusers_gaq.reference.recipe import REFERENCE_UNET_CONFIG
from diffusers_gaq.runtime import is_integer_runtime
from diffusers_gaq.serialization import CODES_KEY, PACKED_SUFFIX, WEIGHTS_NAME, CheckpointError

torch.set_num_threads(1)
logger = logging.getLogger(__name__)

VARIANTS = {
    # name: (UNet config, quantizer settings), each calibrated on helpers.TINY_BUDGET
    "w4a8-gradient-aligned": (SMALL_UNET_CONFIG, dict(weight_bits=4, act_bits=8)),
    "w8a8-minmax": (SMALL_UNET_CONFIG, dict(weight_bits=8, act_bits=8, method="minmax", weighting="uniform")),
    "w4-weight-only": (REFERENCE_UNET_CONFIG, dict(weight_bits=4, act_bits=None, method="minmax", weighting="uniform")),
}


@pytest.fixture(scope="module")
def pipelines(small_w4a8, tiny_quantizer) -> dict[str, tuple[DDIMPipeline, DDIMPipeline]]:
    """name -> (FP pipeline, quantized pipeline)."""
    built = {}
    for name, (unet_config, bits) in VARIANTS.items():
        if name == "w4a8-gradient-aligned":  # exactly conftest's shared small_w4a8 run: reuse it
            built[name] = small_w4a8
            continue
        fp = fp_pipeline(unet_config)
        built[name] = (fp, quantize_pipeline(fp, tiny_quantizer(**bits), progress=False))
    return built


@pytest.fixture(scope="module")
def saved(pipelines, tmp_path_factory) -> dict[str, Path]:
    """Each quantized UNet saved once; the W4A8 one with its model card, the others without."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: q.unet.save_pretrained(root / name, model_card=name.startswith("w4a8"))
            for name, (_, q) in pipelines.items()}


def _fixed_input():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(3, 1, 32, 32, generator=gen), torch.tensor([1, 500, 999])


@torch.no_grad()
def _outputs(unet) -> torch.Tensor:
    x, t = _fixed_input()
    return unet(x, t).sample


def _bits_by_layer(model) -> dict[str, tuple]:
    def bits(quantizer):
        return quantizer.bits if quantizer is not None else None

    return {name: (bits(m.weight_quantizer), bits(m.act_quantizer))
            for name, m in model.named_modules() if isinstance(m, QuantLayer)}


# ---- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_is_bit_identical(name, pipelines, saved):
    model = pipelines[name][1].unet
    folder = saved[name]

    loaded = load_quantized(folder, runtime="simulated")

    assert type(loaded) is QuantizedUNet2DModel
    assert torch.equal(_outputs(loaded), _outputs(model)), f"{name}: reloaded model computes differently"
    assert loaded.gaq_config == model.gaq_config
    assert _bits_by_layer(loaded) == _bits_by_layer(model)
    assert [u.name for u in loaded.gaq_report.units] == [u.name for u in model.gaq_report.units]
    assert torch.equal(loaded.gaq_report.units[0].omega, model.gaq_report.units[0].omega)
    # The class method (what users call) gives the same model.
    assert torch.equal(_outputs(QuantizedUNet2DModel.from_pretrained(str(folder), runtime="simulated")), _outputs(model))


def test_checkpoint_files(saved):
    card_folder = {p.name for p in saved["w4a8-gradient-aligned"].iterdir()}
    assert {"config.json", CONFIG_NAME, WEIGHTS_NAME, "calibration_report.safetensors", "calibration_report.json",
            "README.md", "sample_weights.png"} <= card_folder
    assert "README.md" not in {p.name for p in saved["w8a8-minmax"].iterdir()}  # model_card=False
    assert not [p for p in saved["w8a8-minmax"].parent.rglob(".*")], "temporary files left behind"


def test_w4_weights_are_packed_two_per_byte(pipelines, saved, tmp_path):
    fp_unet = pipelines["w4-weight-only"][0].unet
    fp_unet.save_pretrained(tmp_path / "fp32")
    fp_bytes = (tmp_path / "fp32" / WEIGHTS_NAME).stat().st_size
    q_bytes = (saved["w4-weight-only"] / WEIGHTS_NAME).stat().st_size
    ratio = q_bytes / fp_bytes
    assert ratio <= 0.15, f"W4 checkpoint is {q_bytes} bytes, {ratio:.3f}x the fp32 one ({fp_bytes} bytes)"

    qcfg = json.loads((saved["w4-weight-only"] / CONFIG_NAME).read_text())
    with safe_open(str(saved["w4-weight-only"] / WEIGHTS_NAME), "pt") as f:
        blob = f.get_tensor(CODES_KEY)
        assert not any(k.endswith(".layer.weight") for k in f.keys()), "float weights of quantized layers were saved"
    weights = dict(fp_unet.named_parameters())
    expected = 0
    for name, entry in qcfg["layers"].items():
        numel = weights[name + ".weight"].numel()
        assert entry["codes_nbytes"] == (numel + 1) // 2, name  # two 4-bit codes per byte
        expected += entry["codes_nbytes"]
    assert blob.dtype == torch.uint8 and blob.numel() == expected
    logger.info("W4 weight-only checkpoint / fp32: %.3f (%d / %d bytes)", ratio, q_bytes, fp_bytes)


# ---- broken folders ---------------------------------------------------------------------------
def test_plain_diffusers_folder_is_not_a_checkpoint(pipelines, tmp_path):
    pipelines["w8a8-minmax"][0].unet.save_pretrained(tmp_path / "plain")  # an FP diffusers UNet
    with pytest.raises(CheckpointError, match=re.escape(CONFIG_NAME)):
        load_quantized(tmp_path / "plain")
    with pytest.raises(CheckpointError, match=re.escape(CONFIG_NAME)):
        QuantizedUNet2DModel.from_pretrained(str(tmp_path / "plain"))


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_edited_bit_widths_are_detected(saved, tmp_path):
    folder = _copy(saved["w4a8-gradient-aligned"], tmp_path)
    qcfg = json.loads((folder / CONFIG_NAME).read_text())
    layer = "down_blocks.0.resnets.0.conv1"  # conv_in stays FP by default (first_last_precision)
    assert qcfg["layers"][layer]["weight_bits"] == 4
    qcfg["layers"][layer]["weight_bits"] = 8
    (folder / CONFIG_NAME).write_text(json.dumps(qcfg))

    with pytest.raises(CheckpointError) as excinfo:
        load_quantized(folder)
    message = str(excinfo.value)
    assert f"{layer}{PACKED_SUFFIX}" in message and "8-bit" in message and "disagree" in message


@pytest.mark.parametrize("keep", [0.5, -1], ids=["half", "last-byte-missing"])
def test_truncated_weights_file_is_detected(saved, tmp_path, keep):
    folder = _copy(saved["w8a8-minmax"], tmp_path)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])

    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        load_quantized(folder)


# ---- whole pipelines --------------------------------------------------------------------------
def test_pipeline_save_and_reload(pipelines, tmp_path):
    qpipe = pipelines["w4a8-gradient-aligned"][1]
    qpipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers_gaq.modeling", "QuantizedUNet2DModel"]

    sample = dict(batch_size=1, num_inference_steps=2, output_type="np")
    expected = qpipe(generator=torch.Generator().manual_seed(0), **sample).images
    # Loaded for inference, the denoiser runs on the integer runtime: the same model as loading the
    # unet folder alone (runtime closeness to the simulation: test_runtime_model.py).
    runtime_unet = load_quantized(tmp_path / "pipe" / "unet")
    assert is_integer_runtime(runtime_unet)
    for load in (DiffusionPipeline.from_pretrained, load_quantized_pipeline):
        pipe = load(str(tmp_path / "pipe"))
        assert type(pipe) is DDIMPipeline and type(pipe.unet) is QuantizedUNet2DModel, load.__name__
        assert is_integer_runtime(pipe.unet), load.__name__
        assert torch.equal(_outputs(pipe.unet), _outputs(runtime_unet)), load.__name__
    # The simulated model, one argument away, is bit-identical to the saved one.
    pipe = load_quantized_pipeline(str(tmp_path / "pipe"), runtime="simulated")
    assert not is_integer_runtime(pipe.unet) and torch.equal(_outputs(pipe.unet), _outputs(qpipe.unet))
    assert (pipe(generator=torch.Generator().manual_seed(0), **sample).images == expected).all()

    # A pipeline saved before the restructuring names the class's old module; it still loads.
    index["unet"] = ["diffusers_gaq.models.quantized", "QuantizedUNet2DModel"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    old = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(old.unet) is QuantizedUNet2DModel and torch.equal(_outputs(old.unet), _outputs(runtime_unet))

    # The model card's pipeline snippet runs as written, on this folder.
    card = (tmp_path / "pipe" / "unet" / "README.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", card, flags=re.S)[1]
    assert "DiffusionPipeline.from_pretrained" in snippet
    namespace: dict = {}
    exec(compile(snippet.replace("path/to/saved-pipeline", str(tmp_path / "pipe")), "README.md", "exec"), namespace)
    assert torch.equal(_outputs(namespace["pipe"].unet), _outputs(runtime_unet))
