"""Subset teachers: the student fold's training cases split into k seeded subsets (disjoint, or overlapping;
stratified by group), one budget plans file each, and nnUNetTrainerBudget trains on its subset only: never on the
fold's validation cases."""
from __future__ import annotations

import json
from collections import Counter
from os.path import join

import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import CONFIGURATION, DATASET_ID
from nnunet_kd.provenance import read_training_cases
from nnunet_kd.subsets import SubsetError, plan_subset_teachers, split_into_subsets, subset_plans_name

CASES = [f"case_{i:03d}" for i in range(23)]


def test_disjoint_subsets_cover_the_cases_are_balanced_and_seeded():
    subsets = split_into_subsets(CASES, 3, seed=7)
    assert sorted(c for s in subsets for c in s) == sorted(CASES)  # disjoint and covering
    assert sorted(len(s) for s in subsets) == [7, 8, 8]
    assert subsets == split_into_subsets(list(reversed(CASES)), 3, seed=7)  # the input order does not matter
    assert subsets != split_into_subsets(CASES, 3, seed=8)


def test_overlapping_subsets_take_a_fraction_of_the_other_subsets_cases():
    disjoint = split_into_subsets(CASES, 3, seed=1)
    overlapping = split_into_subsets(CASES, 3, seed=1, overlap=0.25)
    for own, extended in zip(disjoint, overlapping):
        assert set(own) < set(extended) <= set(CASES)
        assert len(extended) - len(own) == round(0.25 * len(own))
    assert len(set(overlapping[0]) & (set(overlapping[1]) | set(overlapping[2]))) > 0


def test_groups_are_dealt_out_in_proportion():
    groups = {c: ("site A" if i < 12 else "site B" if i < 20 else "site C") for i, c in enumerate(CASES)}
    subsets = split_into_subsets(CASES, 4, seed=3, groups=groups)
    for group, total in Counter(groups.values()).items():
        shares = [sum(groups[c] == group for c in s) for s in subsets]
        assert max(shares) - min(shares) <= 1 and sum(shares) == total, group
    assert max(map(len, subsets)) - min(map(len, subsets)) <= 1


@pytest.mark.parametrize("k, overlap, message", [(1, 0.0, r"-k must be an integer >= 2"),
                                                 (30, 0.0, r"cannot be split into 30"),
                                                 (3, 1.0, r"--overlap must be a fraction")])
def test_impossible_splits_are_refused(k, overlap, message):
    with pytest.raises(SubsetError, match=message):
        split_into_subsets(CASES, k, overlap=overlap)


def test_subset_plans_train_a_plain_teacher_on_its_subset_only(workspace, monkeypatch):
    ws = workspace
    ws.set_env(monkeypatch)
    splits = load_json(join(ws.preprocessed, "splits_final.json"))
    written = plan_subset_teachers(str(DATASET_ID), CONFIGURATION, 0, 2, "nnUNetPlans_testsubset", num_epochs=1,
                                   iterations_per_epoch=2, val_iterations_per_epoch=1, seed=0, overwrite=True)
    assert [w["plans_name"] for w in written] == [subset_plans_name("nnUNetPlans_testsubset", i, 2) for i in (0, 1)] \
        == ["nnUNetPlans_testsubset1of2", "nnUNetPlans_testsubset2of2"]
    union = set(written[0]["training_cases"]) | set(written[1]["training_cases"])
    assert union == set(splits[0]["train"]) and not union & set(splits[0]["val"])
    assert not set(written[0]["training_cases"]) & set(written[1]["training_cases"])
    plans = load_json(written[0]["plans_file"])
    assert plans["plans_name"] == "nnUNetPlans_testsubset1of2"
    assert plans["configurations"] == load_json(join(ws.preprocessed, "nnUNetPlans.json"))["configurations"]
    # nothing is replaced without --overwrite, and nothing is written when one file may not be
    with pytest.raises(SubsetError, match="pass --overwrite"):
        plan_subset_teachers(str(DATASET_ID), CONFIGURATION, 0, 2, "nnUNetPlans_testsubset", num_epochs=1)

    ws.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", "nnUNetTrainerBudget", "-p",
           written[0]["plans_name"], "-device", "cpu")
    fold = join(ws.results, "Dataset991_KDTest", f"nnUNetTrainerBudget__{written[0]['plans_name']}__{CONFIGURATION}",
                "fold_0")
    record = read_training_cases(fold)
    assert record["training_cases"] == written[0]["training_cases"]
    assert record["validation_cases"] == sorted(splits[0]["val"])
    from nnunet_kd.teacher import load_nnunet_checkpoint
    assert load_nnunet_checkpoint(join(fold, "checkpoint_final.pth"))["trainer_name"] == "nnUNetTrainer"  # plain


def test_training_cases_that_are_validation_cases_are_refused_before_training(workspace, monkeypatch, tmp_path):
    ws = workspace
    ws.set_env(monkeypatch)
    splits = load_json(join(ws.preprocessed, "splits_final.json"))
    written = plan_subset_teachers(str(DATASET_ID), CONFIGURATION, 0, 2, "nnUNetPlans_badsubset", num_epochs=1,
                                   iterations_per_epoch=2, val_iterations_per_epoch=1, overwrite=True)
    plans = load_json(written[0]["plans_file"])
    plans["kd"][CONFIGURATION]["training"]["training_cases"] = [splits[0]["val"][0]]
    with open(written[0]["plans_file"], "w") as f:
        json.dump(plans, f)
    from test_teacher_and_bad_inputs import make_trainer
    trainer = make_trainer(ws, monkeypatch, "nnUNetPlans_badsubset1of2", trainer="nnUNetTrainerBudget")
    with pytest.raises(Exception, match=r"1 of them are its validation cases"):
        trainer.do_split()


@pytest.fixture(scope="module")
def subset_teachers(workspace):
    """Three teachers, each trained (briefly) on one third of fold 0's training cases."""
    import os
    ws = workspace
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update({k: ws.env[k] for k in saved})
    try:
        written = plan_subset_teachers(str(DATASET_ID), CONFIGURATION, 0, 3, "nnUNetPlans_routesubset", num_epochs=1,
                                       iterations_per_epoch=2, val_iterations_per_epoch=1, seed=0, overwrite=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    folders = []
    for w in written:
        ws.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", "nnUNetTrainerBudget", "-p",
               w["plans_name"], "-device", "cpu")
        folders.append(join(ws.results, "Dataset991_KDTest", f"nnUNetTrainerBudget__{w['plans_name']}__{CONFIGURATION}"))
    return written, folders


def test_the_multi_teacher_student_mixes_its_subset_teachers_and_never_asks_one_about_its_own_cases(
        workspace, subset_teachers, monkeypatch):
    import torch

    from nnunet_kd.planning import plan_student
    from test_multi_teacher import _batch
    from test_teacher_and_bad_inputs import make_trainer

    written, folders = subset_teachers
    workspace.set_env(monkeypatch)
    plan_student(str(DATASET_ID), CONFIGURATION, folders, "nnUNetPlans_multiteacher", width=0.25, verbose=False,
                 overwrite=True, num_epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1)
    trainer = make_trainer(workspace, monkeypatch, "nnUNetPlans_multiteacher", trainer="nnUNetTrainerKD_MultiTeacher")
    recipe = trainer.kd_recipe
    assert (recipe.teacher_aggregation, recipe.teacher_routing) == ("adaptive", True)
    trainer.initialize()
    names = ["teacher0", "teacher1", "teacher2"]
    assert trainer.teacher_trained_on == {n: frozenset(w["training_cases"]) for n, w in zip(names, written)}
    batch = _batch(trainer)
    batch["keys"] = [written[0]["training_cases"][0], written[1]["training_cases"][0]]
    with torch.no_grad():
        step = trainer.distillation_step(batch["data"], trainer.network(batch["data"]), batch["target"], batch["keys"])
    w0, w1, w2 = (step.teacher_weights[n][0] for n in names)
    # A case of subset 0 is taught by teachers 1 and 2 only, one of subset 1 by teachers 0 and 2 only; the adaptive
    # weights of the teachers that may teach a voxel sum to 1 there.
    assert (w0[0] == 0).all() and torch.allclose(w1[0] + w2[0], torch.ones_like(w1[0]))
    assert (w1[1] == 0).all() and torch.allclose(w0[1] + w2[1], torch.ones_like(w0[1]))
    assert len(step.mixture.outputs) == len(step.student_outputs)
    out = trainer.train_step(batch)
    assert {"kl", "feature", *(f"feature_{n}" for n in names), *(f"teacher_weight_{n}" for n in names)} \
        <= set(out["terms"]) and "kl_teacher0" not in out["terms"]
    assert sum(out["terms"][f"teacher_weight_{n}"].item() for n in names) == pytest.approx(1.0)
    trainer.on_train_epoch_end([out])
    assert set(trainer.logged_terms) == set(out["terms"])

    # and nnUNetv2_train runs it end to end, logging each teacher's weight per epoch
    workspace.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", "nnUNetTrainerKD_MultiTeacher", "-p",
                  "nnUNetPlans_multiteacher", "-device", "cpu")
    folder = workspace.student_folder("nnUNetTrainerKD_MultiTeacher", "nnUNetPlans_multiteacher")
    from nnunet_kd.teacher import load_nnunet_checkpoint
    logging = load_nnunet_checkpoint(join(folder, "fold_0", "checkpoint_final.pth"))["logging"]
    assert all(len(logging[f"kd_teacher_weight_{n}"]) == 1 for n in names)

    # its export is a plain nnU-Net model: nnU-Net's trainer name, the student's weights only, no recipe
    exported = join(workspace.root, "multiteacher_exported")
    workspace.run("nnUNetv2_kd_export", "-i", folder, "-o", exported)
    vanilla = load_nnunet_checkpoint(join(exported, "fold_0", "checkpoint_final.pth"))
    assert vanilla["trainer_name"] == "nnUNetTrainer" and not any(k.startswith("kd_") for k in vanilla)
    assert vanilla["network_weights"].keys() == \
        load_nnunet_checkpoint(join(folder, "fold_0", "checkpoint_final.pth"))["network_weights"].keys()


def test_a_labelled_fraction_gives_the_kd_student_and_its_plain_baseline_the_same_seeded_cases(workspace, monkeypatch):
    from nnunet_kd.budget import labelled_subset
    from nnunet_kd.planning import plan_student
    from nnunet_kd.recipe import RecipeError
    from test_teacher_and_bad_inputs import make_trainer

    workspace.set_env(monkeypatch)
    plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans_halflabels", width=0.25,
                 verbose=False, overwrite=True, labelled_fraction=0.5, labelled_fraction_seed=3)
    splits = load_json(join(workspace.preprocessed, "splits_final.json"))
    kd = make_trainer(workspace, monkeypatch, "nnUNetPlans_halflabels", trainer="nnUNetTrainerKD_BalancedHints")
    plain = make_trainer(workspace, monkeypatch, "nnUNetPlans_halflabels", trainer="nnUNetTrainerBudget")
    train, val = kd.do_split()
    assert (train, val) == plain.do_split()
    assert train == labelled_subset(splits[0]["train"], 0.5, 3)
    assert len(train) == round(0.5 * len(splits[0]["train"])) and set(train) < set(splits[0]["train"])
    assert sorted(val) == sorted(splits[0]["val"])
    assert labelled_subset(splits[0]["train"], 0.5, 3) != labelled_subset(splits[0]["train"], 0.5, 4)
    plans = load_json(join(workspace.preprocessed, "nnUNetPlans_halflabels.json"))
    plans["kd"][CONFIGURATION]["training"]["labelled_fraction"] = 1.5
    from nnunet_kd.recipe import parse_recipe
    with pytest.raises(RecipeError, match=r"labelled_fraction must be null or a fraction in \(0, 1\]"):
        parse_recipe(plans, CONFIGURATION, "none", "halflabels.json")
