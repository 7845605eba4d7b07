"""Dense supervised contrastive distillation (multi-task multi-scale contrastive KD, arXiv 2406.03173), summed over
the recipe's ``contrastive_stages`` (nnunet_kd.losses.contrastive).

Per (teacher, stage): a trained projection head for the student's features and one for the teacher's (the teacher's
features are frozen, its head is not: it trains through the in-batch teacher keys), both L2-normalised, and a memory
queue of earlier teacher embeddings. Heads are trained with the student, checkpointed under ``kd_modules`` and never
exported. The queue is not checkpointed: a resumed run starts with an empty one and refills it within
``contrastive_queue_size / sampled voxels per step`` steps.

The class of a voxel is its label at the stage's resolution (nnU-Net's own deep-supervision target where one matches);
for a sample without labels (an unlabelled case) the trainer has already put the teacher's prediction there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nnunet_kd.distill.base import DistillationTerm, TermSettingsError, mean_over_teachers, register_term
from nnunet_kd.distill.feature_hint import module_key
from nnunet_kd.losses._common import resize_mask
from nnunet_kd.losses.contrastive import ProjectionHead, TeacherEmbeddingQueue, dense_contrastive_loss


@dataclass(frozen=True)
class ContrastiveSettings:
    stages: tuple[str, ...]
    temperature: float
    queue_size: int            # teacher embeddings kept per (teacher, stage); 0: in-batch keys only
    max_voxels_per_class: int  # sampled per image and class present, per stage and step
    embedding_dim: int         # output of both projection heads


@register_term
class DenseContrastive(DistillationTerm):
    name = "contrastive"
    setting_keys = ("contrastive_stages", "contrastive_temperature", "contrastive_queue_size",
                    "contrastive_max_voxels_per_class", "contrastive_embedding_dim")
    uses_features = True

    @classmethod
    def parse_settings(cls, section: dict) -> ContrastiveSettings:
        for key, least in (("contrastive_queue_size", 0), ("contrastive_max_voxels_per_class", 1),
                           ("contrastive_embedding_dim", 1)):
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TermSettingsError(f"{key} must be an integer >= {least}, got {value!r}.")
        settings = ContrastiveSettings(stages=tuple(section["contrastive_stages"]),
                                       temperature=float(section["contrastive_temperature"]),
                                       queue_size=int(section["contrastive_queue_size"]),
                                       max_voxels_per_class=int(section["contrastive_max_voxels_per_class"]),
                                       embedding_dim=int(section["contrastive_embedding_dim"]))
        for key, value in (("contrastive_temperature", settings.temperature),
                           ("contrastive_max_voxels_per_class", settings.max_voxels_per_class),
                           ("contrastive_embedding_dim", settings.embedding_dim)):
            if value <= 0:
                raise TermSettingsError(f"{key} must be > 0, got {value!r}.")
        return settings

    def __init__(self, settings: ContrastiveSettings, context):
        super().__init__(settings, context)
        if context.region_based:
            raise TermSettingsError(
                f"the contrastive term needs one class per voxel, but this dataset is region-based (overlapping "
                f"sigmoid outputs): set the contrastive weight to 0 in {context.plans_file}.")
        self.student_heads = nn.ModuleDict()  # teacher -> stage -> head
        self.teacher_heads = nn.ModuleDict()
        self.queues: dict = {}  # (teacher, stage) -> TeacherEmbeddingQueue; state, not parameters

    def build_modules(self, student_shapes: dict, teacher_shapes: dict) -> None:
        dim = self.settings.embedding_dim
        self.student_heads = nn.ModuleDict({
            teacher: nn.ModuleDict({module_key(s): ProjectionHead(student_shapes[s][1], dim)
                                    for s in self.resolved_stages}) for teacher in teacher_shapes})
        self.teacher_heads = nn.ModuleDict({
            teacher: nn.ModuleDict({module_key(s): ProjectionHead(shapes[s][1], dim) for s in self.resolved_stages})
            for teacher, shapes in teacher_shapes.items()})
        self.queues = {(teacher, s): TeacherEmbeddingQueue(self.settings.queue_size, dim)
                       for teacher in teacher_shapes for s in self.resolved_stages}

    def _one_teacher(self, step, name: str, teacher) -> torch.Tensor:
        value = 0.0
        for stage in self.resolved_stages:
            student = step.student_features[stage]
            labels, valid = step.labels_at(student.shape[2:])
            # ignore label, and out-of-sample routing: this teacher never on the cases it trained on
            mask = resize_mask(step.teacher_kd_mask(name, 0), student.shape[2:])
            if valid is not None:
                mask = valid if mask is None else mask & valid
            key = module_key(stage)
            value = value + dense_contrastive_loss(
                student, teacher.features[stage], labels, mask, max_per_class=self.settings.max_voxels_per_class,
                temperature=self.settings.temperature, queue=self.queues[(name, stage)],
                student_head=self.student_heads[name][key], teacher_head=self.teacher_heads[name][key])
        return value

    def forward(self, step) -> dict:
        per_teacher = {name: {self.name: self._one_teacher(step, name, teacher)}
                       for name, teacher in step.teachers.items()}
        return mean_over_teachers(self.name, per_teacher)
