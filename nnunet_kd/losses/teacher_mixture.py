"""Several teachers combined into one soft target per voxel: each teacher weighted by how well it explains the ground
truth there, and only teachers that did not train on the case (out-of-sample routing).

Weights, per voxel x and teacher k (K teachers, labels y):

* ``adaptive``: w_k(x) = softmax over the allowed teachers of -CE_k(x) / tau, CE_k(x) = -log p_k(y(x) | x) at
  temperature 1 (for regions: the sum over regions of the binary cross-entropy). A teacher that is confident and
  right at x dominates there; teachers equally good get equal weights; tau -> infinity gives the uniform mean.
* ``uniform``: 1 / (number of allowed teachers): the mean of the teachers' softened probabilities.
* ``logit_mean``: the same weights, applied to the teachers' logits instead of their probabilities: the student
  distils softmax(mean_k t_k / T), as Fast-nnUNet averages its fold teachers (our peer's recipe at its defaults).
  Not the same target as ``uniform``: where the teachers disagree, averaging logits gives the more confident
  teacher more say than averaging probabilities does.

``allowed`` (B, K) bool says which teacher may teach each batch item (False: the teacher trained on that case, so its
prediction there is memory, not a prediction). An item no teacher may teach gets weight 0 from every teacher and
``covered`` False: the terms leave it out.

The mixture the student distils is sum_k w_k p_k at the distillation temperature T (softmax of t_k / T; for regions
the sigmoids), returned as logits at T (T log p; T logit q for regions) like nnunet_kd.losses.label_map, so every
logit term uses it unchanged; with ``logit_mean`` it is sum_k w_k t_k, already logits. Pure torch, 2D and 3D, no
gradient (teachers are frozen).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nnunet_kd.losses.label_map import FLOOR, floored_region_logits

WEIGHTINGS = ("adaptive", "uniform", "logit_mean")


def _common_shape(teacher_logits: Sequence[torch.Tensor]) -> tuple:
    """The one shape (B, C, *sp) of every teacher's logits."""
    if not teacher_logits:
        raise ValueError("at least one teacher's logits are needed")
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(f"every teacher's logits must have one shape, got {sorted(shapes)}")
    return shapes.pop()


def _stack(teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    _common_shape(teacher_logits)
    return torch.stack([t.detach().float() for t in teacher_logits], 1)  # (B, K, C, *sp)


def teacher_cross_entropy(teacher_logits: Sequence[torch.Tensor], target: torch.Tensor,
                          region_based: bool = False, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K, *sp): each teacher's cross-entropy on the ground truth per voxel (label map (B, 1, *sp); for regions the
    binary regions (B, R, *sp), summed over regions). Where there is no ground truth to explain (a label outside
    [0, C), i.e. an ignore label, or ``valid`` (B, 1, *sp) False: regions have no ignore value, only the mask) every
    teacher's cross-entropy is 0, so no teacher is preferred (adaptive weights are uniform over the allowed
    teachers), also where a coarser stage averages the weights over an area."""
    logits = _stack(teacher_logits)
    if region_based:
        regions = target.float().unsqueeze(1).expand_as(logits)
        ce = F.binary_cross_entropy_with_logits(logits, regions, reduction="none").sum(2)
        known = None
    else:
        num_classes = logits.shape[2]
        labels = target.long()
        known = (labels >= 0) & (labels < num_classes)  # (B, 1, *sp)
        labels = torch.where(known, labels, torch.zeros_like(labels))
        log_p = F.log_softmax(logits, 2)  # (B, K, C, *sp)
        index = labels.unsqueeze(1).expand(-1, logits.shape[1], *labels.shape[1:])  # (B, K, 1, *sp)
        ce = -torch.gather(log_p, 2, index).squeeze(2)
    if valid is not None:
        known = valid.bool() if known is None else known & valid.bool()
    return ce if known is None else torch.where(known, ce, torch.zeros_like(ce))


def teacher_weights(teacher_logits: Sequence[torch.Tensor], target: torch.Tensor, weighting: str = "adaptive",
                    tau: float = 1.0, allowed: Optional[torch.Tensor] = None, region_based: bool = False,
                    valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (B, K, *sp) summing to 1 over the allowed teachers, covered (B, 1, *sp) bool); ``valid``: the
    voxels with ground truth (teacher_cross_entropy)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with torch.no_grad():
        if weighting == "adaptive":
            scores = -teacher_cross_entropy(teacher_logits, target, region_based, valid) / tau  # (B, K, *sp)
        else:  # uniform, logit_mean: equal scores, no cross-entropy (nor a copy of the logits) every step and level
            b, _, *spatial = _common_shape(teacher_logits)
            scores = torch.zeros((b, len(teacher_logits), *spatial), device=teacher_logits[0].device)
        b, k = scores.shape[:2]
        if allowed is None:
            allowed = torch.ones((b, k), dtype=torch.bool, device=scores.device)
        if tuple(allowed.shape) != (b, k):
            raise ValueError(f"allowed must be (batch, teachers) = {(b, k)}, got {tuple(allowed.shape)}")
        allowed_map = allowed.view(b, k, *([1] * (scores.dim() - 2))).expand_as(scores)
        scores = torch.where(allowed_map, scores, torch.full_like(scores, float("-inf")))
        covered = allowed.any(1).view(b, 1, *([1] * (scores.dim() - 2))).expand(b, 1, *scores.shape[2:])
        # an item no teacher may teach: softmax over -inf only is NaN; give it zeros instead
        weights = torch.softmax(torch.where(covered.expand_as(scores), scores, torch.zeros_like(scores)), 1)
        weights = torch.where(allowed_map, weights, torch.zeros_like(weights))
        return weights, covered


def mix_teacher_logits(teacher_logits: Sequence[torch.Tensor], weights: torch.Tensor, temperature: float,
                       region_based: bool = False, average_logits: bool = False) -> torch.Tensor:
    """(B, C, *sp) logits at ``temperature`` of sum_k w_k p_k, p_k the teacher's softened probabilities; with
    ``average_logits`` (weighting ``logit_mean``) the weighted sum of the teachers' logits themselves."""
    w = weights.unsqueeze(2)  # (B, K, 1, *sp)
    if average_logits:
        return (w * _stack(teacher_logits)).sum(1)
    logits = _stack(teacher_logits) / temperature
    if region_based:
        # q = sum_k w_k sigmoid(t_k) and 1 - q = sum_k w_k sigmoid(-t_k) (the weights sum to 1), each in log space
        # and floored at log FLOOR: logit(clamp(q, FLOOR, 1 - FLOOR)) was infinite for a confident teacher, as
        # 1 - 1e-8 rounds to 1 in float32 (and an item no teacher may teach, all weights 0, gets logit 0, finite)
        log_w = torch.log(w)
        log_q = torch.logsumexp(log_w + F.logsigmoid(logits), 1)
        log_outside = torch.logsumexp(log_w + F.logsigmoid(-logits), 1)
        return floored_region_logits(log_q, log_outside, temperature)
    p = (w * torch.softmax(logits, 2)).sum(1)
    return temperature * torch.log(p.clamp_min(FLOOR))


def weights_at(weights: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Teacher weights resampled to another resolution (area average when downsampling, so they still sum to 1;
    nearest-exact when upsampling)."""
    shape = tuple(int(s) for s in spatial_shape)
    if tuple(weights.shape[2:]) == shape:
        return weights
    smaller = all(s <= w for s, w in zip(shape, weights.shape[2:]))
    return F.interpolate(weights, size=shape, mode="area" if smaller else "nearest-exact")
