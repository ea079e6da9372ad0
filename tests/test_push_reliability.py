"""Issue 14, items 6 and 7: pushes that end, pushes that leave the folder alone, cards that name
the repo they went to, and no local absolute path in anything a push uploads.

The client is the unmodified huggingface_hub; servers are on the loopback interface only:
``tests/fake_hub/server.LocalHub`` (an in-memory Hub), a socket that accepts and never answers, and
``refused_endpoint()`` where nothing listens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub.utils._http as hf_http
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from fake_hub.server import LocalHub, refused_endpoint
from helpers import digests
from huggingface_hub import ModelCard

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.hub import (
    DEFAULT_PUSH_TIMEOUT,
    PUSH_TIMEOUT_ENV,
    REPO_ID_PLACEHOLDER,
    HubPushError,
    build_model_card,
    public_base_model,
    push_folder,
    push_timeout,
)
from diffusers_gaq.modeling import save_quantized_pipeline
from diffusers_gaq.reference import PIPELINE_DIR
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "test-user/tiny-w8"
HUB_BASE = "google/ddpm-cifar10-32"


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A full-precision pipeline saved in a local folder, as a user's own model would be."""
    torch.manual_seed(0)
    pipe = DDIMPipeline(unet=UNet2DModel(**REFERENCE_UNET_CONFIG).eval(),
                        scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))
    folder = tmp_path_factory.mktemp("users-projects") / "my-fp-model"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qpipe(base_folder):
    """Quantized from the local folder, given by its absolute path (round-to-nearest: fast)."""
    pipe = DDIMPipeline.from_pretrained(str(base_folder.resolve()))
    config = GradientAlignedQuantizer(weight_bits=8, act_bits=8, method="minmax", num_inference_steps=4,
                                      num_calibration_timesteps=2, num_groups=2, samples_per_timestep=2,
                                      calibration_batch_size=4)
    return quantize_pipeline(pipe, config, progress=False)


@pytest.fixture(scope="module")
def checkpoint(qpipe, tmp_path_factory) -> Path:
    """The quantized UNet saved once with its card (placeholder repo id); tests work on copies."""
    return qpipe.unet.save_pretrained(tmp_path_factory.mktemp("saved") / "tiny-w8")


@pytest.fixture
def checkpoint_copy(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "tiny-w8"))


@pytest.fixture
def silent_server():
    """``http://127.0.0.1:PORT`` of a server that accepts connections and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept_and_hold():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # timeout (check stop) or closed
                continue
            held.append(conn)  # keep it open, read nothing, answer nothing

    thread = threading.Thread(target=accept_and_hold, name="silent-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()
        hf_http.close_session()  # drop pooled connections to it


def _text_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".json", ".md")}


def _make_old_checkpoint(folder: Path, base: Path) -> None:
    """Turn a checkpoint into what earlier versions saved: the base model's absolute path in
    quantization_config.json, config.json and the card's prose."""
    qcfg_path = folder / "quantization_config.json"
    qcfg = json.loads(qcfg_path.read_text())
    qcfg["base_model"] = str(base)
    qcfg_path.write_text(json.dumps(qcfg, indent=2) + "\n")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_name_or_path"] = str(base / "unet")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card = folder / "README.md"
    card.write_text(card.read_text().replace("of `my-fp-model`", f"of `{base}`"))
    assert str(base) in card.read_text()


# ---- pushes that end --------------------------------------------------------------------------
def test_silent_server_fails_the_push_within_its_timeout(checkpoint_copy, silent_server):
    factory_before = hf_http._GLOBAL_CLIENT_FACTORY
    start = time.monotonic()
    with pytest.raises(HubPushError) as excinfo:
        push_folder(checkpoint_copy, REPO_ID, endpoint=silent_server, timeout=2)
    elapsed = time.monotonic() - start

    assert elapsed < 15, f"the push took {elapsed:.1f} s with a 2 s timeout"
    message = str(excinfo.value)
    assert "did not answer within 2 s" in message and "ReadTimeout" in message
    assert silent_server in message and "create_repo" in message and "/api/repos/create" in message
    assert "--timeout" in message and PUSH_TIMEOUT_ENV in message  # what to do
    assert excinfo.value.status_code is None
    assert hf_http._GLOBAL_CLIENT_FACTORY is factory_before  # the user's client configuration is back


def test_retried_requests_end_too(checkpoint_copy, silent_server, monkeypatch, no_retry_sleep):
    # Past create_repo (not retried), huggingface_hub retries a timed-out request itself, at most 5
    # times: the push still ends, after 6 timeouts plus the backoff waits (instant here).
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *args, **kwargs: None)
    (checkpoint_copy / "README.md").unlink()  # its metadata check (not retried) would come first
    start = time.monotonic()
    with pytest.raises(HubPushError, match="during upload_folder: the server did not answer within 1 s") as excinfo:
        push_folder(checkpoint_copy, REPO_ID, endpoint=silent_server, timeout=1)
    assert time.monotonic() - start < 30
    assert "/preupload/" in str(excinfo.value)
    assert no_retry_sleep == [1, 2, 4, 8, 8]  # huggingface_hub's 5 retries, then the error retries of the one request that hung


def test_timeout_comes_from_the_environment(checkpoint_copy, silent_server, monkeypatch):
    monkeypatch.setenv(PUSH_TIMEOUT_ENV, "1")
    start = time.monotonic()
    with pytest.raises(HubPushError, match="did not answer within 1 s"):
        push_folder(checkpoint_copy, REPO_ID, endpoint=silent_server)
    assert time.monotonic() - start < 10


def test_timeout_values_are_checked_before_any_request(checkpoint_copy, monkeypatch, silent_server):
    assert push_timeout() == DEFAULT_PUSH_TIMEOUT == 60
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not a positive number of seconds"):
            push_folder(checkpoint_copy, REPO_ID, endpoint=silent_server, timeout=bad)
    monkeypatch.setenv(PUSH_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=f"\\${PUSH_TIMEOUT_ENV} is 'soon'"):
        push_timeout()


def test_cli_push_has_a_timeout_option(checkpoint_copy, silent_server):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_TOKEN="hf_test_token",
               HF_HUB_DISABLE_TELEMETRY="1")
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "diffusers_gaq", "push", str(checkpoint_copy), REPO_ID,
                        "--endpoint", silent_server, "--timeout", "2"],
                       capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert "did not answer within 2 s" in r.stderr and "Traceback" not in r.stderr
    # Python start-up and imports take most of it; the hang itself is bounded by the 2 s.
    assert time.monotonic() - start < 120


# ---- a failed push leaves the folder byte-identical -------------------------------------------
def test_server_error_leaves_the_folder_byte_identical(checkpoint_copy, local_hub: LocalHub, hub_env: str,
                                                       no_retry_sleep):
    assert REPO_ID_PLACEHOLDER in (checkpoint_copy / "README.md").read_text()  # a card to fill in
    before = digests(checkpoint_copy)
    local_hub.fail_all = True

    with pytest.raises(HubPushError, match="HTTP 500"):
        push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint)

    assert digests(checkpoint_copy) == before


def test_refused_connection_leaves_an_old_checkpoint_byte_identical(checkpoint_copy, base_folder, no_retry_sleep):
    _make_old_checkpoint(checkpoint_copy, base_folder)  # the push would rewrite three files
    before = digests(checkpoint_copy)

    with pytest.raises(HubPushError, match="connection failed"):
        push_folder(checkpoint_copy, REPO_ID, endpoint=refused_endpoint())

    assert digests(checkpoint_copy) == before


def test_successful_push_updates_only_the_local_card(checkpoint_copy, local_hub: LocalHub, hub_env: str):
    before = digests(checkpoint_copy)
    push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint)
    after = digests(checkpoint_copy)
    assert {name for name in before if before[name] != after[name]} == {"README.md"}
    uploaded = local_hub.repo(REPO_ID).files()["README.md"]
    assert (checkpoint_copy / "README.md").read_bytes() == uploaded  # the folder's card is the repo's


# ---- the card names the repo of every push ----------------------------------------------------
def test_each_push_uploads_a_card_naming_its_own_repo(checkpoint_copy, local_hub: LocalHub, hub_env: str):
    first, second = "test-user/first-w8", "test-user/second-w8"
    push_folder(checkpoint_copy, first, endpoint=local_hub.endpoint)
    push_folder(checkpoint_copy, second, endpoint=local_hub.endpoint)

    for repo_id, other in ((first, second), (second, first)):
        card = local_hub.repo(repo_id).files()["README.md"].decode()
        assert f'QuantizedUNet2DModel.from_pretrained("{repo_id}")' in card, repo_id
        assert other not in card and REPO_ID_PLACEHOLDER not in card


# ---- no local absolute path in anything uploaded ----------------------------------------------
def test_saved_files_record_only_the_base_folder_name(qpipe, checkpoint, base_folder, tmp_path):
    pipeline_dir = save_quantized_pipeline(qpipe, tmp_path / "pipe-w8")
    for folder in (checkpoint, pipeline_dir):
        for name, text in _text_files(folder).items():
            assert str(base_folder) not in text and str(base_folder.parent) not in text, f"{folder}/{name}"
    for qcfg_path in (checkpoint / "quantization_config.json", pipeline_dir / "unet" / "quantization_config.json"):
        qcfg = json.loads(qcfg_path.read_text())
        assert qcfg["base_model"] == "my-fp-model"
    assert not json.loads((checkpoint / "config.json").read_text())["_name_or_path"].startswith("/")
    card = ModelCard.load(checkpoint / "README.md")
    assert card.data.base_model is None  # a folder name is not a Hub id: no metadata, no link
    assert "# my-fp-model quantized to W8A8" in card.text and "`my-fp-model`" in card.text


def test_push_of_an_old_checkpoint_uploads_no_local_path(checkpoint_copy, base_folder, local_hub: LocalHub,
                                                         hub_env: str):
    _make_old_checkpoint(checkpoint_copy, base_folder)
    qcfg_before = (checkpoint_copy / "quantization_config.json").read_bytes()

    push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint)

    uploaded = local_hub.repo(REPO_ID).files()
    for name in ("README.md", "quantization_config.json", "config.json"):
        text = uploaded[name].decode()
        assert str(base_folder) not in text and str(base_folder.parent) not in text, name
    assert json.loads(uploaded["quantization_config.json"])["base_model"] == "my-fp-model"
    assert json.loads(uploaded["config.json"])["_name_or_path"] == "unet"
    # The layer table and everything else of the config are uploaded as they were.
    local_qcfg = json.loads(qcfg_before)
    assert {k: v for k, v in json.loads(uploaded["quantization_config.json"]).items() if k != "base_model"} == \
        {k: v for k, v in local_qcfg.items() if k != "base_model"}
    assert (checkpoint_copy / "quantization_config.json").read_bytes() == qcfg_before  # local configs untouched


def test_hub_base_model_is_kept_as_its_id(qpipe, tmp_path, monkeypatch):
    monkeypatch.setattr(qpipe.unet, "gaq_base_model", HUB_BASE)
    folder = qpipe.unet.save_pretrained(tmp_path / "from-hub")
    assert json.loads((folder / "quantization_config.json").read_text())["base_model"] == HUB_BASE
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == HUB_BASE and f"https://huggingface.co/{HUB_BASE}" in card.text


@pytest.mark.parametrize("recorded, public", [
    (HUB_BASE, HUB_BASE),
    ("/home/someone/projects/secret/my-fp-model", "my-fp-model"),
    ("/home/someone/projects/secret/my-fp-model/", "my-fp-model"),
    ("C:\\Users\\someone\\my-fp-model", "my-fp-model"),
    ("~/models/my-fp-model", "my-fp-model"),
    ("/home/someone/.cache/huggingface/hub/models--google--ddpm-cifar10-32/snapshots/0123abc/unet", HUB_BASE),
    (None, None),
])
def test_public_base_model(recorded, public):
    assert public_base_model(recorded) == public


def test_reference_pipeline_is_recorded_by_name():
    # `diffusers-gaq evaluate` loads "reference" as the embedded pipeline (its default baseline).
    assert public_base_model(PIPELINE_DIR) == "reference"
    assert public_base_model(str(PIPELINE_DIR / "unet")) == "unet"


def test_card_shows_a_local_base_and_baseline_by_name_only(qpipe, base_folder, monkeypatch):
    monkeypatch.setattr(qpipe.unet, "gaq_evaluation", {"psnr_db": 30.0, "baseline": str(base_folder)}, raising=False)
    text = str(build_model_card(qpipe.unet, base_model=str(base_folder)))
    assert str(base_folder) not in text and "my-fp-model" in text


# ---- only the checkpoint's own files are uploaded ---------------------------------------------
SECRET = "HF_TOKEN=hf_should_never_leave_this_machine"
OUTSIDE = "private notes outside the checkpoint folder"


@pytest.fixture
def cluttered_pipeline(qpipe, tmp_path) -> Path:
    """A saved quantized pipeline holding what a push must never upload: a hidden .env with a
    token, a symlink to a file outside the folder, a stray file and a stray folder."""
    folder = save_quantized_pipeline(qpipe, tmp_path / "pipe-w8")
    (folder / ".env").write_text(SECRET + "\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "token").write_text(SECRET)
    outside = tmp_path / "outside.txt"
    outside.write_text(OUTSIDE)
    (folder / "unet" / "notes.txt").symlink_to(outside)
    (folder / "scratch.py").write_text("print('mine')\n")
    (folder / "scheduler" / "old.bin").write_bytes(b"\0" * 8)
    (folder / "runs").mkdir()
    (folder / "runs" / "log.json").write_text("{}")
    return folder


def _expected_pipeline_files(folder: Path) -> set[str]:
    names = {"model_index.json", "README.md", "scheduler/scheduler_config.json"}
    names |= {f"unet/{p.name}" for p in (folder / "unet").iterdir() if not p.is_symlink() and p.suffix != ".txt"}
    return names | {p.name for p in folder.glob("*.png")}


def _pushed(hub: LocalHub) -> dict[str, bytes]:
    files = hub.repo(REPO_ID).files()
    files.pop(".gitattributes")  # the Hub's own, written when the repo is created
    return files


def test_push_uploads_only_the_checkpoint_files(cluttered_pipeline, local_hub: LocalHub, hub_env: str, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers_gaq"):
        push_folder(cluttered_pipeline, REPO_ID, endpoint=local_hub.endpoint)

    uploaded = _pushed(local_hub)
    assert set(uploaded) == _expected_pipeline_files(cluttered_pipeline)
    for name, data in uploaded.items():
        assert SECRET.encode() not in data and OUTSIDE.encode() not in data, name
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for skipped in (".env", ".cache/", "unet/notes.txt", "scratch.py", "scheduler/old.bin", "runs/"):
        assert skipped in warning, skipped
    assert "symbolic link" in warning and "hidden" in warning


def test_a_link_is_never_read(cluttered_pipeline, monkeypatch):
    # The allow-list never opens a link: even one named like a checkpoint file is skipped.
    (cluttered_pipeline / "unet" / "notes.txt").unlink()
    config = cluttered_pipeline / "scheduler" / "scheduler_config.json"
    real = cluttered_pipeline.parent / "scheduler_config.json"
    config.rename(real)
    config.symlink_to(real)
    plan = push_folder(cluttered_pipeline, REPO_ID, dry_run=True)
    assert "scheduler/scheduler_config.json" not in {f.path for f in plan}


def test_dry_run_returns_exactly_what_a_push_uploads(cluttered_pipeline, local_hub: LocalHub, hub_env: str):
    plan = push_folder(cluttered_pipeline, REPO_ID, endpoint=local_hub.endpoint, dry_run=True)
    assert not local_hub.requests and REPO_ID_PLACEHOLDER in (cluttered_pipeline / "README.md").read_text()
    push_folder(cluttered_pipeline, REPO_ID, endpoint=local_hub.endpoint)
    uploaded = _pushed(local_hub)
    assert {f.path: f.size for f in plan} == {name: len(data) for name, data in uploaded.items()}


def test_cli_dry_run_prints_the_files_and_sends_nothing(cluttered_pipeline, local_hub: LocalHub, hub_env: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    before = digests(cluttered_pipeline)
    r = subprocess.run([sys.executable, "-m", "diffusers_gaq", "push", str(cluttered_pipeline), REPO_ID,
                        "--endpoint", local_hub.endpoint, "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert not local_hub.requests  # no network call at all
    listed = {line.split()[-1]: int(line.split()[0].replace(",", "")) for line in r.stdout.splitlines()[:-1]}
    expected = _expected_pipeline_files(cluttered_pipeline)
    assert set(listed) == expected
    assert listed["unet/diffusion_pytorch_model.safetensors"] == \
        (cluttered_pipeline / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert f"{len(expected)} files" in r.stdout.splitlines()[-1] and "nothing was sent" in r.stdout
    assert ".env" in r.stderr and "unet/notes.txt" in r.stderr  # the warning names what is skipped
    assert digests(cluttered_pipeline) == before


# ---- a pinned Hub commit loads the files of that commit -----------------------------------------
def test_a_pinned_revision_loads_that_commits_files_after_a_later_push(checkpoint_copy, local_hub: LocalHub,
                                                                       hub_env: str, tmp_path):
    from diffusers_gaq.file_digests import FILES_DIGEST_FIELD, files_digests
    from diffusers_gaq.modeling import QuantizedUNet2DModel

    first = push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint).oid
    expected = _unet_outputs(QuantizedUNet2DModel.from_pretrained(str(checkpoint_copy), runtime="simulated"))
    # A deliberate edit that recomputes the digests: only pinning the commit protects against it.
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["norm_eps"] = 10.0
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg, indent=2))
    qcfg = json.loads((checkpoint_copy / "quantization_config.json").read_text())
    qcfg[FILES_DIGEST_FIELD] = files_digests(cfg, qcfg)
    (checkpoint_copy / "quantization_config.json").write_text(json.dumps(qcfg, indent=2))
    push_folder(checkpoint_copy, REPO_ID, endpoint=local_hub.endpoint)

    pinned = QuantizedUNet2DModel.from_pretrained(REPO_ID, revision=first, endpoint=local_hub.endpoint,
                                                  cache_dir=tmp_path / "cache", runtime="simulated")
    latest = QuantizedUNet2DModel.from_pretrained(REPO_ID, endpoint=local_hub.endpoint,
                                                  cache_dir=tmp_path / "cache", runtime="simulated")
    assert torch.equal(_unet_outputs(pinned), expected)
    assert not torch.equal(_unet_outputs(latest), expected)


@torch.no_grad()
def _unet_outputs(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    size = unet.config.sample_size
    return unet(torch.randn(1, unet.config.in_channels, size, size, generator=gen), torch.tensor([10])).sample
