"""What every term reads in one training step: the student's outputs and features, each teacher's outputs and
features, and the labels and valid-voxel masks at every resolution."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from nnunet_kd.losses._common import resize_mask
from nnunet_kd.losses.label_map import merge_teacher_logits
from nnunet_kd.losses.mskd import resize_labels


class TeacherFeatures(Mapping):
    """A teacher pass's tapped features by stage. The pass runs in inference mode, and an inference tensor cannot be
    saved for the student's backward pass, which a term that compares features in ordinary autograd ops may need: so
    reading a stage gives an ordinary copy, made once, on first read. ``inference(stage)`` gives the pass's own tensor,
    for terms whose backward saves no teacher tensor (the adapted MSE of the feature hints), which need no copy."""

    def __init__(self, features: Optional[dict] = None):
        self._features = dict(features or {})
        self._copies = {}

    def inference(self, stage: str) -> torch.Tensor:
        return self._features[stage]

    def __getitem__(self, stage: str) -> torch.Tensor:
        if stage not in self._copies:
            self._copies[stage] = self._features[stage].clone()
        return self._copies[stage]

    def __iter__(self):
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)


@dataclass
class TeacherOutputs:
    """One teacher's pass: deep-supervision outputs (highest resolution first) and tapped features by canonical
    stage name. ``label_map`` (teacher channel -> student channel, -1 none) merges its outputs onto the student's
    labels; None when the teacher predicts the student's labels."""
    name: str
    outputs: list
    features: TeacherFeatures = field(default_factory=TeacherFeatures)
    label_map: Optional[Sequence[int]] = None
    num_student_channels: int = 0
    region_based: bool = False

    def __post_init__(self):
        if not isinstance(self.features, TeacherFeatures):
            self.features = TeacherFeatures(self.features)

    def logits(self, level: int, temperature: float) -> torch.Tensor:
        """The output at deep-supervision level ``level``, on the student's labels, as logits at ``temperature``."""
        out = self.outputs[level]
        if self.label_map is None:
            return out
        return merge_teacher_logits(out, self.label_map, self.num_student_channels, temperature, self.region_based)


@dataclass
class DistillationStep:
    """``labels[i]`` / ``valid[i]``: nnU-Net's deep-supervision target at level i without the ignore channel, and
    its valid-voxel mask (None: no ignore label). Levels are highest resolution first, like the outputs."""
    student_outputs: list
    student_features: dict
    teachers: dict  # name -> TeacherOutputs, in recipe order
    labels: list
    valid: list
    # Several teachers combined per voxel (recipe teacher_aggregation other than terms_mean): the mixture the logit
    # terms distil, each teacher's weights per deep-supervision level (B, 1, *sp), and per level the voxels some
    # teacher may teach (False: every teacher trained on that case). None: each term averages over the teachers.
    mixture: Optional[TeacherOutputs] = None
    teacher_weights: Optional[dict] = None
    covered: Optional[list] = None
    routing: Optional[dict] = None  # name -> (B,) bool: may this teacher teach this case (out-of-sample routing)
    logged: dict = field(default_factory=dict)  # values logged per epoch that are no loss (each teacher's weight)
    cache: dict = field(default_factory=dict)   # what several terms compute alike, computed once (MSKD's regions)

    def kd_mask(self, level: int) -> Optional[torch.Tensor]:
        """Valid voxels at ``level`` that a teacher may teach."""
        valid = self.valid[level]
        if self.covered is None:
            return valid
        return self.covered[level] if valid is None else valid & self.covered[level]

    def teacher_kd_mask(self, name: str, level: int) -> Optional[torch.Tensor]:
        """kd_mask(level) without the cases that routing keeps teacher ``name`` from teaching: for a term that
        computes something per teacher (the mixture's weights already exclude it)."""
        return self._without_routed_cases(name, self.kd_mask(level), self.labels[level].shape[2:])

    def teacher_mask_at(self, name: str, spatial_shape) -> Optional[torch.Tensor]:
        """labels_at's valid mask without the cases that routing keeps teacher ``name`` from teaching (None: every
        voxel), for a term that compares one teacher's features at a stage's own resolution (MSKD's FFD and RGD)."""
        return self._without_routed_cases(name, self.labels_at(spatial_shape)[1], spatial_shape)

    def _without_routed_cases(self, name: str, mask: Optional[torch.Tensor], spatial_shape) -> Optional[torch.Tensor]:
        """``mask`` (B, 1, *spatial_shape) or None, less the batch items routing keeps teacher ``name`` from."""
        if self.routing is None:
            return mask
        shape = tuple(int(s) for s in spatial_shape)
        batch = self.routing[name].shape[0]
        allowed = self.routing[name].view(batch, *([1] * (len(shape) + 1))).expand(batch, 1, *shape)
        return allowed if mask is None else mask.bool() & allowed

    def labels_at(self, spatial_shape) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Labels and mask at ``spatial_shape``: nnU-Net's own deep-supervision target of that shape; resampled
        from the full resolution (nearest-exact, nnU-Net's rule) only when no level has it."""
        shape = tuple(int(s) for s in spatial_shape)
        for labels, valid in zip(self.labels, self.valid):
            if tuple(labels.shape[2:]) == shape:
                return labels, valid
        return resize_labels(self.labels[0], shape), resize_mask(self.valid[0], shape)
