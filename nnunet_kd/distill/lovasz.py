"""Lovasz-softmax (Lovasz-sigmoid per region) on the full-resolution output against the labels: a student term,
no teacher involved (nnunet_kd.losses.lovasz)."""
from __future__ import annotations

from nnunet_kd.distill.base import DistillationTerm, register_term
from nnunet_kd.losses.lovasz import LovaszSoftmaxLoss


@register_term
class Lovasz(DistillationTerm):
    name = "lovasz"
    uses_teacher = False

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.lovasz = LovaszSoftmaxLoss(region_based=context.region_based)

    def forward(self, step) -> dict:
        return {self.name: self.lovasz(step.student_outputs[0], step.labels[0], step.valid[0])}
