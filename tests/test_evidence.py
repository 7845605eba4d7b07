"""The held-out evidence protocol: a fixed split that no training ever sees, paired statistics whose intervals
cover cases and seeds, a plateau check, and the label-teacher control's targets."""
from __future__ import annotations

import json
import os
from os.path import join

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_kd.evidence import (load_or_make_split, make_split, mean_foreground_dice, paired_bootstrap, parse_runs,
                                per_case_metrics, plateau, prepare_workspace, student_plans_name,
                                write_crossval_split, _parse_student_folder)
from nnunet_kd.losses.kl import LogitKLLoss, label_teacher_logits


def fake_raw_dataset(root, n_cases: int = 20) -> str:
    folder = join(str(root), "Dataset777_Fake")
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(join(folder, sub))
    for i in range(n_cases):
        open(join(folder, "imagesTr", f"case_{i:03d}_0000.nii.gz"), "w").close()
        open(join(folder, "labelsTr", f"case_{i:03d}.nii.gz"), "w").close()
    with open(join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1}, "numTraining": n_cases,
                   "file_ending": ".nii.gz"}, f)
    return folder


def test_split_is_seeded_disjoint_and_crossvalidates_only_training_cases(tmp_path):
    raw = fake_raw_dataset(tmp_path)
    split = make_split(raw, n_test=6)
    assert split == make_split(raw, n_test=6)  # same seed, same split
    assert len(split["test"]) == 6 and len(split["train"]) == 14
    assert not set(split["test"]) & set(split["train"])
    assert set(split["test"]) | set(split["train"]) == {f"case_{i:03d}" for i in range(20)}
    assert len(split["crossval"]) == 5
    for fold in split["crossval"]:
        assert set(fold["train"]) | set(fold["val"]) == set(split["train"])  # never a test case
        assert not set(fold["train"]) & set(fold["val"])
    assert make_split(raw, n_test=6, seed=1)["test"] != split["test"]


def test_split_file_is_written_once_then_only_read(tmp_path):
    raw = fake_raw_dataset(tmp_path)
    split_file = join(str(tmp_path), "splits", "fake.json")
    first = load_or_make_split(split_file, raw, n_test=5)
    assert load_or_make_split(split_file, raw, n_test=7) == first  # n_test of a later call does not redraw it
    os.remove(join(raw, "labelsTr", first["test"][0] + ".nii.gz"))
    with pytest.raises(ValueError, match="names cases that .* does not have"):
        load_or_make_split(split_file, raw, n_test=5)


def test_workspace_raw_folder_holds_only_training_cases(tmp_path):
    raw = fake_raw_dataset(tmp_path)
    split = make_split(raw, n_test=5)
    raw_folder, images_ts, labels_ts = prepare_workspace(raw, split, join(str(tmp_path), "ws_raw"),
                                                         join(str(tmp_path), "ws_test"))
    trained_on = {f[:-len(".nii.gz")] for f in os.listdir(join(raw_folder, "labelsTr"))}
    assert trained_on == set(split["train"])
    assert {f[:-len("_0000.nii.gz")] for f in os.listdir(images_ts)} == set(split["test"])
    assert {f[:-len(".nii.gz")] for f in os.listdir(labels_ts)} == set(split["test"])
    with open(join(raw_folder, "dataset.json")) as f:
        assert json.load(f)["numTraining"] == 15
    preprocessed = join(str(tmp_path), "pre")
    os.makedirs(preprocessed)
    write_crossval_split(preprocessed, split)
    other = make_split(raw, n_test=5, seed=3)
    with pytest.raises(ValueError, match="another split"):
        write_crossval_split(preprocessed, other)


def test_bootstrap_of_constant_differences_is_that_constant():
    result = paired_bootstrap(np.full((3, 10), 0.02))
    assert result["mean_diff"] == pytest.approx(0.02)
    assert result["ci95"] == pytest.approx([0.02, 0.02])
    assert (result["n_cases"], result["n_seeds"]) == (10, 3)


def test_bootstrap_interval_covers_seed_variation_not_only_case_variation():
    cases = np.linspace(-0.01, 0.01, 40)
    same_seeds = np.stack([cases + 0.05] * 3)
    seeds_disagree = np.stack([cases + 0.0, cases + 0.05, cases + 0.10])
    narrow = paired_bootstrap(same_seeds)
    wide = paired_bootstrap(seeds_disagree)
    assert narrow["mean_diff"] == pytest.approx(wide["mean_diff"]) == pytest.approx(0.05)
    assert (wide["ci95"][1] - wide["ci95"][0]) > 5 * (narrow["ci95"][1] - narrow["ci95"][0])
    assert wide["ci95"][0] < 0.05 < wide["ci95"][1]


def test_plateau_detects_a_rising_curve_and_a_flat_one():
    rising = list(np.linspace(0.5, 0.9, 20))
    result = plateau(rising)
    assert not result["flat"]
    assert result["gain_over_last_fifth"] == pytest.approx(0.4 / 19 * 3)  # slope x (4 epochs - 1)
    assert plateau([0.5] * 10 + [0.8] * 10)["flat"]
    assert not plateau([0.8, 0.8, 0.8, 0.8, 0.8, 0.81, 0.82, 0.83])["flat"]  # +0.02 over the last fifth


def test_runs_and_folder_names_round_trip():
    assert parse_runs(["plain@0.25", "adaptive@0.5"]) == [("plain", 0.25), ("adaptive", 0.5)]
    for bad in ("adaptive", "nokd@0.25", "plain@wide", "plain@0"):
        with pytest.raises(ValueError):
            parse_runs([bad])
    name = f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.125, 2)}__2d"
    assert _parse_student_folder(name, "2d") == ("adaptive", 0.125, 2)
    assert _parse_student_folder(name, "3d_fullres") is None
    assert _parse_student_folder("nnUNetTrainer__nnUNetPlans__2d", "2d") is None
    # The plain student: nnUNetTrainerBudget now, nnUNetTrainerKD_NoKD in workspaces made by older versions.
    for trainer in ("nnUNetTrainerBudget", "nnUNetTrainerKD_NoKD"):
        assert _parse_student_folder(f"{trainer}__{student_plans_name(0.25, 0)}__2d", "2d") == ("plain", 0.25, 0)


def test_per_case_metrics_read_nnunets_evaluation(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref, pred = join(str(tmp_path), "ref"), join(str(tmp_path), "pred")
    os.makedirs(ref)
    os.makedirs(pred)
    reference = np.zeros((1, 4, 4), np.uint8)
    reference[0, :2, :2] = 1  # 4 voxels of label 1
    reference[0, 3, 3] = 2    # 1 voxel of label 2
    prediction = np.zeros_like(reference)
    prediction[0, :2, :1] = 1  # 2 of the 4, no false positive
    prediction[0, 2, 2] = 2    # 1 false positive, 1 false negative of label 2
    for folder, array in ((ref, reference), (pred, prediction)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 1.0, 1.0))
        sitk.WriteImage(image, join(folder, "case_000.nii.gz"))
    compute_metrics_on_folder(ref, pred, join(pred, "summary.json"), SimpleITKIO(), ".nii.gz", [1, 2],
                              num_processes=1)
    metrics = per_case_metrics(join(pred, "summary.json"))
    assert set(metrics) == {"case_000"}
    assert metrics["case_000"]["1"]["Dice"] == pytest.approx(2 * 2 / (4 + 2))
    assert (metrics["case_000"]["2"]["FP"], metrics["case_000"]["2"]["FN"]) == (1, 1)
    assert mean_foreground_dice(metrics["case_000"]) == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (2, 1, 3, 5, 6)])
def test_label_teacher_logits_soften_back_to_the_labels(shape):
    labels = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(0))
    logits = label_teacher_logits(labels, 3, temperature=3.0)
    probabilities = torch.softmax(logits / 3.0, dim=1)
    one_hot = torch.zeros_like(probabilities).scatter_(1, labels, 1.0)
    assert torch.allclose(probabilities, one_hot, atol=3e-6)
    # KD against the label teacher is the (tempered, class-balanced) cross-entropy: zero for a perfect student
    kl = LogitKLLoss(temperature=3.0, reduction="class_balanced")
    assert kl(logits.clone().requires_grad_(), logits, None, labels).item() == pytest.approx(0.0, abs=1e-4)
    student = torch.zeros_like(logits, requires_grad=True)  # uniform prediction: T^2 * log(3) per voxel
    assert kl(student, logits, None, labels).item() == pytest.approx(9 * np.log(3), rel=1e-4)


def test_label_teacher_logits_ignore_masked_voxels_and_handle_regions():
    labels = torch.tensor([[[[0, 1], [2, 3]]]])  # 3: an ignore label outside the class range
    mask = labels != 3
    logits = label_teacher_logits(labels, 3, temperature=1.0, mask=mask)
    assert torch.isfinite(logits).all() and logits.shape == (1, 3, 2, 2)
    assert logits[0, :, 1, 1].argmax() == 0
    regions = torch.tensor([[[[0, 1]], [[1, 1]]]])
    region_logits = label_teacher_logits(regions, 2, temperature=2.0, region_based=True)
    assert torch.allclose(torch.sigmoid(region_logits / 2.0), regions.float(), atol=2e-6)
