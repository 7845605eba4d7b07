"""Feature hints (FitNets): per tapped stage, MSE(1x1 adapter(student feature), teacher feature), summed over the
stages. One adapter per (teacher, stage), trained with the student, checkpointed, never exported."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nnunet_kd.distill.base import DistillationTerm, mean_over_teachers, register_term
from nnunet_kd.losses.feature import FeatureAdapter, feature_mse


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

    def forward(self, step) -> dict:
        per_teacher = {}
        for name, teacher in step.teachers.items():
            adapters = self.adapters[name]
            value = sum(feature_mse(adapters[module_key(stage)](step.student_features[stage]),
                                    teacher.features[stage], step.valid[0]) for stage in self.resolved_stages)
            per_teacher[name] = {self.name: value}
        return mean_over_teachers(self.name, per_teacher)
