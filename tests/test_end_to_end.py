"""The user's workflow with the real nnU-Net commands: train with KD, resume with --c, --val, predict, export to a
plain nnU-Net model that predicts the same segmentations without the plugin, and zip it with nnU-Net's tool."""
from __future__ import annotations

import glob
import os
from os.path import basename, isfile, join

import numpy as np
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import CONFIGURATION, DATASET_ID, DATASET_NAME, STUDENT_PLANS
from nnunet_kd.cost import build_network_from_plans, count_parameters
from nnunet_kd.pipeline import model_folder

TRAINER = "nnUNetTrainerKD_Adaptive"
TERMS = ["kd_segmentation", "kd_kl", "kd_lovasz", "kd_feature"]


def _segmentations(folder: str) -> dict:
    return {basename(f): sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in sorted(glob.glob(join(folder, "*.nii.gz")))}


def test_kd_training_resume_validation_prediction_and_export(workspace, tmp_path):
    ws = workspace
    train = ["nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", TRAINER, "-p", STUDENT_PLANS, "-device", "cpu"]
    ws.run(*train)
    student = ws.student_folder(TRAINER)
    first = torch.load(join(student, "fold_0", "checkpoint_final.pth"), weights_only=False)

    # The student checkpoint is nnU-Net's, with the adapters beside the network weights, never inside them.
    assert first["trainer_name"] == TRAINER
    assert first["kd_modules"], "feature adapters must be checkpointed"
    assert all(k.startswith("feature.adapters.teacher0.") for k in first["kd_modules"])  # (term, teacher, stage)
    assert not any(k.startswith(("teacher", "kd_")) for k in first["network_weights"])
    plans = load_json(join(student, "plans.json"))
    plain_student = build_network_from_plans(plans, load_json(join(student, "dataset.json")), CONFIGURATION,
                                             deep_supervision=False)
    plain_student.load_state_dict(first["network_weights"])  # strict: exactly the plain student's parameters
    assert len(first["optimizer_state"]["param_groups"]) == 2  # student + adapters are both trained
    for term in TERMS:  # every term logged once per epoch, in nnU-Net's log and plot
        assert len(first["logging"][term]) == 1 and np.isfinite(first["logging"][term][0])
    assert isfile(join(student, "fold_0", "progress.png"))
    log = open(sorted(glob.glob(join(student, "fold_0", "training_log_*.txt")))[-1]).read()
    assert "train loss terms (unweighted): segmentation" in log and "feature" in log

    # Resume: a longer recipe, --c continues from the final checkpoint with adapters and optimizer restored.
    plans_file = join(ws.preprocessed, STUDENT_PLANS + ".json")
    student_plans = load_json(plans_file)
    student_plans["kd"][CONFIGURATION]["training"]["num_epochs"] = 2
    save_json(student_plans, plans_file, sort_keys=False)
    try:
        ws.run(*train, "--c")
    finally:
        student_plans["kd"][CONFIGURATION]["training"]["num_epochs"] = 1
        save_json(student_plans, plans_file, sort_keys=False)
    resumed = torch.load(join(student, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert resumed["current_epoch"] == 2
    for term in TERMS:
        assert len(resumed["logging"][term]) == 2
        assert resumed["logging"][term][0] == first["logging"][term][0]  # history restored, not restarted
    assert any(not torch.equal(resumed["kd_modules"][k], first["kd_modules"][k]) for k in first["kd_modules"])

    # --val re-runs nnU-Net's validation of the trained student.
    os.remove(join(student, "fold_0", "validation", "summary.json"))
    ws.run(*train, "--val")
    assert isfile(join(student, "fold_0", "validation", "summary.json"))

    # nnUNetv2_predict on the KD student (plugin on the trainer path) ...
    images = join(ws.raw, "imagesTs")
    kd_pred, plain_pred = str(tmp_path / "kd"), str(tmp_path / "plain")
    predict = ["nnUNetv2_predict", "-i", images, "-d", str(DATASET_ID), "-c", CONFIGURATION, "-p", STUDENT_PLANS,
               "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]
    ws.run(*predict, "-o", kd_pred, "-tr", TRAINER)

    # ... and on its export, a vanilla nnU-Net model used without the plugin.
    ws.run("nnUNetv2_kd_export", "-i", student)
    exported = model_folder(ws.results, DATASET_NAME, "nnUNetTrainer", STUDENT_PLANS, CONFIGURATION)
    vanilla = torch.load(join(exported, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert vanilla["trainer_name"] == "nnUNetTrainer"
    assert not [k for k in vanilla if k.startswith("kd_")]
    assert "kd" not in load_json(join(exported, "plans.json")) and "kd" not in vanilla["init_args"]["plans"]
    assert len(vanilla["optimizer_state"]["param_groups"]) == 1
    exported_net = build_network_from_plans(load_json(join(exported, "plans.json")),
                                            load_json(join(exported, "dataset.json")), CONFIGURATION)
    assert count_parameters(exported_net) == count_parameters(plain_student)

    no_plugin = {k: v for k, v in ws.env.items() if k != "nnUNet_extTrainer"}
    ws.run(*predict, "-o", plain_pred, "-tr", "nnUNetTrainer", env=no_plugin)
    kd_segs, plain_segs = _segmentations(kd_pred), _segmentations(plain_pred)
    assert len(kd_segs) == 2 and kd_segs.keys() == plain_segs.keys()
    for name in kd_segs:
        np.testing.assert_array_equal(kd_segs[name], plain_segs[name])

    zip_file = str(tmp_path / "student.zip")
    ws.run("nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", zip_file, "-c", CONFIGURATION,
           "-tr", "nnUNetTrainer", "-p", STUDENT_PLANS, "-f", "0", env=no_plugin)
    assert os.path.getsize(zip_file) > 0


def test_plain_student_baseline_trains_without_teacher_on_the_same_budget(workspace):
    ws = workspace
    ws.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", "nnUNetTrainerKD_NoKD", "-p", STUDENT_PLANS,
           "-device", "cpu")
    checkpoint = torch.load(join(ws.student_folder("nnUNetTrainerKD_NoKD"), "fold_0", "checkpoint_final.pth"),
                            weights_only=False)
    assert checkpoint["current_epoch"] == 1 and not checkpoint["kd_modules"]
    assert list(k for k in checkpoint["logging"] if k.startswith("kd_")) == ["kd_segmentation"]
