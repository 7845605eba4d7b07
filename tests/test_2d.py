"""A 2D configuration distils like a 3D one: teacher, student plans and the Adaptive-KD step on 2D patches."""
from __future__ import annotations

from os.path import join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import DATASET_ID
from nnunet_kd.pipeline import write_budget_plans
from nnunet_kd.planning import plan_student


def _trainer(ws, name: str, plans_name: str):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    plans = load_json(join(ws.preprocessed, plans_name + ".json"))
    plans["continue_training"] = False  # nnU-Net 2.8's trainer pops this key (nnUNetv2_train sets it)
    return recursive_find_trainer_class_by_name(name)(plans, "2d", 0, load_json(join(ws.preprocessed, "dataset.json")),
                                                      device=torch.device("cpu"))


def test_adaptive_kd_step_on_a_2d_configuration(workspace, monkeypatch):
    ws = workspace
    plan_env = {k: v for k, v in ws.env.items() if k != "nnUNet_n_proc_DA"}
    ws.run("nnUNetv2_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1", env=plan_env)
    ws.set_env(monkeypatch)

    # A 2D teacher folder as nnU-Net writes it (untrained weights are enough to check the mechanics).
    write_budget_plans(ws.preprocessed, "nnUNetPlans", "nnUNetPlans_test2dteacher", "2d", 1, 1, 1)
    teacher = _trainer(ws, "nnUNetTrainerKD_NoKD", "nnUNetPlans_test2dteacher")
    teacher.initialize()
    save_json(teacher.plans_manager.plans, join(teacher.output_folder_base, "plans.json"), sort_keys=False)
    save_json(teacher.dataset_json, join(teacher.output_folder_base, "dataset.json"), sort_keys=False)
    teacher.save_checkpoint(join(teacher.output_folder, "checkpoint_final.pth"))

    plan_student(str(DATASET_ID), "2d", teacher.output_folder_base, "nnUNetPlans_test2dstudent", width=0.25,
                 verbose=False)
    kd = _trainer(ws, "nnUNetTrainerKD_Adaptive", "nnUNetPlans_test2dstudent")
    kd.initialize()
    assert kd.teacher is not None and len(kd.configuration_manager.patch_size) == 2
    assert all(isinstance(m.proj, torch.nn.Conv2d) for m in kd.distillation["feature"].adapters["teacher0"].values())

    patch = kd.configuration_manager.patch_size
    labels = torch.randint(0, 3, (2, 1, *patch)).float()
    target = [torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest")
              for s in kd._get_deep_supervision_scales()]
    out = kd.train_step({"data": torch.randn(2, 1, *patch), "target": target})
    assert kd.loss_terms == list(out["terms"]) == ["segmentation", "kl", "lovasz", "feature"]
    assert all(torch.isfinite(v) and v > 0 for v in out["terms"].values())
