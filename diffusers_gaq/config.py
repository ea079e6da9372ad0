"""``GradientAlignedQuantizer``: every knob of a quantization run, validated, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .config_files import read_config_fields, sorted_fields  # noqa: F401 - re-exported
from .files import atomic_write_text

# Precision tags live in precision.py, presets in presets.py; re-exported here, where users look for them.
from .precision import (  # noqa: F401
    ACT_BITS_RANGE,
    FP_TAG,
    PRECISION_FORMS,
    SAME_TAG,
    WEIGHT_BITS_RANGE,
    parse_precision,
    precision_tag,
    validate_precision_fields,
)
from .presets import BUDGETS  # noqa: F401

CONFIG_NAME = "quantization_config.json"

_CHOICES = {
    "weight_granularity": ("per_channel", "per_tensor"),
    "weight_init": ("mse", "minmax"),
    "timestep_schedule": ("uniform", "normal"),
    "method": ("reconstruction", "minmax"),
    "weighting": ("gradient_aligned", "uniform"),
    "act_range_init": ("ema", "ema_shuffled", "minmax", "percentile", "mse"),
    "gradient_matching": ("dot", "cosine"),
    "inner_step": ("absolute", "relative", "adam"),
    "omega_granularity": ("sample", "timestep"),
}


@dataclass
class GradientAlignedQuantizer:
    """Configuration of post-training quantization with gradient-aligned calibration.

    Bit widths
        weight_bits: 2-8. act_bits: 4-16, or None for weight-only quantization.
    Weights
        weight_granularity "per_channel" | "per_tensor"; weight_symmetric; weight_init "mse" | "minmax".
    Activations
        act_symmetric; act_range_init: how the initial range is observed over the calibration
        inputs: "ema" (EMA of per-batch min/max with act_ema_momentum, batches in timestep order),
        "ema_shuffled" (the same over shuffled batches), "minmax", "percentile" (0.01 / 99.99 %),
        "mse" (clipping range searched for the least squared quantization error);
        learn_act_scale (LSQ step sizes during reconstruction).
        timestep_aware_acts: fnmatch patterns of layers (or attention modules) whose input
        activation quantizers hold one step size per timestep group (TFMQ-DM); act_timestep_groups:
        how many groups of consecutive calibration timesteps (None: one per calibration timestep).
    Model
        split_shortcut (separate quantizers for the two halves of skip concatenations);
        quantize_attention (q, k, v and softmax probabilities); keep_fp (fnmatch patterns of
        module names kept in full precision, e.g. "conv_out" or "time_embedding.*").
    Per-layer precision
        layer_precision: {fnmatch pattern: tag}, tags "w8a8", "w4a16", "w8" (activation FP),
        "a8" (weight FP) or "fp" (not wrapped, like keep_fp); the FIRST matching pattern wins, so
        put specific patterns before general ones. A pattern naming an attention module sets its
        matmuls' bits ("fp": not quantized). Every pattern must match a layer of the model.
        first_last_precision: the tag of the family's first and last layers (UNets: conv_in,
        conv_out; DiT: the patch embedding and the output projection), "fp" by default, "same"
        for none. Precedence: keep_fp > layer_precision > first_last_precision > weight_bits /
        act_bits. A tag with activations applies even when act_bits is None (weight-only).
        average_weight_bits: a budget of bits per quantized weight in [weight_bits, 8] (None: off);
        quantize_pipeline measures per-layer weight sensitivity and raises the layers with the most
        damage per added bit to 8 bits (mixed_precision.py), writing them as exact layer_precision
        entries listed in allocated_layers. Explicit entries win and count toward the budget.
    Calibration data
        num_inference_steps of the DDIM trajectories; num_calibration_timesteps (S) kept per
        trajectory; samples_per_timestep (n); timestep_schedule "uniform" (fixed intervals) or
        "normal" (PTQ4DM); calibration_batch_size for sampling the trajectories.
    Reconstruction
        method "reconstruction" (AdaRound + LSQ, block by block) | "minmax" (round-to-nearest);
        recon_iters, recon_batch_size, weight_lr (AdaRound V), act_lr (step sizes; relative: the
        fraction of its initial value a step size may move per Adam step),
        round_reg_weight (lambda), round_warmup (fraction without regulariser), beta_start/beta_end;
        grad_shards (None: every process sums its share of a minibatch and the shares are all-reduced,
        the fastest; K: every minibatch gradient is the fixed-order sum of K shard gradients,
        whichever process computed each, so 1..K processes give bit-identical results);
        keep_rtn_if_no_gain (a unit keeps round-to-nearest when reconstruction did not lower its
        loss on the held-out validation samples).
    Sample weights (the paper's Algorithms 1-2)
        weighting "uniform" | "gradient_aligned" (default: uniform. Gradient-aligned weights did
        not measure better than uniform ones on the reference pipeline, paired over 5 seeds, and
        cost more: docs/benchmarks.md, "Verdict (issue 13)"; weighting="gradient_aligned" turns the
        paper's method on); val_fraction held out per timestep; num_groups
        (T, consecutive timestep groups); tau (softmax temperature); meta_iters, meta_batch_size,
        inner_lr (eta of the virtual step), meta_lr (Adam on the scores); carry_scores (whether
        scores carry over from block to block).
        Variants of the meta objective (calibration/weighting.py; the paper's form is "dot",
        "absolute", "sample"): gradient_matching "dot" (raw dot products of the groups' surrogate
        gradients G_t) | "cosine" (cosines of the G_t, validation losses relative to their value
        before the virtual step: neither inner_lr nor the loss scale decides whether alignment
        matters); inner_step "absolute" (eta = inner_lr) | "relative" (each tensor's virtual step is
        inner_lr times its norm; inner_lr <= 1) | "adam" (as long as the reconstruction optimiser's
        first step; inner_lr unused); omega_granularity "sample" (N weights) | "timestep" (one weight
        per calibration timestep, shared by its samples).

    Memory
        max_calibration_memory_gib: what calibration may hold beyond the model itself, in GiB (None:
        no bound). Half of it is for the captured inputs and FP targets of the unit being calibrated
        (the whole calibration set; beyond that they go to a disk-backed store in a temporary folder
        and are read back per minibatch); a sixteenth is the working set of one chunk of a quantized
        attention map (computed a chunk of (sample, head) slices at a time under activation
        checkpointing). Neither changes a single bit of the result. The default, 16, leaves room on a
        24 GB device for Stable Diffusion 1.5's UNet at minibatch 8. (The meta step's passes run a
        chunk of samples at a time sized from the unit's shapes alone, calibration.meta_gradient, so
        that its float order, and the result, do not depend on this budget either.)
    Run
        seed; device (None: cuda when available, else cpu).
    """

    # What diffusers reads from a `quantization_config=` argument to find the backend; diffusers-gaq's
    # backend then refuses quantize-on-load with a message that says what to call (diffusers_registry).
    quant_method: ClassVar[str] = "diffusers_gaq"

    weight_bits: int = 4
    act_bits: int | None = 8
    weight_granularity: str = "per_channel"
    weight_symmetric: bool = False
    weight_init: str = "mse"
    act_symmetric: bool = False
    act_ema_momentum: float = 0.95
    # Percentiles over every calibration timestep alike (docs/benchmarks.md: an EMA over batches in timestep
    # order weights the first timestep most and cost 8 dB at W8A8).
    act_range_init: str = "percentile"
    learn_act_scale: bool = True
    timestep_aware_acts: tuple[str, ...] = ()
    act_timestep_groups: int | None = None
    split_shortcut: bool = True
    quantize_attention: bool = True
    keep_fp: tuple[str, ...] = ()
    layer_precision: dict[str, str] = field(default_factory=dict)
    first_last_precision: str = FP_TAG
    average_weight_bits: float | None = None
    allocated_layers: tuple[str, ...] = ()  # written by quantize_pipeline: the layers the budget raised

    num_inference_steps: int = 50
    num_calibration_timesteps: int = 10
    samples_per_timestep: int = 32
    timestep_schedule: str = "uniform"
    calibration_batch_size: int = 64

    method: str = "reconstruction"
    recon_iters: int = 200
    recon_batch_size: int = 32
    # Adam moves AdaRound's V by about weight_lr per step and V must reach about +-2.4 to harden, so
    # short runs need large rates (the presets in BUDGETS scale it with recon_iters).
    weight_lr: float = 5e-2
    act_lr: float = 1e-3
    round_reg_weight: float = 0.01
    round_warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    grad_shards: int | None = None
    # Keep round-to-nearest for a unit whose held-out loss reconstruction did not lower.
    keep_rtn_if_no_gain: bool = False

    # None: "gradient_aligned" with reconstruction, "uniform" with method="minmax" (nothing to weight).
    weighting: str | None = None
    val_fraction: float = 0.05
    num_groups: int = 5
    tau: float = 1.0
    # At most 0.3x the reconstruction's time at recon_iters=200: one meta iteration costs 11-17 reconstruction
    # iterations (docs/benchmarks.md, "Gradient-aligned variants (issue 13)").
    meta_iters: int = 3
    meta_batch_size: int = 32
    inner_lr: float = 1e-2
    meta_lr: float = 0.1
    carry_scores: bool = False
    # The paper's meta objective by default (docs/benchmarks.md, "Gradient-aligned variants (issue 13)").
    gradient_matching: str = "dot"
    inner_step: str = "absolute"
    omega_granularity: str = "sample"

    # model families (issue #8)
    # Class-conditional models (class-conditional UNet2DModel, DiT): labels of the calibration
    # trajectories, trajectory j taking class_labels[j % len]; empty: spread evenly over every class.
    class_labels: tuple[int, ...] = ()
    # Text-conditional models (Stable Diffusion): prompts of the calibration trajectories, trajectory j
    # taking calibration_prompts[j % len]; empty: a small built-in list (models/unet2d_condition.py).
    calibration_prompts: tuple[str, ...] = ()
    # Classifier-free guidance of the calibration trajectories (DiT, Stable Diffusion): None takes the
    # pipeline's default (4.0 DiT, 7.5 SD); <= 1 turns guidance off (conditional inputs only).
    guidance_scale: float | None = None

    max_calibration_memory_gib: float | None = 16.0

    seed: int = 0
    device: str | None = None

    def __setattr__(self, name, value):
        # A pattern list given as one string is that one pattern, not its characters, also when set later.
        if name in ("keep_fp", "timestep_aware_acts") and isinstance(value, (str, list)):
            value = (value,) if isinstance(value, str) else tuple(value)
        object.__setattr__(self, name, value)

    def __post_init__(self):
        if self.weighting is None:
            self.weighting = "uniform"
        if isinstance(self.allocated_layers, list):  # JSON gives lists back
            self.allocated_layers = tuple(self.allocated_layers)
        if isinstance(self.layer_precision, Mapping):
            self.layer_precision = dict(self.layer_precision)
        self._normalise_family_fields()
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def _fail(self, name: str, allowed: str):
        raise ValueError(f"GradientAlignedQuantizer.{name}={getattr(self, name)!r} is invalid: expected {allowed}")

    def _int(self, name: str, lo: int, hi: int | None = None, none_ok: bool = False):
        v = getattr(self, name)
        if v is None and none_ok:
            return
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        if not ok:
            self._fail(name, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]" + (" or None" if none_ok else ""))

    def _float(self, name: str, lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
        v = getattr(self, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
            self._fail(name, f"a finite number in {lb}{lo}, {hi if hi is not None else 'inf'}{rb}")

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the allowed range."""
        self._int("weight_bits", 2, 8)
        self._int("act_bits", 4, 16, none_ok=True)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                self._fail(name, "one of " + ", ".join(repr(c) for c in choices))
        for name in ("weight_symmetric", "act_symmetric", "learn_act_scale", "split_shortcut",
                     "quantize_attention", "carry_scores", "keep_rtn_if_no_gain"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "True or False")
        if not isinstance(self.keep_fp, tuple) or not all(isinstance(p, str) and p for p in self.keep_fp):
            self._fail("keep_fp", "a list of non-empty module-name patterns")
        validate_precision_fields(self)
        self._float("act_ema_momentum", 0.0, 1.0, hi_open=True)
        if not isinstance(self.timestep_aware_acts, tuple) or not all(isinstance(p, str) and p
                                                                      for p in self.timestep_aware_acts):
            self._fail("timestep_aware_acts", "a list of non-empty module-name patterns")

        self._int("num_inference_steps", 2, 10_000)
        self._int("num_calibration_timesteps", 1, self.num_inference_steps)
        self._int("act_timestep_groups", 1, self.num_calibration_timesteps, none_ok=True)
        self._int("samples_per_timestep", 1)
        self._int("calibration_batch_size", 1)
        self._int("recon_iters", 0)
        self._int("recon_batch_size", 1)
        self._float("weight_lr", 0.0, lo_open=True)
        self._float("act_lr", 0.0)
        self._float("round_reg_weight", 0.0)
        self._float("round_warmup", 0.0, 1.0, hi_open=True)
        self._float("beta_start", 0.0, lo_open=True)
        self._float("beta_end", 0.0, lo_open=True)
        self._int("grad_shards", 1, self.recon_batch_size, none_ok=True)
        self._float("val_fraction", 0.0, 0.5, hi_open=True)
        self._int("num_groups", 1)
        if self.num_groups > self.num_calibration_timesteps:
            self._fail("num_groups", f"at most num_calibration_timesteps ({self.num_calibration_timesteps})")
        self._float("tau", 0.0, lo_open=True)
        self._int("meta_iters", 0)
        self._int("meta_batch_size", 1)
        self._float("inner_lr", 0.0)
        if self.inner_step == "relative" and self.inner_lr > 1:
            self._fail("inner_lr", "a fraction in [0, 1] with inner_step='relative' (the virtual step's length "
                       "relative to each tensor's norm)")
        self._float("meta_lr", 0.0)
        self._validate_family_fields()
        if self.max_calibration_memory_gib is not None:
            self._float("max_calibration_memory_gib", 0.0, lo_open=True)
        self._int("seed", 0, 2**32 - 1)
        if self.device is not None:
            if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
                self._fail("device", "None, 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.val_per_timestep >= self.samples_per_timestep:
            self._fail("val_fraction", f"small enough to leave training samples: {self.val_per_timestep} of "
                       f"samples_per_timestep={self.samples_per_timestep} would be held out per timestep")
        if self.val_fraction == 0 and self.weighting == "gradient_aligned" and self.meta_iters > 0:
            self._fail("val_fraction", "> 0 with weighting='gradient_aligned' (the meta step needs validation samples); "
                       "or set meta_iters=0 / weighting='uniform'")
        if self.weighting == "gradient_aligned" and self.method == "minmax":
            raise ValueError("weighting='gradient_aligned' needs method='reconstruction' "
                             "(min-max quantization has no calibration loss to weight); set weighting='uniform'")

    def _normalise_family_fields(self) -> None:
        # JSON gives lists back; a single string is one prompt, a single int one label.
        for name, scalar in (("class_labels", int), ("calibration_prompts", str)):
            value = getattr(self, name)
            if isinstance(value, scalar):
                value = (value,)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))

    def _validate_family_fields(self) -> None:
        labels = self.class_labels
        if not isinstance(labels, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                    for v in labels):
            self._fail("class_labels", "a list of non-negative integer class labels (empty: spread over all classes)")
        prompts = self.calibration_prompts
        if not isinstance(prompts, tuple) or not all(isinstance(p, str) and p.strip() for p in prompts):
            self._fail("calibration_prompts", "a list of non-empty prompt strings (empty: the built-in list)")
        if self.guidance_scale is not None:
            self._float("guidance_scale", 0.0)

    # ---- derived ----------------------------------------------------------------------------
    @property
    def val_per_timestep(self) -> int:
        """Validation samples held out per timestep (at least one when val_fraction > 0)."""
        if self.val_fraction == 0:
            return 0
        return max(1, round(self.val_fraction * self.samples_per_timestep))

    @property
    def num_act_timestep_groups(self) -> int:
        """Step sizes per timestep-aware activation quantizer."""
        return self.act_timestep_groups or self.num_calibration_timesteps

    @property
    def quantizes_activations(self) -> bool:
        """Whether any activation may be quantized: globally (act_bits), or by a per-layer tag."""
        tags = list(self.layer_precision.values())
        if self.first_last_precision != SAME_TAG:
            tags.append(self.first_last_precision)
        return self.act_bits is not None or any(parse_precision(t)[1] is not None for t in tags)

    @property
    def capture_memory_bytes(self) -> int | None:
        """Bytes of captured unit inputs and FP targets kept in memory before the disk-backed store."""
        if self.max_calibration_memory_gib is None:
            return None
        return int(self.max_calibration_memory_gib * 2**30) // 2

    @property
    def attention_chunk_bytes(self) -> int | None:
        """Working set of one chunk of a quantized attention map (QuantAttentionCore.max_chunk_bytes)."""
        if self.max_calibration_memory_gib is None:
            return None
        return int(self.max_calibration_memory_gib * 2**30) // 16

    @property
    def tag(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits if self.act_bits else 32}"

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_fp"] = list(self.keep_fp)
        d["allocated_layers"] = list(self.allocated_layers)
        d["timestep_aware_acts"] = list(self.timestep_aware_acts)
        d["layer_precision"] = dict(self.layer_precision)  # insertion order matters: first match wins
        d["quant_method"] = "gaq"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GradientAlignedQuantizer":
        data = dict(data)
        data.pop("quant_method", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GradientAlignedQuantizer field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(sorted_fields(self.to_dict()), indent=2) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json_string())

    @classmethod
    def from_budget(cls, name: str, **fields) -> "GradientAlignedQuantizer":
        """The config of the calibration budget ``name`` (BUDGETS: quick, tiny, demo, default, paper), with
        ``fields`` set on top (``from_budget("demo", weight_bits=4, act_bits=8)``)."""
        if name not in BUDGETS:
            raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
        return cls(**{**BUDGETS[name], **fields})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GradientAlignedQuantizer":
        """A config file: an object of fields, or a quantization_config.json (its ``"config"``)."""
        fields_ = read_config_fields(path)
        try:
            return cls.from_dict(fields_)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes) -> "GradientAlignedQuantizer":
        return dataclasses.replace(self, **changes)


__all__ = ["GradientAlignedQuantizer", "CONFIG_NAME", "parse_precision", "precision_tag", "sorted_fields"]
