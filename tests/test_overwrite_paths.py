"""Overwrites that never delete what they should not, output paths checked before any work, and the
input checks of issue 14 point 8. docs/reliability.md, "Overwrites and output paths", lists them.

The command line runs in-process (cli.main); a small random-weight UNet (helpers.TINY_UNET_CONFIG) stands
for the model, so the whole file runs in well under a minute on one thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import reliability_config, snapshot, tiny_pipeline

from diffusers_gaq import GradientAlignedQuantizer, cli, quantize_pipeline
from diffusers_gaq.files import atomic_directory
from diffusers_gaq.hub import COMPARISON_PNG, card_for_pipeline_top
from diffusers_gaq.modeling import save_quantized_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qpipe(tiny_qpipe):
    """A quantized pipeline to save: conftest's tiny_qpipe."""
    return tiny_qpipe


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory) -> Path:
    """A full-precision pipeline folder, as a user's input model."""
    folder = tmp_path_factory.mktemp("fp") / "fp"
    tiny_pipeline().save_pretrained(folder)
    return folder


def _cli(args, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _refused(code: int, err: str, *expected: str) -> None:
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err


# ---- overwrites that only replace what the tool wrote ------------------------------------------
def test_overwrite_never_deletes_the_input_model(fp_folder, tmp_path, capsys, no_loading):
    """Issue 14: `quantize models/fp --output models --overwrite` deleted the input and notes.txt."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(fp_folder, models / "fp")
    (models / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = _cli(["quantize", models / "fp", "--output", models, "--overwrite", "--budget", "tiny"], capsys)
    _refused(code, err, "holds the input model", "Choose another --output")
    code, err = _cli(["quantize", models / "fp", "--output", models / "fp", "--overwrite", "--budget", "tiny"], capsys)
    _refused(code, err, "holds the input model")
    code, err = _cli(["quantize", models / "fp", "--output", models / "fp" / "q", "--budget", "tiny"], capsys)
    _refused(code, err, "inside the input model folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where, expected", [
    (lambda m: m, "is the input model folder"),
    (lambda m: m / "ckpt", "is inside the input model folder"),
    (lambda m: m.parent, "holds the input model folder"),
], ids=["the-model", "inside-the-model", "holding-the-model"])
def test_checkpoint_dir_never_shares_the_input_model(fp_folder, tmp_path, capsys, no_loading, where, expected):
    """`--checkpoint-dir` on the input model folder was accepted (and the docs say to delete the
    checkpoint folder after the save): refused before loading, nothing written."""
    import shutil

    model = shutil.copytree(fp_folder, tmp_path / "models" / "fp")
    before = snapshot(tmp_path)
    code, err = _cli(["quantize", model, "--output", tmp_path / "out", "--checkpoint-dir", where(model),
                      "--budget", "tiny"], capsys)
    _refused(code, err, "--checkpoint-dir", expected)
    assert snapshot(tmp_path) == before


def test_checkpoint_dir_never_holds_the_output(tmp_path, capsys, no_loading):
    code, err = _cli(["quantize", "reference", "--output", tmp_path / "ckpt" / "out", "--checkpoint-dir",
                      tmp_path / "ckpt", "--budget", "tiny"], capsys)
    _refused(code, err, "holds --output")
    assert not any(tmp_path.iterdir())


def test_overwrite_refuses_an_earlier_save_with_other_files(qpipe, fp_folder, tmp_path, capsys, no_loading):
    out = save_quantized_pipeline(qpipe, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "unet" / "my-plot.pdf").write_bytes(b"%PDF")
    before = snapshot(tmp_path)
    code, err = _cli(["quantize", fp_folder, "--output", out, "--overwrite", "--budget", "tiny"], capsys)
    _refused(code, err, "notes.txt", "unet/my-plot.pdf", "nothing was changed")
    with pytest.raises(FileExistsError, match=r"does not write: notes.txt, unet/my-plot.pdf"):
        save_quantized_pipeline(qpipe, out, overwrite=True)
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_folder_that_is_no_save_of_ours(qpipe, fp_folder, tmp_path):
    import shutil

    other = Path(shutil.copytree(fp_folder, tmp_path / "other-fp-model"))
    before = snapshot(other)
    with pytest.raises(FileExistsError, match="not an earlier quantized pipeline save"):
        save_quantized_pipeline(qpipe, other, overwrite=True)
    assert snapshot(other) == before


def test_overwrite_replaces_an_earlier_save_of_ours(qpipe, fp_folder, tmp_path, capsys):
    """The allowed case, end to end: an earlier CLI output, with its evaluation report, is replaced."""
    out = tmp_path / "out"
    assert _cli(["quantize", fp_folder, "--output", out, "--budget", "tiny", "--quiet"], capsys)[0] == 0
    (out / "evaluation").mkdir()
    (out / "evaluation" / "evaluation.json").write_text("{}")
    code, err = _cli(["quantize", fp_folder, "--output", out, "--overwrite", "--budget", "tiny", "--quiet"], capsys)
    assert code == 0, err
    assert (out / "unet" / "quantization_config.json").is_file() and not (out / "evaluation").exists()
    save_quantized_pipeline(qpipe, out, overwrite=True)  # the library's own rule: the same
    assert not list(tmp_path.glob(".out.*"))


def test_save_pretrained_never_replaces_user_files(qpipe, tmp_path):
    """Issue 14: save_pretrained(dir) replaced any folder holding a quantization_config.json."""
    folder = qpipe.unet.save_pretrained(tmp_path / "unet", model_card=False)
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="does not write: notes.txt"):
            qpipe.unet.save_pretrained(folder, overwrite=overwrite)
    assert snapshot(tmp_path) == before
    (folder / "notes.txt").unlink()
    qpipe.unet.save_pretrained(folder)  # an earlier save alone is replaced, as diffusers' save_pretrained does
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not an earlier quantized save"):
        qpipe.unet.save_pretrained(tmp_path / "plain", overwrite=True)


# ---- output paths checked before any work ------------------------------------------------------
def test_output_under_a_file_is_refused_before_loading(tmp_path, capsys, no_loading):
    (tmp_path / "afile").write_text("mine")
    code, err = _cli(["quantize", "reference", "--output", tmp_path / "afile" / "sub", "--budget", "tiny"], capsys)
    _refused(code, err, "afile is a file, not a folder")
    code, err = _cli(["sensitivity", "reference", "--output", tmp_path / "afile" / "sub"], capsys)
    _refused(code, err, "is a file, not a folder")


def test_checkpoint_dir_under_a_file_is_refused_up_front(tmp_path, capsys, no_loading, no_sampling):
    (tmp_path / "afile").write_text("mine")
    code, err = _cli(["quantize", "reference", "--output", tmp_path / "out", "--budget", "tiny",
                      "--checkpoint-dir", tmp_path / "afile" / "ckpt"], capsys)
    _refused(code, err, "checkpoint folder", "is a file, not a folder")
    with pytest.raises(NotADirectoryError, match="checkpoint folder .* is a file, not a folder"):
        quantize_pipeline(tiny_pipeline(), reliability_config(), progress=False,
                          checkpoint_dir=tmp_path / "afile" / "ckpt")
    assert (tmp_path / "afile").read_text() == "mine"


def test_output_that_is_a_file_is_refused_without_leftovers(qpipe, tmp_path, capsys, no_loading):
    """Issue 14: `--output afile --overwrite` wrote the result, then failed on `.afile.old`."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, err = _cli(["quantize", "reference", "--output", afile, "--overwrite", "--budget", "tiny"], capsys)
    _refused(code, err, "is a file, not a folder")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        save_quantized_pipeline(qpipe, afile, overwrite=True)
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        with atomic_directory(afile):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and afile.read_text() == "mine"


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    real_rename = Path.rename

    def failing(self, dest):
        if self.name.startswith(".out.tmp-"):
            raise OSError("disk gone")
        return real_rename(self, dest)

    with mock.patch.object(Path, "rename", failing), pytest.raises(OSError, match="disk gone"):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "old.txt").read_text() == "previous"


# ---- evaluate --update-card keeps its report ---------------------------------------------------
def test_evaluate_update_card_keeps_the_report(qpipe, fp_folder, tmp_path, capsys):
    """Issue 14: the card update saved the whole pipeline again and deleted DIR/evaluation."""
    directory = save_quantized_pipeline(qpipe, tmp_path / "q")
    (directory / "notes.txt").write_text("mine")
    code = cli.main(["evaluate", str(directory), "--baseline", str(fp_folder), "--num-images", "2",
                     "--num-inference-steps", "2", "--update-card"])
    out = capsys.readouterr().out
    assert code == 0 and f"report: {directory / 'evaluation'}" in out
    report = json.loads((directory / "evaluation" / "evaluation.json").read_text())
    assert (directory / "evaluation" / "comparison.png").is_file()
    card = (directory / "README.md").read_text()
    assert f"{report['models'][0]['psnr_db']:.2f}" in card
    assert card == card_for_pipeline_top((directory / "unet" / "README.md").read_text())
    # The card shows this evaluation's FP vs quantized samples, copied beside it.
    assert f"]({COMPARISON_PNG})" in card and "path/to/saved-pipeline" not in card
    for folder in (directory, directory / "unet"):
        assert (folder / COMPARISON_PNG).read_bytes() == (directory / "evaluation" / "comparison.png").read_bytes()
    assert (directory / "notes.txt").read_text() == "mine"


# ---- point 8: input checks ---------------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (b"[1, 2, 3]", "holds a JSON list, not an object"),
    (b'{"config": "w4a8"}', "unknown GradientAlignedQuantizer field"),
    ('{"seed": 1, "note": "caf\u00e9"}'.encode("latin-1"), "is not UTF-8"),
], ids=["list", "config-not-object", "latin-1"])
def test_a_bad_config_file_is_named(tmp_path, capsys, no_loading, content, expected):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as e:
        GradientAlignedQuantizer.from_json_file(path)
    assert str(path) in str(e.value)
    code, err = _cli(["quantize", "reference", "--config", path, "--output", tmp_path / "out"], capsys)
    _refused(code, err, str(path), expected)


def _args(*argv):
    return cli.build_parser().parse_args(["quantize", "reference", "--output", "unused", *argv])


def test_negative_act_bits_are_refused(tmp_path, capsys, no_loading):
    assert cli.build_config(_args("--act-bits", "0")).act_bits is None  # 0 alone means weight-only
    code, err = _cli(["quantize", "reference", "--act-bits", "-5", "--output", tmp_path / "out"], capsys)
    _refused(code, err, "--act-bits -5 is invalid", "0 for weight-only")
    code, err = _cli(["sensitivity", "reference", "--act-bits", "-5", "--output", tmp_path / "out"], capsys)
    _refused(code, err, "--act-bits -5 is invalid")


def test_budget_over_a_config_file_names_the_fields_it_replaces(tmp_path, caplog):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"recon_iters": 300, "meta_iters": 1, "weight_bits": 8}))
    with caplog.at_level("WARNING", logger="diffusers_gaq"):
        config = cli.build_config(_args("--config", str(path), "--budget", "tiny"))
    assert config.recon_iters == 5 and config.weight_bits == 8
    [message] = [r.getMessage() for r in caplog.records if "overrides" in r.getMessage()]
    assert "recon_iters (file 300, budget 5)" in message and str(path) in message
    assert "meta_iters" not in message  # the same value in both: nothing is replaced
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffusers_gaq"):
        assert cli.build_config(_args("--config", str(path))).recon_iters == 300
    assert not [r for r in caplog.records if "overrides" in r.getMessage()]


def test_a_model_path_that_is_a_file_is_refused(tmp_path, capsys, no_loading):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    code, err = _cli(["quantize", tmp_path / "model.safetensors", "--output", tmp_path / "out"], capsys)
    _refused(code, err, "is a file; pass the pipeline folder")


def test_nan_weights_are_blamed_on_the_model(no_sampling):
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter conv_in.weight holds NaN/Inf \(1 of 72 values\)"):
        quantize_pipeline(pipe, reliability_config(), progress=False)


def test_push_options_are_documented(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["push", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for described in ("--private create the repo as private", "--token TOKEN a Hub token",
                      "--revision REVISION branch to push to", "--create-pr open a pull request"):
        assert described in text, described
    assert "HF_TOKEN" in text and "huggingface-cli login" in text and "process list" in text
