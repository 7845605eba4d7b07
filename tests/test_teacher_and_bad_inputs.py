"""The teacher is frozen, and every bad input is refused before training with a message naming the file and fix."""
from __future__ import annotations

import copy
import glob
import os
import shutil
from os.path import isdir, join

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import CONFIGURATION, DATASET_ID, STUDENT_PLANS
from nnunet_kd.planning import PlanningError, plan_student
from nnunet_kd.recipe import RecipeError
from nnunet_kd.teacher import TeacherError


def make_trainer(ws, monkeypatch, plans_name=STUDENT_PLANS, fold=0, trainer="nnUNetTrainerKD_Adaptive"):
    ws.set_env(monkeypatch)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    plans = load_json(join(ws.preprocessed, plans_name + ".json"))
    plans["continue_training"] = False
    cls = recursive_find_trainer_class_by_name(trainer)
    return cls(plans, CONFIGURATION, fold, load_json(join(ws.preprocessed, "dataset.json")), device=torch.device("cpu"))


def student_plans_with(ws, name, teacher_folder=None, **teacher_settings) -> str:
    """A copy of the student plans under another name, with its recipe's teacher entry changed."""
    plans = load_json(join(ws.preprocessed, STUDENT_PLANS + ".json"))
    plans["plans_name"] = name
    if teacher_folder is not None:
        teacher_settings["model_folder"] = teacher_folder
    plans["kd"][CONFIGURATION]["teacher"].update(teacher_settings)
    save_json(plans, join(ws.preprocessed, name + ".json"), sort_keys=False)
    return name


def teacher_copy(ws, tmp_path, edit=None) -> str:
    """A copy of the trained teacher folder, optionally with plans.json / dataset.json edited."""
    folder = str(tmp_path / os.path.basename(ws.teacher_folder))
    shutil.copytree(ws.teacher_folder, folder)
    if edit:
        edit(folder)
    return folder


def edit_json(path, change):
    data = load_json(path)
    change(data)
    save_json(data, path, sort_keys=False)


def test_teacher_is_frozen_outside_the_student_and_untouched_by_a_training_step(workspace, monkeypatch):
    trainer = make_trainer(workspace, monkeypatch)
    trainer.initialize()
    teacher = trainer.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(m is teacher.network for m in trainer.network.modules())  # never saved with the student
    trainer.network.train()
    teacher.train()
    assert not teacher.training and not teacher.network.training

    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    labels = torch.randint(0, 3, (2, 1, *patch)).float()
    target = [torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest") for s in scales]
    batch = {"data": torch.randn(2, 1, *patch), "target": target}
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(trainer.network.state_dict())
    adapters_before = copy.deepcopy(trainer.kd_adapters.state_dict())
    out = trainer.train_step(batch)

    assert out["terms"].shape == (4,) and torch.isfinite(out["terms"]).all() and (out["terms"] > 0).all()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, trainer.network.state_dict()[k]) for k, v in student_before.items())
    assert any(not torch.equal(v, trainer.kd_adapters.state_dict()[k]) for k, v in adapters_before.items())


def test_missing_teacher_fold_checkpoint(workspace, monkeypatch):
    name = student_plans_with(workspace, "nnUNetPlans_bad_fold", fold=3)
    trainer = make_trainer(workspace, monkeypatch, name)
    with pytest.raises(TeacherError, match=r"Teacher checkpoint not found: .*fold_3.*checkpoint_final\.pth.*fold_0"):
        trainer.initialize()


def test_corrupt_teacher_checkpoint(workspace, monkeypatch, tmp_path):
    def truncate(folder):
        path = join(folder, "fold_0", "checkpoint_final.pth")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    folder = teacher_copy(workspace, tmp_path, truncate)
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, "nnUNetPlans_bad_corrupt", folder))
    with pytest.raises(TeacherError, match=r"checkpoint_final\.pth is not a readable PyTorch checkpoint.*corrupt"):
        trainer.initialize()


# (what is wrong, how to break a copy of the teacher, the trainer's error, the planner's error)
@pytest.mark.parametrize("what, edit, message, planner_error", [
    ("labels", lambda f: edit_json(join(f, "dataset.json"), lambda d: d["labels"].update(extra=3)),
     r"Label mismatch: the teacher \(.*dataset\.json\)", (TeacherError, r"Label mismatch")),
    ("channels", lambda f: edit_json(join(f, "dataset.json"), lambda d: d["channel_names"].update({"1": "ADC"})),
     r"Input channel mismatch", (TeacherError, r"Input channel mismatch")),
    # The planner copies the teacher's preprocessing into the student, so it finds the mismatch against the
    # preprocessed data on disk instead.
    ("normalisation", lambda f: edit_json(join(f, "plans.json"), lambda p: p["configurations"][CONFIGURATION].update(
        normalization_schemes=["CTNormalization"])), r"Normalisation mismatch: teacher \(.*plans\.json\)",
     (PlanningError, r"Preprocessing mismatch: .*normalisation \['ZScoreNormalization'\].*'CTNormalization'")),
    ("spacing", lambda f: edit_json(join(f, "plans.json"), lambda p: p["configurations"][CONFIGURATION].update(
        spacing=[1.0, 1.0, 1.0])), r"Spacing mismatch", (PlanningError, r"Preprocessing mismatch: .*spacing")),
])
def test_incompatible_teacher_is_refused_before_training(workspace, monkeypatch, tmp_path, what, edit, message,
                                                         planner_error):
    folder = teacher_copy(workspace, tmp_path, edit)
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, f"nnUNetPlans_bad_{what}", folder))
    with pytest.raises(TeacherError, match=message):
        trainer.initialize()
    assert not glob.glob(join(trainer.output_folder, "checkpoint_*.pth"))
    # The planner refuses the same teacher when the student is planned.
    workspace.set_env(monkeypatch)
    error_class, planner_message = planner_error
    with pytest.raises(error_class, match=planner_message):
        plan_student(str(DATASET_ID), CONFIGURATION, folder, f"nnUNetPlans_never_{what}", verbose=False)
    assert not os.path.exists(join(workspace.preprocessed, f"nnUNetPlans_never_{what}.json"))


def test_teacher_trained_on_student_validation_cases_is_refused_unless_allowed(workspace, monkeypatch):
    splits = load_json(join(workspace.preprocessed, "splits_final.json"))
    leaked = sorted(set(splits[1]["val"]) & set(splits[0]["train"]))
    assert leaked  # teacher fold 0 trained on part of fold 1's validation cases
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, "nnUNetPlans_bad_leak", fold=0),
                           fold=1)
    with pytest.raises(TeacherError, match=rf"was trained on {len(leaked)} of the student's .*allow_validation_overlap"):
        trainer.initialize()

    allowed = make_trainer(workspace, monkeypatch, student_plans_with(
        workspace, "nnUNetPlans_leak_allowed", fold=0, allow_validation_overlap=True), fold=1)
    allowed.initialize()
    assert "WARNING: Teacher fold 0" in open(allowed.log_file).read()


def test_plans_without_recipe_are_refused_and_leave_nothing_on_disk(workspace, monkeypatch):
    trainer_folder = join(workspace.results, os.path.basename(workspace.preprocessed),
                          f"nnUNetTrainerKD_Adaptive__nnUNetPlans__{CONFIGURATION}")
    with pytest.raises(RecipeError, match=r"nnUNetPlans\.json has no distillation recipe .*nnUNetv2_kd_plan_student"):
        make_trainer(workspace, monkeypatch, "nnUNetPlans")
    assert not isdir(trainer_folder)


def test_recipe_typo_is_refused(workspace, monkeypatch):
    plans = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    plans["plans_name"] = "nnUNetPlans_bad_typo"
    plans["kd"][CONFIGURATION]["methods"]["adaptive"]["weights"]["lovasz_weigth"] = 1.0
    save_json(plans, join(workspace.preprocessed, "nnUNetPlans_bad_typo.json"), sort_keys=False)
    with pytest.raises(RecipeError, match=r"nnUNetPlans_bad_typo\.json.*unknown key 'lovasz_weigth'"):
        make_trainer(workspace, monkeypatch, "nnUNetPlans_bad_typo")


def test_planner_never_overwrites_existing_plans(workspace, monkeypatch):
    workspace.set_env(monkeypatch)
    existing = join(workspace.preprocessed, STUDENT_PLANS + ".json")
    before = open(existing).read()
    with pytest.raises(PlanningError, match="already plans configuration '3d_fullres'.*--overwrite"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, STUDENT_PLANS, verbose=False)
    with pytest.raises(PlanningError, match="teacher's plans name"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans_testteacher",
                     verbose=False)
    with pytest.raises(PlanningError, match="not a student plans file"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans", verbose=False)
    assert open(existing).read() == before


def test_planner_output_keeps_the_data_and_shrinks_the_network(workspace):
    teacher = load_json(join(workspace.teacher_folder, "plans.json"))["configurations"][CONFIGURATION]
    plans = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    student = plans["configurations"][CONFIGURATION]
    assert plans["plans_name"] == STUDENT_PLANS
    for key in ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "data_identifier", "batch_size"):
        assert student[key] == teacher[key], key
    t_arch, s_arch = teacher["architecture"]["arch_kwargs"], student["architecture"]["arch_kwargs"]
    assert s_arch["features_per_stage"] == [max(min(8, f), round(f / 4)) for f in t_arch["features_per_stage"]]
    assert s_arch["strides"] == t_arch["strides"] and s_arch["kernel_sizes"] == t_arch["kernel_sizes"]
    recipe = plans["kd"][CONFIGURATION]
    assert recipe["teacher"]["model_folder"] == workspace.teacher_folder and recipe["teacher"]["fold"] == "same"
    assert recipe["training"] == {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
                                  "seed": None}
    assert {"adaptive", "logit"} <= set(recipe["methods"])
    ratio = recipe["student"]["teacher_parameters"] / recipe["student"]["student_parameters"]
    assert ratio > 8  # a quarter of the width: about 16x fewer parameters
    assert np.isclose(recipe["student"]["teacher_flops_per_patch"] / recipe["student"]["student_flops_per_patch"],
                      ratio, rtol=0.5)


def test_seeded_recipe_gives_plain_and_kd_students_the_same_initial_weights(workspace, monkeypatch):
    plans = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    plans["plans_name"] = "nnUNetPlans_seeded"
    plans["kd"][CONFIGURATION]["training"]["seed"] = 3
    save_json(plans, join(workspace.preprocessed, "nnUNetPlans_seeded.json"), sort_keys=False)
    plain = make_trainer(workspace, monkeypatch, "nnUNetPlans_seeded", trainer="nnUNetTrainerKD_NoKD")
    plain.initialize()
    kd = make_trainer(workspace, monkeypatch, "nnUNetPlans_seeded", trainer="nnUNetTrainerKD_Adaptive")
    kd.initialize()
    for name, value in plain.network.state_dict().items():
        assert torch.equal(value, kd.network.state_dict()[name]), name

    plans["kd"][CONFIGURATION]["training"]["seed"] = -1
    save_json(plans, join(workspace.preprocessed, "nnUNetPlans_seeded.json"), sort_keys=False)
    with pytest.raises(RecipeError, match=r"nnUNetPlans_seeded\.json: kd\.3d_fullres\.training\.seed must be null or"):
        make_trainer(workspace, monkeypatch, "nnUNetPlans_seeded", trainer="nnUNetTrainerKD_NoKD")
