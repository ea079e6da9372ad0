"""Calibrate a wrapped model unit by unit: the data flow of DESIGN.md section 2.

For every reconstruction unit, in forward order: capture its FP output and its input inside
the partly quantized model, initialise its quantizers, learn sample weights (gradient-aligned
weighting), reconstruct, harden the rounding, and move on with the unit quantized.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import GradientAlignedQuantizer
from ..models.timestep_groups import groups_from_data, install_timestep_groups, sample_groups_of
from ..models.wrap import reconstruction_units, set_quant_state
from ..quant.quantizers import has_timestep_aware
from .capture import capture_all_outputs, capture_unit
from .data import CalibrationData
from .diagnostics import cosine_matrix, group_gradients, mean_per_step
from .reconstruction import UnitProblem, harden, init_quantizers, reconstruct, start_rounding
from .store import CaptureStore
from .weighting import learn_scores, num_scores, weights_of_samples

logger = logging.getLogger(__name__)


@dataclass
class UnitReport:
    """What happened to one reconstruction unit."""

    name: str
    seconds: float = 0.0
    meta_seconds: float = 0.0
    recon_seconds: float = 0.0  # the reconstruction loop alone (the part split between processes)
    loss_init: float = float("nan")  # training loss at round-to-nearest, before reconstruction
    loss_final: float = float("nan")
    val_loss_init: float = float("nan")
    val_loss_final: float = float("nan")
    omega: torch.Tensor | None = None  # weight of every training sample
    step_loss_init: torch.Tensor | None = None  # mean loss per calibration timestep
    step_loss_final: torch.Tensor | None = None
    conflict_before: torch.Tensor | None = None  # T x T cosine of group gradients, uniform weights
    conflict_after: torch.Tensor | None = None  # the same with the learned weights
    fallback: str | None = None


@dataclass
class CalibrationReport:
    units: list[UnitReport] = field(default_factory=list)
    train_timesteps: torch.Tensor | None = None  # model timestep of each training sample
    train_step_index: torch.Tensor | None = None
    data_seconds: float = 0.0
    calibration_seconds: float = 0.0
    data_digest: str | None = None  # CalibrationData.digest() of the set calibrated on

    def summary(self) -> dict:
        return {
            "data_seconds": round(self.data_seconds, 2),
            "calibration_seconds": round(self.calibration_seconds, 2),
            "data_digest": self.data_digest,
            "units": [
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in u.__dict__.items()
                 if not isinstance(v, torch.Tensor) and v is not None}
                for u in self.units
            ],
        }


# A reconstruction whose final training loss is non-finite or more than this many times the unit's
# round-to-nearest loss has diverged: the unit keeps round-to-nearest instead (docs/reliability.md).
DIVERGENCE_FACTOR = 10.0


@torch.no_grad()
def _fall_back_to_nearest(problem, act_steps: list[torch.Tensor]) -> None:
    """Undo a diverged reconstruction: weights rounded to nearest with the scales init_quantizers
    chose (reconstruction never changes them), activation step sizes back to their EMA values."""
    for layer in problem.layers:
        wq = layer.weight_quantizer
        if wq is not None:
            wq.alpha, wq.w_floor, wq.codes, wq.mode = None, None, None, "nearest"
            wq.harden(layer.layer.weight)
    for q, step in zip(problem.act_quantizers(), act_steps):
        q.scale.data.copy_(step)
        q.scale.requires_grad_(False)


def _split_groups(data: CalibrationData, idx: torch.Tensor) -> list[torch.Tensor]:
    return [idx[data.group[idx] == g] for g in range(data.num_groups)]


@dataclass
class CalibrationStart:
    """Where calibrate_model starts: unit 0 with zero scores for a fresh run; a resumed run's next
    unit and the sample scores it carried (checkpointing.ResumePoint extends this)."""

    next_unit: int = 0
    scores: torch.Tensor | None = None


# Called after every finished unit with (its index, the sample scores, the report so far): the
# checkpoint writer and the cross-process sync check.
UnitHook = Callable[[int, torch.Tensor, CalibrationReport], None]


@dataclass
class _RunPlan:
    """What stays fixed over one calibration run: the splits, the score layout, the switches."""

    config: GradientAlignedQuantizer
    data: CalibrationData
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    val_groups: list[torch.Tensor]
    train_groups: list[torch.Tensor]  # positions into train_idx, per timestep group
    score_index: torch.Tensor | None  # omega_granularity="timestep": the score of every training sample
    sample_groups: torch.Tensor | None  # timestep-aware activation quantizers: every sample's group
    batch_size: int
    device: torch.device
    progress: bool
    record_conflict: bool
    dist: object | None

    @property
    def gradient_aligned(self) -> bool:
        return self.config.method == "reconstruction" and self.config.weighting == "gradient_aligned"

    def evaluate(self, problem: UnitProblem):
        """Train / validation mean loss and per-timestep train loss, from one pass over the samples."""
        losses = problem.per_sample_losses(torch.arange(len(self.data)), self.batch_size)
        step_index = self.data.step_index
        per_step = mean_per_step(losses[self.train_idx], step_index[self.train_idx], int(step_index.max()) + 1)
        val = losses[self.val_idx].mean().item() if len(self.val_idx) else float("nan")
        return losses[self.train_idx].mean().item(), val, per_step


def calibrate_model(model: nn.Module, family, data: CalibrationData, config: GradientAlignedQuantizer, *,
                    units: list[tuple[str, nn.Module]] | None = None, progress: bool = True,
                    record_conflict: bool = False, dist=None, start: CalibrationStart | None = None,
                    hooks: Sequence[UnitHook] = ()) -> CalibrationReport:
    """Quantize ``model`` (already wrapped) in place, unit by unit. ``units``: its reconstruction
    units (models.wrap.reconstruction_units; listed here when not given); ``dist``: the process
    group of a multi-process run (distributed.Dist); ``start`` and ``hooks`` let callers resume and
    checkpoint."""
    units = units if units is not None else reconstruction_units(model, family)
    start = start or CalibrationStart()
    train_idx, val_idx = data.train_indices, data.val_indices
    report = CalibrationReport(train_timesteps=data.timesteps[train_idx].clone(),
                               train_step_index=data.step_index[train_idx].clone())
    # omega_granularity="timestep": one score per calibration timestep, indexed by each sample's step.
    score_index = data.step_index[train_idx].clone() if config.omega_granularity == "timestep" else None
    n_scores = num_scores(config, len(train_idx), int(data.step_index.max()) + 1)
    scores = torch.zeros(n_scores) if start.scores is None else start.scores
    if len(scores) != n_scores:
        raise ValueError(f"the resumed run carries {len(scores)} sample scores but this configuration learns "
                         f"{n_scores} (omega_granularity={config.omega_granularity!r}); resume with the run's "
                         "own configuration")
    started = time.perf_counter()
    # Timestep-aware activation quantizers: the model's forward (captures) picks each sample's group
    # from its timestep; units called alone get the groups of their samples.
    sample_groups = None
    if has_timestep_aware(model):
        install_timestep_groups(model, groups_from_data(data, config.num_act_timestep_groups))
        sample_groups = sample_groups_of(data, config.num_act_timestep_groups)
    plan = _RunPlan(config, data, train_idx, val_idx, _split_groups(data, val_idx),
                    [torch.nonzero(data.group[train_idx] == g).flatten() for g in range(data.num_groups)],
                    score_index, sample_groups, max(config.recon_batch_size, config.calibration_batch_size),
                    next(model.parameters()).device, progress, record_conflict, dist)
    set_quant_state(model, weight=False, act=False)
    # The shared FP pass holds every unit's targets at once: a quarter of the capture budget at most.
    share = config.capture_memory_bytes
    cached_targets = capture_all_outputs(model, units[start.next_unit:], data, family, plan.batch_size, plan.device,
                                         max_bytes=2 * 2**30 if share is None else min(2 * 2**30, share // 4))
    bar = tqdm(units, desc=f"calibrating {config.tag}", disable=not progress)
    store = CaptureStore()
    try:
        for b, (name, unit) in enumerate(bar):
            if b < start.next_unit:
                continue
            t0 = time.perf_counter()
            # This unit's captures: in memory up to the budget, the rest on disk (store.py), deleted when
            # the next unit starts (or the loop ends, however it ends).
            store.close()
            store = CaptureStore(config.capture_memory_bytes)
            targets = cached_targets.pop(name) if cached_targets is not None else None
            problem = _capture_problem(plan, model, family, units, b, targets, store)
            rep, scores = _calibrate_unit(plan, problem, b, scores, t0)
            report.units.append(rep)
            bar.set_postfix(unit=name, loss=f"{rep.loss_final:.3g}")
            for hook in hooks:
                hook(b, scores, report)
    finally:
        store.close()
    set_quant_state(model, weight=True, act=config.quantizes_activations)
    report.calibration_seconds = time.perf_counter() - started
    return report


def _capture_problem(plan: _RunPlan, model, family, units, b: int, targets, store: CaptureStore) -> UnitProblem:
    """Unit b's problem: its FP target (the whole model in full precision) and its input (earlier
    units quantized, this one not yet)."""
    name, unit = units[b]
    set_quant_state(model, weight=False, act=False)
    if targets is None:
        targets = capture_unit(model, unit, plan.data, family, plan.batch_size, "output", device=plan.device,
                               store=store)
    for _, done in units[:b]:
        set_quant_state(done, weight=True, act=plan.config.quantizes_activations)
    inputs = capture_unit(model, unit, plan.data, family, plan.batch_size, "inputs", device=plan.device, store=store)
    return UnitProblem(name, unit, inputs, targets, plan.device, sample_groups=plan.sample_groups)


def _calibrate_unit(plan: _RunPlan, problem: UnitProblem, b: int, scores: torch.Tensor, t0: float):
    """Initialise, learn sample weights, reconstruct and harden one unit, keeping round-to-nearest
    where reconstruction did not help; returns its report (its seconds counted from ``t0``, before
    the captures) and the scores carried on."""
    config = plan.config
    rep = UnitReport(problem.name)
    init_quantizers(problem, plan.train_idx, config)
    act_steps = [q.scale.detach().clone() for q in problem.act_quantizers()]  # kept for a fallback
    rep.loss_init, rep.val_loss_init, rep.step_loss_init = plan.evaluate(problem)
    omega = torch.ones(len(plan.train_idx))
    if config.method == "reconstruction":
        start_rounding(problem)
        omega, scores = _weights_and_reconstruction(plan, problem, b, scores, rep)
    harden(problem)
    set_quant_state(problem.unit, weight=True, act=config.quantizes_activations)
    rep.omega = omega.clone()
    rep.loss_final, rep.val_loss_final, rep.step_loss_final = plan.evaluate(problem)
    scores = _keep_nearest_if_no_gain(plan, problem, rep, act_steps, scores)
    rep.seconds = time.perf_counter() - t0
    logger.info("%s: loss %.4g -> %.4g (val %.4g -> %.4g) in %.1fs", problem.name, rep.loss_init, rep.loss_final,
                rep.val_loss_init, rep.val_loss_final, rep.seconds)
    return rep, scores


def _weights_and_reconstruction(plan: _RunPlan, problem: UnitProblem, b: int, scores: torch.Tensor,
                                rep: UnitReport):
    """The meta steps (gradient-aligned weighting), then the weighted reconstruction; (omega, scores)."""
    config = plan.config
    omega = torch.ones(len(plan.train_idx))
    theta = [p for ps in problem.trainable_params(config).values() for p in ps]
    # theta is empty when nothing in the unit is trainable (e.g. only FP-weight layers, fixed act steps)
    if plan.gradient_aligned and config.meta_iters > 0 and theta:
        tm = time.perf_counter()
        init_scores = scores if config.carry_scores else torch.zeros(len(scores))
        gen = torch.Generator().manual_seed(config.seed * 1009 + 2 * b + 1)
        scores, _ = learn_scores(problem, init_scores, plan.train_idx, plan.val_groups, config, gen, plan.progress,
                                 grad_hook=plan.dist.broadcast_tensor if plan.dist else None,
                                 score_index=plan.score_index)
        scores = scores.cpu()
        omega = weights_of_samples(scores, config.tau, plan.score_index)
        rep.meta_seconds = time.perf_counter() - tm
    if plan.record_conflict and theta:
        groups = [plan.train_idx[g] for g in plan.train_groups]
        rep.conflict_before = cosine_matrix(group_gradients(problem, theta, groups))
        weights = [omega[g] for g in plan.train_groups]
        rep.conflict_after = cosine_matrix(group_gradients(problem, theta, groups, weights))
    gen = torch.Generator().manual_seed(config.seed * 1009 + 2 * b)
    tr = time.perf_counter()
    try:
        reconstruct(problem, plan.train_idx, omega, config, gen,
                    plan.progress and (plan.dist is None or plan.dist.is_main), dist=plan.dist)
    except FloatingPointError as err:  # non-finite loss: fall back below
        rep.fallback = f"round-to-nearest ({err})"
    rep.recon_seconds = time.perf_counter() - tr
    return omega, scores


def _keep_nearest_if_no_gain(plan: _RunPlan, problem: UnitProblem, rep: UnitReport, act_steps, scores):
    """Round-to-nearest instead of a reconstruction that diverged or did not lower the held-out loss
    (it only fitted the training samples: at 8 bits, where rounding is already near its best, this
    happens); returns the scores to carry on (zeros if they diverged)."""
    config = plan.config
    diverged = not math.isfinite(rep.loss_final) or rep.loss_final > DIVERGENCE_FACTOR * rep.loss_init
    no_gain = (config.keep_rtn_if_no_gain and math.isfinite(rep.val_loss_init)
               and rep.val_loss_final >= rep.val_loss_init)
    if config.method != "reconstruction" or not (rep.fallback or diverged or no_gain):
        return scores
    if no_gain and not (rep.fallback or diverged):
        rep.fallback = (f"round-to-nearest (held-out loss {rep.val_loss_final:.4g} after reconstruction vs "
                        f"{rep.val_loss_init:.4g} at round-to-nearest)")
    rep.fallback = rep.fallback or (f"round-to-nearest (reconstruction loss {rep.loss_final:.4g} vs "
                                    f"{rep.loss_init:.4g} at round-to-nearest)")
    _fall_back_to_nearest(problem, act_steps)
    rep.loss_final, rep.val_loss_final, rep.step_loss_final = plan.evaluate(problem)
    if not math.isfinite(rep.loss_final):
        raise FloatingPointError(f"unit {problem.name}: the loss is {rep.loss_final} even at round-to-nearest; "
                                 "check the model and the calibration data for NaN/Inf")
    if not torch.isfinite(scores).all():  # diverged sample weights must not reach the next unit
        scores = torch.zeros_like(scores)
    if no_gain and not diverged:
        logger.info("%s: kept %s", problem.name, rep.fallback)
    else:
        logger.warning("%s: reconstruction diverged, kept %s", problem.name, rep.fallback)
    return scores
