"""Several teachers in nnU-Net: nnUNetv2_kd_plan_student --teacher twice writes a 'teachers' list, the trainer loads
each teacher with its own taps and adapters (keyed term, teacher, stage), logs each teacher's share, and resumes
from an old one-teacher checkpoint's 'kd_adapters'."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import CONFIGURATION, DATASET_ID
from nnunet_kd.planning import PlanningError, plan_student
from nnunet_kd.teacher import TeacherError
from nnunet_kd.trainer import ADAPTERS_KEY, MODULES_KEY
from test_teacher_and_bad_inputs import make_trainer


def _batch(trainer):
    patch = trainer.configuration_manager.patch_size
    labels = torch.randint(0, 3, (2, 1, *patch)).float()
    target = [torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest-exact")
              for s in trainer._get_deep_supervision_scales()]
    return {"data": torch.randn(2, 1, *patch), "target": target}


def _teacher_copy(ws) -> str:
    """The session's teacher in a second model folder (same name, another parent): a second teacher with the same
    weights, so both must give the same soft targets."""
    copy = os.path.join(ws.root, "teacher_copy", os.path.basename(ws.teacher_folder))
    if not os.path.isdir(copy):
        shutil.copytree(ws.teacher_folder, copy)
    return copy


def test_the_same_teacher_folder_twice_is_refused_before_anything_is_written(workspace, monkeypatch):
    ws = workspace
    ws.set_env(monkeypatch)
    with pytest.raises(PlanningError, match=r"--teacher .* is given twice .*give each teacher model folder once"):
        plan_student(str(DATASET_ID), CONFIGURATION, [ws.teacher_folder, ws.teacher_folder + "/"],
                     "nnUNetPlans_sameteachertwice", width=0.25, verbose=False)
    assert not os.path.exists(os.path.join(ws.preprocessed, "nnUNetPlans_sameteachertwice.json"))


def test_two_teachers_plan_train_and_log_each_share(workspace, monkeypatch):
    ws = workspace
    ws.set_env(monkeypatch)
    name = "nnUNetPlans_twoteachers"
    plan_student(str(DATASET_ID), CONFIGURATION, [ws.teacher_folder, _teacher_copy(ws)], name, width=0.25,
                 verbose=False)
    trainer = make_trainer(ws, monkeypatch, name, trainer="nnUNetTrainerKD_BalancedHints")
    recipe = trainer.kd_recipe
    assert [t.name for t in recipe.teachers] == ["teacher0", "teacher1"]
    trainer.initialize()
    assert list(trainer.teachers) == ["teacher0", "teacher1"] and len(trainer.teacher_taps) == 2
    assert trainer.teachers["teacher0"] is not trainer.teachers["teacher1"]
    adapters = trainer.distillation["feature"].adapters
    assert sorted(adapters) == ["teacher0", "teacher1"]
    assert len(adapters["teacher0"]) == 2 and sorted(adapters["teacher0"]) == sorted(adapters["teacher1"])
    out = trainer.train_step(_batch(trainer))
    for term in ("kl", "feature"):
        assert {term, f"{term}_teacher0", f"{term}_teacher1"} <= set(out["terms"])
        shares = out["terms"][f"{term}_teacher0"] + out["terms"][f"{term}_teacher1"]
        assert torch.allclose(out["terms"][term], shares / 2)
    # the same teacher twice: the same soft targets (the adapters differ, so the hints do not)
    assert torch.allclose(out["terms"]["kl_teacher0"], out["terms"]["kl_teacher1"])
    assert "lovasz_teacher0" not in out["terms"]  # Lovasz reads the labels only
    trainer.on_train_epoch_end([out])
    assert set(trainer.logged_terms) == set(out["terms"])


def test_an_old_checkpoints_kd_adapters_load_into_the_first_teachers_feature_term(workspace, monkeypatch, tmp_path):
    trainer = make_trainer(workspace, monkeypatch, trainer="nnUNetTrainerKD_Adaptive")
    trainer.initialize()
    new_style = trainer.distillation.state_dict()
    prefix = "feature.adapters.teacher0."
    assert new_style and all(k.startswith(prefix) for k in new_style)
    old_style = {k[len(prefix):]: torch.full_like(v, 0.5) for k, v in new_style.items()}  # 'encoder_4.proj.weight'
    assert trainer._module_state({ADAPTERS_KEY: old_style}).keys() == new_style.keys()
    trainer.distillation.load_state_dict(trainer._module_state({ADAPTERS_KEY: old_style}))
    assert all((v == 0.5).all() for v in trainer.distillation.state_dict().values())
    assert trainer._module_state({MODULES_KEY: new_style, ADAPTERS_KEY: old_style}) is new_style


def test_under_ddp_the_step_averages_the_adapter_gradients_over_the_ranks(workspace, monkeypatch):
    import nnunet_kd.trainer as trainer_module
    trainer = make_trainer(workspace, monkeypatch, trainer="nnUNetTrainerKD_BalancedHints")
    trainer.initialize()
    averaged = []
    monkeypatch.setattr(trainer_module, "average_gradients", lambda parameters: averaged.append(list(parameters)))
    trainer.is_ddp = True  # as nnU-Net sets it when torch.distributed is initialised
    trainer.train_step(_batch(trainer))
    assert len(averaged) == 1
    assert [id(p) for p in averaged[0]] == [id(p) for p in trainer.distillation.parameters()] and averaged[0]


def test_the_benchmark_loads_times_and_costs_every_teacher_of_the_recipe(workspace, monkeypatch, tmp_path):
    from nnunet_kd.benchmark import BenchmarkError, run_benchmark

    ws = workspace
    ws.set_env(monkeypatch)
    name = "nnUNetPlans_twoteachers_bench"
    plan_student(str(DATASET_ID), CONFIGURATION, [ws.teacher_folder, _teacher_copy(ws)], name, width=0.25,
                 verbose=False, overwrite=True)
    res = run_benchmark(str(DATASET_ID), CONFIGURATION, "0", student_plans=name, device="cpu", steps=1, warmup=0,
                        inference_repeats=1, inference_warmup=0, output=str(tmp_path / "two.json"), verbose=False)
    one = res["cost"]["teachers"]["teacher0"]
    assert sorted(res["cost"]["teachers"]) == ["teacher0", "teacher1"] == [t["name"] for t in res["setup"]["teachers"]]
    assert res["cost"]["teacher"]["parameters"] == 2 * one["parameters"]
    assert res["cost"]["teacher"]["flops_per_patch"] == 2 * one["flops_per_patch"]
    runs = res["inference"]["teachers"]
    assert res["inference"]["teacher"]["mirroring_off"]["median_s"] == pytest.approx(
        runs["teacher0"]["mirroring_off"]["median_s"] + runs["teacher1"]["mirroring_off"]["median_s"])
    table = (tmp_path / "two.md").read_text()
    assert "| | teacher0 | teacher1 | all teachers (in turn) | student |" in table
    assert "kl_teacher0" in res["training"]["kd_step"]["loss_terms"]
    with pytest.raises(BenchmarkError, match="names 2 teachers"):
        run_benchmark(str(DATASET_ID), CONFIGURATION, "0", teacher=ws.teacher_folder, student_plans=name,
                      device="cpu", steps=1, warmup=0, verbose=False)


def _teacher_with_two_folds(ws) -> str:
    """The session's teacher in another model folder with its fold 0 also as fold 1 (same weights), fold 1's record
    saying it trained on nnU-Net's fold-1 training cases, which hold fold 0's validation cases: two fold teachers as
    a 2-fold cross-validation leaves them, whose logit mean must be either one's logits."""
    import json

    folder = os.path.join(ws.root, "teacher_two_folds", os.path.basename(ws.teacher_folder))
    if not os.path.isdir(folder):
        shutil.copytree(ws.teacher_folder, folder)
        shutil.copytree(os.path.join(folder, "fold_0"), os.path.join(folder, "fold_1"))
        with open(os.path.join(ws.preprocessed, "splits_final.json")) as f:
            split = json.load(f)[1]
        record_file = os.path.join(folder, "fold_1", "training_cases.json")
        with open(record_file) as f:
            record = json.load(f)
        record.update(fold=1, training_cases=sorted(split["train"]), validation_cases=sorted(split["val"]))
        with open(record_file, "w") as f:
            json.dump(record, f)
    return folder


def test_the_folds_of_one_teacher_folder_distil_as_fast_nnunets_all_fold_ensemble(workspace, monkeypatch):
    ws = workspace
    ws.set_env(monkeypatch)
    folder = _teacher_with_two_folds(ws)
    name = "nnUNetPlans_foldteachers"
    plan = ["nnUNetv2_kd_plan_student", "-d", str(DATASET_ID), "-c", CONFIGURATION, "--teacher", folder,
            "--teacher-fold", "0", "1", "--width", "0.25", "-o", name, "--epochs", "1", "--iterations-per-epoch", "3",
            "--val-iterations-per-epoch", "1", "--set", "methods.logit.teacher_aggregation=logit_mean"]
    # fold 1's teacher trained on fold 0's validation cases: refused unless the user accepts it
    ws.run(*plan)
    with pytest.raises(TeacherError, match=r"Teacher fold 1 .* was trained on \d+ of the student's \d+ fold-0 "
                                           r"validation cases.*--allow-validation-overlap"):
        make_trainer(ws, monkeypatch, name, trainer="nnUNetTrainerKD_Logit").initialize()
    ws.run(*plan, "--allow-validation-overlap", "--overwrite")
    trainer = make_trainer(ws, monkeypatch, name, trainer="nnUNetTrainerKD_Logit")
    recipe = trainer.kd_recipe
    assert [(t.name, t.fold, t.model_folder) for t in recipe.teachers] == [("fold0", 0, folder), ("fold1", 1, folder)]
    assert recipe.teacher_aggregation == "logit_mean"
    trainer.initialize()
    assert list(trainer.teachers) == ["fold0", "fold1"]
    batch = _batch(trainer)
    with torch.no_grad():
        data = batch["data"].to(trainer.device)
        step = trainer.distillation_step(data, trainer.network(data), batch["target"])
    # the same weights in both folds: their logit mean is either teacher's logits, at every level
    for level, mixed in enumerate(step.mixture.outputs):
        assert torch.allclose(mixed, step.teachers["fold0"].outputs[level], atol=1e-5)
    out = trainer.train_step(batch)
    assert out["terms"]["teacher_weight_fold0"].item() == pytest.approx(0.5)
    assert out["terms"]["teacher_weight_fold1"].item() == pytest.approx(0.5)
    assert torch.isfinite(out["terms"]["kl"])


def test_a_teacher_fold_given_twice_is_refused_before_anything_is_written(workspace, monkeypatch):
    ws = workspace
    ws.set_env(monkeypatch)
    with pytest.raises(PlanningError, match=r"--teacher-fold 0 is given twice"):
        plan_student(str(DATASET_ID), CONFIGURATION, ws.teacher_folder, "nnUNetPlans_foldtwice", width=0.25,
                     teacher_fold=[0, 0], verbose=False)
    assert not os.path.exists(os.path.join(ws.preprocessed, "nnUNetPlans_foldtwice.json"))
