"""The student planner's latency budget: every candidate width is timed with nnU-Net's predictor on a real
preprocessed case, the widest within the budget is chosen and recorded, and an impossible budget writes nothing."""
from __future__ import annotations

import os
from os.path import join

import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import CONFIGURATION, DATASET_ID
from nnunet_kd.planning import PlanningError, plan_student


def test_the_widest_candidate_within_the_budget_is_chosen_and_every_measurement_recorded(workspace, monkeypatch):
    workspace.set_env(monkeypatch)
    path = plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans_budgetwidth",
                        max_latency=1e9, min_speedup=1e-9, width_candidates=[0.25, 0.5], verbose=False,
                        overwrite=True)
    student = load_json(path)["kd"][CONFIGURATION]["student"]
    budget = student["width_budget"]
    assert student["width"] == budget["width"] == 0.5  # both meet a budget nothing misses: the wider one
    assert [c["width"] for c in budget["candidates"]] == [0.5, 0.25]
    for c in budget["candidates"]:
        assert c["median_s"] > 0 and len(c["all_s"]) == 3 and c["within_budget"]
        assert c["speedup_over_teacher"] == pytest.approx(budget["teacher_median_s"] / c["median_s"])
    assert budget["case"] and budget["device"] == "cpu" and len(budget["volume_shape"]) == 4
    features = load_json(path)["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]["features_per_stage"]
    teacher = load_json(join(workspace.teacher_folder, "plans.json"))["configurations"][CONFIGURATION]
    assert features[0] == max(8, teacher["architecture"]["arch_kwargs"]["features_per_stage"][0] // 2)


def test_a_budget_no_candidate_meets_is_refused_listing_what_was_measured(workspace, monkeypatch):
    workspace.set_env(monkeypatch)
    path = join(workspace.preprocessed, "nnUNetPlans_impossiblewidth.json")
    with pytest.raises(PlanningError, match=r"No candidate width meets the budget .*0\.25: .* s \(") as info:
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans_impossiblewidth",
                     max_latency=1e-9, width_candidates=[0.25], verbose=False)
    assert "teacher" in str(info.value)
    assert not os.path.exists(path)
    with pytest.raises(PlanningError, match="--min-speedup must be a positive number"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans_impossiblewidth",
                     min_speedup=-1.0, width_candidates=[0.25], verbose=False)
