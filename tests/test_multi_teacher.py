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
