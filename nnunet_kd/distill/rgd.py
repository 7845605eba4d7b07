"""MSKD Region Graph Distillation (nodes, edges, voxel-to-prototype), summed over the recipe's mskd_stages; the
node, edge and voxel parts are logged too (unweighted, summed over the stages)."""
from __future__ import annotations

from dataclasses import dataclass

from nnunet_kd.distill.base import DistillationTerm, mean_over_teachers, register_term
from nnunet_kd.distill.ffd import refuse_regions, shared_region_statistics
from nnunet_kd.losses.mskd import RegionGraphDistillation


@dataclass(frozen=True)
class RGDSettings:
    stages: tuple[str, ...]
    include_background: bool
    node_weight: float
    edge_weight: float
    voxel_weight: float


@register_term
class RegionGraph(DistillationTerm):
    name = "rgd"
    setting_keys = ("mskd_stages", "rgd_include_background", "rgd_node_weight", "rgd_edge_weight", "rgd_voxel_weight")
    parts = ("node", "edge", "voxel")
    uses_features = True

    @classmethod
    def parse_settings(cls, section: dict) -> RGDSettings:
        return RGDSettings(stages=tuple(section["mskd_stages"]), include_background=section["rgd_include_background"],
                           node_weight=float(section["rgd_node_weight"]), edge_weight=float(section["rgd_edge_weight"]),
                           voxel_weight=float(section["rgd_voxel_weight"]))

    def __init__(self, settings: RGDSettings, context):
        super().__init__(settings, context)
        refuse_regions(self.name, context)
        self.rgd = RegionGraphDistillation(context.num_classes, include_background=settings.include_background,
                                           node_weight=settings.node_weight, edge_weight=settings.edge_weight,
                                           voxel_weight=settings.voxel_weight)

    def forward(self, step) -> dict:
        per_teacher = {}
        for name, teacher in step.teachers.items():
            sums = {}
            for stage in self.resolved_stages:
                student = step.student_features[stage]
                labels = step.labels_at(student.shape[2:])[0]
                valid = step.teacher_mask_at(name, student.shape[2:])
                stats = shared_region_statistics(step, name, stage, self.context.num_classes)
                parts = self.rgd(student, teacher.features.inference(stage), labels, valid, stats)
                for part, key in (("total", self.name), *((p, f"{self.name}_{p}") for p in self.parts)):
                    sums[key] = sums[key] + parts[part] if key in sums else parts[part]
            per_teacher[name] = sums
        return mean_over_teachers(self.name, per_teacher)
