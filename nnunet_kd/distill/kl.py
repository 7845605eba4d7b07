"""Logit KD: T^2 KL(teacher || student) per deep-supervision output, weighted like nnU-Net's outputs (per-region
binary KL for region-based datasets), averaged over voxels or per ground-truth class (nnunet_kd.losses.kl)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nnunet_kd.distill.base import DistillationTerm, mean_over_teachers, register_term
from nnunet_kd.losses.kl import LogitKLLoss


@dataclass(frozen=True)
class KLSettings:
    temperature: float
    deep_supervision: bool     # every deep-supervision output (nnU-Net's weights) or the full resolution only
    mean_over_classes: bool    # F.kl_div(reduction='mean') semantics: also divide by the number of classes
    reduction: str             # 'voxel', 'class_balanced' or 'symmetric_balanced'


@register_term
class LogitKL(DistillationTerm):
    name = "kl"
    reads_mixture = True
    setting_keys = ("temperature", "kl_deep_supervision", "kl_mean_over_classes", "kl_reduction")

    @classmethod
    def parse_settings(cls, section: dict) -> KLSettings:
        return KLSettings(temperature=float(section["temperature"]), deep_supervision=section["kl_deep_supervision"],
                          mean_over_classes=section["kl_mean_over_classes"], reduction=section["kl_reduction"])

    def __init__(self, settings: KLSettings, context):
        super().__init__(settings, context)
        self.kl = LogitKLLoss(temperature=settings.temperature, region_based=context.region_based,
                              reduction=settings.reduction)

    def levels(self, step) -> list[int]:
        weights = self.context.deep_supervision_weights
        if self.settings.deep_supervision and weights is not None and len(step.student_outputs) > 1:
            # nnU-Net's DeepSupervisionWrapper skips the outputs it weights 0
            return [i for i, w in enumerate(weights[:len(step.student_outputs)]) if w != 0.0]
        return [0]

    def _divergence(self, step, teacher) -> "torch.Tensor":
        """KL of the student against one teacher's outputs (or the teachers' mixture) over the levels, weighted like
        nnU-Net's outputs; on the voxels a teacher may teach (step.kd_mask: the valid ones without a mixture)."""
        levels = self.levels(step)
        weights = self.context.deep_supervision_weights if levels != [0] else None
        values = [self.kl(step.student_outputs[i], teacher.logits(i, self.settings.temperature), step.kd_mask(i),
                          step.labels[i]) for i in levels]
        value = sum(weights[i] * v for i, v in zip(levels, values)) if weights is not None else values[0]
        if self.settings.mean_over_classes:
            value = value / step.student_outputs[0].shape[1]
        return value

    def forward(self, step) -> dict:
        if step.mixture is not None:  # one soft target: the teachers' per-voxel mixture
            return {self.name: self._divergence(step, step.mixture)}
        per_teacher = {name: {self.name: self._divergence(step, teacher)} for name, teacher in step.teachers.items()}
        return mean_over_teachers(self.name, per_teacher)
