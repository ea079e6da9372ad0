"""A pushed artefact loads back by its repo id, through every call the model card and the README print.

Real: the unmodified huggingface_hub client and diffusers' own loaders, in a fresh process with a
fresh cache whose environment points at the test suite's local Hub server (tests/fake_hub), which
stands in for huggingface.co. A pipeline folder saved by ``qpipe.save_pretrained`` is pushed with
``diffusers-gaq push``; the model alone with ``unet.push_to_hub``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from diffusers_gaq import cli

PIPELINE_REPO = "me/ddpm-w4a8"
MODEL_REPO = "me/unet-w4a8"
ROOT = Path(__file__).resolve().parents[1]


def _env(endpoint: str, home: Path) -> dict:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="hf_test_token", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_CACHE", None)
    return env


def _run_all(codes: dict[str, str], endpoint: str, tmp_path: Path) -> dict[str, str]:
    """Each code in a fresh process with a fresh cache (run side by side); name -> stdout."""
    procs = {name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=_env(endpoint, tmp_path / f"home{i}"), cwd="/")
             for i, (name, code) in enumerate(codes.items())}
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{err[-4000:]}"
        outputs[name] = out
    return outputs


@pytest.fixture
def pushed(tiny_qpipe, local_hub, hub_env, tmp_path):
    folder = tmp_path / "saved"
    tiny_qpipe.save_pretrained(folder)
    assert cli.main(["push", str(folder), PIPELINE_REPO]) == 0
    tiny_qpipe.unet.push_to_hub(MODEL_REPO)
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900])
    torch.save({"x": x, "t": t}, tmp_path / "io.pt")
    return local_hub.endpoint, folder


LOADS = {
    "pipeline by id": "import diffusers_gaq\nfrom diffusers import DiffusionPipeline\n"
                      f"unet = DiffusionPipeline.from_pretrained({PIPELINE_REPO!r}).unet",
    "load_quantized_pipeline": "from diffusers_gaq.modeling import load_quantized_pipeline\n"
                               f"unet = load_quantized_pipeline({PIPELINE_REPO!r}).unet",
    "dequantizing pipeline": "from diffusers_gaq.modeling import load_quantized_pipeline\n"
                             f"unet = load_quantized_pipeline({PIPELINE_REPO!r}, runtime='dequantize').unet",
    "model of a pipeline repo": "from diffusers_gaq.modeling import QuantizedUNet2DModel\n"
                                f"unet = QuantizedUNet2DModel.from_pretrained({PIPELINE_REPO!r})",
    "model with subfolder": "from diffusers_gaq.modeling import QuantizedUNet2DModel\n"
                            f"unet = QuantizedUNet2DModel.from_pretrained({PIPELINE_REPO!r}, subfolder='unet')",
    "diffusers class with subfolder": "import diffusers_gaq\nfrom diffusers import UNet2DModel\n"
                                      f"unet = UNet2DModel.from_pretrained({PIPELINE_REPO!r}, subfolder='unet')",
    "model repo": "from diffusers_gaq.modeling import QuantizedUNet2DModel\n"
                  f"unet = QuantizedUNet2DModel.from_pretrained({MODEL_REPO!r})",
    "diffusers class, model repo": "import diffusers_gaq\nfrom diffusers import UNet2DModel\n"
                                   f"unet = UNet2DModel.from_pretrained({MODEL_REPO!r})",
}


def test_pushed_artefacts_load_by_repo_id(pushed, tmp_path):
    endpoint, folder = pushed
    codes = {}
    for call, load in LOADS.items():
        runtime = "dequantize" if "dequantiz" in call else "auto"
        # Against the pushed folder loaded locally in the same process (same threads, same kernels).
        codes[call] = load + f"""
import torch
from diffusers_gaq.modeling import load_quantized
local = load_quantized({str(folder / 'unet')!r}, runtime={runtime!r})
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    diff = (unet(io["x"], io["t"]).sample - local(io["x"], io["t"]).sample).abs().max()
print(type(unet).__name__, float(diff))
"""
    for call, out in _run_all(codes, endpoint, tmp_path).items():
        name, diff = out.split()[-2:]
        assert (name, float(diff)) == ("QuantizedUNet2DModel", 0.0), call


def test_the_cards_snippets_run_against_the_pushed_repo(pushed, tmp_path):
    endpoint, folder = pushed
    card = ModelCard.load(folder / "README.md").text
    assert PIPELINE_REPO in card and "path/to/saved-pipeline" not in card
    assert "diffusers_gaq.models.quantized" not in card
    snippets = {}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", card, flags=re.S)):
        loading = "\n".join(line for line in block.splitlines() if not line.startswith("images = "))
        if "from_pretrained(" not in loading or "DDIMScheduler.from_pretrained" in loading:
            continue  # the DDIM snippet needs the base model's scheduler repo, served in test_hub.py
        snippets[f"snippet {i}"] = loading + "\nprint('ran')"
    assert snippets
    for name, out in _run_all(snippets, endpoint, tmp_path).items():
        assert out.strip().endswith("ran"), name


def test_save_pretrained_with_push_to_hub_uploads_the_saved_folder(tiny_qpipe, local_hub, hub_env, tmp_path):
    saved = tiny_qpipe.save_pretrained(tmp_path / "pipeline", push_to_hub=True, repo_id="me/pushed-pipeline")
    model = tiny_qpipe.unet.save_pretrained(tmp_path / "model", push_to_hub=True, repo_id="me/pushed-model")
    for folder, repo_id in ((saved, "me/pushed-pipeline"), (model, "me/pushed-model")):
        local = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        uploaded = sorted(name for name in local_hub.repo(repo_id).files() if name != ".gitattributes")
        assert uploaded == local, (uploaded, local)
    assert (Path(saved) / "README.md").is_file()  # the Python API writes the top-level card too
    with pytest.raises(ValueError, match="variant='fp16' cannot apply"):
        tiny_qpipe.save_pretrained(tmp_path / "other", variant="fp16")
    with pytest.raises(ValueError, match="variant='fp16' cannot apply"):
        tiny_qpipe.unet.save_pretrained(tmp_path / "other", variant="fp16")
    assert not (tmp_path / "other").exists()
