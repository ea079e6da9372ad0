"""Per-layer sensitivity analysis (diffusers_gaq.sensitivity) on a tiny random UNet2DModel."""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from diffusers_gaq import GradientAlignedQuantizer, analyze_sensitivity, cli
from diffusers_gaq.models import family_for
from diffusers_gaq.models.wrap import attention_cores, quant_layers, wrap_model
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG
from diffusers_gaq.sensitivity import SensitivityReport

torch.set_num_threads(1)

# Short trajectories, few samples: the analysis is a diagnostic, the tests check its wiring.
CALIB = dict(num_inference_steps=4, num_calibration_timesteps=2, samples_per_timestep=4, num_groups=2,
             val_fraction=0.25, seed=0)
RUN = dict(num_inference_steps=3, progress=False)


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    # One attention block and skip concatenations (split inputs), like the reference UNet, in ~30 layers.
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def pipe():
    return DDIMPipeline(unet=_tiny_unet(), scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def _config(**bits):
    return GradientAlignedQuantizer(**{**CALIB, "weight_bits": 8, "act_bits": 8, **bits})


@pytest.fixture(scope="module")
def report_8bit(pipe):
    return analyze_sensitivity(pipe, _config(), images=False, **RUN)


def _expected_names(pipe):
    wrapped = _tiny_unet()
    wrap_model(wrapped, _config(), family_for(wrapped))
    layers = [n for n, _ in quant_layers(wrapped)]
    cores = [n.removesuffix(".processor.core") for n, _ in attention_cores(wrapped)]
    return layers, cores


def test_every_layer_gets_a_weight_and_an_activation_row(pipe, report_8bit):
    layers, cores = _expected_names(pipe)
    assert cores, "the tiny UNet should have an attention core"
    weight = [r.layer for r in report_8bit.rows if r.kind == "weight"]
    act = [r.layer for r in report_8bit.rows if r.kind == "activation"]
    assert sorted(weight) == sorted(layers)
    assert sorted(act) == sorted(layers + cores)
    assert all(r.noise_mse >= 0 and r.psnr_db is None for r in report_8bit.rows)
    ranked = report_8bit.ranked("weight")
    assert [r.noise_mse for r in ranked] == sorted((r.noise_mse for r in ranked), reverse=True)


def test_fewer_bits_do_more_damage(pipe, report_8bit):
    low = analyze_sensitivity(pipe, _config(weight_bits=2, act_bits=4), images=False, **RUN)
    high = {(r.layer, r.kind): r.noise_mse for r in report_8bit.rows}
    assert len(low.rows) == len(high)
    for row in low.rows:
        assert row.bits == (2 if row.kind == "weight" else 4)
        assert row.noise_mse >= high[row.layer, row.kind] - 1e-12, (row, high[row.layer, row.kind])
    # Not merely equal: low bits must actually hurt somewhere.
    assert sum(r.noise_mse for r in low.rows) > 10 * sum(high.values())


def test_users_pipeline_is_untouched(pipe):
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
    with torch.no_grad():
        before = pipe.unet(x, t).sample
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    analyze_sensitivity(pipe, _config(weight_bits=4), images=False, **RUN)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t).sample, before)
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    assert not any(type(m).__name__.startswith("Quant") for m in pipe.unet.modules())


def test_images_json_markdown_and_plot(pipe, tmp_path):
    report = analyze_sensitivity(pipe, _config(weight_bits=4), num_images=2, **RUN)
    assert all(r.psnr_db is not None and r.mse is not None and r.mse >= 0 for r in report.rows)
    path = report.to_json(tmp_path / "s.json")
    loaded = SensitivityReport.from_json(path)
    assert loaded.rows == report.rows and json.loads(path.read_text())["settings"]["weight_bits"] == 4
    table = report.to_markdown(top=5)
    assert table.count("\n") == 2 + 5 and "PSNR" in table
    png = report.plot(tmp_path / "s.png", top=5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unsupported_pipeline_refused():
    with pytest.raises(TypeError, match="supported pipelines"):
        analyze_sensitivity(object(), _config())


@pytest.fixture(scope="module")
def conditional():
    from diffusers_gaq import ClassConditionalDDIMPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(**{**_tiny_unet().config, "num_class_embeds": 3}).eval()
    return ClassConditionalDDIMPipeline(unet=unet, scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def test_class_conditional_noise_error(conditional):
    report = analyze_sensitivity(conditional, _config(weight_bits=4), images=False, **RUN)
    assert {r.kind for r in report.rows} == {"weight", "activation"}
    assert all(r.noise_mse >= 0 for r in report.rows)


def test_image_metric_on_a_conditional_pipeline_refused_before_any_work(conditional, monkeypatch):
    import diffusers_gaq.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "collect_calibration_data", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(TypeError, match="images=False"):
        analyze_sensitivity(conditional, _config(), **RUN)


def test_cli_runs_end_to_end(pipe, tmp_path, capsys):
    model_dir, out = tmp_path / "tiny", tmp_path / "sens"
    pipe.save_pretrained(model_dir)
    code = cli.main(["sensitivity", str(model_dir), "--weight-bits", "4", "--act-bits", "8", "--output", str(out),
                     "--num-images", "2", "--steps", "3", "--top", "5", "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0
    for name in ("sensitivity.json", "sensitivity.md", "sensitivity.png"):
        assert (out / name).is_file(), name
    assert "| 1 |" in stdout and "| 6 |" not in stdout  # the top 5 only
    rows = json.loads((out / "sensitivity.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"weight", "activation"}


@pytest.mark.parametrize("args, expected", [
    (["--weight-bits", "1"], "weight_bits"),
    (["--act-bits", "3"], "act_bits"),
], ids=["weight-bits", "act-bits"])
def test_cli_bad_input_is_one_line_before_any_work(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.common, "load_pipeline", lambda model: pytest.fail("the model was loaded"))
    code = cli.main(["sensitivity", "reference", "--output", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 1 and expected in err and err.count("\n") == 1, err


def test_cli_unsupported_pipeline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.common, "load_pipeline", lambda model: object())
    code = cli.main(["sensitivity", "reference", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "supported pipelines" in err and err.count("\n") == 1, err
