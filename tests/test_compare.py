"""The comparison engine behind nnUNetv2_kd_demo and benchmarks/run_quality.py, on the shared test workspace:
it plans the student, trains plain and distilled students with the real nnUNetv2_train on one budget and seed,
and reports nnU-Net's validation Dice, cost, inference time, gap closed and plots."""
from __future__ import annotations

import json
import os
from os.path import isfile, join

import pytest

from conftest import CONFIGURATION, DATASET_ID, DATASET_NAME
from nnunet_kd.compare import (Budget, Comparison, StaleRunError, add_gap_closed, format_table, plot_results,
                               run_comparison, save_result)


def test_gap_closed_is_the_share_of_the_teacher_student_gap_recovered():
    rows = [{"model": "teacher", "mean_dice": 0.9}, {"model": "plain student", "mean_dice": 0.7},
            {"model": "Adaptive KD", "mean_dice": 0.85}, {"model": "MSKD", "mean_dice": 0.6}]
    add_gap_closed(rows)
    assert [r["gap_closed"] for r in rows][:2] == [None, None]
    assert rows[2]["gap_closed"] == pytest.approx(0.75) and rows[3]["gap_closed"] == pytest.approx(-0.5)
    rows[0]["mean_dice"] = 0.7  # no gap to close: undefined, not a division by zero
    add_gap_closed(rows)
    assert rows[2]["gap_closed"] is None


def test_table_shows_each_folds_mean_dice_when_there_are_several():
    row = {"model": "plain student", "parameters": 346065, "flops_per_patch": 1.11e9, "inference_s": 0.04,
           "dice_per_class": {"1": 0.9, "2": 0.8}, "mean_dice": 0.85, "mean_dice_per_fold": [0.86, 0.84],
           "gap_closed": None}
    table = format_table([row], ["1", "2"], {"1": "peripheral_zone", "2": "transition_zone"})
    assert "| mean Dice | mean Dice per fold | gap closed |" in table
    assert table.splitlines()[-1] == ("| plain student | 346.06 k | 1.11 G | 0.04 | 0.9000 | 0.8000 | 0.8500 | "
                                      "0.8600 / 0.8400 |  |")
    row["mean_dice_per_fold"] = [0.85]
    assert "per fold" not in format_table([row], ["1", "2"])


def test_table_shows_the_inference_times_median_and_range_when_timed_several_times():
    row = {"model": "plain student", "parameters": 346065, "flops_per_patch": 1.11e9, "inference_s": 0.052,
           "inference_all_s": [0.061, 0.052, 0.049], "dice_per_class": {"1": 0.9}, "mean_dice": 0.9,
           "mean_dice_per_fold": [0.9], "gap_closed": None}
    table = format_table([row], ["1"])
    assert "| infer s, median [range] of 3 |" in table
    assert "| 0.05 [0.05-0.06] |" in table.splitlines()[-1]


def test_runs_of_older_workspaces_are_found_under_their_older_trainer_name(tmp_path):
    from nnunet_kd.pipeline import model_folder, trainer_of_existing_run
    results = str(tmp_path)

    def checkpoint(trainer: str, name: str) -> None:
        fold = join(model_folder(results, DATASET_NAME, trainer, "P", CONFIGURATION), "fold_0")
        os.makedirs(fold, exist_ok=True)
        open(join(fold, name), "wb").close()

    def found() -> str:
        return trainer_of_existing_run(results, DATASET_NAME, "nnUNetTrainerBudget", "P", CONFIGURATION, 0)
    assert found() == "nnUNetTrainerBudget"  # nothing trained yet: the current trainer
    checkpoint("nnUNetTrainerKD_NoKD", "checkpoint_latest.pth")  # an interrupted run of an older version
    assert found() == "nnUNetTrainerKD_NoKD"
    assert trainer_of_existing_run(results, DATASET_NAME, "nnUNetTrainerBudget", "P", CONFIGURATION, 1) == \
        "nnUNetTrainerBudget"  # another fold
    checkpoint("nnUNetTrainerBudget", "checkpoint_final.pth")
    assert found() == "nnUNetTrainerBudget"


def test_comparison_trains_students_on_one_budget_and_reports_everything(workspace, tmp_path):
    ws = workspace
    plans = "nnUNetPlans_testcompare"
    comparison = Comparison(dataset_id=DATASET_ID, dataset_name=DATASET_NAME, configuration=CONFIGURATION,
                            budget=Budget(teacher_epochs=1, student_epochs=1, iterations_per_epoch=2,
                                          val_iterations_per_epoch=1, seed=7),
                            methods=["plain", "mskd"], teacher_folder=ws.teacher_folder, student_plans=plans,
                            inference_repeats=1)
    result = run_comparison(comparison, ws.env, join(ws.root, "commands.log"), preprocess=False)

    assert [r["model"] for r in result["models"]] == ["teacher", "plain student", "MSKD"]
    student_plans = json.load(open(join(ws.preprocessed, plans + ".json")))
    assert student_plans["kd"][CONFIGURATION]["training"]["seed"] == 7
    for row in result["models"]:
        assert isfile(join(row["folder"], "fold_0", "validation", "summary.json"))
        assert set(row["dice_per_class"]) == {"1", "2"} and 0 <= row["mean_dice"] <= 1
        assert row["parameters"] > 0 and row["flops_per_patch"] > 0 and row["inference_s"] > 0
        assert row["curves"]["0"]["val_losses"]
    teacher, plain, mskd = result["models"]
    assert plain["trainer"] == "nnUNetTrainerBudget"
    assert plain["parameters"] == mskd["parameters"] < teacher["parameters"] / 4
    assert result["table"].splitlines()[-1].startswith("| MSKD | ")

    out = str(tmp_path / "r.json")
    save_result(result, out)
    assert json.load(open(out))["budget"]["student_epochs"] == 1 and isfile(str(tmp_path / "r.md"))
    for png in plot_results(result, str(tmp_path / "r")):
        assert os.path.getsize(png) > 1000

    # A second call reuses the finished runs instead of training them again.
    before = os.path.getmtime(join(plain["folder"], "fold_0", "checkpoint_final.pth"))
    run_comparison(comparison, ws.env, join(ws.root, "commands.log"), preprocess=False)
    assert os.path.getmtime(join(plain["folder"], "fold_0", "checkpoint_final.pth")) == before

    # A rerun that asks for another budget must not report the old models: refused, the old run kept on disk.
    comparison.budget = Budget(teacher_epochs=1, student_epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1,
                               seed=7)
    with pytest.raises(StaleRunError, match=r"fold_0 is a finished run, but it was trained with other plans"):
        run_comparison(comparison, ws.env, join(ws.root, "commands.log"), preprocess=False)
    assert os.path.getmtime(join(plain["folder"], "fold_0", "checkpoint_final.pth")) == before


def test_a_finished_run_is_reused_when_its_plans_only_lack_a_setting_that_is_null_now(tmp_path):
    """A preset that gains a setting at null (its earlier behaviour) leaves every finished run reusable; any real
    change of a setting still refuses the run."""
    from nnunet_kd.compare import _check_same_plans

    folder = tmp_path / "model"
    folder.mkdir()
    used = {"kd": {"2d": {"methods": {"m": {"weights": {"kl": 0.5}, "train_on_unlabelled": True}}}}}
    (folder / "plans.json").write_text(json.dumps(used))
    now = json.loads(json.dumps(used))
    now["kd"]["2d"]["methods"]["m"]["unlabelled_batch_share"] = None
    (tmp_path / "now.json").write_text(json.dumps(now))
    _check_same_plans(str(folder), str(tmp_path / "now.json"), 0)
    now["kd"]["2d"]["methods"]["m"]["unlabelled_batch_share"] = 0.25
    (tmp_path / "now.json").write_text(json.dumps(now))
    with pytest.raises(StaleRunError, match="trained with other plans"):
        _check_same_plans(str(folder), str(tmp_path / "now.json"), 0)
