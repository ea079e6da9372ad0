"""The sample weights and the gradient-matching term: omega = N * softmax(s / tau) and L_GM.

The definitions the meta objective (weighting.py) and its by-parts gradient (meta_gradient.py) share."""

from __future__ import annotations

import torch

# Norms below this are treated as zero (a group whose validation loss does not depend on omega).
TINY_NORM = 1e-30


def sample_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """omega = N * softmax(s / tau): positive, sums to N (N = len(scores))."""
    return len(scores) * torch.softmax(scores / tau, dim=0)


def weights_of_samples(scores: torch.Tensor, tau: float, score_index: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of every training sample: omega of its score. ``score_index[i]`` is the score of
    training sample i (its calibration timestep with omega_granularity="timestep"); None: one score
    per sample. With equally many samples per score the sample weights also sum to their count."""
    omega = sample_weights(scores, tau)
    return omega if score_index is None else omega[score_index.to(omega.device)]


def gradient_matching_loss(group_grads: list[torch.Tensor], form: str = "dot") -> torch.Tensor:
    """-2 / (T (T-1)) * sum_{t<k} G_t . G_k: raw dot products (``form="dot"``, the paper's) or
    cosines (``form="cosine"``); zero for a single group."""
    t = len(group_grads)
    if t < 2:
        return group_grads[0].new_zeros(())
    g = torch.stack(group_grads)  # [T, |B|]
    if form == "cosine":
        # sqrt of (|G|^2 + tiny): differentiable at G = 0, where the direction is undefined.
        g = g / (g.pow(2).sum(1, keepdim=True) + TINY_NORM).sqrt()
    elif form != "dot":
        raise ValueError(f"gradient matching form {form!r}: expected 'dot' or 'cosine'")
    gram = g @ g.T
    pairs = (gram.sum() - gram.diagonal().sum()) / 2
    return -2.0 / (t * (t - 1)) * pairs
