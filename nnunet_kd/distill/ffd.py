"""MSKD Feature Filtering Distillation, summed over the recipe's mskd_stages (nnunet_kd.losses.mskd)."""
from __future__ import annotations

from dataclasses import dataclass

from nnunet_kd.distill.base import DistillationTerm, TermSettingsError, mean_over_teachers, register_term
from nnunet_kd.losses.mskd import FeatureFilteringDistillation, RegionStatistics, region_statistics, resize_labels


@dataclass(frozen=True)
class FFDSettings:
    stages: tuple[str, ...]
    boundary_width: int
    include_background: bool
    teacher_confidence: bool  # compare only where the teacher segments the voxel correctly


def shared_region_statistics(step, teacher: str, stage: str, num_classes: int) -> RegionStatistics:
    """The region statistics of one teacher's stage in this step, computed by whichever of FFD and RGD runs first
    and kept in the step for the other (both read the same prototypes and similarity maps). Out-of-sample routing
    leaves out the cases the teacher trained on (their regions have no voxels, so no nodes, pairs or bands)."""
    key = ("mskd_region_statistics", teacher, stage)
    if key not in step.cache:
        student = step.student_features[stage]
        labels = step.labels_at(student.shape[2:])[0]
        valid = step.teacher_mask_at(teacher, student.shape[2:])
        # the teacher pass's own tensor: no teacher quantity needs a gradient, so none is saved for backward
        step.cache[key] = region_statistics(student, step.teachers[teacher].features.inference(stage),
                                            resize_labels(labels, student.shape[2:]),
                                            num_classes, None if valid is None else resize_labels(valid.bool(),
                                                                                                  student.shape[2:]))
    return step.cache[key]


def refuse_regions(term: str, context) -> None:
    if context.region_based:
        raise TermSettingsError(
            f"MSKD's region prototypes need one label per voxel, but this dataset is region-based (overlapping "
            f"sigmoid outputs). Use nnUNetTrainerKD_Adaptive for it, or set the {term} weight to 0 in "
            f"{context.plans_file}.")


@register_term
class FeatureFiltering(DistillationTerm):
    name = "ffd"
    setting_keys = ("mskd_stages", "ffd_boundary_width", "ffd_include_background", "ffd_teacher_confidence")
    uses_features = True

    @classmethod
    def parse_settings(cls, section: dict) -> FFDSettings:
        return FFDSettings(stages=tuple(section["mskd_stages"]), boundary_width=int(section["ffd_boundary_width"]),
                           include_background=section["ffd_include_background"],
                           teacher_confidence=section["ffd_teacher_confidence"])

    def __init__(self, settings: FFDSettings, context):
        super().__init__(settings, context)
        refuse_regions(self.name, context)
        self.ffd = FeatureFilteringDistillation(context.num_classes, boundary_width=settings.boundary_width,
                                                include_background=settings.include_background)

    def forward(self, step) -> dict:
        per_teacher = {}
        for name, teacher in step.teachers.items():
            confident = None
            if self.settings.teacher_confidence:
                # Keep only voxels the teacher segments correctly: its mistakes are not worth imitating.
                confident = teacher.logits(0, 1.0).argmax(1, keepdim=True) == step.labels[0].long()
            value = 0
            for stage in self.resolved_stages:
                student = step.student_features[stage]
                labels = step.labels_at(student.shape[2:])[0]
                valid = step.teacher_mask_at(name, student.shape[2:])
                stats = shared_region_statistics(step, name, stage, self.context.num_classes)
                value = value + self.ffd(student, teacher.features.inference(stage), labels, valid, confident, stats)
            per_teacher[name] = {self.name: value}
        return mean_over_teachers(self.name, per_teacher)
