"""The distillation recipe: what a student plans file says about how its student is trained.

nnU-Net builds a trainer from (plans, configuration, fold, dataset.json) only, so everything a KD run
needs lives in the student plans under one key, ``plans["kd"][<configuration>]``:

    {
      "teacher":  {"model_folder": ..., "checkpoint": "checkpoint_final.pth", "fold": "same",
                   "allow_validation_overlap": false},
      "training": {"num_epochs": 1000, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50,
                   "seed": null},
      "methods":  {"adaptive": {...preset plans/adaptive.json...}, "logit": {...}, "mskd": {...}},
      "student":  {... what the planner derived, for the record ...}
    }

A trainer class names one method (``kd_method``) and reads that method's section; so one student plans
file serves every KD trainer and the plain-student baseline, and nnU-Net's results folder
(``<trainer>__<plans>__<configuration>``) keeps their runs apart. The plans copy nnU-Net writes next to
each run documents the model completely.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_kd.losses.kl import REDUCTIONS as KL_REDUCTIONS
from nnunet_kd.resources import recipes_dir

PLANS_KEY = "kd"
# nnU-Net's own defaults; the planner's --epochs / --iterations-per-epoch replace them.
# "seed": null keeps nnU-Net's behaviour (unseeded). An integer seeds python, numpy and torch before the network is
# built, so a plain and a KD student of the same plans start from the same weights and (with nnUNet_n_proc_DA=0)
# see the same augmented batches: the comparison then isolates the distillation terms.
DEFAULT_TRAINING = {"num_epochs": 1000, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50,
                    "seed": None}
# Optional training settings (absent: nnU-Net's behaviour). "training_cases": train on these cases of the fold's
# training split only (a subset teacher, nnUNetv2_kd_plan_subset_teachers); the validation cases stay the fold's.
# "labelled_fraction": train on a seeded fraction of the fold's training cases ("labelled_fraction_seed"), the same
# cases for a KD student and its plain baseline (a student with part of the labels, nnUNetv2_kd_plan_student
# --labelled-fraction).
# "unlabelled_images": extra images without labels (nnUNetv2_kd_plan_student --unlabelled-images), preprocessed into
# a folder of the dataset's nnUNet_preprocessed folder: {"source": <the images folder>, "folder": <that folder's name>,
# "cases": [<case identifiers>]}. Only methods with train_on_unlabelled use them (and the labelled fraction's rest).
# "reconstruction_weight": the weight of a multi-task teacher's reconstruction loss (nnunet_kd.multitask).
OPTIONAL_TRAINING = {"training_cases": None, "labelled_fraction": None, "labelled_fraction_seed": 0,
                     "unlabelled_images": None, "reconstruction_weight": None}
DEFAULT_TEACHER = {"model_folder": None, "checkpoint": "checkpoint_final.pth", "fold": "same",
                   "allow_validation_overlap": False}


# Recipe settings that take one of a few names.
# How several teachers are combined: "terms_mean" (each term computed per teacher, then averaged), or one soft target
# per voxel from the teachers' probabilities weighted "uniform"ly or "adaptive"ly, or from the mean of their logits
# ("logit_mean", Fast-nnUNet's fold ensemble) (nnunet_kd.losses.teacher_mixture).
TEACHER_AGGREGATIONS = ("terms_mean", "uniform", "adaptive", "logit_mean")
CHOICES = {"kl_reduction": KL_REDUCTIONS, "teacher_aggregation": TEACHER_AGGREGATIONS}
# Numbers that must be > 0 (a zero temperature divides the logits by 0); every other number is >= 0 (a weight of 0
# switches its term off). All must be finite: JSON's NaN / Infinity (which Python's json reads) are refused.
POSITIVE_KEYS = {"temperature", "teacher_aggregation_tau"}
# Numbers for which null is a setting of its own, whatever the preset holds (unlabelled_batch_share null: nnU-Net's
# draw in proportion to the number of cases; the preset's number is a share of each batch).
NULLABLE_KEYS = {"unlabelled_batch_share"}


class RecipeError(ValueError):
    """A student plans file whose KD recipe is missing or malformed. The message names the file and the fix."""


def available_methods() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.json"))


def load_preset(method: str) -> dict:
    path = recipes_dir() / f"{method}.json"
    if not path.is_file():
        raise RecipeError(f"Unknown distillation method '{method}'. Known methods: {available_methods()} "
                          f"(presets in {recipes_dir()}).")
    with open(path) as f:
        preset = json.load(f)
    preset.pop("description", None)
    return preset


def without_nulls(value):
    """A recipe (or plans) with every null setting removed, recursively: the parser reads an absent setting as null,
    so plans written before a preset gained a setting at null (its earlier behaviour) hold the same recipe as plans
    written after, and compare equal this way."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def default_recipe(teacher_model_folder: str | None) -> dict:
    """A complete recipe with every shipped method at its preset values."""
    return {
        "teacher": dict(DEFAULT_TEACHER, model_folder=teacher_model_folder),
        "training": dict(DEFAULT_TRAINING),
        "methods": {m: load_preset(m) for m in available_methods()},
    }


@dataclass(frozen=True)
class TeacherRecipe:
    model_folder: str
    checkpoint: str
    fold: str | int
    allow_validation_overlap: bool
    name: str = "teacher0"  # keys its modules (adapters) and its logged losses when there are several teachers
    # teacher label name -> student label name; None: the teacher predicts the student's labels
    label_map: dict | None = None

    def fold_for_student(self, student_fold: int | str) -> int | str:
        """'same' (default): the teacher fold that was trained on the student's training split."""
        return student_fold if self.fold == "same" else self.fold


@dataclass(frozen=True)
class Recipe:
    configuration: str
    method: str
    teachers: tuple  # TeacherRecipe, in recipe order; empty for a method without a teacher
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    seed: int | None
    settings: dict  # the method's section as written (with preset defaults): weights, temperature, stages, ...
    terms: dict = field(default_factory=dict)  # term name -> its typed settings, for the terms with weight > 0
    training_cases: tuple | None = None  # the subset of the fold's training cases to train on; None: all of them
    labelled_fraction: float | None = None  # or a seeded fraction of them (the same for every trainer of the plans)
    labelled_fraction_seed: int = 0
    # Fraction of training after which every distillation weight decays linearly, reaching 0 at the last epoch
    # (1.0: constant weights). The segmentation weight never decays.
    kd_anneal_start: float = 1.0
    # Soft targets and hints from the teacher's prediction averaged over the mirrorings nnU-Net's inference uses
    # (its test-time augmentation) instead of a single pass. Costs one extra teacher pass per mirroring.
    teacher_mirroring: bool = False
    teacher_aggregation: str = "terms_mean"
    teacher_aggregation_tau: float = 1.0  # the adaptive weights' temperature: softmax over teachers of -CE / tau
    # Out-of-sample routing: a teacher does not teach the cases it was trained on (their keys are in its record).
    teacher_routing: bool = False
    # The fold's training cases outside labelled_fraction and the plans' unlabelled images enter training with the
    # segmentation loss masked (the method's train_on_unlabelled); None: no unlabelled images in the plans.
    train_on_unlabelled: bool = False
    # The share of a batch's samples drawn, in expectation, from those unlabelled cases; None: in proportion to the
    # number of cases (nnU-Net's uniform draw over the training cases). With half the fold unlabelled, a proportional
    # draw leaves half of each batch to the segmentation loss, so the student sees half the labelled samples a plain
    # student of the same budget sees; a smaller share trades teacher-only samples for labelled ones.
    unlabelled_batch_share: float | None = None
    unlabelled_images: dict | None = None
    reconstruction_weight: float | None = None

    @property
    def teacher(self) -> TeacherRecipe | None:
        """The first teacher (the only one in a one-teacher recipe)."""
        return self.teachers[0] if self.teachers else None

    def weight(self, term: str) -> float:
        return float(self.settings.get("weights", {}).get(term, 0.0))

    def kd_weight_factor(self, epoch: int) -> float:
        """The factor on every distillation weight at ``epoch`` (0-based): 1 until ``kd_anneal_start`` of training,
        then linear down to 0 at the last epoch."""
        progress = epoch / max(1, self.num_epochs - 1)
        if progress <= self.kd_anneal_start:
            return 1.0
        return max(0.0, (1.0 - progress) / (1.0 - self.kd_anneal_start))


def _check_against_preset(section: Any, preset: dict, where: str, fix: str) -> None:
    """Unknown keys are typos (a silently ignored 'lovasz_weigth' would train the wrong model)."""
    if not isinstance(section, dict):
        raise RecipeError(f"{where} must be a JSON object, got {type(section).__name__}. {fix}")
    for key, value in section.items():
        if key not in preset:
            raise RecipeError(f"{where} has unknown key '{key}' (known: {sorted(preset)}). {fix}")
        expected = preset[key]
        if value is None and key in NULLABLE_KEYS:
            continue
        if isinstance(expected, dict):
            _check_against_preset(value, expected, f"{where}.{key}", fix)
        elif isinstance(expected, bool):
            if not isinstance(value, bool):
                raise RecipeError(f"{where}.{key} must be true or false, got {value!r}. {fix}")
        elif isinstance(expected, list):  # stage names, e.g. ["encoder.-1", "decoder.-1"]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise RecipeError(f"{where}.{key} must be a non-empty list of stage names such as {expected}, got "
                                  f"{value!r} (to switch a term off set its weight to 0 instead). {fix}")
        elif isinstance(expected, (int, float)):
            # The preset's type decides: an integer setting (a boundary width, an epoch count) takes integers only.
            integer = isinstance(expected, int)
            kind = ("an integer" if integer else "a finite number") + (" > 0" if key in POSITIVE_KEYS else " >= 0")
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or (integer and not isinstance(value, int))
                    or value < 0 or (key in POSITIVE_KEYS and value <= 0)):
                raise RecipeError(f"{where}.{key} must be {kind}, got {value!r}. {fix}")
        elif key in CHOICES and value not in CHOICES[key]:
            raise RecipeError(f"{where}.{key} must be one of {list(CHOICES[key])}, got {value!r}. {fix}")


def recipe_fix(plans_file: str) -> str:
    """The advice that ends every refusal of a student plans file's recipe."""
    return f"Write the student plans with nnUNetv2_kd_plan_student (or edit '{PLANS_KEY}' in {plans_file})."


def parse_recipe(plans: dict, configuration: str, method: str, plans_file: str) -> Recipe:
    """Read and validate ``plans['kd'][configuration]`` for one method. Raises RecipeError naming the file."""
    fix = recipe_fix(plans_file)
    all_recipes = plans.get(PLANS_KEY)
    if not isinstance(all_recipes, dict) or configuration not in all_recipes:
        raise RecipeError(
            f"{plans_file} has no distillation recipe for configuration '{configuration}' "
            f"(expected plans['{PLANS_KEY}']['{configuration}']). These are not student plans: "
            f"run nnUNetv2_kd_plan_student -d <dataset> -c {configuration} --teacher <teacher model folder> "
            f"-o <student plans name> and train with -p <student plans name>.")
    raw = all_recipes[configuration]
    known_top = {"teacher", "teachers", "training", "methods", "student"}
    for key in raw:
        if key not in known_top:
            raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration} has unknown key '{key}' "
                              f"(known: {sorted(known_top)}). {fix}")

    training = {**DEFAULT_TRAINING, **OPTIONAL_TRAINING, **raw.get("training", {})}
    _check_against_preset(raw.get("training", {}), {**DEFAULT_TRAINING, **OPTIONAL_TRAINING},
                          f"{plans_file}: {PLANS_KEY}.{configuration}.training", fix)
    cases = training["training_cases"]
    if cases is not None and (not isinstance(cases, list) or not cases or not all(isinstance(c, str) and c for c in cases)
                              or len(set(cases)) != len(cases)):
        raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration}.training.training_cases must be null or a "
                          f"non-empty list of distinct case identifiers, got {cases!r}. {fix}")
    fraction, fraction_seed = training["labelled_fraction"], training["labelled_fraction_seed"]
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not math.isfinite(fraction) or not 0 < fraction <= 1):
        raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration}.training.labelled_fraction must be null or a "
                          f"fraction in (0, 1], got {fraction!r}. {fix}")
    if fraction is not None and cases is not None:
        raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration}.training sets both training_cases and "
                          f"labelled_fraction: keep one. {fix}")
    for key in ("num_epochs", "num_iterations_per_epoch"):
        if not isinstance(training[key], int) or training[key] < 1:
            raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration}.training.{key} must be an integer >= 1, "
                              f"got {training[key]!r}. {fix}")
    unlabelled_images = _parse_unlabelled_images(training["unlabelled_images"],
                                                 f"{plans_file}: {PLANS_KEY}.{configuration}.training", fix)
    reconstruction_weight = training["reconstruction_weight"]
    if reconstruction_weight is not None and (isinstance(reconstruction_weight, bool)
                                              or not isinstance(reconstruction_weight, (int, float))
                                              or not math.isfinite(reconstruction_weight) or reconstruction_weight < 0):
        raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration}.training.reconstruction_weight must be null or "
                          f"a finite number >= 0, got {reconstruction_weight!r}. {fix}")
    seed = training["seed"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration}.training.seed must be null or an integer >= 0, "
                          f"got {seed!r}. {fix}")

    if method != "none":
        methods = raw.get("methods", {})
        if method not in methods:
            raise RecipeError(f"{plans_file}: {PLANS_KEY}.{configuration}.methods has no section '{method}' "
                              f"(has: {sorted(methods)}). Re-run nnUNetv2_kd_plan_student to write it. ")
        where = f"{plans_file}: {PLANS_KEY}.{configuration}.methods.{method}"
        preset = load_preset(method)
        _check_against_preset(methods[method], preset, where, fix)
        settings = copy.deepcopy(preset)
        for key, value in methods[method].items():
            if isinstance(value, dict):
                settings[key].update(value)
            else:
                settings[key] = value

        teachers = _parse_teachers(raw, plans_file, configuration, fix)
        terms = _parse_terms(settings, where, fix)
        anneal_start = float(settings.get("kd_anneal_start", 1.0))
        if anneal_start > 1.0:
            raise RecipeError(f"{where}.kd_anneal_start must be a fraction of training in [0, 1] (1: no annealing), "
                              f"got {anneal_start!r}. {fix}")
        mirroring = bool(settings.get("teacher_mirroring", False))
        aggregation = {"teacher_aggregation": settings.get("teacher_aggregation", "terms_mean"),
                       "teacher_aggregation_tau": float(settings.get("teacher_aggregation_tau", 1.0)),
                       "teacher_routing": bool(settings.get("teacher_routing", False))}
        if aggregation["teacher_routing"] and aggregation["teacher_aggregation"] == "terms_mean":
            # routing excludes a teacher from the per-voxel mixture; terms_mean has no mixture, and computing every
            # term per teacher on every case would let each teacher teach the cases it trained on while the plans
            # said otherwise
            raise RecipeError(f"{where}: teacher_routing applies to the teachers' per-voxel mixture "
                              f"(teacher_aggregation 'adaptive', 'uniform' or 'logit_mean'); with teacher_aggregation "
                              f"'terms_mean' every teacher teaches every case. Set teacher_aggregation to 'adaptive', "
                              f"'uniform' or 'logit_mean', "
                              f"or teacher_routing to false. {fix}")
        aggregation["train_on_unlabelled"] = bool(settings.get("train_on_unlabelled", False))
        share = settings.get("unlabelled_batch_share")
        if share is not None:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
                raise RecipeError(f"{where}: unlabelled_batch_share must be a number between 0 and 1 (exclusive: the "
                                  f"share of a batch's samples drawn from the unlabelled cases), or null to draw in "
                                  f"proportion to the number of cases; got {share!r}. {fix}")
            if not aggregation["train_on_unlabelled"]:
                raise RecipeError(f"{where}: unlabelled_batch_share {share} applies to the unlabelled cases of "
                                  f"train_on_unlabelled, which is false: set it to null, or train_on_unlabelled to "
                                  f"true. {fix}")
        aggregation["unlabelled_batch_share"] = None if share is None else float(share)
        if aggregation["train_on_unlabelled"]:
            label_only = [t for t in terms if not term_class_of(t).uses_teacher]
            if label_only:
                raise RecipeError(f"{where}: train_on_unlabelled feeds samples without labels, which the label-only "
                                  f"term(s) {label_only} cannot use: set their weights to 0, or train_on_unlabelled "
                                  f"to false. {fix}")
    else:
        settings, teachers, terms, anneal_start, mirroring, aggregation = {}, (), {}, 1.0, False, {}
    return Recipe(configuration=configuration, method=method, teachers=teachers, terms=terms,
                  kd_anneal_start=anneal_start, teacher_mirroring=mirroring, **aggregation,
                  num_epochs=training["num_epochs"], num_iterations_per_epoch=training["num_iterations_per_epoch"],
                  num_val_iterations_per_epoch=training["num_val_iterations_per_epoch"], seed=seed, settings=settings,
                  training_cases=tuple(cases) if cases is not None else None,
                  labelled_fraction=None if fraction is None else float(fraction),
                  labelled_fraction_seed=int(fraction_seed), unlabelled_images=unlabelled_images,
                  reconstruction_weight=None if reconstruction_weight is None else float(reconstruction_weight))


def term_class_of(name: str):
    from nnunet_kd.distill import term_class
    return term_class(name)


def _parse_unlabelled_images(entry, where: str, fix: str) -> dict | None:
    """{"source": str, "folder": str, "cases": [str, ...]} or None."""
    if entry is None:
        return None
    ok = (isinstance(entry, dict) and set(entry) == {"source", "folder", "cases"}
          and isinstance(entry["source"], str) and isinstance(entry["folder"], str) and entry["folder"]
          and "/" not in entry["folder"] and "\\" not in entry["folder"] and entry["folder"] not in (".", "..")
          and isinstance(entry["cases"], list) and entry["cases"]
          and all(isinstance(c, str) and c for c in entry["cases"]) and len(set(entry["cases"])) == len(entry["cases"]))
    if not ok:
        raise RecipeError(f"{where}.unlabelled_images must be null or {{\"source\": <images folder>, \"folder\": "
                          f"<folder name in the dataset's nnUNet_preprocessed folder>, \"cases\": [<distinct case "
                          f"identifiers>]}}, got {entry!r}. Write it with nnUNetv2_kd_plan_student "
                          f"--unlabelled-images. {fix}")
    return {"source": entry["source"], "folder": entry["folder"], "cases": tuple(entry["cases"])}


def _parse_teachers(raw: dict, plans_file: str, configuration: str, fix: str) -> tuple:
    """``teacher`` (one object, the form every planner so far wrote) or ``teachers`` (a list of them)."""
    where = f"{plans_file}: {PLANS_KEY}.{configuration}"
    if "teacher" in raw and "teachers" in raw:
        raise RecipeError(f"{where} has both 'teacher' and 'teachers': keep one (a list under 'teachers' for "
                          f"several teachers). {fix}")
    if "teachers" in raw:
        entries = raw["teachers"]
        if not isinstance(entries, list) or not entries:
            raise RecipeError(f"{where}.teachers must be a non-empty list of teacher objects, got {entries!r}. {fix}")
        places = [f"{where}.teachers[{i}]" for i in range(len(entries))]
    else:
        entries, places = [raw.get("teacher", {})], [f"{where}.teacher"]
    teachers = []
    for i, (entry, place) in enumerate(zip(entries, places)):
        checked = {k: v for k, v in entry.items() if k != "label_map"} if isinstance(entry, dict) else entry
        _check_against_preset(checked, {**DEFAULT_TEACHER, "model_folder": "", "fold": "", "name": ""}, place, fix)
        merged = dict(DEFAULT_TEACHER, **entry)
        if not merged["model_folder"]:
            raise RecipeError(f"{place}.model_folder is not set. Pass --teacher <nnUNet_results/DatasetXXX/"
                              f"Trainer__Plans__config> to nnUNetv2_kd_plan_student.")
        fold = merged["fold"]
        if not (fold in ("same", "all") or (isinstance(fold, int) and fold >= 0)):
            raise RecipeError(f"{place}.fold must be \"same\", \"all\" or a fold number, got {fold!r}. {fix}")
        name = merged.get("name") or f"teacher{i}"
        if not name.isidentifier():
            raise RecipeError(f"{place}.name must be a name of letters, digits and '_' (it keys the teacher's "
                              f"adapters and logged losses), got {name!r}. {fix}")
        label_map = merged.get("label_map") or None
        if label_map is not None and not isinstance(label_map, dict) or label_map and not all(isinstance(k, str) and isinstance(v, str) for k, v in label_map.items()):
            raise RecipeError(f"{place}.label_map must map teacher label names to student label names (strings, as "
                              f"in the two dataset.json files), got {label_map!r}. {fix}")
        teachers.append(TeacherRecipe(model_folder=str(merged["model_folder"]), checkpoint=str(merged["checkpoint"]),
                                      fold=fold, allow_validation_overlap=bool(merged["allow_validation_overlap"]),
                                      name=name, label_map=label_map))
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}.teachers: two teachers share a name ({names}); give each its own 'name'. {fix}")
    return tuple(teachers)


def _parse_terms(settings: dict, where: str, fix: str) -> dict:
    """The typed settings of every registered term the method switches on (weight > 0), parsed once."""
    from nnunet_kd.distill import registered_terms, term_class
    from nnunet_kd.distill.base import TermSettingsError
    weights = settings.get("weights", {})
    unknown = [t for t in weights if t != "segmentation" and t not in registered_terms()]
    if unknown:
        raise RecipeError(f"{where}.weights names unknown term(s) {unknown} (known: ['segmentation'] + "
                          f"{registered_terms()}). {fix}")
    terms = {}
    for name in registered_terms():
        if float(weights.get(name, 0.0)) <= 0:
            continue
        cls = term_class(name)
        missing = [k for k in cls.setting_keys if k not in settings]
        if missing:
            raise RecipeError(f"{where} switches on term '{name}' but has no {missing} (its settings). {fix}")
        try:
            terms[name] = cls.parse_settings(settings)
        except TermSettingsError as e:
            raise RecipeError(f"{where}: {e} {fix}") from e
    return terms


def plans_file_path(preprocessed_base: str | None, plans_name: str) -> str:
    """The student plans file a trainer was started with (the planner names the file after plans_name)."""
    return str(Path(preprocessed_base) / f"{plans_name}.json") if preprocessed_base else f"{plans_name}.json"
