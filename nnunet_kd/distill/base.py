"""The term interface and the registry (models: mdistiller's one class per distiller returning a dict of named
losses; torchdistill's registry that builds terms from a config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

TERMS: dict[str, type["DistillationTerm"]] = {}


class TermSettingsError(ValueError):
    """A term's settings that cannot be used; the recipe turns it into a RecipeError naming the plans file."""


def register_term(cls: type["DistillationTerm"]) -> type["DistillationTerm"]:
    if cls.name in TERMS:
        raise ValueError(f"distillation term '{cls.name}' is registered twice ({TERMS[cls.name]} and {cls})")
    TERMS[cls.name] = cls
    return cls


def registered_terms() -> list[str]:
    """Term names in registration (= logging) order."""
    return list(TERMS)


def term_class(name: str) -> type["DistillationTerm"]:
    if name not in TERMS:
        raise KeyError(f"unknown distillation term '{name}' (registered: {registered_terms()})")
    return TERMS[name]


@dataclass(frozen=True)
class TermContext:
    """What a term needs to know about the run when it is built (once, at set-up)."""
    num_classes: int          # the student's output channels (nnU-Net's segmentation heads)
    region_based: bool
    dim: int                  # 2 or 3
    teachers: tuple[str, ...]  # names of the teachers whose outputs the step carries
    deep_supervision_weights: tuple[float, ...] | None  # nnU-Net's output weights, None without deep supervision
    plans_file: str           # named in every error


class DistillationTerm(nn.Module):
    """One distillation term. Subclasses set ``name`` and ``setting_keys``, implement ``parse_settings`` and
    ``forward``, and, if they train modules of their own, ``build_modules``.

    ``forward(step)`` returns a dict of named losses: the entry ``name`` enters the training loss (times the
    recipe's weight for the term); entries ``f"{name}_{part}"`` (listed in ``parts``) are logged only."""

    name: ClassVar[str]
    setting_keys: ClassVar[tuple[str, ...]] = ()  # keys of the method section this term reads
    parts: ClassVar[tuple[str, ...]] = ()         # logged sub-terms
    uses_teacher: ClassVar[bool] = True          # needs a teacher's outputs (a network or the label teacher)
    uses_features: ClassVar[bool] = False        # needs teacher features (not available from the label teacher)

    def __init__(self, settings: Any, context: TermContext):
        super().__init__()
        self.settings = settings
        self.context = context
        self.resolved_stages: list[str] = []  # canonical names of stages(), set once by the trainer at set-up

    @classmethod
    def parse_settings(cls, section: dict) -> Any:
        """Typed settings from the method's section (already type-checked against the preset). Raise
        TermSettingsError for a combination that cannot work."""
        return None

    def stages(self) -> list[str]:
        """Feature stages (as written in the recipe) this term taps, on the student and every teacher: its
        settings' ``stages``, if they have any."""
        return list(getattr(self.settings, "stages", ()))

    def build_modules(self, student_shapes: dict, teacher_shapes: dict[str, dict]) -> None:
        """Create trainable modules from the tapped shapes ({canonical stage: shape}); default: none."""

    # With the teachers' per-voxel mixture (recipe teacher_aggregation), a term that reads only the mixture has no
    # per-teacher share to log.
    reads_mixture: ClassVar[bool] = False

    @classmethod
    def log_names(cls, teachers: tuple[str, ...], mixture: bool = False) -> list[str]:
        """Every name forward() returns: the term, its parts, and with several teachers each teacher's share."""
        names = [cls.name] + [f"{cls.name}_{p}" for p in cls.parts]
        if len(teachers) > 1 and cls.uses_teacher and not (mixture and cls.reads_mixture):
            names += [f"{cls.name}_{t}" for t in teachers]
        return names

    def forward(self, step) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def mean_over_teachers(name: str, per_teacher: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several teachers: each named loss is averaged over the teachers, and each teacher's main loss is logged as
    ``f"{name}_{teacher}"``. One teacher: its losses as they are."""
    if len(per_teacher) == 1:
        return next(iter(per_teacher.values()))
    keys = next(iter(per_teacher.values())).keys()
    out = {k: sum(losses[k] for losses in per_teacher.values()) / len(per_teacher) for k in keys}
    out.update({f"{name}_{teacher}": losses[name] for teacher, losses in per_teacher.items()})
    return out
