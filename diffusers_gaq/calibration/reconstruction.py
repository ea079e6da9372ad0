"""Block-wise reconstruction (BRECQ / Q-Diffusion) with per-sample weights.

For one unit: initialise its quantizers (weight scales by MSE search, activation ranges by an
EMA of min/max), then minimise  mean_i omega_i * L_i(theta) + lambda * R(V)  over AdaRound's V
and the activation step sizes, where L_i is the squared error between the FP unit output and the
quantized unit output for sample i, the quantized unit fed with the quantized model's input.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..config import GradientAlignedQuantizer
from ..models.wrap import set_observing, set_quant_state
from ..quant.layers import QuantAttentionCore, QuantLayer
from ..quant.quantizers import has_timestep_aware, set_group_index
from .capture import UnitInputs
from .gradients import pack_grads, unpack_grads

logger = logging.getLogger(__name__)


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over positions: one value per sample (BRECQ's scale).

    Layouts: [B], [B, C], [B, C, H, W] (convolutional units), [B, tokens, C] (transformer blocks:
    channels last, so that a transformer unit's loss has the same scale against the rounding
    regulariser as a convolutional one)."""
    err = (output - target).pow(2)
    if err.dim() == 1:
        return err
    if err.dim() == 2:
        return err.sum(1)
    if err.dim() == 3:
        return err.sum(2).mean(1)
    return err.sum(1).flatten(1).mean(1)


class UnitProblem:
    """A unit with its captured quantized-model inputs and FP targets."""

    def __init__(self, name: str, unit: nn.Module, inputs: UnitInputs, targets: torch.Tensor, device: torch.device,
                 sample_groups: torch.Tensor | None = None):
        """``sample_groups``: the timestep group of every calibration sample, for timestep-aware
        activation quantizers (the unit is called directly, not through the model's timestep hook)."""
        self.name, self.unit, self.inputs, self.targets, self.device = name, unit, inputs, targets, device
        self.layers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
        self.cores = [m for m in unit.modules() if isinstance(m, QuantAttentionCore)]
        self.sample_groups = sample_groups if has_timestep_aware(unit) else None
        if has_timestep_aware(unit) and sample_groups is None:
            raise ValueError(f"unit {name} has timestep-aware activation quantizers: pass sample_groups")

    def losses(self, idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.sample_groups is not None:
            set_group_index(self.unit, self.sample_groups[idx].to(self.device))
        args, kwargs = self.inputs.select(idx, self.device)
        if params is None:
            out = self.unit(*args, **kwargs)
        else:
            out = functional_call(self.unit, params, args, kwargs, strict=False)
        return per_sample_loss(out, self.targets[idx].to(self.device))

    @torch.no_grad()
    def mean_loss(self, idx: torch.Tensor, batch_size: int) -> float:
        if len(idx) == 0:
            return float("nan")
        total = sum(self.losses(idx[i : i + batch_size]).sum().item() for i in range(0, len(idx), batch_size))
        return total / len(idx)

    @torch.no_grad()
    def per_sample_losses(self, idx: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([self.losses(idx[i : i + batch_size]).cpu() for i in range(0, len(idx), batch_size)])

    def act_quantizers(self):
        qs = [q for layer in self.layers for q in layer.act_quantizers()]
        return qs + [q for core in self.cores for q in core.act_quantizers()]

    def trainable_params(self, config: GradientAlignedQuantizer) -> dict[str, list[nn.Parameter]]:
        """AdaRound's V of every layer, and the activation step sizes when they are learned."""
        rounding = [layer.weight_quantizer.alpha for layer in self.layers
                    if layer.weight_quantizer is not None and layer.weight_quantizer.alpha is not None]
        steps = [q.scale for q in self.act_quantizers()] if config.learn_act_scale and config.quantizes_activations else []
        return {"rounding": rounding, "steps": steps}

    def named_trainable(self, config: GradientAlignedQuantizer) -> dict[str, nn.Parameter]:
        wanted = {id(p) for ps in self.trainable_params(config).values() for p in ps}
        return {n: p for n, p in self.unit.named_parameters() if id(p) in wanted}


@torch.no_grad()
def init_quantizers(problem: UnitProblem, idx: torch.Tensor, config: GradientAlignedQuantizer) -> None:
    """Weight scales from the weights; activation ranges observed over the calibration inputs.

    ``idx`` is in timestep order; an EMA over batches in that order weights the first timesteps
    least and the last most, so ``act_range_init="ema_shuffled"`` observes them shuffled (seeded)."""
    for layer in problem.layers:
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.calibrate(layer.layer.weight)
    set_quant_state(problem.unit, weight=True, act=config.quantizes_activations)
    if config.quantizes_activations:
        if config.act_range_init == "ema_shuffled":
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(config.seed))]
        set_observing(problem.unit, True)
        for i in range(0, len(idx), config.recon_batch_size):
            problem.losses(idx[i : i + config.recon_batch_size])
        set_observing(problem.unit, False)
        for q in problem.act_quantizers():
            q.finalize()


def beta_schedule(step: int, total: int, config: GradientAlignedQuantizer) -> float | None:
    """None during the warm-up (no regulariser), then beta annealed linearly start -> end."""
    warm = int(config.round_warmup * total)
    if step < warm:
        return None
    frac = (step - warm) / max(1, total - warm)
    return config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1.0 - frac)


def start_rounding(problem: UnitProblem) -> None:
    for layer in problem.layers:
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.start_adaround(layer.layer.weight)


def harden(problem: UnitProblem) -> None:
    for layer in problem.layers:
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.harden(layer.layer.weight)


def sharded_backward(problem: UnitProblem, pick: torch.Tensor, train_idx: torch.Tensor, omega: torch.Tensor,
                     params: list[torch.Tensor], num_shards: int, dist=None) -> torch.Tensor:
    """Set ``p.grad`` of ``params`` to the gradient of the omega-weighted minibatch mean loss, computed as
    the sum of ``num_shards`` shard gradients in shard order; return the loss (detached).

    Shard k is the k-th contiguous piece of ``pick``; with several processes, process r computes shards
    r, r + W, ... and the rows are gathered (not all-reduced) so that every process adds the same K
    vectors in the same order. A shard's gradient does not depend on which process computed it (same
    samples, same batch size), so the result is bit-identical for any number of processes <= K at
    the same thread count."""
    pieces = torch.tensor_split(pick, num_shards)
    mine = dist.owned_rows(num_shards) if dist is not None else range(num_shards)
    width = sum(p.numel() for p in params) + len(params) + 1  # pack_grads' layout, then the loss
    rows = torch.zeros(len(mine), width, device=problem.device)
    for row, k in enumerate(mine):
        piece = pieces[k]
        if len(piece) == 0:  # fewer samples than shards: this shard adds nothing
            continue
        loss = (omega[piece] * problem.losses(train_idx[piece])).sum() / len(pick)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows[row, :-1] = pack_grads(grads, params, dtype=rows.dtype, device=rows.device)
        rows[row, -1] = loss.detach()
    full = dist.gather_rows(rows, num_shards) if dist is not None else rows  # [K, width], shard order
    total = full.sum(0)
    unpack_grads(params, total[:-1])
    return total[-1]


def reconstruct(problem: UnitProblem, train_idx: torch.Tensor, omega: torch.Tensor, config: GradientAlignedQuantizer,
                generator: torch.Generator, progress: bool = True, dist=None) -> list[float]:
    """Minimise the omega-weighted reconstruction loss plus AdaRound's regulariser; returns the loss curve.

    ``omega`` holds one weight per entry of ``train_idx``. With several processes, ``dist`` (see
    distributed.py) gives each process its share of every minibatch (``dist.shard``) and sums the
    gradients of the reconstruction term across processes (``dist.sum_grads``) before each step, so
    every process takes the same step as a single process would on the whole minibatch. With
    ``config.grad_shards`` set, the gradient is :func:`sharded_backward`'s fixed-order sum instead.
    """
    groups = problem.trainable_params(config)
    param_groups = [{"params": groups["rounding"], "lr": config.weight_lr}]
    # Adam moves a parameter by about lr per step whatever its scale, and activation steps range
    # from ~1/255 (softmax probabilities) to ~1: each step size gets a learning rate relative to
    # its initial value, so act_lr is the fraction it may move per step (an absolute rate drove
    # small steps through zero).
    for p in groups["steps"]:
        p.requires_grad_(True)
        param_groups.append({"params": [p], "lr": config.act_lr * max(float(p.detach().abs().mean()), 1e-8)})
    params = [p for g in param_groups for p in g["params"]]
    if not params or config.recon_iters == 0:
        return []
    opt = torch.optim.Adam(param_groups)
    omega = omega.to(problem.device)
    curve = []
    bar = tqdm(range(config.recon_iters), desc=f"reconstruct {problem.name}", disable=not progress, leave=False)
    for step in bar:
        pick = torch.randint(0, len(train_idx), (min(config.recon_batch_size, len(train_idx)),), generator=generator)
        opt.zero_grad(set_to_none=True)
        if config.grad_shards is not None:
            rec = sharded_backward(problem, pick, train_idx, omega, params, config.grad_shards, dist)
        else:
            local = dist.shard(pick) if dist is not None else pick
            # Sum over this process's share, divided by the whole minibatch: summed over processes
            # it is the minibatch mean.
            rec = (omega[local] * problem.losses(train_idx[local])).sum() / len(pick)
            rec.backward()
            if dist is not None:
                dist.sum_grads(params)
                rec = dist.sum_scalar(rec.detach())
        beta = beta_schedule(step, config.recon_iters, config)
        if beta is not None and groups["rounding"]:
            # The regulariser depends on theta alone: every process adds the same gradient.
            reg = sum(layer.weight_quantizer.regularizer(beta) for layer in problem.layers
                      if layer.weight_quantizer is not None and layer.weight_quantizer.alpha is not None)
            (config.round_reg_weight * reg).backward()
        if not torch.isfinite(rec):
            raise FloatingPointError(f"reconstruction loss of unit {problem.name} became {rec.item()} at step {step}")
        opt.step()
        curve.append(rec.item())
        if step % 20 == 0:
            bar.set_postfix(rec=f"{rec.item():.4g}")
    for p in groups["steps"]:
        p.requires_grad_(False)
    return curve


__all__ = ["UnitProblem", "init_quantizers", "reconstruct", "start_rounding", "harden", "per_sample_loss"]
