"""Pushing quantized models to a Hub and pulling them back; the model card and its plots.

What is real here: the unmodified ``huggingface_hub`` client (HfApi.create_repo, upload_folder,
snapshot_download, hf_hub_download), HTTP over the loopback interface, and our own save / load
(packed integer checkpoints) and card rendering. What is a stand-in: ``tests/fake_hub/server.LocalHub``
plays huggingface.co's HTTP API (repos, LFS uploads, commits, downloads) in memory.

One tiny W4A8 model (reference architecture, random weights, a few calibration iterations with
gradient-aligned weights and recorded conflict matrices) is built once for the module.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx2
import pytest
import torch
from diffusers import DDIMScheduler
from fake_hub.server import LocalHub, refused_endpoint
from helpers import digests, fp_pipeline
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from diffusers_gaq import quantize_pipeline
from diffusers_gaq.calibration.calibrate import CalibrationReport, UnitReport
from diffusers_gaq.hub import (
    REPO_ID_PLACEHOLDER,
    HubPushError,
    build_model_card,
    check_repo_id,
    push_folder,
    write_model_card,
)
from diffusers_gaq.modeling import QuantizedUNet2DModel, load_quantized
from diffusers_gaq.plots import plot_conflict, plot_fidelity_bars, plot_sample_weights
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG
from diffusers_gaq.serialization import CheckpointError
from diffusers_gaq.runtime import is_integer_runtime

torch.set_num_threads(1)

REPO_ID = "test-user/tiny-w4a8"
BASE_MODEL = "google/ddpm-cifar10-32"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qpipe(tiny_quantizer):
    pipe = fp_pipeline(REFERENCE_UNET_CONFIG)
    # The smallest budget that still runs every stage: meta-learned weights, reconstruction, conflict.
    config = tiny_quantizer(weight_bits=4, act_bits=8)
    qpipe = quantize_pipeline(pipe, config, progress=False, record_conflict=True)
    qpipe.unet.gaq_base_model = BASE_MODEL
    return qpipe


@pytest.fixture(scope="module")
def model(qpipe):
    return qpipe.unet


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    """The model saved once (with card and plots); tests that modify it work on a copy."""
    return model.save_pretrained(tmp_path_factory.mktemp("saved") / "tiny-w4a8")


@pytest.fixture
def checkpoint_copy(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "tiny-w4a8"))


def _fixed_input():
    gen = torch.Generator().manual_seed(123)
    return torch.randn(2, 1, 32, 32, generator=gen), torch.tensor([5, 870])


@torch.no_grad()
def _outputs(unet) -> torch.Tensor:
    x, t = _fixed_input()
    return unet(x, t).sample


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


# ---- (a) push, then load from the Hub ---------------------------------------------------------
def test_push_to_hub_then_from_pretrained_is_bit_identical(model, local_hub: LocalHub, hub_env: str, tmp_path):
    info = model.push_to_hub(REPO_ID, endpoint=local_hub.endpoint, commit_message="tiny model")

    repo = local_hub.repo(REPO_ID)
    assert repo.head().title == "tiny model" and info.oid == repo.head().oid
    files = repo.files()
    for name in ("README.md", "config.json", "quantization_config.json", "diffusion_pytorch_model.safetensors",
                 "calibration_report.safetensors", "calibration_report.json",
                 "sample_weights.png", "gradient_conflict.png"):
        assert name in files, f"{name} missing from the pushed repo: {sorted(files)}"
    assert files["sample_weights.png"].startswith(PNG_MAGIC) and files["gradient_conflict.png"].startswith(PNG_MAGIC)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == BASE_MODEL and card.data.library_name == "diffusers"
    assert {"quantization", "diffusers-gaq", "w4a8", "diffusers", "gradient-aligned-calibration"} <= set(card.data.tags)
    assert f'from_pretrained("{REPO_ID}")' in card.text and REPO_ID_PLACEHOLDER not in card.text
    assert "](sample_weights.png)" in card.text and "](gradient_conflict.png)" in card.text

    loaded = QuantizedUNet2DModel.from_pretrained(REPO_ID, endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache",
                                                   runtime="simulated")
    assert type(loaded) is QuantizedUNet2DModel
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert loaded.gaq_config == model.gaq_config
    assert torch.equal(loaded.gaq_report.units[3].omega, model.gaq_report.units[3].omega)


def test_push_folder_fills_repo_id_and_keeps_other_files(checkpoint_copy, local_hub: LocalHub, hub_env: str):
    before = digests(checkpoint_copy)
    assert REPO_ID_PLACEHOLDER in (checkpoint_copy / "README.md").read_text()

    info = push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint, create_pr=True)

    assert info.pr_url is not None  # create_pr went through: main still holds only .gitattributes
    assert set(local_hub.repo(REPO_ID).files()) == {".gitattributes"}
    after = digests(checkpoint_copy)
    assert set(after) == set(before)
    assert {k for k in before if before[k] != after[k]} == {"README.md"}  # only the repo id was filled in
    assert f'from_pretrained("{REPO_ID}")' in (checkpoint_copy / "README.md").read_text()


# ---- (b), (c) failures leave the local folder intact ------------------------------------------
def test_server_error_raises_hub_push_error(model, local_hub: LocalHub, hub_env: str, no_retry_sleep, tmp_path):
    local_hub.fail_all = True
    folder = tmp_path / "kept"

    with pytest.raises(HubPushError) as excinfo:
        model.push_to_hub(REPO_ID, endpoint=local_hub.endpoint, save_directory=folder)

    err = excinfo.value
    assert err.status_code == 500 and "HTTP 500" in str(err)
    assert "intact" in str(err) and f"diffusers-gaq push {folder} {REPO_ID}" in str(err)
    assert isinstance(err, RuntimeError) and err.__cause__ is not None
    # The folder given is kept, complete, and loads to the same model.
    assert {"README.md", "config.json", "quantization_config.json", "diffusion_pytorch_model.safetensors",
            "sample_weights.png"} <= {p.name for p in folder.iterdir()}
    assert torch.equal(_outputs(load_quantized(folder, runtime="simulated")), _outputs(model))


def test_failure_during_upload_names_the_stage(checkpoint_copy, local_hub: LocalHub, hub_env: str, no_retry_sleep,
                                             monkeypatch):
    # The repo is created, then the server starts failing: the error comes from the upload itself.
    create_repo = HfApi.create_repo

    def create_then_fail(self, *args, **kwargs):
        url = create_repo(self, *args, **kwargs)
        local_hub.fail_all = True
        return url

    monkeypatch.setattr(HfApi, "create_repo", create_then_fail)
    with pytest.raises(HubPushError, match="during upload_folder: HTTP 500") as excinfo:
        push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint)
    assert excinfo.value.status_code == 500
    assert set(local_hub.repo(REPO_ID).files()) == {".gitattributes"}  # nothing half-committed


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_say_how_to_fix_the_token(checkpoint_copy, monkeypatch, status):
    # LocalHub accepts any token, so the client call itself answers as the Hub would.
    def refuse(self, repo_id, **kwargs):
        url = f"{self.endpoint}/api/repos/create"
        response = httpx2.Response(status, request=httpx2.Request("POST", url))
        raise HfHubHTTPError(f"{status} Client Error for url {url}", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubPushError, match=f"HTTP {status}") as excinfo:
        push_folder(checkpoint_copy, REPO_ID, endpoint="http://127.0.0.1:9")
    assert excinfo.value.status_code == status and "HF_TOKEN" in str(excinfo.value)


def test_refused_connection_raises_hub_push_error(checkpoint_copy, no_retry_sleep):
    before = digests(checkpoint_copy)
    endpoint = refused_endpoint()

    with pytest.raises(HubPushError) as excinfo:
        push_folder(checkpoint_copy, REPO_ID, endpoint=endpoint)

    assert excinfo.value.status_code is None
    assert "connection failed" in str(excinfo.value) and endpoint in str(excinfo.value)
    assert "intact" in str(excinfo.value)
    assert set(digests(checkpoint_copy)) == set(before)


# ---- (d) invalid input fails before any request -----------------------------------------------
@pytest.mark.parametrize("bad", ["a/b/c", "user//model", "-model", "model.git", "my model", "a--b", ""])
def test_invalid_repo_id_is_refused_before_any_request(model, bad, local_hub: LocalHub):
    with pytest.raises(ValueError, match="invalid Hub repo id") as excinfo:
        model.push_to_hub(bad, endpoint=local_hub.endpoint)
    assert "my-username/ddpm-cifar10-w4a8" in str(excinfo.value)  # shows a valid example
    assert list(local_hub.requests) == []


def test_check_repo_id_accepts_valid_ids():
    assert check_repo_id("me/ddpm-cifar10-w4a8") == "me/ddpm-cifar10-w4a8"
    assert check_repo_id("model_1.0") == "model_1.0"


def test_push_folder_refuses_a_folder_that_is_not_a_checkpoint(local_hub: LocalHub, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="quantization_config.json"):
        push_folder(tmp_path, REPO_ID, endpoint=local_hub.endpoint)
    assert list(local_hub.requests) == []


# ---- (e) the model card -----------------------------------------------------------------------
def test_card_names_base_model_bits_settings_and_usage(model):
    card = build_model_card(model, license="apache-2.0", repo_id="me/tiny")
    data, text = card.data, card.text
    assert data.base_model == BASE_MODEL and data.license == "apache-2.0"
    assert "w4a8" in data.tags and "gradient-aligned-calibration" in data.tags
    assert "4-bit weights and 8-bit activations" in text
    assert "| 4-bit | 8-bit |" in text  # the per-layer bit-width table
    assert "arXiv:2602.01289" in text and "AdaRound" in text
    for setting in ("calibration timesteps | 2 of 4 DDIM steps", "samples per timestep | 4",
                    "timestep groups T | 2", "softmax temperature tau | 1",
                    "validation fraction | 0.25 per timestep"):
        assert setting in text
    assert "No fidelity evaluation was run" in text and "diffusers-gaq evaluate DIR --baseline MODEL" in text
    usage = _python_blocks(text)[0]
    assert 'QuantizedUNet2DModel.from_pretrained("me/tiny")' in usage and "DDIMPipeline(unet=unet" in usage


def test_card_reports_measured_fidelity(model, monkeypatch):
    monkeypatch.setattr(model, "gaq_evaluation", {"fid_ref_fp": 10.25, "fid_ref_quantized": 11.5, "psnr_db": 27.125,
                                                  "num_images": 64, "how": "DDIM, eta=0, seeds 0-63"}, raising=False)
    text = build_model_card(model).text
    assert "No fidelity evaluation" not in text
    assert "| FID-ref, quantized model | 11.5 |" in text and "| PSNR vs full-precision samples (dB) | 27.12 |" in text
    assert "DDIM, eta=0, seeds 0-63" in text


def test_card_without_report_or_base_model(model, monkeypatch, tmp_path):
    monkeypatch.setattr(model, "gaq_report", None)
    monkeypatch.setattr(model, "gaq_base_model", None)
    readme = write_model_card(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no plots without a report
    card = ModelCard.load(readme)
    assert card.data.base_model is None and ".png)" not in card.text
    assert "scheduler = DDIMScheduler()" in card.text


def test_card_survives_failing_plots(model, monkeypatch, tmp_path):
    from diffusers_gaq import plots

    def broken(report, path, units=None):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "plot_sample_weights", broken)
    monkeypatch.setattr(plots, "plot_conflict", broken)
    text = write_model_card(model, tmp_path).read_text()
    assert ".png)" not in text and "## Usage" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_card_keeps_local_base_model_out_of_metadata(model, tmp_path):
    # The Hub rejects a path as base_model metadata; the prose names only the folder (issue 14: no
    # local absolute path in what is uploaded, see test_push_reliability.py).
    card = build_model_card(model, base_model=str(tmp_path))
    assert card.data.base_model is None and str(tmp_path) not in card.text and f"`{tmp_path.name}`" in card.text


# diffusers' scheduler loader passes an argument huggingface_hub deprecated; not ours to fix.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning")
def test_usage_snippet_runs(qpipe, model, checkpoint_copy, local_hub: LocalHub, hub_env: str):
    """Execute the card's usage code against the local Hub, as written: its repo id and the base
    model's scheduler are served by LocalHub. (The pipeline snippet runs in test_serialization.py,
    on a saved pipeline.)"""
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo(BASE_MODEL)
    api.upload_file(path_or_fileobj=json.dumps(dict(REFERENCE_SCHEDULER_CONFIG, _class_name="DDPMScheduler")).encode(),
                    path_in_repo="scheduler/scheduler_config.json", repo_id=BASE_MODEL)
    push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint)  # also fills REPO_ID into the card there
    unet_snippet = _python_blocks(ModelCard.load(checkpoint_copy / "README.md").text)[0]

    # Sampling 50 steps is the user's part; the loading part runs verbatim, then a short sample.
    loading = "\n".join(line for line in unet_snippet.splitlines() if not line.startswith("images = "))
    assert loading != unet_snippet
    namespace: dict = {}
    exec(compile(loading, "README.md:usage", "exec"), namespace)  # noqa: S102 - our own card's code
    pipe = namespace["pipe"]
    assert type(pipe.unet) is QuantizedUNet2DModel and isinstance(pipe.scheduler, DDIMScheduler)
    # The snippet loads for inference: the integer runtime of the pushed checkpoint.
    runtime_unet = load_quantized(checkpoint_copy)
    assert is_integer_runtime(pipe.unet) and torch.equal(_outputs(pipe.unet), _outputs(runtime_unet))
    sample = dict(batch_size=1, num_inference_steps=2, output_type="np")
    ours = pipe(generator=torch.Generator().manual_seed(0), **sample).images
    reference = type(pipe)(unet=runtime_unet, scheduler=pipe.scheduler)(generator=torch.Generator().manual_seed(0),
                                                                         **sample).images
    assert (ours == reference).all()


# ---- plots ------------------------------------------------------------------------------------
def _synthetic_report(conflict: bool) -> CalibrationReport:
    steps, per_step, groups = 4, 3, 2
    report = CalibrationReport(train_timesteps=torch.arange(steps).flip(0).repeat_interleave(per_step) * 250,
                               train_step_index=torch.arange(steps).repeat_interleave(per_step))
    for i in range(3):
        omega = torch.linspace(0.5, 1.5, steps * per_step)
        matrix = torch.eye(groups) if conflict else None
        report.units.append(UnitReport(f"block{i}", omega=omega, conflict_before=matrix, conflict_after=matrix))
    return report


def test_plots_write_pngs_and_explain_missing_data(tmp_path):
    report = _synthetic_report(conflict=False)
    assert plot_sample_weights(report, tmp_path / "w.png", units=["block0", 2]).read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="no calibration unit named 'nope'"):
        plot_sample_weights(report, tmp_path / "x.png", units=["nope"])
    with pytest.raises(ValueError, match="record_conflict=True"):
        plot_conflict(report, tmp_path / "c.png")
    assert plot_conflict(_synthetic_report(conflict=True), tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    rows = [{"method": "uniform", "bits": "W4A8", "value": 5.1, "err": 0.2},
            {"method": "gradient-aligned", "bits": "W4A8", "value": 4.3},
            {"method": "uniform", "bits": 8, "value": 4.0}]
    assert plot_fidelity_bars(rows, tmp_path / "b.png", "FID-ref").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="lacks"):
        plot_fidelity_bars([{"method": "x"}], tmp_path / "b.png", "FID-ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "c.png", "w.png"]  # no temp files left
