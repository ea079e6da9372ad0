"""Verified loads (issue 14, item 1): a tampered or corrupt quantized checkpoint is refused with a
CheckpointError naming the file and the field, never loaded into a wrong model and never ended in
a raw KeyError / SafetensorError / JSONDecodeError; a damaged optional report costs only a warning.

One W4A8 UNet is quantized on a tiny budget and saved once for the module; every test edits a
copy of that folder. Edits of the tensors that must reach the value checks (NaN, negative scales,
a dropped tensor) rewrite the weights file and its digests together (weights_sha256 and the
files_sha256 that covers it), as a tool that knows the format would: the digests alone are tested
by the flipped byte and the consistent edits.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_gaq import quantize_pipeline
from diffusers_gaq.checkpoint_checks import DIGEST_FIELD, weights_digest
from diffusers_gaq.config import CONFIG_NAME
from diffusers_gaq.file_digests import FILES_DIGEST_FIELD, files_digests
from diffusers_gaq.modeling import QuantizedUNet2DModel, load_quantized
from diffusers_gaq.serialization import (
    ACT_SCALES_KEY,
    ACT_ZEROS_KEY,
    REPORT_JSON,
    REPORT_TENSORS,
    WEIGHT_SCALES_KEY,
    WEIGHT_ZEROS_KEY,
    WEIGHTS_NAME,
    CheckpointError,
)

torch.set_num_threads(1)

LAYER = "down_blocks.0.resnets.0.conv1"  # follows the global bits (conv_in / conv_out stay FP by default)


@pytest.fixture(scope="module")
def quantized(tiny_pipe, tiny_quantizer) -> QuantizedUNet2DModel:
    """conftest's tiny_pipe (helpers.TINY_UNET_CONFIG) quantized W4A8 on the tiny budget."""
    return quantize_pipeline(tiny_pipe, tiny_quantizer(weight_bits=4, act_bits=8), progress=False).unet


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory) -> Path:
    return quantized.save_pretrained(tmp_path_factory.mktemp("saved") / "w4a8", model_card=False)


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "w4a8"))


@torch.no_grad()
def _outputs(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return unet(torch.randn(2, 1, 16, 16, generator=gen), torch.tensor([10, 900])).sample


def _edit_json(path: Path, edit) -> None:
    """``edit`` changes the parsed file in place (what it returns is ignored)."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _rewrite_tensors(folder: Path, edit) -> None:
    """Edit the weights file's tensors and record their new digest, so only the value checks can object."""
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata=metadata)
    _edit_json(folder / CONFIG_NAME, lambda q: q.update({DIGEST_FIELD: weights_digest(state)}))
    _reseal(folder)


def _reseal(folder: Path) -> None:
    """Recompute files_sha256 from the files as they are: a deliberate edit that knows the format."""
    _edit_json(folder / CONFIG_NAME, lambda q: q.update(
        {FILES_DIGEST_FIELD: files_digests(json.loads((folder / "config.json").read_text()), q)}))


def _refused(folder: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as excinfo:
        load_quantized(folder)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_the_saved_checkpoint_loads_and_records_its_digest(quantized, folder):
    qcfg = json.loads((folder / CONFIG_NAME).read_text())
    assert qcfg["format_version"] == 3 and re.fullmatch(r"[0-9a-f]{64}", qcfg[DIGEST_FIELD])
    assert set(qcfg[FILES_DIGEST_FIELD]) == {"config.json", CONFIG_NAME}
    assert torch.equal(_outputs(load_quantized(folder, runtime="simulated")), _outputs(quantized))


# ---- bit widths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, layer_field", [
    ("act_bits", 4, "act_bits is 8"), ("act_bits", 16, "act_bits is 8"), ("weight_bits", 8, "weight_bits is 4")])
def test_edited_global_bit_widths_are_refused(folder, field, value, layer_field):
    _edit_json(folder / CONFIG_NAME, lambda q: q["config"].update({field: value}))
    _refused(folder, str(folder / CONFIG_NAME), layer_field, f"give this layer {value}", "restore")


def test_edited_layer_act_bits_is_refused(folder):
    _edit_json(folder / CONFIG_NAME, lambda q: q["layers"][LAYER].update(act_bits=4))
    _refused(folder, str(folder / CONFIG_NAME), f"layers.{LAYER}.act_bits is 4", "give this layer 8")


def test_edited_layer_act_bits_is_refused_by_from_pretrained(folder):
    _edit_json(folder / CONFIG_NAME, lambda q: q["layers"][LAYER].update(act_bits=16))
    with pytest.raises(CheckpointError, match=re.escape(f"layers.{LAYER}.act_bits is 16")):
        QuantizedUNet2DModel.from_pretrained(str(folder))


# ---- scales and zero points ----------------------------------------------------------------------
@pytest.mark.parametrize("key", [WEIGHT_SCALES_KEY, ACT_SCALES_KEY])
@pytest.mark.parametrize("kind", ["nan", "inf", "negative", "zero"])
def test_bad_scales_are_refused(folder, key, kind):
    def set_one(state):
        current = float(state[key][3])
        state[key][3] = {"nan": float("nan"), "inf": float("inf"), "negative": -abs(current), "zero": 0.0}[kind]

    _rewrite_tensors(folder, set_one)
    _refused(folder, str(folder / WEIGHTS_NAME), key, "must be finite and > 0")


@pytest.mark.parametrize("key, value, bits", [(WEIGHT_ZEROS_KEY, 200, 4), (ACT_ZEROS_KEY, 3.5, 8),
                                              (ACT_ZEROS_KEY, 256.0, 8), (ACT_ZEROS_KEY, float("nan"), 8)])
def test_bad_zero_points_are_refused(folder, key, value, bits):
    _rewrite_tensors(folder, lambda state: state[key].__setitem__(0, value))
    _refused(folder, key, f"a {bits}-bit zero point must be an integer in [0, {2**bits - 1}]")


# ---- the digest ----------------------------------------------------------------------------------
def test_a_flipped_byte_in_the_tensor_data_is_refused(folder):
    path = folder / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 + header_len + (len(data) - 8 - header_len) // 2] ^= 0x01  # one bit, in the middle of the tensors
    path.write_bytes(bytes(data))
    _refused(folder, str(path), f"do not match {DIGEST_FIELD}", "corrupt or was edited")


def test_a_version_1_checkpoint_without_digest_still_loads(quantized, folder, caplog):
    # A version 1 file records neither digest (a files_sha256 left in place would catch the edit).
    _edit_json(folder / CONFIG_NAME, lambda q: (q.pop(DIGEST_FIELD), q.pop(FILES_DIGEST_FIELD),
                                                q.update(format_version=1)))
    with caplog.at_level(logging.WARNING):
        loaded = load_quantized(folder, runtime="simulated")
    assert torch.equal(_outputs(loaded), _outputs(quantized))
    assert not caplog.records, "an old checkpoint must load without warnings"


def test_a_version_2_checkpoint_without_its_digest_is_refused(folder):
    _edit_json(folder / CONFIG_NAME, lambda q: (q.pop(FILES_DIGEST_FIELD), q.update(format_version=2),
                                                q.pop(DIGEST_FIELD)))
    _refused(folder, str(folder / CONFIG_NAME), f"field {DIGEST_FIELD} is missing")


def test_a_version_3_checkpoint_without_its_files_digest_is_refused(folder):
    _edit_json(folder / CONFIG_NAME, lambda q: q.pop(FILES_DIGEST_FIELD))
    _refused(folder, str(folder / CONFIG_NAME), f"field {FILES_DIGEST_FIELD} is missing")


def test_a_version_2_checkpoint_loads_with_a_note_that_only_tensors_were_verified(quantized, folder, caplog):
    _edit_json(folder / CONFIG_NAME, lambda q: (q.pop(FILES_DIGEST_FIELD), q.update(format_version=2)))
    with caplog.at_level(logging.INFO, logger="diffusers_gaq"):
        loaded = load_quantized(folder, runtime="simulated")
    assert torch.equal(_outputs(loaded), _outputs(quantized))
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("only the tensors are verified" in n for n in notes), notes
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- consistent edits: every file that decides the computation is covered ------------------------
def test_act_bits_edited_consistently_everywhere_is_refused(folder):
    def to_16(q):
        q["config"]["act_bits"] = 16
        for entry in q["layers"].values():
            if entry["act_bits"] == 8:
                entry["act_bits"] = 16

    _edit_json(folder / CONFIG_NAME, to_16)
    _refused(folder, str(folder / CONFIG_NAME), f"does not match {FILES_DIGEST_FIELD}", "restore the folder")


def test_an_edited_model_config_is_refused(folder):
    _edit_json(folder / "config.json", lambda c: c.update(norm_eps=10.0))
    message = _refused(folder, str(folder / "config.json"), f"does not match {FILES_DIGEST_FIELD}",
                       "restore the folder from the original save")
    assert str(folder / CONFIG_NAME) + ":" not in message  # names the file that changed


def test_a_lowered_format_version_does_not_skip_the_check(folder):
    _edit_json(folder / CONFIG_NAME, lambda q: (q.update(format_version=2), q["config"].update(act_bits=16)))
    _edit_json(folder / CONFIG_NAME, lambda q: [e.update(act_bits=16) for e in q["layers"].values()
                                                if e["act_bits"] == 8])
    _refused(folder, str(folder / CONFIG_NAME), f"does not match {FILES_DIGEST_FIELD}")


def test_rewrites_a_push_makes_keep_the_digests_valid(quantized, folder):
    # A push makes _name_or_path / base_model public and re-indents the JSON: not content.
    _edit_json(folder / "config.json", lambda c: c.update(_name_or_path="unet", _diffusers_version="0.0.1"))
    _edit_json(folder / CONFIG_NAME, lambda q: q.update(base_model="my-fp-model"))
    assert torch.equal(_outputs(load_quantized(folder, runtime="simulated")), _outputs(quantized))


def test_nan_in_a_float_tensor_is_refused_even_with_its_digests_recomputed(folder):
    state = load_file(str(folder / WEIGHTS_NAME))
    key = next(k for k, t in state.items() if t.is_floating_point() and not k.startswith("gaq.") and t.numel() > 1)
    _rewrite_tensors(folder, lambda s: s[key].view(-1).__setitem__(0, float("nan")))
    _refused(folder, str(folder / WEIGHTS_NAME), f"tensor {key} holds NaN/Inf", "restore")


# ---- shapes, counts and structure: CheckpointError, no raw exception ------------------------------
def test_a_dropped_act_zero_points_is_refused(folder):
    _rewrite_tensors(folder, lambda state: state.pop(ACT_ZEROS_KEY))
    _refused(folder, str(folder / WEIGHTS_NAME), f"tensor {ACT_ZEROS_KEY} is missing")


@pytest.mark.parametrize("key", [WEIGHT_SCALES_KEY, WEIGHT_ZEROS_KEY, ACT_SCALES_KEY, ACT_ZEROS_KEY])
def test_a_tensor_of_the_wrong_length_is_refused(folder, key):
    _rewrite_tensors(folder, lambda state: state.update({key: state[key][:-1].clone()}))
    _refused(folder, str(folder / WEIGHTS_NAME), key)


@pytest.mark.parametrize("name", [CONFIG_NAME, "config.json"])
def test_a_json_list_instead_of_an_object_is_refused(folder, name):
    (folder / name).write_text("[1, 2, 3]\n")
    _refused(folder, str(folder / name), "not an object")


@pytest.mark.parametrize("edit, field", [
    (lambda q: q.pop("config"), "field config"),
    (lambda q: q.update(config=[1]), "field config"),
    (lambda q: q["layers"][LAYER].pop("weight_bits"), f"layers.{LAYER}.weight_bits is missing"),
    (lambda q: q["layers"][LAYER].update(act_bits="8"), f"layers.{LAYER}.act_bits is '8'"),
    (lambda q: q.update(layers=[]), "field layers"),
    (lambda q: q["layers"].pop(LAYER), f"no entry for quantized layer {LAYER}"),
    (lambda q: q["config"].update(weight_bits=99), "field config"),
    (lambda q: q.update(kept_fp="conv_in"), "field kept_fp"),
], ids=["no-config", "config-list", "no-weight-bits", "act-bits-string", "layers-list", "layer-dropped",
        "invalid-bits", "kept-fp-string"])
def test_damaged_fields_are_refused_with_a_checkpoint_error(folder, edit, field):
    _edit_json(folder / CONFIG_NAME, edit)
    _refused(folder, str(folder / CONFIG_NAME), field)


def test_a_truncated_json_is_refused(folder):
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text[: len(text) // 2])
    _refused(folder, str(folder / CONFIG_NAME), "not valid JSON")


# ---- optional parts --------------------------------------------------------------------------------
def _garbage_json(folder):
    (folder / REPORT_JSON).write_text("{not json")


def _list_json(folder):
    (folder / REPORT_JSON).write_text("[1, 2]")


def _wrong_units(folder):
    _edit_json(folder / REPORT_JSON, lambda r: r.update(units=[1, 2]))


def _truncated_tensors(folder):
    data = (folder / REPORT_TENSORS).read_bytes()
    (folder / REPORT_TENSORS).write_bytes(data[: len(data) // 2])


def _garbage_tensors(folder):
    (folder / REPORT_TENSORS).write_bytes(b"\xff" * 64)


@pytest.mark.parametrize("damage", [_garbage_json, _list_json, _wrong_units, _truncated_tensors, _garbage_tensors],
                         ids=["json-garbage", "json-list", "json-wrong-units", "tensors-truncated", "tensors-garbage"])
def test_a_damaged_report_is_skipped_with_a_warning(quantized, folder, caplog, damage):
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="diffusers_gaq.serialization"):
        loaded = load_quantized(folder, runtime="simulated")
    assert loaded.gaq_report is None
    assert torch.equal(_outputs(loaded), _outputs(quantized))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(REPORT_TENSORS in w and "skipped" in w for w in warnings), warnings
