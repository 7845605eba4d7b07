"""nnUNetTrainerBudget: teachers and plain students are plain nnU-Net models, trained at the plans' budget and seed."""
from __future__ import annotations

import glob
import os
from os.path import isdir, isfile, join

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import CONFIGURATION, DATASET_ID, DATASET_NAME, STUDENT_PLANS, TEACHER_PLANS, TEACHER_TRAINER
from nnunet_kd.recipe import RecipeError
from nnunet_kd.teacher import load_nnunet_checkpoint
from test_teacher_and_bad_inputs import make_trainer

BUDGET = "nnUNetTrainerBudget"


def plans_copy(ws, source: str, name: str, **training) -> str:
    """``source`` plans saved as ``name``, with their kd.<configuration>.training values changed."""
    plans = load_json(join(ws.preprocessed, source + ".json"))
    plans["plans_name"] = name
    plans["kd"][CONFIGURATION]["training"].update(training)
    save_json(plans, join(ws.preprocessed, name + ".json"), sort_keys=False)
    return name


def test_budget_teacher_is_a_plain_nnunet_model_that_predicts_without_the_plugin(workspace, tmp_path):
    ws = workspace
    assert TEACHER_TRAINER == BUDGET
    checkpoint = load_nnunet_checkpoint(join(ws.teacher_folder, "fold_0", "checkpoint_final.pth"))
    # The class nnU-Net's predictor builds is nnU-Net's own; the trainer that wrote it is recorded beside it.
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["trained_with"] == BUDGET
    assert checkpoint["current_epoch"] == 1  # the budget plans' num_epochs, not nnU-Net's 1000
    assert not any(k.startswith("kd_") for k in list(checkpoint) + list(checkpoint["logging"]))
    log = open(sorted(glob.glob(join(ws.teacher_folder, "fold_0", "training_log_*.txt")))[-1]).read()
    assert "Training budget from" in log and "1 epochs x 3 iterations (1 validation iterations per epoch)" in log

    no_plugin = {k: v for k, v in ws.env.items() if k != "nnUNet_extTrainer"}
    out = str(tmp_path / "teacher_predictions")
    ws.run("nnUNetv2_predict", "-i", join(ws.raw, "imagesTs"), "-o", out, "-d", str(DATASET_ID), "-c", CONFIGURATION,
           "-tr", BUDGET, "-p", TEACHER_PLANS, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1",
           env=no_plugin)
    assert len(glob.glob(join(out, "*.nii.gz"))) == len(os.listdir(join(ws.raw, "imagesTs"))) == 2


def test_budget_and_seed_come_from_teacher_and_student_plans(workspace, monkeypatch):
    ws = workspace
    teacher = make_trainer(ws, monkeypatch, TEACHER_PLANS, trainer=BUDGET)
    assert (teacher.num_epochs, teacher.num_iterations_per_epoch, teacher.num_val_iterations_per_epoch) == (1, 3, 1)
    name = plans_copy(ws, STUDENT_PLANS, "nnUNetPlans_budget_seeded", num_epochs=7, num_iterations_per_epoch=5,
                      num_val_iterations_per_epoch=2, seed=3)
    plain = make_trainer(ws, monkeypatch, name, trainer=BUDGET)
    assert (plain.num_epochs, plain.num_iterations_per_epoch, plain.num_val_iterations_per_epoch) == (7, 5, 2)
    assert plain.budget.seed == 3
    plain.initialize()
    kd = make_trainer(ws, monkeypatch, name, trainer="nnUNetTrainerKD_Adaptive")
    # a stopped 7-epoch run resumes (--c) from its last epoch, not from nnU-Net's every-50-epochs checkpoint
    assert plain.save_every == kd.save_every == 1
    kd.initialize()
    kd_weights = kd.network.state_dict()
    for key, value in plain.network.state_dict().items():
        assert torch.equal(value, kd_weights[key]), key

    # Another seed starts elsewhere: the equality above is the seed's doing, not a deterministic initialisation.
    other = make_trainer(ws, monkeypatch, plans_copy(ws, name, "nnUNetPlans_budget_seed4", seed=4), trainer=BUDGET)
    other.initialize()
    assert any(not torch.equal(v, kd_weights[k]) for k, v in other.network.state_dict().items())


def test_plans_without_a_budget_are_refused_before_anything_is_written(workspace, monkeypatch):
    ws = workspace
    folder = join(ws.results, DATASET_NAME, f"{BUDGET}__nnUNetPlans__{CONFIGURATION}")
    assert not isdir(folder)
    with pytest.raises(RecipeError, match=r"nnUNetPlans\.json has no training budget for configuration '3d_fullres'.*"
                                          r"-tr nnUNetTrainer"):
        make_trainer(ws, monkeypatch, "nnUNetPlans", trainer=BUDGET)
    plans_copy(ws, TEACHER_PLANS, "nnUNetPlans_budget_bad", num_epochs=0)
    with pytest.raises(RecipeError, match=r"nnUNetPlans_budget_bad\.json: kd\.3d_fullres\.training\.num_epochs must"):
        make_trainer(ws, monkeypatch, "nnUNetPlans_budget_bad", trainer=BUDGET)
    assert not isdir(folder) and not isdir(folder.replace("__nnUNetPlans__", "__nnUNetPlans_budget_bad__"))


def test_resume_with_c_and_fallback_from_a_truncated_checkpoint(workspace, monkeypatch):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    ws = workspace
    name = plans_copy(ws, TEACHER_PLANS, "nnUNetPlans_budget_resume")
    trainer = make_trainer(ws, monkeypatch, name, trainer=BUDGET)
    trainer.initialize()
    latest, best = (join(trainer.output_folder, f"checkpoint_{n}.pth") for n in ("latest", "best"))
    for path, epoch in ((latest, 6), (best, 4)):
        trainer.current_epoch = epoch - 1  # nnU-Net stores the next epoch to run
        trainer.save_checkpoint(path)
    assert load_nnunet_checkpoint(latest)["trainer_name"] == "nnUNetTrainer"

    def resume():  # what nnUNetv2_train ... --c does: final, else latest, else best, then load_checkpoint
        resumed = make_trainer(ws, monkeypatch, name, trainer=BUDGET)
        maybe_load_checkpoint(resumed, continue_training=True, validation_only=False)
        return resumed, open(resumed.log_file).read()

    resumed, _ = resume()
    assert resumed.current_epoch == 6
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(value, resumed.network.state_dict()[key]), key

    open(latest, "r+b").truncate(os.path.getsize(latest) // 3)
    resumed, log = resume()
    assert resumed.current_epoch == 4 and f"newest intact checkpoint {best} (epoch 4)" in log

    # A checkpoint of another trainer (here a distillation trainer's) is not resumed as a plain model.
    checkpoint = load_nnunet_checkpoint(best)
    checkpoint["trainer_name"] = "nnUNetTrainerKD_Adaptive"
    torch.save(checkpoint, latest)
    with pytest.raises(RuntimeError, match=r"written by trainer nnUNetTrainerKD_Adaptive.*-tr nnUNetTrainerKD_Adaptive"):
        resume()


def test_real_training_resumes_with_c_and_records_its_cases(workspace):
    ws = workspace
    name = plans_copy(ws, TEACHER_PLANS, "nnUNetPlans_budget_c", num_iterations_per_epoch=1)
    train = ["nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", BUDGET, "-p", name, "-device", "cpu"]
    ws.run(*train)
    fold = join(ws.results, DATASET_NAME, f"{BUDGET}__{name}__{CONFIGURATION}", "fold_0")
    record = load_json(join(fold, "training_cases.json"))
    splits = load_json(join(ws.preprocessed, "splits_final.json"))
    assert record["dataset_name"] == DATASET_NAME and record["fold"] == 0
    assert record["training_cases"] == sorted(splits[0]["train"])
    assert record["validation_cases"] == sorted(splits[0]["val"])

    # A case the first run trained on but today's split does not list (the splits file was edited in between): the
    # resumed run's record keeps it, since the fold's weights have seen it.
    record["training_cases"].append("case_of_the_first_run")
    save_json(record, join(fold, "training_cases.json"))
    plans_copy(ws, name, name, num_epochs=2)
    ws.run(*train, "--c")
    assert load_nnunet_checkpoint(join(fold, "checkpoint_final.pth"))["current_epoch"] == 2
    resumed = load_json(join(fold, "training_cases.json"))
    assert resumed["training_cases"] == sorted(splits[0]["train"] + ["case_of_the_first_run"])
    assert isfile(join(fold, "validation", "summary.json"))


def test_the_old_plain_trainer_name_still_trains_and_says_it_is_deprecated(workspace, monkeypatch):
    old = make_trainer(workspace, monkeypatch, STUDENT_PLANS, trainer="nnUNetTrainerKD_NoKD")
    assert old.num_epochs == load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))["kd"][CONFIGURATION][
        "training"]["num_epochs"]
    assert "nnUNetTrainerKD_NoKD is deprecated" in open(old.log_file).read() and BUDGET in open(old.log_file).read()


def test_budget_plans_command_writes_plans_the_trainer_reads_and_replaces_only_its_own(workspace, monkeypatch,
                                                                                      capsys):
    from nnunet_kd.budget import main
    ws = workspace
    ws.set_env(monkeypatch)
    command = ["-d", str(DATASET_ID), "-c", CONFIGURATION, "--epochs", "2", "--iterations-per-epoch", "3", "--seed",
               "1", "--max-batch-size", "1"]
    main(command + ["-o", "nnUNetPlans_cli_budget"])
    with pytest.raises(SystemExit):  # its own budget plans: replaced only with --overwrite
        main(command + ["-o", "nnUNetPlans_cli_budget"])
    assert "exists (budget plans written earlier" in capsys.readouterr().err
    main(command + ["-o", "nnUNetPlans_cli_budget", "--overwrite"])
    assert "-tr nnUNetTrainerBudget -p nnUNetPlans_cli_budget" in capsys.readouterr().out
    plans = load_json(join(ws.preprocessed, "nnUNetPlans_cli_budget.json"))
    assert plans["configurations"][CONFIGURATION]["batch_size"] == 1
    trainer = make_trainer(ws, monkeypatch, "nnUNetPlans_cli_budget", trainer=BUDGET)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.budget.seed) == (2, 3, 1)

    student_file = join(ws.preprocessed, STUDENT_PLANS + ".json")
    student_before = open(student_file).read()
    for name, message in (("nnUNetPlans", "is not budget plans this command wrote"),
                          (STUDENT_PLANS, "is not budget plans this command wrote"),
                          ("plans/x", "is not a plans name")):
        with pytest.raises(SystemExit) as stopped:
            main(command + ["-o", name, "--overwrite"])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert open(student_file).read() == student_before
    with pytest.raises(SystemExit):
        main(["-d", str(DATASET_ID), "-c", CONFIGURATION, "--epochs", "0", "-o", "nnUNetPlans_cli_never"])
    assert "training.num_epochs must be an integer >= 1" in capsys.readouterr().err
    assert not isfile(join(ws.preprocessed, "nnUNetPlans_cli_never.json"))


def test_a_budget_run_writes_checkpoint_latest_every_tenth_of_its_epochs_at_most_every_50():
    from nnunet_kd.budget import checkpoint_interval

    assert [checkpoint_interval(n) for n in (1, 9, 10, 60, 500, 1000, 4000)] == [1, 1, 1, 6, 50, 50, 50]
