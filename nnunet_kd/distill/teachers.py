"""The recipe's set of teachers, made ready for distillation: each one located, checked against the student (labels,
channels, spacing, normalisation, and what it trained on), built frozen, tapped at the stages the terms need, and
given its label map onto the student's output channels."""
from __future__ import annotations

from dataclasses import dataclass
from os.path import join

from nnunet_kd.teacher import (TeacherError, build_frozen_teacher, check_teacher_compatible, locate_teacher,
                               teacher_training_cases)


def output_channel_names(dataset_json: dict, region_based: bool) -> list[str]:
    """The label name of each output channel: one per label (softmax), or one per region without background."""
    names = list(dataset_json["labels"])
    return [n for n in names if n != "background"] if region_based else names


def label_map_channels(label_map: dict, teacher_dataset_json: dict, student_dataset_json: dict, region_based: bool,
                       where: str) -> list[int]:
    """{teacher label name: student label name} -> the student channel of each teacher channel (-1: none)."""
    teacher_names = output_channel_names(teacher_dataset_json, region_based)
    student_names = output_channel_names(student_dataset_json, region_based)
    unknown = sorted(set(label_map) - set(teacher_names))
    wrong = sorted({v for v in label_map.values() if v not in student_names})
    if unknown or wrong:
        raise TeacherError(f"{where}: the label map names teacher labels {unknown} that the teacher does not predict "
                           f"(it predicts {teacher_names}) or student labels {wrong} that the student does not have "
                           f"(it has {student_names}). Fix the label_map of this teacher.")
    return [student_names.index(label_map[n]) if n in label_map else -1 for n in teacher_names]


def check_teacher_for_student(teacher, plans_manager, configuration_manager, student_dataset_json: dict,
                              label_map: dict | None, region_based: bool, plans_file: str, dataset_json_file: str,
                              where: str) -> list[int] | None:
    """check_teacher_compatible, with the labels checked through the teacher's label map when it has one (every other
    property must still match). Returns the student channel of each teacher channel (-1 none), or None without a map.
    The planner and the trainer both check a teacher through it."""
    channels = None
    if label_map is not None:
        channels = label_map_channels(label_map, teacher.dataset_json, student_dataset_json, region_based, where)
        student_dataset_json = dict(student_dataset_json, labels=teacher.dataset_json.get("labels"))
    check_teacher_compatible(teacher, plans_manager, configuration_manager, student_dataset_json, plans_file,
                             dataset_json_file)
    return channels


def check_no_validation_leak(trainer, teacher, recipe_teacher, where: str) -> None:
    """A teacher that saw the student's validation cases leaks them into the student: refuse by default. With
    several teachers each is checked, so the union of their training cases is."""
    _, val_keys = trainer.do_split()
    allow = recipe_teacher.allow_validation_overlap
    trained_on = teacher_training_cases(teacher, student_dataset_folder=trainer.preprocessed_dataset_folder_base,
                                        log=trainer.print_to_log_file, allow_other_dataset=allow)
    flag = (f"set \"allow_validation_overlap\": true under {where} in {trainer.kd_plans_file} "
            f"(nnUNetv2_kd_plan_student --allow-validation-overlap) to accept this")
    if trained_on is None:
        message = (f"Cannot tell which cases teacher fold {teacher.fold} was trained on: no usable "
                   f"splits_final.json for dataset {teacher.plans.get('dataset_name')} under nnUNet_preprocessed.")
        overlap = None
    else:
        overlap = sorted(set(val_keys) & trained_on)
        message = (f"Teacher fold {teacher.fold} ({teacher.checkpoint_file}) was trained on {len(overlap)} of the "
                   f"student's {len(val_keys)} fold-{trainer.fold} validation cases (e.g. {overlap[:5]}): the "
                   f"student's validation Dice would be inflated by the teacher's memory of them.")
    if overlap == []:
        return trained_on
    if not allow:
        raise TeacherError(f"{message} Use the teacher fold that matches the student's fold (the default, "
                           f"teacher fold \"same\"), or {flag}.")
    trainer.print_to_log_file(f"WARNING: {message} Accepted because allow_validation_overlap is set.")
    return trained_on


@dataclass(frozen=True)
class LoadedTeacher:
    model: object            # nnunet_kd.teacher.TeacherModel: where it is and what it was trained with
    network: object          # FrozenTeacher
    label_map: list | None   # student channel of each teacher channel (-1 none), or None
    trained_on: frozenset | None  # the cases its fold trained on (None: unknown), for out-of-sample routing


def load_teachers(trainer) -> dict:
    """name -> LoadedTeacher, for every teacher of the recipe."""
    recipe = trainer.kd_recipe
    loaded = {}
    for index, recipe_teacher in enumerate(recipe.teachers):
        where = (f"{trainer.plans_manager.plans_name}'s kd.{trainer.configuration_name}."
                 f"{'teacher' if len(recipe.teachers) == 1 else f'teachers[{index}]'}")
        teacher, checkpoint = locate_teacher(recipe_teacher.model_folder, recipe_teacher.fold_for_student(trainer.fold),
                                             recipe_teacher.checkpoint)
        channels = check_teacher_for_student(
            teacher, trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json,
            recipe_teacher.label_map, trainer.label_manager.has_regions, trainer.kd_plans_file,
            join(trainer.preprocessed_dataset_folder_base, "dataset.json"), f"{trainer.kd_plans_file}: {where}")
        trained_on = check_no_validation_leak(trainer, teacher, recipe_teacher, where)
        loaded[recipe_teacher.name] = LoadedTeacher(teacher, build_frozen_teacher(teacher, checkpoint, trainer.device),
                                                    channels, frozenset(trained_on) if trained_on is not None else None)
        del checkpoint
    return loaded
