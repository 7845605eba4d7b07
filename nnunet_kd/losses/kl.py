"""Logit distillation: temperature-scaled Kullback-Leibler divergence KL(teacher || student) per voxel.

Hinton et al., "Distilling the knowledge in a neural network" (2015): soften both distributions with a
temperature T and multiply by T^2 so the soft-target gradient keeps the scale of the hard-label loss when T
changes. For nnU-Net's region-based datasets (overlapping regions, one sigmoid per region) the divergence is
the sum over regions of the binary KL between Bernoulli(sigmoid(t/T)) and Bernoulli(sigmoid(s/T)).

Shapes: logits (B, C, *spatial), 2D or 3D; mask (B, 1, *spatial) bool (False = ignore label / outside),
or None. The teacher is detached; the maths runs in float32 with autocast disabled.

Two reductions over voxels:
* ``voxel`` (Hinton's, and Fast-nnUNet's): the mean over valid voxels of the per-voxel divergence.
* ``class_balanced``: the mean over the voxels of each ground-truth class, then over the classes present in the
  batch (for regions: over the voxels inside and outside each region, summed over regions). In a prostate
  patch the gland is a few percent of the voxels, so the plain voxel mean is almost entirely background: it
  teaches the student the background first, exactly what the hard labels already do, and measured here it
  delayed the student's first foreground predictions well past those of a student without KD. Balancing by
  class gives the teacher's knowledge about the structures the same weight as nnU-Net's Dice loss gives
  them (cf. the class-aware weighting of ReCo-KD, Lan et al. 2026, and MSKD's per-region normalisation).
* ``symmetric_balanced``: the mean of two class-balanced means, one over the classes of the ground truth and one
  over the classes the student predicts (its argmax, no gradient; for regions: inside and outside its own
  sigmoid > 0.5). Balancing by the ground truth alone gives each of the student's false-positive voxels the
  tiny per-voxel weight of the background class while its false negatives get the weight of their structure,
  so the divergence pulls boundaries outward more than inward; balancing by the student's own prediction as
  well gives a false positive the weight of the structure it claims.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_kd.losses._common import check_mask, float32_region, masked_voxel_mean

REDUCTIONS = ("voxel", "class_balanced", "symmetric_balanced")


def softmax_kl_map(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """(B, 1, *sp): T^2 * sum_c p_t,c (log p_t,c - log p_s,c) per voxel, with p = softmax(logits / T)."""
    _check_logits(student_logits, teacher_logits)
    with float32_region(student_logits.device):
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        return temperature ** 2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1, keepdim=True)


def sigmoid_kl_map(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """(B, R, *sp): T^2 * KL(Bernoulli(q_t,r) || Bernoulli(q_s,r)) per voxel and region, q = sigmoid(logits / T)."""
    _check_logits(student_logits, teacher_logits)
    with float32_region(student_logits.device):
        s = student_logits.float() / temperature
        t = teacher_logits.detach().float() / temperature
        q_t = torch.sigmoid(t)
        # log q = logsigmoid(x), log(1 - q) = logsigmoid(-x): stable for large |x|.
        return temperature ** 2 * (q_t * (F.logsigmoid(t) - F.logsigmoid(s))
                                   + (1 - q_t) * (F.logsigmoid(-t) - F.logsigmoid(-s)))


def softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * mean over valid voxels of sum_c p_t,c (log p_t,c - log p_s,c), with p = softmax(logits / T)."""
    mask = check_mask(mask, student_logits)
    return masked_voxel_mean(softmax_kl_map(student_logits, teacher_logits, temperature), mask)


def sigmoid_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * mean over valid voxels of sum_r KL(Bernoulli(q_t,r) || Bernoulli(q_s,r)), q = sigmoid(logits / T)."""
    mask = check_mask(mask, student_logits)
    return masked_voxel_mean(sigmoid_kl_map(student_logits, teacher_logits, temperature).sum(1, keepdim=True), mask)


def class_balanced_mean(per_voxel: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of per_voxel (B, 1, *sp) over the valid voxels of each class of ``labels`` (B, 1, *sp), then over the
    classes present in the batch. Nothing is read back to the host (no GPU synchronisation)."""
    return (class_balanced_weights(labels, num_classes, mask, per_voxel.dtype) * per_voxel).sum()


def class_balanced_weights(labels: torch.Tensor, num_classes: int, mask: Optional[torch.Tensor] = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-voxel weights (B, 1, *sp) w, so that sum(w * x) is the class-balanced mean of any per-voxel x
    (class_balanced_mean): 1 / (count of the voxel's class * number of classes present) on valid voxels, 0 elsewhere."""
    labels = labels.long()
    valid = torch.ones_like(labels, dtype=dtype) if mask is None else mask.to(dtype)
    if mask is not None:
        labels = torch.where(mask, labels, torch.zeros_like(labels))
    counts = torch.zeros(num_classes, device=labels.device, dtype=dtype).scatter_add_(0, labels.reshape(-1),
                                                                                      valid.reshape(-1))
    present = (counts > 0).to(dtype).sum().clamp(min=1.0)
    return (1.0 / (counts.clamp(min=1.0) * present))[labels] * valid


class _WeightedSoftmaxKL(torch.autograd.Function):
    """T^2 * sum over voxels of weight * sum_c p_t,c (log p_t,c - log p_s,c), p = softmax(logits / T). Its gradient
    T * weight * (p_s - p_t) is formed in the forward from the softmaxes it already holds, and the backward only
    scales it: one autograd node instead of a graph through the log-softmax, the product and the reduction. The
    teacher's logits are not saved (they may be inference tensors)."""

    @staticmethod
    def forward(ctx, student, teacher, weights, temperature):
        log_p_s = F.log_softmax(student / temperature, dim=1)
        log_p_t = F.log_softmax(teacher / temperature, dim=1)
        p_t = log_p_t.exp()
        per_voxel = (p_t * (log_p_t - log_p_s)).sum(1, keepdim=True)
        value = temperature ** 2 * torch.dot(per_voxel.reshape(-1), weights.expand_as(per_voxel).reshape(-1))
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(log_p_s.exp_().sub_(p_t).mul_(weights * temperature))
        return value

    @staticmethod
    def backward(ctx, grad_value):
        (grad_student,) = ctx.saved_tensors
        return grad_student * grad_value, None, None, None


def weighted_softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """T^2 * sum over voxels of weights (B, 1, *sp) times the per-voxel KL of softmax_kl_map, as one autograd node."""
    _check_logits(student_logits, teacher_logits)
    with float32_region(student_logits.device):
        return _WeightedSoftmaxKL.apply(student_logits.float(), teacher_logits.detach().float(),
                                        weights.detach().float(), float(temperature))


def region_balanced_mean(per_region: torch.Tensor, regions: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """per_region (B, R, *sp) against binary regions (B, R, *sp): for each region, the mean of the means over its
    valid inside and outside voxels (each side that has voxels), summed over regions."""
    weights = torch.ones_like(per_region[:, :1]) if mask is None else mask.to(per_region.dtype)
    inside = regions.to(per_region.dtype) * weights
    outside = (1 - regions.to(per_region.dtype)) * weights
    dims = [0] + list(range(2, per_region.dim()))
    means, present = [], []
    for side in (inside, outside):
        count = side.sum(dims)
        means.append((side * per_region).sum(dims) / count.clamp(min=1.0))
        present.append((count > 0).to(per_region.dtype))
    per_region_value = (means[0] * present[0] + means[1] * present[1]) / (present[0] + present[1]).clamp(min=1.0)
    return per_region_value.sum()


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.dim() not in (4, 5):
        raise ValueError(f"logits must be (B, C, X, Y) or (B, C, X, Y, Z), got {tuple(student_logits.shape)}")


class LogitKLLoss(nn.Module):
    """KL(teacher || student) on logits; softmax over classes, or per-region sigmoids when region_based.

    ``reduction``: 'voxel' (mean over valid voxels), 'class_balanced' (mean per ground-truth class, then over
    the classes present; needs ``target``: the label map (B, 1, *sp), or the binary regions (B, R, *sp)) or
    'symmetric_balanced' (the mean of the class-balanced means by ``target`` and by the student's prediction)."""

    def __init__(self, temperature: float, region_based: bool = False, reduction: str = "voxel"):
        # No default temperature: the recipe presets (plans/*.json) are its only source.
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.temperature = float(temperature)
        self.region_based = region_based
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.reduction == "voxel":
            kl = sigmoid_kl if self.region_based else softmax_kl
            return kl(student_logits, teacher_logits, self.temperature, mask)
        if target is None:
            raise ValueError("the class-balanced KL needs the target (label map or regions)")
        mask = check_mask(mask, student_logits)
        symmetric = self.reduction == "symmetric_balanced"
        if self.region_based:
            per_region = sigmoid_kl_map(student_logits, teacher_logits, self.temperature)
            value = region_balanced_mean(per_region, target, mask)
            if symmetric:
                predicted = (student_logits.detach() > 0).to(target.dtype)
                value = 0.5 * (value + region_balanced_mean(per_region, predicted, mask))
            return value
        # the class-balanced means as per-voxel weights of one weighted sum (same value, one autograd node)
        num_classes = student_logits.shape[1]
        weights = class_balanced_weights(target, num_classes, mask)
        if symmetric:
            predicted = student_logits.detach().argmax(1, keepdim=True)
            weights = 0.5 * (weights + class_balanced_weights(predicted, num_classes, mask))
        return weighted_softmax_kl(student_logits, teacher_logits, weights, self.temperature)


def label_teacher_logits(labels: torch.Tensor, num_classes: int, temperature: float,
                         mask: Optional[torch.Tensor] = None, region_based: bool = False,
                         floor: float = 1e-6) -> torch.Tensor:
    """Logits of a "teacher" that is the ground truth: their tempered softmax (or per-region sigmoid) is the one-hot
    label up to ``floor``. Fed to the KL in place of a network's logits they turn the KD terms into a tempered,
    identically reduced cross-entropy on the labels: the label-teacher control, which isolates what the terms'
    re-weighting does without any teacher knowledge.

    labels: (B, 1, *sp) label map, or (B, R, *sp) binary regions when region_based; mask: (B, 1, *sp) bool or None
    (masked voxels get class 0, the KL masks them anyway). The floor keeps every log finite."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if region_based:
        return temperature * torch.logit(labels.float().clamp(floor, 1 - floor))
    labels = labels.long()
    if mask is not None:
        labels = torch.where(mask, labels, torch.zeros_like(labels))
    one_hot = torch.zeros((labels.shape[0], num_classes, *labels.shape[2:]), device=labels.device)
    one_hot.scatter_(1, labels, 1.0)
    return temperature * torch.log(one_hot.clamp_min(floor))
