"""``nnUNetv2_kd_plan_student``: write student plans derived from a trained teacher's plans.

The student keeps everything that defines the data (patch size, spacing, normalisation, axis order and the
``data_identifier`` of the preprocessed folder), so it trains on the teacher's preprocessed data as it is;
only the network shrinks. The distillation recipe is stored in the same plans file (nnunet_kd.recipe).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from os.path import abspath, isdir, isfile, join

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_kd.cost import format_count, network_cost
from nnunet_kd.recipe import (PLANS_KEY, RecipeError, available_methods, default_recipe, parse_recipe,
                              recipe_fix)
from nnunet_kd.resources import warn_ext_trainer
from nnunet_kd.teacher import TeacherModel, configuration_named_by

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
ARCHITECTURES = {"PlainConvUNet": PLAIN_UNET, "ResidualEncoderUNet": RESENC_UNET}
# nnU-Net's ResEnc presets use these residual blocks per encoder stage.
RESENC_DEFAULT_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)


class PlanningError(RuntimeError):
    pass


def scale_features(features_per_stage: list[int], width: float, min_features: int) -> list[int]:
    """Width multiplier with a floor: a 4-channel stage is too narrow to carry a segmentation decoder."""
    return [max(min(min_features, f), int(round(f * width))) for f in features_per_stage]


def derive_student_architecture(teacher_architecture: dict, width: float, min_features: int = 8,
                                n_conv_per_stage: int | None = None, n_conv_per_stage_decoder: int | None = None,
                                architecture: str | None = None) -> dict:
    """The student's ``architecture`` entry of a configuration, from the teacher's."""
    arch = copy.deepcopy(teacher_architecture)
    kwargs = arch["arch_kwargs"]
    n_stages = kwargs["n_stages"]
    kwargs["features_per_stage"] = scale_features(kwargs["features_per_stage"], width, min_features)

    target_class = ARCHITECTURES[architecture] if architecture else arch["network_class_name"]
    if target_class not in (PLAIN_UNET, RESENC_UNET):
        raise PlanningError(f"The teacher uses {arch['network_class_name']}; the planner derives students for "
                            f"{sorted(ARCHITECTURES)}. Pass --arch PlainConvUNet or --arch ResidualEncoderUNet.")
    if target_class != arch["network_class_name"]:
        # PlainConvUNet counts convolutions per stage, ResidualEncoderUNet residual blocks.
        kwargs.pop("n_conv_per_stage", None)
        kwargs.pop("n_blocks_per_stage", None)
        if target_class == RESENC_UNET:
            kwargs["n_blocks_per_stage"] = list(RESENC_DEFAULT_BLOCKS[:n_stages])
        else:
            kwargs["n_conv_per_stage"] = [2] * n_stages
        arch["network_class_name"] = target_class
    per_stage_key = "n_blocks_per_stage" if target_class == RESENC_UNET else "n_conv_per_stage"
    if n_conv_per_stage is not None:
        kwargs[per_stage_key] = [n_conv_per_stage] * n_stages
    if n_conv_per_stage_decoder is not None:
        kwargs["n_conv_per_stage_decoder"] = [n_conv_per_stage_decoder] * (n_stages - 1)
    return arch


def _resolved_configuration(plans: dict, configuration: str, where: str) -> dict:
    if configuration not in plans.get("configurations", {}):
        raise PlanningError(f"{where} has no configuration '{configuration}' "
                            f"(has: {sorted(plans.get('configurations', {}))}).")
    cfg = copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration)
    for key in ("inherits_from", "previous_stage", "next_stage"):
        cfg.pop(key, None)
    if "architecture" not in cfg:
        raise PlanningError(f"{where}: configuration '{configuration}' has no 'architecture' entry (nnU-Net < 2.4 "
                            f"plans). Re-plan the teacher with a current nnU-Net.")
    return cfg


def _check_preprocessed_data(preprocessed_base: str, teacher_cfg: dict, teacher_plans: dict) -> None:
    """The student trains on the preprocessed folder of the teacher's data_identifier: it must exist and have been
    made with the teacher's spacing and normalisation."""
    data_folder = join(preprocessed_base, teacher_cfg["data_identifier"])
    fix = (f"Run nnU-Net's preprocessing for the teacher's plans first: nnUNetv2_preprocess -d <dataset> "
           f"-plans_name {teacher_plans['plans_name']} -c <configuration>.")
    if not isdir(data_folder):
        raise PlanningError(f"Preprocessed data {data_folder} not found. {fix}")
    for name in sorted(os.listdir(preprocessed_base)):
        if not name.endswith(".json") or name in ("dataset.json", "dataset_fingerprint.json", "splits_final.json"):
            continue
        plans = load_json(join(preprocessed_base, name))
        if PLANS_KEY in plans or not isinstance(plans.get("configurations"), dict):
            continue
        for cname, cfg in plans["configurations"].items():
            if cfg.get("data_identifier") != teacher_cfg["data_identifier"]:
                continue
            cfg = PlansManager(plans).get_configuration(cname).configuration
            same = (cfg.get("spacing") == teacher_cfg["spacing"]
                    and cfg.get("normalization_schemes") == teacher_cfg["normalization_schemes"]
                    and plans.get("transpose_forward") == teacher_plans.get("transpose_forward"))
            if not same:
                raise PlanningError(
                    f"Preprocessing mismatch: {data_folder} was preprocessed by {join(preprocessed_base, name)} "
                    f"(configuration {cname}: spacing {cfg.get('spacing')}, normalisation "
                    f"{cfg.get('normalization_schemes')}), which differs from the teacher's (spacing "
                    f"{teacher_cfg['spacing']}, normalisation {teacher_cfg['normalization_schemes']}) although both "
                    f"name data_identifier '{teacher_cfg['data_identifier']}'. The teacher was not trained on these "
                    f"data, so the student would learn from a teacher that sees other inputs. Use the teacher model "
                    f"folder trained with {join(preprocessed_base, name)}, or give the teacher's plans their own "
                    f"data_identifier and preprocess them (nnUNetv2_preprocess -plans_name "
                    f"{teacher_plans['plans_name']}) so the existing data stay untouched.")
            return
    raise PlanningError(f"No plans file in {preprocessed_base} declares the data identifier "
                        f"'{teacher_cfg['data_identifier']}' of {data_folder}. {fix}")


def _check_plans_name(name: str) -> None:
    """-o is a plans *name*: nnU-Net writes <nnUNet_preprocessed>/<dataset>/<name>.json and names results folders
    after it, so a path or a file name would write the plans somewhere nnU-Net never looks (or outside the dataset)."""
    separators = {"/", "\\"} | {sep for sep in (os.sep, os.altsep) if sep}
    if not name or any(sep in name for sep in separators) or name.lower().endswith(".json") or name in (".", ".."):
        stem = os.path.basename(name.replace("\\", "/").rstrip("/"))
        stem = stem[:-5] if stem.lower().endswith(".json") else stem
        raise PlanningError(f"-o {name!r} is not a plans name: pass a bare name without folder or .json suffix "
                            f"(e.g. -o {stem or 'nnUNetPlans_kdstudent'}); the plans are always written to "
                            f"$nnUNet_preprocessed/<dataset>/<name>.json.")


def _check_own_student_plans(plans: dict, output_file: str, output_plans_name: str, dataset_name: str) -> None:
    """Only student plans this tool wrote for this dataset may be extended or (--overwrite) replaced: never nnU-Net's
    plans, a teacher's plans (whose 'kd' key holds only a training budget) or a copy that belongs elsewhere."""
    def refuse(reason: str):
        raise PlanningError(f"{output_file} exists and {reason}; it is not a student plans file written by "
                            f"nnUNetv2_kd_plan_student for {dataset_name}, so it is not overwritten (not even with "
                            f"--overwrite). Choose another -o.")
    if not isinstance(plans, dict) or not isinstance(plans.get(PLANS_KEY), dict) or not plans[PLANS_KEY]:
        refuse(f"has no '{PLANS_KEY}' recipe")
    if plans.get("plans_name") != output_plans_name:
        refuse(f"names itself plans_name {plans.get('plans_name')!r}, not {output_plans_name!r}")
    if plans.get("dataset_name") != dataset_name:
        refuse(f"belongs to dataset {plans.get('dataset_name')!r}")
    for cname, recipe in plans[PLANS_KEY].items():
        if not (isinstance(recipe, dict) and isinstance(recipe.get("teacher", recipe.get("teachers")), (dict, list))
                and "student" in recipe
                and "methods" in recipe):
            refuse(f"has a '{PLANS_KEY}.{cname}' entry without the teacher/methods/student sections the planner "
                   f"writes (a teacher's budget plans, or plans from another tool)")
    if not isinstance(plans.get("configurations"), dict):
        refuse("has no 'configurations'")


def parse_override(assignment: str) -> tuple[str, object]:
    """'methods.adaptive.weights.kl=0.5' -> ('methods.adaptive.weights.kl', 0.5): the value parsed as JSON, else kept
    as a string (how --set reads it)."""
    if "=" not in assignment:
        raise PlanningError(f"--set expects KEY=VALUE, got '{assignment}'.")
    path, value = assignment.split("=", 1)
    try:
        return path, json.loads(value)
    except json.JSONDecodeError:
        return path, value


# What setting_at returns for a path the recipe does not hold (None is a setting's value: a preset's "not set").
MISSING = object()


def setting_at(recipe: dict, path: str):
    """The value at a dotted recipe path ('methods.adaptive.weights.kl'), or MISSING where a key on the way is absent
    or is not a section."""
    node = recipe
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return MISSING
        node = node[key]
    return node


def apply_override(recipe: dict, assignment: str) -> None:
    """--set methods.adaptive.weights.kl=0.5 (value parsed as JSON, else kept as a string)."""
    path, value = parse_override(assignment)
    keys = path.split(".")
    node = recipe
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise PlanningError(f"--set {path}: '{key}' is not a section of the recipe (sections: {sorted(node)}).")
        node = node[key]
    node[keys[-1]] = value


def _distinct_teacher_folders(teacher_folder) -> list[str]:
    """One folder or a list of them, each given once (the same model twice would count its vote twice in every
    mixture and mean)."""
    folders = [teacher_folder] if isinstance(teacher_folder, str) else list(teacher_folder)
    if not folders:
        raise PlanningError("Give at least one --teacher model folder.")
    seen = {}
    for folder in folders:
        key = os.path.realpath(folder)
        if key in seen:
            raise PlanningError(f"--teacher {folder} is given twice (also as {seen[key]}): give each teacher model "
                                f"folder once.")
        seen[key] = folder
    return folders


def _teacher_folds(teacher_fold) -> list:
    """'same', 'all', a fold number, or a list of them: one teacher per fold of every --teacher folder (several folds:
    an all-fold ensemble, as Fast-nnUNet distils), each fold once."""
    folds = list(teacher_fold) if isinstance(teacher_fold, (list, tuple)) else [teacher_fold]
    if not folds:
        raise PlanningError("Give at least one --teacher-fold.")
    repeated = sorted({str(f) for f in folds if folds.count(f) > 1})
    if repeated:
        raise PlanningError(f"--teacher-fold {' '.join(repeated)} is given twice: give each fold once (the same "
                            f"teacher twice would count its vote twice).")
    return folds


def _teacher_name(folder_index: int, fold, n_folders: int, n_folds: int) -> str:
    """teacher<i> for several folders of one fold (the names every earlier planner wrote), fold<f> for the folds of
    one folder, teacher<i>_fold<f> for several of each."""
    if n_folds == 1:
        return f"teacher{folder_index}"
    return f"fold{fold}" if n_folders == 1 else f"teacher{folder_index}_fold{fold}"


def _budgeted_width(teacher_plans: dict, teacher_cfg: dict, configuration: str, student_configuration,
                    student_dataset_json: dict, preprocessed_base: str, max_latency, min_speedup, width_candidates,
                    latency_device: str, latency_case, verbose: bool) -> dict:
    """The widest student within the latency / speed-up budget (nnunet_kd.width_budget), measured on this machine
    before anything is written; its record, with every candidate measured."""
    from nnunet_kd.width_budget import DEFAULT_CANDIDATES, choose_width

    def plans_of(w: float) -> dict:
        p = copy.deepcopy(teacher_plans)
        p["configurations"] = {configuration: student_configuration(w)}
        return p

    single = copy.deepcopy(teacher_plans)
    single["configurations"] = {configuration: teacher_cfg}
    try:
        budget = choose_width(single, plans_of, student_dataset_json, configuration, preprocessed_base,
                              candidates=tuple(width_candidates or DEFAULT_CANDIDATES), max_latency=max_latency,
                              min_speedup=min_speedup, device=latency_device, case=latency_case,
                              say=print if verbose else (lambda *a: None))
    except (ValueError, FileNotFoundError) as e:
        raise PlanningError(str(e)) from None
    if budget["width"] is None:
        measured = ", ".join(f"{r['width']:g}: {r['median_s']:.3f} s ({r['speedup_over_teacher']:.2f}x)"
                             for r in budget["candidates"])
        raise PlanningError(f"No candidate width meets the budget (max latency {max_latency} s, min speed-up "
                            f"{min_speedup}x) on case {budget['case']} ({latency_device}); measured {measured}, "
                            f"teacher {budget['teacher_median_s']:.3f} s. Relax the budget or give smaller "
                            f"--width-candidates.")
    return budget


def _checked_unlabelled_images(unlabelled_images: str, data_folder: str, student_dataset_json: dict,
                               student_dataset_json_file: str, unlabelled_folder: str, overwrite: bool) -> tuple:
    """The case identifiers of the unlabelled images, checked before anything is written (they are preprocessed
    right before the plans are)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_kd.unlabelled import UnlabelledImagesError, check_unlabelled_images
    try:
        cases = check_unlabelled_images(abspath(unlabelled_images), student_dataset_json, student_dataset_json_file,
                                        infer_dataset_class(data_folder).get_identifiers(data_folder))
    except UnlabelledImagesError as e:
        raise PlanningError(str(e)) from None
    if os.path.exists(unlabelled_folder) and not overwrite:
        raise PlanningError(f"{unlabelled_folder} exists (unlabelled images preprocessed for these plans before): "
                            f"pass --overwrite to preprocess them again, or choose another -o.")
    return cases


def _plans_to_write(output_file: str, output_plans_name: str, dataset_name: str, teacher_plans: dict,
                    configuration: str, overwrite: bool) -> dict:
    """The plans file's content before this configuration is added: the existing student plans (ours, for this
    dataset; a configuration is replaced only with overwrite) or a copy of the teacher's without configurations."""
    if isfile(output_file):
        plans = load_json(output_file)
        _check_own_student_plans(plans, output_file, output_plans_name, dataset_name)
        if configuration in plans["configurations"] and not overwrite:
            raise PlanningError(f"{output_file} already plans configuration '{configuration}'. Pass --overwrite to "
                                f"replace it (a student already trained with it keeps its own plans copy in its "
                                f"results folder), or choose another -o.")
    else:
        plans = copy.deepcopy(teacher_plans)
        plans["configurations"] = {}
        plans[PLANS_KEY] = {}
    plans["plans_name"] = output_plans_name
    plans["dataset_name"] = dataset_name
    return plans


def parse_label_map(assignments) -> dict | None:
    """--label-map Anterior=hippocampus Posterior=hippocampus -> {'Anterior': 'hippocampus', 'Posterior':
    'hippocampus'} (label names as in the two dataset.json files); None when not given."""
    if not assignments:
        return None
    label_map = {}
    for assignment in assignments:
        teacher_label, sep, student_label = assignment.partition("=")
        if not sep or not teacher_label or not student_label:
            raise PlanningError(f"--label-map expects TEACHER_LABEL=STUDENT_LABEL (names as in the teacher's and the "
                                f"student's dataset.json), got '{assignment}'.")
        if label_map.get(teacher_label, student_label) != student_label:
            raise PlanningError(f"--label-map maps teacher label '{teacher_label}' twice ('{label_map[teacher_label]}' "
                                f"and '{student_label}'): a teacher class goes to one student label.")
        label_map[teacher_label] = student_label
    return label_map


def _check_teachers_against_student(teacher_folders: list[str], teacher_folds: list, plans: dict, configuration: str,
                                    student_dataset_json: dict, output_file: str, student_dataset_json_file: str,
                                    dataset_name: str, label_map: dict | None = None) -> None:
    """Every teacher must see the student's inputs and predict its labels (teacher.check_teacher_compatible), or,
    with a label map, labels that the map sends onto the student's (checked as the trainer checks it: every other
    property must still match)."""
    from nnunet_kd.distill.teachers import check_teacher_for_student

    manager = PlansManager(plans)
    region_based = manager.get_label_manager(student_dataset_json).has_regions
    for folder in teacher_folders:
        for name in ("plans.json", "dataset.json"):
            if not isfile(join(folder, name)):
                raise PlanningError(f"{join(folder, name)} not found: every --teacher must be a trained nnU-Net model "
                                    f"folder ($nnUNet_results/{dataset_name}/<Trainer>__<Plans>__{configuration}).")
        teacher_plans = load_json(join(folder, "plans.json"))
        teacher_dataset_json = load_json(join(folder, "dataset.json"))
        # the configuration the teacher trained in, as its folder names it (as locate_teacher reads it without a
        # checkpoint's init_args), not the student's: a ...__2d teacher for a 3d student must be refused here
        trained_in = configuration_named_by(folder)
        if trained_in not in teacher_plans.get("configurations", {}):
            trained_in = configuration
        for fold in teacher_folds:
            model = TeacherModel(model_folder=folder, fold=fold, checkpoint_file="", plans=teacher_plans,
                                 dataset_json=teacher_dataset_json, configuration=trained_in, trainer_name="")
            check_teacher_for_student(model, manager, manager.get_configuration(configuration), student_dataset_json,
                                      label_map, region_based, output_file, student_dataset_json_file,
                                      f"--label-map for the teacher {folder} (labels in {join(folder, 'dataset.json')}) "
                                      f"and the student ({student_dataset_json_file})")


def _student_recipe(teacher_folders: list[str], teacher_folds: list, teacher_checkpoint: str,
                    allow_validation_overlap: bool, training: dict, labelled_fraction, labelled_fraction_seed: int,
                    unlabelled: dict | None, temperature, overrides, label_map: dict | None = None) -> dict:
    """The recipe section of the plans: the default recipe (plans/*.json presets) for these teachers (one per folder
    and fold), with the command line's training settings, temperature and --set overrides."""
    recipe = default_recipe(teacher_folders[0])
    recipe["teacher"].update(fold=teacher_folds[0], checkpoint=teacher_checkpoint,
                             allow_validation_overlap=allow_validation_overlap)
    if label_map is not None:  # every teacher's (the list below copies this entry)
        recipe["teacher"]["label_map"] = dict(label_map)
    if len(teacher_folders) * len(teacher_folds) > 1:  # one teacher keeps the one-object form every earlier planner wrote
        first = recipe.pop("teacher")
        recipe["teachers"] = [
            dict(first, model_folder=folder, fold=fold,
                 name=_teacher_name(i, fold, len(teacher_folders), len(teacher_folds)))
            for i, folder in enumerate(teacher_folders) for fold in teacher_folds]
    recipe["training"].update({k: v for k, v in training.items() if v is not None})
    if labelled_fraction is not None:  # the KD students and their plain baseline train on the same labelled cases
        recipe["training"]["labelled_fraction"] = labelled_fraction
        recipe["training"]["labelled_fraction_seed"] = labelled_fraction_seed
    if unlabelled is not None:
        recipe["training"]["unlabelled_images"] = unlabelled
    if temperature is not None:
        for section in recipe["methods"].values():
            if "temperature" in section:
                section["temperature"] = temperature
    for assignment in overrides:
        apply_override(recipe, assignment)
    return recipe


def _print_written(output_file: str, output_plans_name: str, dataset_name: str, configuration: str, student_cfg: dict,
                   teacher_cost: dict, student_cost: dict) -> None:
    p_t, p_s = teacher_cost["parameters"], student_cost["parameters"]
    f_t, f_s = teacher_cost["flops_per_patch"], student_cost["flops_per_patch"]
    print(f"Wrote student plans {output_file} (configuration {configuration}, patch {student_cfg['patch_size']}, "
          f"data {student_cfg['data_identifier']}).")
    print(f"{'':10s}{'parameters':>14s}{'FLOPs/patch':>14s}")
    print(f"{'teacher':10s}{format_count(p_t):>14s}{format_count(f_t):>14s}")
    print(f"{'student':10s}{format_count(p_s):>14s}{format_count(f_s):>14s}")
    print(f"{'ratio':10s}{p_t / p_s:>13.1f}x{f_t / f_s:>13.1f}x")
    print(f"Train: nnUNetv2_train {dataset_name} {configuration} FOLD -tr nnUNetTrainerKD_BalancedHints "
          f"-p {output_plans_name}   (with nnUNet_extTrainer=\"$(nnUNetv2_kd_trainers_dir)\")")


def plan_student(dataset: str, configuration: str, teacher_folder, output_plans_name: str, width: float = 0.25,
                 min_features: int = 8, n_conv_per_stage=None, n_conv_per_stage_decoder=None, architecture=None,
                 teacher_fold="same", teacher_checkpoint: str = "checkpoint_final.pth",
                 allow_validation_overlap: bool = False, num_epochs: int | None = None,
                 iterations_per_epoch: int | None = None, val_iterations_per_epoch: int | None = None,
                 temperature: float | None = None, overrides: tuple[str, ...] = (), overwrite: bool = False,
                 verbose: bool = True, seed: int | None = None, max_latency: float | None = None,
                 min_speedup: float | None = None, width_candidates=None, latency_device: str = "cpu",
                 latency_case: str | None = None, labelled_fraction: float | None = None,
                 labelled_fraction_seed: int = 0, unlabelled_images: str | None = None,
                 label_map: dict | None = None) -> str:
    """Write ``nnUNet_preprocessed/<dataset>/<output_plans_name>.json``; returns its path. ``teacher_folder``: one
    teacher model folder, or a list of them (the student is derived from the first; every one is checked against it
    and distils into it, see the recipe's ``teachers``); ``teacher_fold``: one fold or a list of folds, one teacher
    per fold of every folder; ``label_map`` ({teacher label name: student label name}) lets teachers with other (e.g.
    finer) labels teach: each teacher's softened probabilities are summed per student label, unmapped classes count as
    background. Everything is checked before anything is written."""
    teacher_folders = [abspath(f) for f in _distinct_teacher_folders(teacher_folder)]
    teacher_folds = _teacher_folds(teacher_fold)
    if not nnUNet_preprocessed.is_set():
        raise PlanningError("nnUNet_preprocessed is not set. Export it as for any nnU-Net command.")
    if not 0 < width <= 4:
        raise PlanningError(f"--width must be in (0, 4], got {width}.")
    _check_plans_name(output_plans_name)
    dataset_name = maybe_convert_to_dataset_name(dataset)
    preprocessed_base = join(nnUNet_preprocessed.get(), dataset_name)
    teacher_plans_file = join(teacher_folders[0], "plans.json")
    if not isfile(teacher_plans_file):
        raise PlanningError(f"{teacher_plans_file} not found: --teacher must be a trained nnU-Net model folder "
                            f"($nnUNet_results/{dataset_name}/<Trainer>__<Plans>__{configuration}).")
    teacher_plans = load_json(teacher_plans_file)
    teacher_dataset_json = load_json(join(teacher_folders[0], "dataset.json"))
    if output_plans_name == teacher_plans["plans_name"]:
        raise PlanningError(f"-o {output_plans_name} is the teacher's plans name: writing it would replace the "
                            f"teacher's plans. Choose another name, e.g. {output_plans_name}_kdstudent.")

    teacher_cfg = _resolved_configuration(teacher_plans, configuration, teacher_plans_file)
    _check_preprocessed_data(preprocessed_base, teacher_cfg, teacher_plans)
    student_dataset_json_file = join(preprocessed_base, "dataset.json")
    student_dataset_json = load_json(student_dataset_json_file)

    def student_configuration(w: float) -> dict:
        cfg = copy.deepcopy(teacher_cfg)
        cfg["architecture"] = derive_student_architecture(
            teacher_cfg["architecture"], w, min_features, n_conv_per_stage, n_conv_per_stage_decoder, architecture)
        return cfg

    width_budget = None
    if max_latency is not None or min_speedup is not None:
        width_budget = _budgeted_width(teacher_plans, teacher_cfg, configuration, student_configuration,
                                       student_dataset_json, preprocessed_base, max_latency, min_speedup,
                                       width_candidates, latency_device, latency_case, verbose)
        width = width_budget["width"]
    student_cfg = student_configuration(width)

    output_file = join(preprocessed_base, output_plans_name + ".json")
    unlabelled_cases, unlabelled_folder = None, None
    if unlabelled_images is not None:
        unlabelled_folder = join(preprocessed_base, f"{output_plans_name}_{configuration}_unlabelled")
        unlabelled_cases = _checked_unlabelled_images(unlabelled_images,
                                                      join(preprocessed_base, teacher_cfg["data_identifier"]),
                                                      student_dataset_json, student_dataset_json_file,
                                                      unlabelled_folder, overwrite)
    plans = _plans_to_write(output_file, output_plans_name, dataset_name, teacher_plans, configuration, overwrite)
    plans["configurations"][configuration] = student_cfg
    _check_teachers_against_student(teacher_folders, teacher_folds, plans, configuration, student_dataset_json,
                                    output_file, student_dataset_json_file, dataset_name, label_map)

    recipe = _student_recipe(
        teacher_folders, teacher_folds, teacher_checkpoint, allow_validation_overlap,
        {"num_epochs": num_epochs, "num_iterations_per_epoch": iterations_per_epoch,
         "num_val_iterations_per_epoch": val_iterations_per_epoch, "seed": seed},
        labelled_fraction, labelled_fraction_seed,
        None if unlabelled_cases is None else {"source": abspath(unlabelled_images),
                                               "folder": os.path.basename(unlabelled_folder),
                                               "cases": list(unlabelled_cases)},
        temperature, overrides, label_map)
    teacher_cost = network_cost(teacher_plans, teacher_dataset_json, configuration)
    student_cost = network_cost(plans, student_dataset_json, configuration)
    recipe["student"] = {
        "width": width, "min_features": min_features, "architecture": student_cfg["architecture"]["network_class_name"],
        "teacher_parameters": teacher_cost["parameters"], "student_parameters": student_cost["parameters"],
        "teacher_flops_per_patch": teacher_cost["flops_per_patch"],
        "student_flops_per_patch": student_cost["flops_per_patch"]}
    if width_budget is not None:
        recipe["student"]["width_budget"] = width_budget
    plans[PLANS_KEY][configuration] = recipe

    for method in ["none"] + available_methods():  # every method must parse before anything is written
        try:
            parse_recipe(plans, configuration, method, output_file)
        except RecipeError as e:
            # the recipe's own advice (write the plans with this planner) would send the user in a circle: the
            # settings come from the presets and this invocation's --set
            raise PlanningError(str(e).replace(recipe_fix(output_file), "").rstrip() + " Nothing was written: change "
                                "the setting with --set KEY=VALUE (the presets are plans/*.json).") from None
    if unlabelled_cases is not None:
        # nnU-Net's preprocessor of this configuration (the teacher's plans), into the dataset's preprocessed folder
        from nnunet_kd.unlabelled import UnlabelledImagesError, preprocess_unlabelled_images
        try:
            preprocess_unlabelled_images(unlabelled_cases, unlabelled_folder, teacher_plans, configuration,
                                         student_dataset_json, overwrite=overwrite)
        except UnlabelledImagesError as e:
            raise PlanningError(str(e)) from None
        if verbose:
            print(f"Preprocessed {len(unlabelled_cases)} unlabelled image(s) from {abspath(unlabelled_images)} into "
                  f"{unlabelled_folder}.")
    save_json(plans, output_file, sort_keys=False)
    if verbose:
        _print_written(output_file, output_plans_name, dataset_name, configuration, student_cfg, teacher_cost,
                       student_cost)
    return output_file


def _fold(value: str):
    return value if value in ("same", "all") else int(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_kd_plan_student",
        description="Write student plans (a smaller network on the teacher's preprocessed data) and the "
                    "distillation recipe, from a trained nnU-Net teacher model folder.")
    parser.add_argument("-d", required=True, help="Dataset name or id of the student (its preprocessed data is used)")
    parser.add_argument("-c", required=True, help="Configuration, e.g. 3d_fullres or 2d")
    parser.add_argument("--teacher", required=True, action="append",
                        help="Teacher model folder: $nnUNet_results/DatasetXXX/<Trainer>__<Plans>__<configuration>. "
                             "Repeat it for several teachers (the student is derived from the first; the recipe "
                             "then lists them under 'teachers')")
    parser.add_argument("-o", required=True, help="Name of the student plans (file name and plans_name; a bare "
                                                   "name, no folder or .json: written to nnUNet_preprocessed/<dataset>)")
    parser.add_argument("--width", type=float, default=0.25, help="Multiplier on features_per_stage (default 0.25)")
    parser.add_argument("--min-features", type=int, default=8, help="Floor on each stage's channels (default 8)")
    parser.add_argument("--n-conv-per-stage", type=int, default=None,
                        help="Convolutions (Plain) or residual blocks (ResEnc) per encoder stage "
                             "(default: the teacher's)")
    parser.add_argument("--n-conv-per-stage-decoder", type=int, default=None, help="Convolutions per decoder stage")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                        help="Student architecture class (default: the teacher's)")
    parser.add_argument("--teacher-fold", type=_fold, nargs="+", default=["same"],
                        help="'same' (teacher fold = student fold, default), 'all' or a fold number; several folds "
                             "(e.g. 0 1 2 3 4) make one teacher per fold of every --teacher: an all-fold ensemble, as "
                             "Fast-nnUNet distils (its folds other than the student's trained on the student's "
                             "validation cases: add --allow-validation-overlap; the held-out test cases stay unseen)")
    parser.add_argument("--teacher-checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--allow-validation-overlap", action="store_true",
                        help="Accept a teacher trained on some of the student's validation cases (logged as a warning), "
                             "or on another dataset (whose cases cannot be compared with the student's)")
    parser.add_argument("--label-map", nargs="+", default=None, metavar="TEACHER_LABEL=STUDENT_LABEL",
                        help="For teachers with other labels than the student's dataset (e.g. finer ones), every "
                             "teacher's: label names as in the two dataset.json files, e.g. Anterior=hippocampus "
                             "Posterior=hippocampus. A teacher's softened probabilities are summed per student label; "
                             "unmapped teacher classes count as background (region-based: a student region is the "
                             "union of the teacher regions mapped onto it)")
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs (default nnU-Net's 1000)")
    parser.add_argument("--iterations-per-epoch", type=int, default=None, help="Default nnU-Net's 250")
    parser.add_argument("--val-iterations-per-epoch", type=int, default=None, help="Default nnU-Net's 50")
    parser.add_argument("--temperature", type=float, default=None, help="KD temperature for every method")
    parser.add_argument("--seed", type=int, default=None,
                        help="Seed python/numpy/torch before the student is built (default: unseeded, as nnU-Net). "
                             "Runs are bit-identical (same machine and device) only with nnUNet_n_proc_DA=0, i.e. "
                             "augmentation in the main process; with data-augmentation worker processes the batches, "
                             "and so the runs, differ")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Recipe override, e.g. --set methods.adaptive.weights.lovasz=0 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="Replace this configuration in existing student plans")
    parser.add_argument("--labelled-fraction", type=float, default=None,
                        help="Train every student of these plans (KD and plain) on a seeded fraction of the fold's "
                             "training cases, e.g. 0.5 (default: all of them)")
    parser.add_argument("--labelled-fraction-seed", type=int, default=0, help="Seed of that fraction (default 0)")
    parser.add_argument("--unlabelled-images", default=None, metavar="FOLDER",
                        help="Extra images without labels (nnU-Net's imagesTr layout and file ending), preprocessed "
                             "now with nnU-Net's preprocessor into nnUNet_preprocessed/<dataset>/<-o>_<configuration>"
                             "_unlabelled (the folder itself is only read). Methods with train_on_unlabelled (e.g. "
                             "-tr nnUNetTrainerKD_MultiScaleContrastive) train on them, and on the fold's training "
                             "cases outside --labelled-fraction, with the segmentation loss masked; the others and "
                             "the plain baseline ignore them")
    budget = parser.add_argument_group("latency budget (replaces --width: the widest candidate within it is chosen)")
    budget.add_argument("--max-latency", type=float, default=None, metavar="SECONDS",
                        help="Sliding-window latency of one preprocessed case, measured here with nnU-Net's predictor")
    budget.add_argument("--min-speedup", type=float, default=None, metavar="X",
                        help="Teacher latency / student latency on that case")
    budget.add_argument("--width-candidates", type=float, nargs="+", default=None,
                        help="Widths to measure (default 1 0.75 0.5 0.375 0.25 0.1875 0.125)")
    budget.add_argument("--latency-device", default="cpu", help="Device to measure on (default cpu)")
    budget.add_argument("--latency-case", default=None, help="Preprocessed case to time (default: the first)")
    args = parser.parse_args(argv)
    try:
        label_map = parse_label_map(args.label_map)
        plan_student(args.d, args.c, args.teacher, args.o, width=args.width, min_features=args.min_features,
                     n_conv_per_stage=args.n_conv_per_stage, n_conv_per_stage_decoder=args.n_conv_per_stage_decoder,
                     architecture=args.arch, teacher_fold=args.teacher_fold, teacher_checkpoint=args.teacher_checkpoint,
                     allow_validation_overlap=args.allow_validation_overlap, num_epochs=args.epochs,
                     iterations_per_epoch=args.iterations_per_epoch,
                     val_iterations_per_epoch=args.val_iterations_per_epoch, temperature=args.temperature,
                     overrides=tuple(args.overrides), overwrite=args.overwrite, seed=args.seed,
                     max_latency=args.max_latency, min_speedup=args.min_speedup,
                     width_candidates=args.width_candidates, latency_device=args.latency_device,
                     latency_case=args.latency_case, labelled_fraction=args.labelled_fraction,
                     labelled_fraction_seed=args.labelled_fraction_seed, unlabelled_images=args.unlabelled_images,
                     label_map=label_map)
    except (PlanningError, RecipeError, RuntimeError) as e:
        print(f"nnUNetv2_kd_plan_student: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()


def plan_student_main(argv=None) -> None:
    """Console entry point `nnUNetv2_kd_plan_student`: main, then the nnUNet_extTrainer check, since the next command
    the user runs is nnUNetv2_train -tr nnUNetTrainerKD_..., which needs it."""
    main(argv)  # exits with status 2 on a planning error
    warn_ext_trainer("nnUNetv2_kd_plan_student")
