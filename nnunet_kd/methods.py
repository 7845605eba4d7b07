"""The held-out protocol's methods and their recipe variants.

A *method* is a name of ``benchmarks/run_evidence.py --runs METHOD@WIDTH`` (``TRAINERS`` gives its nnU-Net trainer);
a *variant* of a KD method, ``METHOD:VARIANT``, is a named list of the student planner's ``--set KEY=VALUE`` overrides
defined in that method's sweep file (``benchmarks/sweeps/<method>.json``). Both the validation sweep
(``nnunet_kd.sweep``) and the held-out protocol (``nnunet_kd.evidence``) read sweep files, so they are read here,
below both.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Protocol method name -> nnU-Net trainer. "plain" is the baseline of every comparison at the same width.
TRAINERS = {
    "plain": "nnUNetTrainerBudget",
    "adaptive": "nnUNetTrainerKD_Adaptive",
    "logit": "nnUNetTrainerKD_Logit",
    "mskd": "nnUNetTrainerMSKD",
    "plain_seg_weight": "nnUNetTrainerKD_PlainSegWeight",
    "label_teacher": "nnUNetTrainerKD_LabelTeacher",
    "multiscale_contrastive": "nnUNetTrainerKD_MultiScaleContrastive",
    "multi_teacher": "nnUNetTrainerKD_MultiTeacher",
    # the peer at its defaults: Fast-nnUNet's logit KD from the mean logits of the teacher's cross-validation folds
    "logit_all_folds": "nnUNetTrainerKD_Logit",
}


# A recipe variant of a KD method under the held-out protocol, 'METHOD:VARIANT' (e.g.
# 'multiscale_contrastive:noContrastive'): the named --set overrides of that method's sweep file
# (<Protocol.sweeps_dir>/<METHOD>.json), the same ones its validation sweep (nnunet_kd.sweep) ran. Its plans name
# carries '_v<VARIANT>'; it is compared with everything its method is compared with, with the method's preset itself
# (what the variant changes) and with the variants its sweep file's "compare_with" names
# (nnunet_kd.evidence.report.compared_variants). Variant names are letters and digits only: they name plans files.
VARIANT_SEPARATOR = ":"
VARIANT_NAME = re.compile(r"^[A-Za-z0-9]+$")
# Methods without a recipe of their own to vary: the plain student; the peer at its defaults is defined by them.
NO_VARIANTS = ("plain", "logit_all_folds")


def method_and_variant(method: str) -> tuple[str, str | None]:
    """'multiscale_contrastive:noContrastive' -> ('multiscale_contrastive', 'noContrastive'); 'adaptive' -> ('adaptive',
    None)."""
    base, sep, variant = method.partition(VARIANT_SEPARATOR)
    return base, (variant if sep else None)


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the file and the fix."""


@dataclass(frozen=True)
class Sweep:
    file: str
    method: str
    baseline: str
    variants: dict  # name -> {"why": str, "set": [KEY=VALUE, ...], optional "compare_with": [variant, ...]}, in order
    base: tuple = ()  # KEY=VALUE applied to every variant first (the preset as it was when the sweep ran)

    def overrides(self, variant: str) -> list[str]:
        return list(self.base) + list(self.variants[variant]["set"])


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file: {"method", "baseline", "variants": {name: {"why", "set": [...]}}}."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"{path}: cannot read the sweep file ({e}).") from None
    method, baseline, variants = raw.get("method"), raw.get("baseline"), raw.get("variants")
    if method not in TRAINERS or method == "plain":
        raise SweepError(f"{path}: 'method' must be one of the KD methods {sorted(set(TRAINERS) - {'plain'})}, got "
                         f"{method!r}.")
    if not isinstance(variants, dict) or not variants:
        raise SweepError(f"{path}: 'variants' must be an object of named variants, each {{\"why\": ..., \"set\": "
                         f"[\"methods.{method}.weights.kl=0\", ...]}}.")
    for name, variant in variants.items():
        if not VARIANT_NAME.match(name):
            raise SweepError(f"{path}: variant name {name!r} must be letters and digits only (it names a plans file).")
        if not isinstance(variant, dict) or not isinstance(variant.get("set"), list) or not all(
                isinstance(a, str) and "=" in a for a in variant["set"]) or not isinstance(variant.get("why"), str):
            raise SweepError(f"{path}: variant {name!r} must be {{\"why\": \"...\", \"set\": [\"KEY=VALUE\", ...]}}.")
        also = variant.get("compare_with", [])
        if not isinstance(also, list) or not all(v in variants and v != name for v in also):
            raise SweepError(f"{path}: variant {name!r}: 'compare_with' must list other variants of this file "
                             f"{[v for v in variants if v != name]}, got {also!r}.")
    base = raw.get("base", [])
    if not isinstance(base, list) or not all(isinstance(a, str) and "=" in a for a in base):
        raise SweepError(f"{path}: 'base' must be a list of \"KEY=VALUE\" overrides applied to every variant.")
    if baseline not in variants:
        raise SweepError(f"{path}: 'baseline' must name one of the variants {list(variants)}, got {baseline!r}.")
    return Sweep(file=path, method=method, baseline=baseline, variants=dict(variants), base=tuple(base))
