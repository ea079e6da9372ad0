"""Counts, report paths and input folders of the commands that produce numbers: each is refused before any
model is loaded or sampled, so that no command reports fidelity numbers of images that were never made
(a negative step count once gave PSNR 100 dB, written into the model card)."""

from __future__ import annotations

from unittest import mock

import pytest

from diffusers_gaq import cli
from diffusers_gaq import modeling
from diffusers_gaq.evaluation.sampling import SamplingPlan


@pytest.fixture
def nothing_loads():
    """Fails the test if any command loads a pipeline or a quantized pipeline."""
    boom = mock.Mock(side_effect=AssertionError("a model was loaded before the input was refused"))
    with mock.patch.object(cli.common, "load_pipeline", boom), mock.patch.object(modeling, "load_quantized_pipeline", boom):
        yield


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refuses with exit code 2
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--num-inference-steps", "-1"), ("--num-inference-steps", "0"),
                                        ("--num-images", "0"), ("--num-images", "two")])
@pytest.mark.parametrize("command", ["evaluate", "demo"])
def test_counts_below_one_are_refused_first(command, flag, value, tmp_path, capsys, nothing_loads):
    argv = [command, str(tmp_path)] if command == "evaluate" else [command, "--output", str(tmp_path / "demo")]
    code, err = _run(argv + [flag, value, "--quiet"], capsys)
    assert code == 2 and flag in err and ("at least 1" in err or "whole number" in err), err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flag", ["--num-images", "--steps", "--top"])
def test_sensitivity_counts_are_refused_first(flag, tmp_path, capsys, nothing_loads):
    code, err = _run(["sensitivity", "reference", "--output", str(tmp_path / "s"), flag, "0"], capsys)
    assert code == 2 and flag in err


def test_sampling_plan_refuses_counts_below_one():
    for field in ("num_images", "num_inference_steps", "batch_size"):
        with pytest.raises(ValueError, match=f"{field} must be a whole number >= 1"):
            SamplingPlan(**{field: 0})


def test_evaluate_refuses_a_folder_that_is_not_quantized(tmp_path, capsys, nothing_loads):
    fp = tmp_path / "fp"
    fp.mkdir()
    (fp / "model_index.json").write_text('{"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"]}')
    (fp / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # a weights file at the top misleads no one
    code, err = _run(["evaluate", str(fp)], capsys)
    assert code == 1 and "is not a quantized pipeline" in err and "diffusers-gaq quantize" in err
    code, err = _run(["evaluate", str(tmp_path / "missing")], capsys)
    assert code == 1 and "no folder" in err


def test_evaluate_refuses_a_report_path_that_is_a_file(tmp_path, capsys, nothing_loads):
    saved = tmp_path / "q"
    saved.mkdir()
    (saved / "model_index.json").write_text(
        '{"_class_name": "DDIMPipeline", "unet": ["diffusers_gaq.modeling", "QuantizedUNet2DModel"]}')
    report = tmp_path / "report.md"
    report.write_text("mine")
    code, err = _run(["evaluate", str(saved), "--report", str(report)], capsys)
    assert code == 1 and "is a file" in err and report.read_text() == "mine"


def test_quantize_refuses_a_quantized_pipeline(tmp_path, capsys, nothing_loads):
    saved = tmp_path / "q"
    saved.mkdir()
    (saved / "model_index.json").write_text(
        '{"_class_name": "DDIMPipeline", "unet": ["diffusers_gaq.modeling", "QuantizedUNet2DModel"]}')
    code, err = _run(["quantize", str(saved), "--output", str(tmp_path / "out"), "--budget", "tiny"], capsys)
    assert code == 1 and "quantized pipeline already" in err


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, capsys, nothing_loads, monkeypatch):
    (tmp_path / "out" / "w4a8").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, err = _run(["quantize", "out/w4a9", "--output", str(tmp_path / "o"), "--budget", "tiny"], capsys)
    assert code == 1 and "no folder out/w4a9" in err and "w4a8" in err


def test_verbose_and_version_anywhere(capsys):
    assert _run(["--version"], capsys)[0] == 0
    parsed = cli.build_parser().parse_args(["info", "x", "--verbose"])
    assert parsed.verbose is True
    assert cli.build_parser().parse_args(["--verbose", "info", "x"]).verbose is True
    assert cli.build_parser().parse_args(["info", "x"]).verbose is False


def test_settings_that_quantize_nothing_are_refused_before_sampling(tmp_path, capsys, no_sampling):
    code, err = _run(["quantize", "reference", "--output", str(tmp_path / "o"), "--budget", "tiny",
                      "--layer-precision", "*=fp"], capsys)
    assert code == 1 and "nothing would be quantized" in err


def test_push_timeout_beyond_a_day_is_refused(tmp_path, capsys):
    code, err = _run(["push", str(tmp_path), "me/x", "--timeout", "1e308"], capsys)
    assert code == 1 and "more than a day" in err


def test_errors_without_text_name_their_type(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["info", "x"])
    args.func = mock.Mock(side_effect=MemoryError())
    with mock.patch.object(cli, "build_parser") as build:
        build.return_value.parse_args.return_value = args
        assert cli.main(["info", "x"]) == 1
    assert capsys.readouterr().err.strip() == "error: MemoryError"


def test_a_fifo_in_place_of_a_json_file_is_refused_not_waited_on(tmp_path):
    import os

    from diffusers_gaq.serialization import CheckpointError, read_json

    fifo = tmp_path / "quantization_config.json"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_json(fifo)


def test_a_base_class_that_is_not_a_model_is_refused(tmp_path):
    from diffusers_gaq.serialization import CheckpointError, build_base_model

    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CheckpointError, match="'DiffusionPipeline' is not a diffusers model class"):
        build_base_model({"base_class": "DiffusionPipeline"}, tmp_path)


def test_calibration_data_larger_than_memory_is_refused_naming_the_field(tiny_pipe, no_sampling):
    from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline

    with pytest.raises(ValueError, match=r"samples_per_timestep=1000000000 .* more than this machine's"):
        quantize_pipeline(tiny_pipe, GradientAlignedQuantizer(samples_per_timestep=10**9), progress=False)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"seed": ' + "9" * 5000 + "}"],
                         ids=["deeply-nested", "5000-digit"])
def test_an_unreadable_config_names_its_file(text, tmp_path):
    from diffusers_gaq import GradientAlignedQuantizer

    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)):
        GradientAlignedQuantizer.from_json_file(path)
