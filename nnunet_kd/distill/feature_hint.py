"""Feature hints (FitNets): per tapped stage, MSE(1x1 adapter(student feature), teacher feature), summed over the
stages. One adapter per (teacher, stage), trained with the student, checkpointed, never exported."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nnunet_kd.distill.base import DistillationTerm, mean_over_teachers, register_term
from nnunet_kd.losses.feature import FeatureAdapter, adapted_feature_mse
from nnunet_kd.losses.teacher_mixture import weights_at


@dataclass(frozen=True)
class FeatureHintSettings:
    stages: tuple[str, ...]


def module_key(stage: str) -> str:
    """ModuleDict keys may not contain '.': 'encoder.5' -> 'encoder_5'."""
    return stage.replace(".", "_")


@register_term
class FeatureHint(DistillationTerm):
    name = "feature"
    setting_keys = ("feature_stages",)
    uses_features = True

    @classmethod
    def parse_settings(cls, section: dict) -> FeatureHintSettings:
        return FeatureHintSettings(stages=tuple(section["feature_stages"]))

    def __init__(self, settings: FeatureHintSettings, context):
        super().__init__(settings, context)
        self.adapters = nn.ModuleDict()  # teacher -> stage -> adapter

    def build_modules(self, student_shapes: dict, teacher_shapes: dict) -> None:
        self.adapters = nn.ModuleDict({
            teacher: nn.ModuleDict({module_key(stage): FeatureAdapter(student_shapes[stage][1], shapes[stage][1],
                                                                      self.context.dim)
                                    for stage in self.resolved_stages})
            for teacher, shapes in teacher_shapes.items()})

    def _hint(self, step, name: str, teacher) -> "torch.Tensor":
        """One teacher's hint summed over the stages; with the teachers' mixture each voxel is weighted by the
        teacher's share there (its weights at the stage's resolution), on the voxels a teacher may teach."""
        adapters, mask = self.adapters[name], step.kd_mask(0)
        value = 0.0
        for stage in self.resolved_stages:
            student = step.student_features[stage]
            weight = None if step.teacher_weights is None else weights_at(step.teacher_weights[name][0],
                                                                           student.shape[2:])
            # the teacher's feature as its pass left it (the adapted MSE saves no teacher tensor for backward)
            value = value + adapted_feature_mse(adapters[module_key(stage)], student,
                                                teacher.features.inference(stage), mask, weight)
        return value

    def forward(self, step) -> dict:
        values = {name: self._hint(step, name, teacher) for name, teacher in step.teachers.items()}
        if step.teacher_weights is None:  # each teacher's hint, averaged over the teachers
            return mean_over_teachers(self.name, {name: {self.name: v} for name, v in values.items()})
        # weighted per voxel by the mixture: summed (equal weights give the mean over teachers)
        return {self.name: sum(values.values()), **{f"{self.name}_{name}": v for name, v in values.items()}}
