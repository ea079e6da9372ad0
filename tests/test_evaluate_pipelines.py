"""`diffusers-gaq evaluate` on every family: a tiny class-conditional UNet, a tiny DiT, a tiny
Stable Diffusion and a tiny SDXL pipeline (random weights, the in-memory CLIP tokenizer of test_families), each
compared with its FP pipeline from the same noise; two folders give two rows in one table and grid."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from test_families import TINY, build_pipeline
from test_sdxl import tiny_sdxl_pipeline

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.cli import main
from diffusers_gaq.evaluation.sampling import SamplingPlan, conditioning, paired_samples
from diffusers_gaq.modeling import save_quantized_pipeline

torch.set_num_threads(1)

# kind -> (precisions of the quantized folders, extra evaluate flags)
CASES = {
    "class_conditional": ([(8, 8), (4, 8)], ["--class-labels", "3", "7"]),
    "dit": ([(8, 8)], ["--class-labels", "1", "2"]),
    "sd": ([(8, 8)], ["--prompt", "a red fox", "--guidance-scale", "3"]),
    "sdxl": ([(8, 8)], ["--prompt", "a red fox"]),  # SDXL's own guidance scale, 5
}


@pytest.mark.parametrize("kind", list(CASES))
def test_evaluate_gives_one_row_per_folder(kind, tmp_path, capsys):
    precisions, flags = CASES[kind]
    pipe = tiny_sdxl_pipeline() if kind == "sdxl" else build_pipeline(kind)
    pipe.save_pretrained(tmp_path / "fp")
    folders = []
    for w, a in precisions:
        qpipe = quantize_pipeline(pipe, GradientAlignedQuantizer(**dict(TINY, weight_bits=w, act_bits=a)), progress=False)
        folders.append(str(save_quantized_pipeline(qpipe, tmp_path / f"w{w}a{a}")))
    report = tmp_path / "report"
    rc = main(["evaluate", *folders, "--baseline", str(tmp_path / "fp"), "--num-images", "2",
               "--num-inference-steps", "2", "--report", str(report), "--quiet", *flags])
    out = capsys.readouterr()
    assert rc == 0, out.err

    result = json.loads((report / "evaluation.json").read_text())
    assert [row["name"] for row in result["models"]] == [f"w{w}a{a}" for w, a in precisions]
    assert result["fp"]["fid_ref"] is None  # FID-ref is defined for the reference pipeline only
    for row in result["models"]:
        assert 0 < row["psnr_db"] < 100 and math.isfinite(row["psnr_db"])  # the quantized model differs from FP
        assert -1 <= row["ssim"] < 1
        assert row["seconds_per_image"] > 0 and 0 < row["size_vs_fp"] < 1
    assert result["fp"]["seconds_per_image"] > 0
    table = (report / "evaluation.md").read_text()
    assert all(f"| w{w}a{a} |" in table for w, a in precisions) and "| FP |" in table
    assert "| model |" in out.out  # the table is printed too
    # The grid: one strip per model, FP first, all the same height.
    grid = Image.open(report / "comparison.png")
    assert grid.height % (len(precisions) + 1) == 0


def test_rows_of_the_same_model_are_identical_and_conditioning_is_used():
    """Same plan, same pipeline -> bit-identical images (the noise is shared); other labels or prompts
    change them (the conditioning reaches the model)."""
    for kind, other in (("class_conditional", {"class_labels": [5, 6]}), ("sd", {"prompts": ["a lighthouse"]})):
        pipe = build_pipeline(kind)
        plan = SamplingPlan(num_images=2, num_inference_steps=2)
        a, _ = paired_samples(pipe, plan)
        b, _ = paired_samples(pipe, plan)
        c, _ = paired_samples(pipe, SamplingPlan(num_images=2, num_inference_steps=2, **other))
        assert (a == b).all() and not (a == c).all()


def test_class_labels_are_checked_against_the_model():
    pipe = build_pipeline("class_conditional")  # 10 classes
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\]"):
        conditioning(pipe, SamplingPlan(num_images=2, class_labels=[10]))
    assert conditioning(pipe, SamplingPlan(num_images=4))[1] == [0, 2, 5, 7]  # spread over every class


def test_sdxl_is_sampled_from_prompts_at_its_own_guidance_scale():
    from diffusers_gaq.models import denoiser_of

    pipe = tiny_sdxl_pipeline()
    kind, cond = conditioning(pipe, SamplingPlan(num_images=3))
    assert kind == "text_to_image" and all(isinstance(c, str) for c in cond)
    guidance = {k: denoiser_of(p)[0].default_guidance_scale for k, p in (("sdxl", pipe), ("sd", build_pipeline("sd")),
                                                                        ("dit", build_pipeline("dit")))}
    assert guidance == {"sdxl": 5.0, "sd": 7.5, "dit": 4.0}
