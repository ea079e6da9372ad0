"""Bounded calibration memory (issue 17): quantized attention in chunks of (sample, head) slices,
captured unit inputs and targets in a disk-backed store, the max_calibration_memory_gib knob. None
of them may change a bit of the result."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.calibration.reconstruction import UnitProblem, start_rounding
from diffusers_gaq.calibration.store import CaptureStore, DiskRows
from diffusers_gaq.calibration.weighting import learn_scores
from diffusers_gaq.calibration.capture import UnitInputs
from diffusers_gaq.config import BUDGETS
from diffusers_gaq.models.attention import QuantAttnProcessor
from diffusers_gaq.models.wrap import set_observing, set_quant_state
from diffusers_gaq.quant.layers import QuantAttentionCore, QuantLinear
from diffusers_gaq.quant.quantizers import ActQuantizer, WeightQuantizer

torch.set_num_threads(1)  # bit-equality is claimed at a fixed thread count (reductions split by thread)

B, H, T, D = 3, 2, 12, 8
SLICE = 8 * T * T * 4  # ATTENTION_WORKING_COPIES x one slice of the attention map, float32


def _core_run(max_chunk_bytes, range_method="ema", groups=1, mask=False):
    """Observe, finalize, then forward + backward of a quantized attention core on fixed inputs."""
    torch.manual_seed(0)
    core = QuantAttentionCore(8, range_method=range_method, num_groups=groups, max_chunk_bytes=max_chunk_bytes)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    m = torch.randn(B, 1, 1, T) if mask else None
    if groups > 1:
        for qz in core.act_quantizers():
            qz.group_index = torch.tensor([0, 1, 1])
    for qz in core.act_quantizers():
        qz.observing = True
    with torch.no_grad():
        core(q, k, v, 0.35, m)
    for qz in core.act_quantizers():
        qz.finalize()
    out = core(q, k, v, 0.35, m)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    steps = [qz.scale for qz in core.act_quantizers()]
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v] + steps)
    return out, grads, [s.detach().clone() for s in steps]


@pytest.mark.parametrize("range_method,groups,mask", [("ema", 1, False), ("percentile", 1, True), ("mse", 2, False),
                                                      ("percentile", 2, True)])
def test_chunked_attention_core_is_bit_identical(range_method, groups, mask):
    ref_out, ref_grads, ref_steps = _core_run(None, range_method, groups, mask)
    assert (ref_steps[3] != 1.0).all()  # the probability quantizer was initialised and quantizes
    for budget in (1, 2 * SLICE, 4 * SLICE):  # 1, 2 and 4 of the 6 (sample, head) slices per chunk
        out, grads, steps = _core_run(budget, range_method, groups, mask)
        assert torch.equal(out, ref_out)
        assert all(torch.equal(a, b) for a, b in zip(steps, ref_steps))  # observed ranges
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))  # q, k, v and all four step sizes


def test_chunk_rows_follow_the_budget():
    core = QuantAttentionCore(8, max_chunk_bytes=3 * SLICE)
    assert core.chunk_rows(6, T, T, 4) == 3
    assert core.chunk_rows(2, T, T, 4) == 2  # never more rows than there are
    assert QuantAttentionCore(8, max_chunk_bytes=1).chunk_rows(6, T, T, 4) == 1  # never zero
    assert QuantAttentionCore(8).chunk_rows(6, T, T, 4) == 6  # no budget: the whole map


def _attention_unit(max_chunk_bytes):
    """A tiny diffusers Attention block with wrapped projections and a quantized core."""
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, QuantLinear(getattr(attn, name), WeightQuantizer(4), ActQuantizer(8)))
    attn.to_out[0] = QuantLinear(attn.to_out[0], WeightQuantizer(4), ActQuantizer(8))
    core = QuantAttentionCore(8, max_chunk_bytes=max_chunk_bytes)
    attn.set_processor(QuantAttnProcessor(attn.processor, core))
    return attn


def test_chunked_attention_block_and_meta_step_are_bit_identical():
    """Through diffusers' Attention: the block's output, the gradients of every parameter (AdaRound's V,
    all step sizes) and the meta step's second-order score gradients."""
    results = []
    for budget in (None, 8 * 6 * 6 * 4):  # one (sample, head) slice of a 6-token map per chunk
        unit = _attention_unit(budget)
        x = torch.randn(6, 6, 16, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            targets = unit(x)
        problem = UnitProblem("attn", unit, UnitInputs((x,), {}), targets + 0.01 * torch.randn_like(targets),
                              torch.device("cpu"))
        for layer in problem.layers:
            layer.weight_quantizer.calibrate(layer.layer.weight)
        set_quant_state(unit, weight=True, act=True)
        set_observing(unit, True)
        with torch.no_grad():
            problem.losses(torch.arange(6))
        set_observing(unit, False)
        for q in problem.act_quantizers():
            q.finalize()
        start_rounding(problem)
        config = GradientAlignedQuantizer(num_calibration_timesteps=2, num_groups=2, meta_iters=2, meta_batch_size=4)
        params = list(problem.named_trainable(config).values())
        for p in params:
            p.requires_grad_(True)
        loss = problem.losses(torch.arange(6)).sum()
        grads = torch.autograd.grad(loss, params)
        scores, _ = learn_scores(problem, torch.zeros(4), torch.arange(4), [torch.tensor([4]), torch.tensor([5])],
                                 config, torch.Generator().manual_seed(0), progress=False)
        results.append((loss.detach(), grads, scores))
    (l0, g0, s0), (l1, g1, s1) = results
    assert len(g0) == 12  # V of four layers, their four input steps, the core's q, k, v and probability steps
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert not torch.equal(s0, torch.zeros(4)) and torch.equal(s0, s1)


# ---- disk-backed store -----------------------------------------------------------------------------
def test_disk_rows_read_back_exactly(tmp_path):
    store = CaptureStore(max_memory_bytes=0, folder=tmp_path)
    data = torch.randn(10, 3, 4).to(torch.bfloat16)  # also dtypes numpy lacks
    table = store.new_rows(10, (3, 4), data.dtype, "test rows")
    assert isinstance(table, DiskRows)
    table.write(0, data[:4])
    table.write(4, data[4:])
    for idx in (torch.tensor([7, 1, 2, 3, 9]), torch.arange(10), torch.tensor([5])):
        assert torch.equal(table[idx], data[idx])
    folder = table.path.parent
    store.close()
    assert not folder.exists()


def test_store_keeps_what_fits_in_memory():
    store = CaptureStore(max_memory_bytes=10 * 4 * 4)
    first = store.new_rows(10, (4,), torch.float32, "a")  # exactly the budget
    second = store.new_rows(1, (1,), torch.float32, "b")
    assert not isinstance(first, DiskRows) and isinstance(second, DiskRows)
    store.close()


def test_disk_store_and_attention_chunks_give_the_same_checkpoint(tmp_path, caplog):
    """quantize_pipeline with a tiny memory budget (every capture on disk, one attention slice per chunk)
    writes the same checkpoint bytes as with no budget."""
    def run(budget, out):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                           layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
        config = GradientAlignedQuantizer(**dict(BUDGETS["tiny"], weighting="gradient_aligned", weight_bits=4, act_bits=8,
                                                 num_inference_steps=6,
                                                 num_calibration_timesteps=3, num_groups=3, recon_iters=3,
                                                 max_calibration_memory_gib=budget))
        qpipe = quantize_pipeline(pipe, config, progress=False)
        return qpipe.unet.save_pretrained(tmp_path / out, model_card=False)

    with caplog.at_level(logging.INFO, logger="diffusers_gaq.calibration.store"):
        tiny = run(1e-9, "tiny")
    assert "go to disk" in caplog.text
    whole = run(None, "whole")
    name = "diffusion_pytorch_model.safetensors"
    assert (tiny / name).read_bytes() == (whole / name).read_bytes()


def test_memory_budget_is_validated_and_round_trips():
    config = GradientAlignedQuantizer(max_calibration_memory_gib=0.5)
    assert GradientAlignedQuantizer.from_dict(config.to_dict()) == config
    assert config.capture_memory_bytes == 2**28 and config.attention_chunk_bytes == 2**25
    assert GradientAlignedQuantizer(max_calibration_memory_gib=None).attention_chunk_bytes is None
    for bad in (0, -1.0, float("inf"), "16GB", True):
        with pytest.raises(ValueError, match="max_calibration_memory_gib"):
            GradientAlignedQuantizer(max_calibration_memory_gib=bad)


def test_strided_pool_indices_stay_in_range_past_float32_precision():
    """A [8, 1024, 2560] activation (SD 1.5's 32x32 feed-forward at minibatch 8) has 20971520 values,
    and float32 rounds the last linspace index up to 20971520: out of range before the clamp."""
    from diffusers_gaq.quant.quantizers import _subsample

    n = 8 * 1024 * 2560
    pool = _subsample(torch.arange(n, dtype=torch.float32), 4096)
    assert len(pool) == 4098 and pool[4095] == n - 1 and pool[-1] == n - 1
