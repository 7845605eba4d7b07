"""Logit distillation: temperature-scaled Kullback-Leibler divergence KL(teacher || student) per voxel.

Hinton et al., "Distilling the knowledge in a neural network" (2015): soften both distributions with a
temperature T and multiply by T^2 so the soft-target gradient keeps the scale of the hard-label loss when T
changes. For nnU-Net's region-based datasets (overlapping regions, one sigmoid per region) the divergence is
the sum over regions of the binary KL between Bernoulli(sigmoid(t/T)) and Bernoulli(sigmoid(s/T)).

Shapes: logits (B, C, *spatial), 2D or 3D; mask (B, 1, *spatial) bool (False = ignore label / outside),
or None. Reduction: sum over classes (or regions), mean over valid voxels, i.e. the value is the
per-voxel KL divergence. The teacher is detached; the maths runs in float32 with autocast disabled.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_kd.losses._common import check_mask, float32_region, masked_voxel_mean


def softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * mean over valid voxels of sum_c p_t,c (log p_t,c - log p_s,c), with p = softmax(logits / T)."""
    _check_logits(student_logits, teacher_logits)
    mask = check_mask(mask, student_logits)
    with float32_region(student_logits.device):
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        per_voxel = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1, keepdim=True)
        return temperature ** 2 * masked_voxel_mean(per_voxel, mask)


def sigmoid_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * mean over valid voxels of sum_r KL(Bernoulli(q_t,r) || Bernoulli(q_s,r)), q = sigmoid(logits / T)."""
    _check_logits(student_logits, teacher_logits)
    mask = check_mask(mask, student_logits)
    with float32_region(student_logits.device):
        s = student_logits.float() / temperature
        t = teacher_logits.detach().float() / temperature
        q_t = torch.sigmoid(t)
        # log q = logsigmoid(x), log(1 - q) = logsigmoid(-x): stable for large |x|.
        per_region = q_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - q_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return temperature ** 2 * masked_voxel_mean(per_region.sum(1, keepdim=True), mask)


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.dim() not in (4, 5):
        raise ValueError(f"logits must be (B, C, X, Y) or (B, C, X, Y, Z), got {tuple(student_logits.shape)}")


class LogitKLLoss(nn.Module):
    """KL(teacher || student) on logits; softmax over classes, or per-region sigmoids when region_based."""

    def __init__(self, temperature: float = 3.0, region_based: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.region_based = region_based

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        kl = sigmoid_kl if self.region_based else softmax_kl
        return kl(student_logits, teacher_logits, self.temperature, mask)
