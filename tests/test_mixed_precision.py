"""Mixed precision by measurement (GradientAlignedQuantizer.average_weight_bits): the allocator as a
pure function on synthetic sensitivity reports, the budget on a saved checkpoint, bit-exact reload of
the allocation without re-analysis, the integer runtime, the card / ``info`` lines, and refusals
before any sampling."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_UNET_CONFIG, fp_unet

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq import mixed_precision as mp
from diffusers_gaq.cli import main as cli_main
from diffusers_gaq.config import CONFIG_NAME
from diffusers_gaq.hub import build_model_card
from diffusers_gaq.modeling import load_quantized
from diffusers_gaq.models import family_for
from diffusers_gaq.runtime import IntegerLayer
from diffusers_gaq.sensitivity import SensitivityReport, SensitivityRow
from diffusers_gaq.weight_bits import checkpoint_weight_bits

torch.set_num_threads(1)

BUDGET = 4.5


def _layers(*specs):
    return [mp.LayerWeights(name, numel, bits, movable) for name, numel, bits, movable in specs]


def _report(damage: dict[str, float]) -> SensitivityReport:
    """A synthetic sensitivity report: weight rows with the given noise MSE, and an activation row that
    must not count."""
    rows = [SensitivityRow(name, "weight", 4, value) for name, value in damage.items()]
    rows.append(SensitivityRow("a", "activation", 8, 1e9))
    return SensitivityReport(rows, {"weight_bits": 4})


# ---- the allocator, a pure function ------------------------------------------------------------------
def test_allocator_picks_the_best_damage_per_bit_within_the_budget():
    # 1000 weights at 4 bits, budget 4.4: 400 bits to spend; a raise to 8 bits costs 4 bits per weight.
    layers = _layers(("a", 50, 4, True), ("b", 50, 4, True), ("c", 100, 4, True), ("d", 30, 4, True),
                     ("e", 770, 4, True))
    damage = mp.damage_of(_report({"a": 1.0, "b": 3.0, "c": 4.0, "d": 0.1, "e": 100.0}))
    # Damage per added bit: e 0.032 (3080 bits: never fits), b 0.015 (200), c 0.010 (400: 600 > 400,
    # skipped), a 0.005 (200: exactly 400), d 0.0008 (120: over).
    chosen = mp.allocate_bits(layers, damage, 4.4)
    assert chosen == ["b", "a"]
    assert mp.average_bits(layers, chosen) == pytest.approx(4.4) and mp.average_bits(layers, chosen) <= 4.4
    # One bit less and a no longer fits; c still does not.
    assert mp.allocate_bits(layers, damage, 4.399) == ["b", "d"]


def test_allocator_never_exceeds_the_budget_and_spends_it_greedily():
    torch.manual_seed(0)
    numels = torch.randint(1, 500, (40,)).tolist()
    layers = _layers(*[(f"l{i}", n, 4, True) for i, n in enumerate(numels)])
    damage = {f"l{i}": float(v) for i, v in enumerate(torch.rand(40))}
    for budget in (4.0, 4.1, 4.25, 4.5, 5.0, 7.9, 8.0):
        chosen = mp.allocate_bits(layers, damage, budget)
        assert mp.average_bits(layers, chosen) <= budget
        # Greedy: no layer left out would still fit.
        left = [layer for layer in layers if layer.name not in chosen]
        spare = budget * sum(numels) - sum(layer.numel * (8 if layer.name in chosen else 4) for layer in layers)
        assert all(4 * layer.numel > spare + 1e-9 for layer in left)
    assert mp.allocate_bits(layers, damage, 4.0) == []
    assert len(mp.allocate_bits(layers, damage, 8.0)) == 40


def test_explicit_precision_wins_and_counts_toward_the_budget():
    # "x" is set to 8 bits by an explicit entry (not movable): it spends 400 of the 500 bits of budget 4.5.
    layers = _layers(("x", 100, 8, False), ("y", 100, 4, True), ("z", 800, 4, True))
    damage = {"x": 50.0, "y": 1.0, "z": 1.0}
    assert mp.allocate_bits(layers, damage, 4.5) == []  # y's 400 bits no longer fit
    assert mp.allocate_bits(layers, damage, 4.8) == []  # the float 4.8 lies just below 4.8: 4799.99... bits
    assert mp.allocate_bits(layers, damage, 4.9) == ["y"]
    with pytest.raises(ValueError, match="explicit precision already spends: 4.4000"):
        mp.allocate_bits(layers, damage, 4.3)


def test_layers_without_damage_and_fixed_layers_are_not_raised():
    layers = _layers(("p", 10, 4, True), ("q", 10, 4, True), ("r", 10, 6, False))
    assert mp.allocate_bits(layers, {"p": 0.0, "r": 9.0}, 8.0) == []


def test_weight_layers_follow_the_precision_policy():
    unet = fp_unet(TINY_UNET_CONFIG)
    family = family_for(unet)
    config = GradientAlignedQuantizer(layer_precision={"up_blocks.0.*": "w6a8", "time_embedding.*": "a8"})
    layers = {layer.name: layer for layer in mp.weight_layers(unet, config, family)}
    assert "conv_in" not in layers and "conv_out" not in layers  # first_last_precision="fp": not counted
    assert "time_embedding.linear_1" not in layers  # FP weights: not counted
    fixed = [layer for layer in layers.values() if not layer.movable]
    assert fixed and all(layer.name.startswith("up_blocks.0.") and layer.bits == 6 for layer in fixed)
    same = mp.weight_layers(unet, config.replace(first_last_precision="same"), family)
    assert {"conv_in", "conv_out"} <= {layer.name for layer in same if layer.movable}


# ---- a budget allocated on a real (tiny) UNet ------------------------------------------------------------
@pytest.fixture(scope="module")
def allocated(tiny_pipe, tiny_quantizer, tmp_path_factory):
    """(the sensitivity report the allocation used, the quantized UNet, its saved folder)."""
    reports = []

    def recording(*args, **kwargs):
        reports.append(analyze(*args, **kwargs))
        return reports[-1]

    analyze = mp.analyze_sensitivity
    config = tiny_quantizer(weight_bits=4, act_bits=8, average_weight_bits=BUDGET, weighting="uniform")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mp, "analyze_sensitivity", recording)
        unet = quantize_pipeline(tiny_pipe, config, progress=False).unet
    assert len(reports) == 1
    return reports[0], unet, unet.save_pretrained(tmp_path_factory.mktemp("mixed") / "unet")


def test_the_saved_allocation_stays_within_the_budget(allocated, tiny_pipe):
    report, unet, folder = allocated
    qcfg = json.loads((folder / CONFIG_NAME).read_text())
    # The average from the checkpoint's own layer table.
    widths = [(entry["weight_bits"], entry["weight_shape"]) for entry in qcfg["layers"].values()
              if entry["weight_bits"] is not None]
    numel = [torch.Size(shape).numel() for _, shape in widths]
    average = sum(b * n for (b, _), n in zip(widths, numel)) / sum(numel)
    assert 4 < average <= BUDGET
    assert checkpoint_weight_bits(folder).average_quantized_bits == pytest.approx(average)
    chosen = qcfg["config"]["allocated_layers"]
    assert chosen and all(qcfg["layers"][name]["weight_bits"] == 8 for name in chosen)
    assert all(qcfg["config"]["layer_precision"][name] == "w8a8" for name in chosen)
    assert qcfg["config"]["average_weight_bits"] == BUDGET
    # Exactly what the allocator makes of the report the run measured (weights only, no images).
    assert {row.kind for row in report.rows} == {"weight"} and report.settings["images"] == 0
    config = unet.gaq_config
    family = family_for(unet)
    fp_layers = mp.weight_layers(tiny_pipe.unet, config.replace(layer_precision={}, allocated_layers=()), family)
    assert chosen == mp.allocate_bits(fp_layers, mp.damage_of(report), BUDGET)


def test_reload_is_bit_exact_and_the_integer_runtime_runs_it(allocated):
    _, unet, folder = allocated
    torch.manual_seed(1)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    simulated = load_quantized(folder, runtime="simulated")
    assert simulated.gaq_config.allocated_layers == unet.gaq_config.allocated_layers
    with torch.no_grad():
        assert torch.equal(simulated(x, t).sample, unet(x, t).sample)
        integer = load_quantized(folder)
        out = integer(x, t).sample
    bits = {name: m.weight_bits for name, m in integer.named_modules() if isinstance(m, IntegerLayer)}
    assert all(bits[name] == 8 for name in unet.gaq_config.allocated_layers)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out, unet(x, t).sample, atol=1e-3)


def test_card_and_info_show_the_allocation(allocated, capsys):
    _, unet, folder = allocated
    chosen = unet.gaq_config.allocated_layers
    average = checkpoint_weight_bits(folder).average_quantized_bits
    line = f"{average:.2f} average weight bits (budget {BUDGET:g}), {len(chosen)} layer"
    text = build_model_card(unet).text
    assert "Mixed precision by measurement: " + line in text and chosen[0] in text
    assert cli_main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "mixed:        " + line in out and f"chosen by sensitivity: {chosen[0]}" in out


def test_a_config_with_its_allocation_is_not_analysed_again(allocated, tiny_pipe, monkeypatch):
    _, unet, _ = allocated
    monkeypatch.setattr(mp, "analyze_sensitivity", lambda *a, **k: pytest.fail("the allocation was measured again"))
    config = unet.gaq_config.replace(recon_iters=0)
    again = quantize_pipeline(tiny_pipe, config, progress=False).unet.gaq_config
    assert again.layer_precision == unet.gaq_config.layer_precision
    assert again.allocated_layers == unet.gaq_config.allocated_layers


# ---- refusals before any work -----------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [3.9, 8.5, float("nan"), True, "4.5"])
def test_budgets_outside_weight_bits_to_8_are_refused(budget):
    with pytest.raises(ValueError, match="average_weight_bits"):
        GradientAlignedQuantizer(weight_bits=4, average_weight_bits=budget)


def test_a_budget_the_explicit_entries_exceed_is_refused_before_sampling(tiny_pipe, tiny_quantizer, no_sampling):
    config = tiny_quantizer(weight_bits=4, average_weight_bits=4.5, layer_precision={"*": "w8a8"})
    with pytest.raises(ValueError, match="explicit precision already spends: 8.0000"):
        quantize_pipeline(tiny_pipe, config, progress=False)


def test_cli_refuses_a_bad_budget_before_loading(tmp_path, no_loading, capsys):
    code = cli_main(["quantize", "reference", "--weight-bits", "4", "--average-weight-bits", "3",
                     "--output", str(tmp_path / "out")])
    assert code != 0 and "average_weight_bits=3.0" in capsys.readouterr().err
