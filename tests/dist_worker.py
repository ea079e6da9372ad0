"""Quantize the random-weight reference-architecture pipeline with a tiny budget; the main process
saves what calibration decided (integer codes, scales, sample weights) to one safetensors file.

Run alone (``python tests/dist_worker.py OUT``) or under a launcher (``torchrun --nproc_per_node 2
tests/dist_worker.py OUT``); test_distributed.py compares the files. ``--budget`` picks the tiny
test budget or the larger demo one (examples/benchmark_distributed.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not installed

import torch  # noqa: E402

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline  # noqa: E402
from diffusers_gaq.distributed import detect, is_main_process, wait_for_everyone  # noqa: E402
from diffusers_gaq.quant.layers import QuantLayer  # noqa: E402
from diffusers_gaq.quant.quantizers import ActQuantizer  # noqa: E402

logger = logging.getLogger("dist_worker")

# samples_per_timestep and recon_batch_size are odd so that two processes get uneven shards.
# calibration_batch_size=4 makes one process sample the 7 trajectories in the batches two
# processes use ([0..3] and [4..6]): CPU kernels round differently for different batch sizes, so
# only then is the gathered calibration set bit-identical to the single-process one.
BUDGETS = {
    "tiny": dict(num_inference_steps=10, num_calibration_timesteps=5, samples_per_timestep=7, recon_iters=6,
                 recon_batch_size=5, meta_iters=2, meta_batch_size=6, val_fraction=0.2, calibration_batch_size=4),
    "demo": dict(num_inference_steps=20, num_calibration_timesteps=5, samples_per_timestep=16, recon_iters=40,
                 recon_batch_size=16, meta_iters=5, meta_batch_size=16, val_fraction=0.2),
}


def build_pipeline(kind: str):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    if kind == "reference":
        from diffusers_gaq.reference import load_reference_pipeline  # the trained embedded pipeline

        return load_reference_pipeline()
    from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

    torch.manual_seed(0)  # the same random weights in every process and every run
    return DDIMPipeline(UNet2DModel(**REFERENCE_UNET_CONFIG), DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def decisions(unet) -> dict[str, torch.Tensor]:
    """Everything calibration decided: weight codes and scales, activation step sizes, sample weights."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, QuantLayer) and module.weight_quantizer is not None:
            wq = module.weight_quantizer
            out[f"{name}.codes"] = wq.codes
            out[f"{name}.weight_scale"] = wq.scale
            out[f"{name}.weight_zero_point"] = wq.zero_point
        elif isinstance(module, ActQuantizer):
            out[f"{name}.act_scale"] = module.scale.detach()
            out[f"{name}.act_zero_point"] = module.zero_point
    for unit in unet.gaq_report.units:
        out[f"omega.{unit.name}"] = unit.omega
        out[f"loss.{unit.name}"] = torch.tensor([unit.loss_init, unit.loss_final, unit.val_loss_final])
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def check_primitives(dist) -> None:
    """Exercise every collective of Dist on shapes that calibration rarely produces: empty shares,
    uneven shares, gradients missing on some processes. Raises AssertionError on a mismatch."""
    r, w = dist.rank, dist.world_size
    # Shares of a minibatch: disjoint, covering it, and empty for ranks beyond its length.
    idx = torch.arange(10, 13)
    assert dist.shard(idx).tolist() == idx.tolist()[r::w]
    assert len(dist.shard(idx[:1])) == (1 if r == 0 else 0)
    # Trajectory ids: a partition of range(n) in rank order, in whole batches, even for n < world size.
    for n, batch in ((1, None), (5, None), (7, 3)):
        ids = dist.split_trajectories(n, batch)
        if batch is not None:  # whole batches: [0, 1, 2, 3, 4, 5] and [6] for two processes
            assert ids == (list(range(6)) if r == 0 else [6]) if w == 2 else True, ids
        everyone = [None] * w
        torch.distributed.all_gather_object(everyone, ids)
        assert sum(everyone, []) == list(range(n)), everyone
        # Trajectory j holds the value j: the gathered tensor must be arange in trajectory order.
        local = torch.tensor(ids, dtype=torch.float32).reshape(1, -1, 1).expand(3, -1, 2).contiguous()
        full = dist.gather_trajectories(local, ids)
        assert full.shape == (3, n, 2) and torch.equal(full[0, :, 0], torch.arange(n, dtype=torch.float32)), full
    # Gradients: one only rank 0 has, one nobody has, one everybody has.
    only0, nobody, all_ = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    if r == 0:
        only0.grad = torch.tensor([1.0, 2.0])
    all_.grad = torch.full((2,), float(r + 1))
    dist.sum_grads([only0, nobody, all_])
    assert only0.grad.tolist() == [1.0, 2.0] and nobody.grad is None, (only0.grad, nobody.grad)
    assert all_.grad.tolist() == [w * (w + 1) / 2] * 2, all_.grad
    assert float(dist.sum_scalar(torch.tensor(float(r)))) == w * (w - 1) / 2
    assert torch.equal(dist.broadcast_tensor(torch.tensor([0.1, -3.7, float(r)])), torch.tensor([0.1, -3.7, 0.0]))
    # Rows gathered in row order whoever computed them (row i by process i mod w), uneven counts included.
    for total in (1, 3, 4):
        ids = list(dist.owned_rows(total))
        assert ids == list(range(r, total, w)), ids
        rows = torch.tensor([[float(i), float(10 * i)] for i in ids]).reshape(len(ids), 2)
        full = dist.gather_rows(rows, total)
        assert torch.equal(full[:, 0], torch.arange(total, dtype=torch.float32)), full
    assert dist.broadcast_object({"rank": r} if r == 0 else None) == {"rank": 0}
    dist.assert_same({"x": torch.ones(3)}, "primitives")
    try:
        dist.assert_same({"x": torch.full((), float(r))}, "a deliberately different tensor")
    except RuntimeError:
        pass
    else:
        raise AssertionError("assert_same accepted different tensors")
    logger.info("distributed primitives OK on %d processes", w)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path, help="safetensors file written by the main process")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="tiny")
    parser.add_argument("--pipeline", choices=("random", "reference"), default="random")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a GradientAlignedQuantizer field of the budget (JSON value)")
    parser.add_argument("--state-without-cpu", action="store_true",
                        help="create accelerate's PartialState() without cpu=True first, as a user script might")
    parser.add_argument("--check-primitives", action="store_true",
                        help="first exercise every collective on empty / uneven shares (several processes only)")
    args = parser.parse_args(argv)

    if args.state_without_cpu:
        # What a user script does with `Accelerator()` before quantizing: on a machine without CUDA
        # this state leaves every launched process alone, which detect() must refuse.
        from accelerate import PartialState

        PartialState()
    dist = detect()  # before anything else, so a bad launch fails fast
    rank = 0 if dist is None else dist.rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if args.check_primitives:
        if dist is None:
            parser.error("--check-primitives needs several processes")
        check_primitives(dist)
    pipe = build_pipeline(args.pipeline)
    budget = dict(BUDGETS[args.budget])
    for item in args.set:
        key, value = item.split("=", 1)
        budget[key] = json.loads(value)
    config = GradientAlignedQuantizer(weight_bits=4, act_bits=8, method="reconstruction",
                                      weighting="gradient_aligned", device="cpu",
                                      first_last_precision="same", **budget)  # FIRST_UNITS include conv_in
    t0 = time.perf_counter()
    qpipe = quantize_pipeline(pipe, config, progress=False)
    seconds = time.perf_counter() - t0
    report = qpipe.unet.gaq_report
    if is_main_process():
        from safetensors.torch import save_file

        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {"world_size": str(1 if dist is None else dist.world_size), "seconds": f"{seconds:.3f}",
                "data_seconds": f"{report.data_seconds:.3f}", "calibration_seconds": f"{report.calibration_seconds:.3f}",
                "threads": str(torch.get_num_threads())}
        save_file(decisions(qpipe.unet), str(args.output), metadata=meta)
        logger.info("wrote %s: %s", args.output, json.dumps(meta))
    wait_for_everyone()  # nobody exits (and tears the group down) before the file is written
    return 0


if __name__ == "__main__":
    sys.exit(main())
