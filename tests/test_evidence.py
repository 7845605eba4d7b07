"""The held-out evidence protocol: a fixed split that no training ever sees, paired statistics whose intervals
cover cases and seeds, a plateau check, and the label-teacher control's targets."""
from __future__ import annotations

import json
import os
import shutil
from os.path import join

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_kd.evidence.collect import parse_student_folder
from nnunet_kd.evidence.protocol import parse_runs, student_plans_name
from nnunet_kd.evidence.split import load_or_make_split, make_split, prepare_workspace, write_crossval_split
from nnunet_kd.evidence.statistics import mean_foreground_dice, paired_bootstrap, per_case_metrics, plateau
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
    # what the interval is made of, for a reader to judge with 2-3 seeds
    assert wide["mean_diff_per_seed"] == pytest.approx([0.0, 0.05, 0.10])


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
    assert parse_student_folder(name, "2d") == ("adaptive", 0.125, 2, None, None)
    assert parse_student_folder(name, "3d_fullres") is None
    assert parse_student_folder("nnUNetTrainer__nnUNetPlans__2d", "2d") is None
    # The plain student: nnUNetTrainerBudget now, nnUNetTrainerKD_NoKD in workspaces made by older versions.
    for trainer in ("nnUNetTrainerBudget", "nnUNetTrainerKD_NoKD"):
        assert parse_student_folder(f"{trainer}__{student_plans_name(0.25, 0)}__2d", "2d") == ("plain", 0.25, 0, None, None)
    # Students on part of the labels (with or without extra unlabelled images) carry the fraction in the plans name.
    for extra in (False, True):
        name = f"nnUNetTrainerKD_MultiScaleContrastive__{student_plans_name(0.25, 1, 0.5, extra)}__2d"
        assert parse_student_folder(name, "2d") == ("multiscale_contrastive", 0.25, 1, 0.5, None)
    assert student_plans_name(0.25, 1, 0.5) != student_plans_name(0.25, 1, 0.5, True) != student_plans_name(0.25, 1)
    assert parse_runs(["multiscale_contrastive@0.25"]) == [("multiscale_contrastive", 0.25)]
    # A student of k subset teachers has plans of its own (its recipe lists those teachers), and only it uses them.
    name = f"nnUNetTrainerKD_MultiTeacher__{student_plans_name(0.25, 1, subset_teachers=3)}__2d"
    assert parse_student_folder(name, "2d") == ("multi_teacher", 0.25, 1, None, 3)
    assert parse_student_folder(f"nnUNetTrainerKD_MultiTeacher__{student_plans_name(0.25, 1)}__2d", "2d") is None
    assert parse_student_folder(f"nnUNetTrainerBudget__{student_plans_name(0.25, 1, subset_teachers=3)}__2d", "2d") is None
    assert parse_student_folder(f"nnUNetTrainerKD_MultiTeacher__{student_plans_name(0.5, 0, 0.5, True, 2)}__2d",
                                 "2d") == ("multi_teacher", 0.5, 0, 0.5, 2)


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


# ---------------------------------------------------------------------------- across sessions: archive and records
def fake_model_folder(root, name: str, plans: dict, fold: int = 0, weight: float = 1.0) -> str:
    """A finished, evaluated nnU-Net model folder as the protocol reads it (checkpoint with optimiser state, the two
    evaluation summaries, the case record)."""
    folder = join(str(root), name)
    for sub in ("validation", "test_predictions"):
        os.makedirs(join(folder, f"fold_{fold}", sub))
    torch.save({"network_weights": {"w": torch.full((3,), weight)}, "optimizer_state": {"state": {0: torch.ones(3)}},
                "grad_scaler_state": None, "trainer_name": "nnUNetTrainer", "init_args": {},
                "logging": {"ema_fg_dice": [0.5, 0.6], "dice_per_class_or_region": [[0.4, 0.6], [0.6, 0.6]]}},
               join(folder, f"fold_{fold}", "checkpoint_final.pth"))
    for rel, content in (("plans.json", plans), ("dataset.json", {"labels": {"background": 0, "a": 1}}),
                         ("dataset_fingerprint.json", {}), (f"fold_{fold}/training_cases.json", ["case_000"]),
                         (f"fold_{fold}/validation/summary.json", {
                             "mean": {"1": {"Dice": 0.7}}, "foreground_mean": {"Dice": 0.7},
                             "metric_per_case": [{"reference_file": "/x/case_001.nii.gz", "prediction_file":
                                                  "/y/case_001.nii.gz", "metrics": {"1": {"Dice": 0.7, "FP": 1, "FN": 1, "TP": 3, "n_ref": 4, "n_pred": 4}}}]}),
                         (f"fold_{fold}/test_predictions/summary.json", {
                             "mean": {"1": {"Dice": weight / 2}}, "foreground_mean": {"Dice": weight / 2},
                             "metric_per_case": [{"reference_file": "/x/case_010.nii.gz", "prediction_file":
                                                  "/y/case_010.nii.gz", "metrics": {"1": {"Dice": weight / 2, "FP": 1, "FN": 2, "TP": 3, "n_ref": 5, "n_pred": 4}}}]})):
        with open(join(folder, rel), "w") as f:
            json.dump(content, f)
    return folder


def test_the_archived_teacher_restores_into_a_fresh_workspace_without_optimiser_state(tmp_path):
    from nnunet_kd.evidence.protocol import EvidenceError
    from nnunet_kd.evidence.records import archive_teacher, restore_teacher
    from nnunet_kd.teacher import load_nnunet_checkpoint

    plans = {"plans_name": "teacher", "kd": {"2d": {"training": {"num_epochs": 5}}}}
    teacher = fake_model_folder(tmp_path / "ws1", "nnUNetTrainerBudget__teacher__2d", plans)
    archive = join(str(tmp_path), "repo", "teachers", "Dataset777_Fake-2d")
    written = archive_teacher(teacher, archive, 0, {"teacher_epochs": 5})
    assert join(archive, "manifest.json") in written and join(archive, "fold_0", "checkpoint_final.pth") in written
    archived = load_nnunet_checkpoint(join(archive, "fold_0", "checkpoint_final.pth"))
    assert "optimizer_state" not in archived and torch.equal(archived["network_weights"]["w"], torch.ones(3))
    assert archived["logging"]["ema_fg_dice"] == [0.5, 0.6]  # the curves the report reads survive
    assert archive_teacher(teacher, archive, 0, {}) == []  # written once, never replaced

    plans_file = join(str(tmp_path), "teacher.json")
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    fresh = join(str(tmp_path), "ws2", "nnUNetTrainerBudget__teacher__2d")
    assert restore_teacher(archive, fresh, 0, plans_file)
    checkpoint = join(fresh, "fold_0", "checkpoint_final.pth")
    assert torch.equal(load_nnunet_checkpoint(checkpoint)["network_weights"]["w"], torch.ones(3))
    for summary in ("validation", "test_predictions"):  # newer than the checkpoint: not predicted again
        assert os.path.getmtime(join(fresh, "fold_0", summary, "summary.json")) > os.path.getmtime(checkpoint)
    assert not restore_teacher(archive, fresh, 0, plans_file)  # a workspace with a teacher keeps it

    other_plans = join(str(tmp_path), "longer.json")
    with open(other_plans, "w") as f:
        json.dump({"plans_name": "teacher", "kd": {"2d": {"training": {"num_epochs": 50}}}}, f)
    with pytest.raises(EvidenceError, match="other plans"):
        restore_teacher(archive, join(str(tmp_path), "ws3", "t"), 0, other_plans)
    assert not os.path.exists(join(str(tmp_path), "ws3"))  # refused before copying anything

    with open(join(archive, "fold_0", "training_cases.json"), "w") as f:
        json.dump(["case_000", "case_010"], f)  # an edited archive
    with pytest.raises(EvidenceError, match="training_cases.json does not match its SHA-256"):
        restore_teacher(archive, join(str(tmp_path), "ws4", "t"), 0, plans_file)


def _budget(epochs: int) -> dict:
    """Budget plans of ``epochs`` x 10 iterations, 10 validation iterations per epoch, with the shipped presets as the
    student planner writes them."""
    from nnunet_kd.recipe import default_recipe

    return {"kd": {"2d": {"training": {"num_epochs": epochs, "num_iterations_per_epoch": 10,
                                       "num_val_iterations_per_epoch": 10},
                          "methods": default_recipe(None)["methods"]}}}


class _RecordWorkspace:
    """What collect() reads of a Workspace: its protocol, its results folder and the teacher's folder name."""

    def __init__(self, results: str, records_dir: str, labelled_fraction: float | None = None,
                 sweeps_dir: str | None = None):
        from nnunet_kd.evidence.protocol import Protocol

        self.results = results
        self.split = {"crossval": [{}, {}]}  # two cross-validation folds (two fold teachers)
        self.p = Protocol(raw_dataset="/nowhere/Dataset777_Fake", split_file="", n_test=1, workdir="",
                          configuration="2d", runs=[], seeds=[0], teacher_epochs=5, student_epochs=4,
                          iterations_per_epoch=10, records_dir=records_dir, labelled_fraction=labelled_fraction,
                          sweeps_dir=sweeps_dir)

    def folder(self, trainer: str, plans: str) -> str:
        return join(self.results, f"{trainer}__{plans}__2d")


def test_committed_records_pool_with_the_workspace_when_they_share_teacher_and_budget(tmp_path):
    from nnunet_kd.evidence.collect import collect, save_workspace_records
    from nnunet_kd.evidence.protocol import TEACHER_PLANS, TEACHER_TRAINER, EvidenceError
    from nnunet_kd.evidence.records import archive_teacher, load_records, restore_teacher

    budget = _budget(4)
    session1, session2 = join(str(tmp_path), "s1"), join(str(tmp_path), "s2")
    records, archive = join(str(tmp_path), "records"), join(str(tmp_path), "teachers", "t")
    teacher_name = f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d"
    teacher1 = fake_model_folder(session1, teacher_name, {"plans_name": TEACHER_PLANS})
    fake_model_folder(session1, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d", budget, weight=1.2)
    fake_model_folder(session1, f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.25, 0)}__2d", budget, weight=1.6)
    first = _RecordWorkspace(session1, records)
    found = collect(first)
    assert sorted(found["students"]) == [("adaptive", 0.25), ("plain", 0.25)]
    assert all(r["folder"] for by_seed in found["students"].values() for r in by_seed.values())
    assert len(save_workspace_records(first, found)) == 3
    teacher_sha = found["teacher"]["network_weights_sha256"]
    assert {r["teacher_network_weights_sha256"] for r in load_records(records).values()} == {None, teacher_sha}
    # each record keeps the per-case validation Dice that the budget check pairs (nnU-Net's validation summary)
    assert {json.dumps(r["validation"]) for r in load_records(records).values()} == {'{"case_001": 0.7}'}
    archive_teacher(teacher1, archive, 0, {})

    # A later session on a fresh machine: the archived teacher restored (a re-saved checkpoint without optimiser
    # state: other file bytes, the same network weights), seed 1 trained there, seed 0 from the records.
    plans_file = join(str(tmp_path), "teacher_plans.json")
    with open(plans_file, "w") as f:
        json.dump({"plans_name": TEACHER_PLANS}, f)
    assert restore_teacher(archive, join(session2, teacher_name), 0, plans_file)
    fake_model_folder(session2, f"nnUNetTrainerBudget__{student_plans_name(0.25, 1)}__2d", budget, weight=1.0)
    second = _RecordWorkspace(session2, records)
    found = collect(second)
    assert found["skipped"] == []
    plain = found["students"][("plain", 0.25)]
    assert sorted(plain) == [0, 1] and plain[0]["folder"] is None and plain[1]["folder"] is not None
    assert plain[0]["test"]["case_010"]["1"]["Dice"] == pytest.approx(0.6)
    assert sorted(found["students"][("adaptive", 0.25)]) == [0]
    assert len(save_workspace_records(second, found)) == 2  # the restored teacher and seed 1

    # Another teacher: the committed students learned from a different one and are left out, with a reason, and its
    # workspace may not write records beside theirs.
    fake_model_folder(join(str(tmp_path), "s3"), teacher_name, {}, weight=2.0)
    third = _RecordWorkspace(join(str(tmp_path), "s3"), records)
    found = collect(third)
    assert found["students"] == {}
    assert len(found["skipped"]) == 3 and all("another teacher" in s for s in found["skipped"])
    with pytest.raises(EvidenceError, match="--no-records"):
        save_workspace_records(third, found)


def test_a_protocol_at_another_budget_may_not_replace_the_committed_records_of_the_first(tmp_path):
    from nnunet_kd.evidence.collect import collect, save_workspace_records
    from nnunet_kd.evidence.protocol import TEACHER_PLANS, TEACHER_TRAINER, EvidenceError

    records = join(str(tmp_path), "records")
    short, long = join(str(tmp_path), "short"), join(str(tmp_path), "long")
    student = f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d"
    for ws, epochs in ((short, 4), (long, 8)):
        fake_model_folder(ws, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", {"plans_name": TEACHER_PLANS})
        fake_model_folder(ws, student, _budget(epochs), weight=epochs)
    first = _RecordWorkspace(short, records)
    save_workspace_records(first, collect(first))
    before = {name: open(join(records, name)).read() for name in os.listdir(records)}

    second = _RecordWorkspace(long, records)
    second.p.student_epochs = 8
    with pytest.raises(EvidenceError, match=r"4 x 10 iterations \(10 validation.*8 x 10 \(10\).*--tag 80it\)"):
        save_workspace_records(second, collect(second))
    assert {name: open(join(records, name)).read() for name in os.listdir(records)} == before  # nothing replaced

    second.p.records_dir = records + "-80it"  # what --tag 80it gives
    assert len(save_workspace_records(second, collect(second))) == 2

    # students validated on more batches per epoch than the protocol's are another protocol's models, and the fix
    # offered for their records names the validation batches too
    second.p.student_val_iterations_per_epoch = 50
    found = collect(second)
    assert found["students"] == {} and "(10 validation iterations per epoch), not this protocol" in found["skipped"][0]
    third = join(str(tmp_path), "val50")
    fake_model_folder(third, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", {"plans_name": TEACHER_PLANS})
    fake_model_folder(third, student, {"kd": {"2d": {"training": {
        "num_epochs": 4, "num_iterations_per_epoch": 10, "num_val_iterations_per_epoch": 50}}}})
    validated_more = _RecordWorkspace(third, records)
    validated_more.p.student_val_iterations_per_epoch = 50
    with pytest.raises(EvidenceError, match=r"--tag 40it_val50"):
        save_workspace_records(validated_more, collect(validated_more))


def test_students_may_validate_on_more_batches_than_the_teachers_they_learn_from():
    from nnunet_kd.evidence.protocol import Protocol
    from nnunet_kd.evidence.workspace import Workspace

    ws = object.__new__(Workspace)  # no nnU-Net folders: only the planners' command lines are looked at
    ws.p = Protocol(raw_dataset="/nowhere/Dataset777_Fake", split_file="", n_test=1, workdir="", configuration="2d",
                    runs=[], seeds=[0], teacher_epochs=5, student_epochs=4, iterations_per_epoch=10,
                    val_iterations_per_epoch=10, student_val_iterations_per_epoch=50)
    ws.env, calls = {}, []
    ws.command = lambda name, args, env=None: calls.append((name, [str(a) for a in args]))
    ws.train = lambda trainer, plans: join("/results", plans)
    ws.plan_student("/results/teacher", 0.25, 0)
    ws.subset_teachers(evaluate=False)
    validation_batches = {name: args[args.index("--val-iterations-per-epoch") + 1] for name, args in calls}
    assert validation_batches == {"nnUNetv2_kd_plan_student": "50", "nnUNetv2_kd_plan_subset_teachers": "10"}


def test_a_labelled_fraction_protocol_reports_its_students_and_the_plain_students_on_all_labels(tmp_path):
    from nnunet_kd.evidence.collect import collect
    from nnunet_kd.evidence.protocol import ALL_LABELS_PLAIN, TEACHER_PLANS, TEACHER_TRAINER

    def budget(fraction=None, seed=0):
        training = {"num_epochs": 4, "num_iterations_per_epoch": 10, "num_val_iterations_per_epoch": 10}
        if fraction is not None:
            training.update(labelled_fraction=fraction, labelled_fraction_seed=seed)
        return {"kd": {"2d": {"training": training, "methods": _budget(4)["kd"]["2d"]["methods"]}}}

    ws = join(str(tmp_path), "ws")
    fake_model_folder(ws, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", {"plans_name": TEACHER_PLANS})
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d", budget(), weight=1.6)
    fake_model_folder(ws, f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.25, 0)}__2d", budget(), weight=1.7)
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0, 0.5)}__2d", budget(0.5), weight=1.2)
    fake_model_folder(ws, f"nnUNetTrainerKD_MultiScaleContrastive__{student_plans_name(0.25, 0, 0.5)}__2d",
                      budget(0.5), weight=1.4)
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0, 0.25)}__2d", budget(0.25), weight=1.0)
    # A model whose plans name and plans disagree (another fraction seed) is left out, with the reason.
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 1, 0.5)}__2d", budget(0.5, seed=3))

    half = collect(_RecordWorkspace(ws, None, labelled_fraction=0.5))
    assert sorted(half["students"]) == [("multiscale_contrastive", 0.25), ("plain", 0.25), (ALL_LABELS_PLAIN, 0.25)]
    assert half["students"][("plain", 0.25)][0]["test"]["case_010"]["1"]["Dice"] == pytest.approx(0.6)
    assert half["students"][(ALL_LABELS_PLAIN, 0.25)][0]["test"]["case_010"]["1"]["Dice"] == pytest.approx(0.8)
    assert len(half["skipped"]) == 1 and "labelled fraction" in half["skipped"][0]
    # Each row is paired with its baselines on the seeds both have: the method with the plain student on the same
    # labels and with the plain student on all labels; the plain student with the one on all labels.
    from nnunet_kd.evidence.report import paired_comparisons
    comparisons = {(c["method"], c["baseline"]): c for c in
                   paired_comparisons(half["students"], half["teacher"], ["case_010"], labelled_fraction=True)}
    assert set(comparisons) == {("multiscale_contrastive", "plain"), ("multiscale_contrastive", ALL_LABELS_PLAIN),
                                ("multiscale_contrastive", "teacher"), ("plain", ALL_LABELS_PLAIN), ("plain", "teacher")}
    assert comparisons[("multiscale_contrastive", "plain")]["mean_diff"] == pytest.approx(0.7 - 0.6)
    assert comparisons[("multiscale_contrastive", ALL_LABELS_PLAIN)]["mean_diff"] == pytest.approx(0.7 - 0.8)
    assert comparisons[("plain", "teacher")]["mean_diff"] == pytest.approx(0.6 - 0.5)
    # The all-labels protocol never sees the students on part of the labels.
    full = collect(_RecordWorkspace(ws, None))
    assert sorted(full["students"]) == [("adaptive", 0.25), ("plain", 0.25)]
    assert full["students"][("plain", 0.25)][0]["test"]["case_010"]["1"]["Dice"] == pytest.approx(0.8)


def test_a_teacher_archive_of_another_split_or_fold_is_refused(tmp_path):
    from nnunet_kd.evidence.protocol import EvidenceError
    from nnunet_kd.evidence.records import archive_teacher, restore_teacher

    teacher = fake_model_folder(tmp_path / "ws", "t", {"plans_name": "p"})
    archive = join(str(tmp_path), "archive")
    archive_teacher(teacher, archive, 0, {"dataset": "Dataset777_Fake", "split_sha256": "aaa"})
    plans_file = join(str(tmp_path), "p.json")
    with open(plans_file, "w") as f:
        json.dump({"plans_name": "p"}, f)
    with pytest.raises(EvidenceError, match="split_sha256 'aaa'"):
        restore_teacher(archive, join(str(tmp_path), "fresh"), 0, plans_file,
                        {"dataset": "Dataset777_Fake", "split_sha256": "bbb"})
    with pytest.raises(EvidenceError, match="fold 0"):
        restore_teacher(archive, join(str(tmp_path), "fresh"), 1, plans_file)
    assert not os.path.exists(join(str(tmp_path), "fresh"))
    assert restore_teacher(archive, join(str(tmp_path), "fresh"), 0, plans_file,
                           {"dataset": "Dataset777_Fake", "split_sha256": "aaa"})
    os.makedirs(join(str(tmp_path), "stale"))
    with pytest.raises(EvidenceError, match="holds no manifest.json"):
        archive_teacher(teacher, join(str(tmp_path), "stale"), 0, {})


def test_a_multi_teacher_student_is_reported_beside_its_subset_teachers_their_ensemble_and_one_teacher(tmp_path):
    from nnunet_kd.evidence.collect import collect, save_workspace_records
    from nnunet_kd.evidence.protocol import SUBSET_ENSEMBLE, SUBSET_TEACHER_PLANS, TEACHER_PLANS, TEACHER_TRAINER
    from nnunet_kd.evidence.records import load_records
    from nnunet_kd.evidence.report import paired_comparisons

    student_budget = _budget(4)
    teacher_budget = _budget(5)
    ws, records = join(str(tmp_path), "ws"), join(str(tmp_path), "records")
    fake_model_folder(ws, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", teacher_budget, weight=1.8)
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d", student_budget, weight=1.2)
    fake_model_folder(ws, f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.25, 0)}__2d", student_budget, weight=1.4)
    subset = [fake_model_folder(ws, f"{TEACHER_TRAINER}__{SUBSET_TEACHER_PLANS}{i}of2__2d", teacher_budget,
                                weight=1.0 + i / 10) for i in (1, 2)]
    fake_model_folder(ws, f"nnUNetTrainerKD_MultiTeacher__{student_plans_name(0.25, 0, subset_teachers=2)}__2d",
                      student_budget, weight=1.5)
    fake_model_folder(ws, f"nnUNetTrainerMSKD__{student_plans_name(0.25, 0)}__2d", student_budget, weight=1.3)
    workspace = _RecordWorkspace(ws, records)
    workspace.p.subset_teachers = 2
    workspace.p.teacher_epochs = 5

    # Without the ensemble's evaluation the subset teachers are reported, the ensemble row is absent.
    found = collect(workspace)
    assert [r["folder"] for r in found["subset_teachers"]] == subset and found["subset_ensemble"] is None
    ensemble = join(ws, f"{SUBSET_ENSEMBLE}_k2__2d", "fold_0", "test_predictions")
    os.makedirs(ensemble)
    shutil.copy(join(subset[1], "fold_0", "test_predictions", "summary.json"), ensemble)
    found = collect(workspace)
    assert sorted(found["students"]) == [("adaptive", 0.25), ("mskd", 0.25), ("multi_teacher", 0.25), ("plain", 0.25)]
    assert found["subset_ensemble"]["test"]["case_010"]["1"]["Dice"] == pytest.approx(0.6)

    # The student of the subset teachers is compared with the plain student, with the student of one teacher trained
    # on all their cases, with the teacher and with the ensemble of the teachers it learned from.
    comparisons = {(c["method"], c["baseline"]): c["mean_diff"] for c in paired_comparisons(
        found["students"], found["teacher"], ["case_010"], False, found["subset_ensemble"])}
    assert comparisons[("multi_teacher", "plain")] == pytest.approx(0.75 - 0.6)
    assert comparisons[("multi_teacher", "adaptive")] == pytest.approx(0.75 - 0.7)
    assert comparisons[("multi_teacher", "teacher")] == pytest.approx(0.75 - 0.9)
    assert comparisons[("multi_teacher", "subset_teachers_ensemble")] == pytest.approx(0.75 - 0.6)
    assert ("adaptive", "subset_teachers_ensemble") not in comparisons
    # The mission's other methods are ranked against Adaptive KD on the same cases and seeds too
    assert comparisons[("mskd", "adaptive")] == pytest.approx(0.65 - 0.7)
    assert ("adaptive", "mskd") not in comparisons and ("mskd", "subset_teachers_ensemble") not in comparisons
    # The subset teachers and their ensemble are rows of a file with a multi-teacher student, and of no other file
    # of the same workspace.
    from nnunet_kd.evidence.report import subset_teacher_rows
    assert subset_teacher_rows(found) == (found["subset_teachers"], found["subset_ensemble"])
    without = dict(found, students={k: v for k, v in found["students"].items() if k[0] != "multi_teacher"})
    assert subset_teacher_rows(without) == ([], None)

    # Records: the multi-teacher student names the set of teachers it learned from, the others the protocol teacher;
    # a fresh workspace pools them.
    save_workspace_records(workspace, found)
    committed = load_records(records)
    subset_shas = "+".join(r["network_weights_sha256"] for r in found["subset_teachers"])
    multi = f"nnUNetTrainerKD_MultiTeacher__{student_plans_name(0.25, 0, subset_teachers=2)}__2d"
    assert committed[multi]["teacher_network_weights_sha256"] == subset_shas
    assert committed[f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.25, 0)}__2d"][
        "teacher_network_weights_sha256"] == found["teacher"]["network_weights_sha256"]
    fresh = join(str(tmp_path), "fresh")
    shutil.copytree(join(ws, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d"), join(fresh, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d"))
    again = _RecordWorkspace(fresh, records)
    again.p.subset_teachers, again.p.teacher_epochs = 2, 5
    pooled = collect(again)
    assert sorted(pooled["students"]) == [("adaptive", 0.25), ("mskd", 0.25), ("multi_teacher", 0.25), ("plain", 0.25)]
    assert pooled["skipped"] == [] and len(pooled["subset_teachers"]) == 2
    # The ensemble has no checkpoint: its per-case record, named after its members, keeps its row and comparison.
    assert committed[f"{SUBSET_ENSEMBLE}_k2__2d"]["teacher_network_weights_sha256"] == subset_shas
    assert pooled["subset_ensemble"]["test"] == found["subset_ensemble"]["test"]
    assert not pooled["subset_ensemble"].get("in_workspace")
    # Another number of subset teachers: neither those teachers nor their student belong to this protocol.
    again.p.subset_teachers = 3
    assert "subset_teachers" not in collect(again) and ("multi_teacher", 0.25) not in collect(again)["students"]

    # Subset teachers retrained in a fresh workspace are never mixed with the committed ones: with one of two
    # retrained, the set is incomplete and the multi-teacher student is left out, saying why.
    from nnunet_kd.evidence.protocol import EvidenceError
    again.p.subset_teachers = 2
    fake_model_folder(fresh, f"{TEACHER_TRAINER}__{SUBSET_TEACHER_PLANS}1of2__2d", teacher_budget, weight=3.3)
    partial = collect(again)
    assert "subset_teachers" not in partial and ("multi_teacher", 0.25) not in partial["students"]
    assert any("subset teachers are not all finished" in reason for reason in partial["skipped"])
    # With both retrained (other weights), their records would replace the committed ones: refused.
    fake_model_folder(fresh, f"{TEACHER_TRAINER}__{SUBSET_TEACHER_PLANS}2of2__2d", teacher_budget, weight=3.4)
    retrained = collect(again)
    assert len(retrained["subset_teachers"]) == 2 and ("multi_teacher", 0.25) not in retrained["students"]
    assert retrained["subset_ensemble"] is None  # the committed ensemble is of the other teachers
    assert any("ensemble of other subset teachers" in reason for reason in retrained["skipped"])
    with pytest.raises(EvidenceError, match=r"subset teacher .*\(other network weights\)"):
        save_workspace_records(again, retrained)


def test_the_peer_at_its_defaults_learns_from_every_fold_and_is_compared_with_the_peer_of_one_teacher(tmp_path):
    from nnunet_kd.evidence.collect import collect, save_workspace_records
    from nnunet_kd.evidence.protocol import TEACHER_PLANS, TEACHER_TRAINER, VALIDATION_SEEN_BY_TEACHERS
    from nnunet_kd.evidence.records import load_records
    from nnunet_kd.evidence.report import paired_comparisons

    budget = _budget(4)
    ws, records = join(str(tmp_path), "ws"), join(str(tmp_path), "records")
    teacher_name = f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d"
    fake_model_folder(ws, teacher_name, {}, weight=1.8)
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.5, 0)}__2d", budget, weight=1.2)
    fake_model_folder(ws, f"nnUNetTrainerKD_Logit__{student_plans_name(0.5, 0)}__2d", budget, weight=1.3)
    fake_model_folder(ws, f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.5, 0)}__2d", budget, weight=1.5)
    peer = f"nnUNetTrainerKD_Logit__{student_plans_name(0.5, 0, fold_teachers=2)}__2d"
    fake_model_folder(ws, peer, budget, weight=1.4)
    assert student_plans_name(0.5, 0, fold_teachers=2) == "nnUNetPlans_evidence_w0p5_folds2_s0"
    assert parse_student_folder(peer, "2d") == ("logit_all_folds", 0.5, 0, None, None)
    assert parse_student_folder(f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.5, 0, fold_teachers=2)}__2d",
                                 "2d") is None  # only the peer trains from the folds' plans
    workspace = _RecordWorkspace(ws, records)

    # fold 1's teacher not trained yet: the student is reported, but gets no record (its teachers have no identity)
    found = collect(workspace)
    assert sorted(found["students"]) == [("adaptive", 0.5), ("logit", 0.5), ("logit_all_folds", 0.5), ("plain", 0.5)]
    assert not any("logit_all_folds" in str(w) or "folds2" in w for w in save_workspace_records(workspace, found))

    # with both folds trained, its record names the two fold teachers, fold 0 (the protocol's teacher) first
    fake_model_folder(ws, teacher_name, {}, fold=1, weight=1.9)
    found = collect(workspace)
    save_workspace_records(workspace, found)
    teacher_sha = found["teacher"]["network_weights_sha256"]
    recorded = load_records(records)[peer]["teacher_network_weights_sha256"]
    assert recorded.startswith(f"{teacher_sha}+") and recorded.count("+") == 1

    # compared with the plain student, the controls (where present), the peer from one teacher and the teacher; ours
    # is compared with both peers
    comparisons = {(c["method"], c["baseline"]): c["mean_diff"] for c in paired_comparisons(
        found["students"], found["teacher"], ["case_010"], False)}
    assert comparisons[("logit_all_folds", "plain")] == pytest.approx(0.7 - 0.6)
    assert comparisons[("logit_all_folds", "logit")] == pytest.approx(0.7 - 0.65)
    assert comparisons[("adaptive", "logit_all_folds")] == pytest.approx(0.75 - 0.7)
    assert comparisons[("adaptive", "logit")] == pytest.approx(0.75 - 0.65)
    assert ("logit", "logit_all_folds") not in comparisons
    assert "logit_all_folds" in VALIDATION_SEEN_BY_TEACHERS  # never the best KD by validation (its folds saw it)

    # a fresh workspace with only the protocol's teacher pools the committed record (its fold 0 is this teacher) ...
    fresh = join(str(tmp_path), "fresh")
    shutil.copytree(join(ws, teacher_name, "fold_0"), join(fresh, teacher_name, "fold_0"))
    for rel in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(join(ws, teacher_name, rel), join(fresh, teacher_name, rel))
    pooled = collect(_RecordWorkspace(fresh, records))
    assert sorted(pooled["students"][("logit_all_folds", 0.5)]) == [0] and pooled["skipped"] == []
    # ... but not once other fold teachers are trained there
    fake_model_folder(fresh, teacher_name, {}, fold=1, weight=2.5)
    other = collect(_RecordWorkspace(fresh, records))
    assert ("logit_all_folds", 0.5) not in other["students"]
    assert any("other fold teachers" in reason for reason in other["skipped"])


def test_subset_teachers_have_a_budget_of_their_own_and_skip_the_protocol_teacher_when_its_record_is_committed(
        tmp_path, monkeypatch):
    from nnunet_kd.evidence import workspace as workspace_module
    from nnunet_kd.evidence.collect import collect
    from nnunet_kd.evidence.protocol import SUBSET_TEACHER_PLANS, TEACHER_PLANS, TEACHER_TRAINER, EvidenceError
    from nnunet_kd.evidence.workspace import run_protocol

    ws, records = join(str(tmp_path), "ws"), join(str(tmp_path), "records")
    at_three = _budget(3)
    for i in (1, 2):
        fake_model_folder(ws, f"{TEACHER_TRAINER}__{SUBSET_TEACHER_PLANS}{i}of2__2d", at_three, weight=1.0 + i / 10)
    workspace = _RecordWorkspace(ws, records)
    workspace.p.subset_teachers = 2  # teacher budget 5 epochs
    # Subset teachers of 3 epochs are not those of a protocol whose subset teachers train at the teacher's 5...
    found = collect(workspace)
    assert "subset_teachers" not in found
    assert any("not this protocol's subset-teacher budget (5 x 10, 10)" in reason for reason in found["skipped"])
    # ...and are those of a protocol that gives them 3.
    workspace.p.subset_teacher_epochs = 3
    assert len(collect(workspace)["subset_teachers"]) == 2

    # run_protocol: multi-teacher students learn from the subset teachers only, so the protocol teacher is trained
    # only when no committed record holds it.
    calls = []

    class Recorder:
        def __init__(self, protocol):
            self.p = protocol

        def folder(self, trainer, plans):
            return join(ws, f"{trainer}__{plans}__2d")

        def __getattr__(self, name):
            def record(*args, **kwargs):
                calls.append(name)
                return [] if name == "subset_teachers" else join(ws, name)
            return record

    monkeypatch.setattr(workspace_module, "Workspace", Recorder)
    workspace.p.runs = [("multi_teacher", 0.25)]
    run_protocol(workspace.p)
    assert "teacher" in calls and "subset_teachers" in calls  # no record of the teacher yet
    os.makedirs(records)
    with open(join(records, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d.json"), "w") as f:
        json.dump({"model": f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", "network_weights_sha256": "abc"}, f)
    calls.clear()
    run_protocol(workspace.p)
    assert "teacher" not in calls and "subset_teachers" in calls
    workspace.p.runs = [("multi_teacher", 0.25), ("plain", 0.25)]  # a student of the protocol teacher needs it,
    calls.clear()
    # and a teacher trained now would not be the one of the committed record: refused before anything runs...
    with pytest.raises(EvidenceError, match="Nothing was trained"):
        run_protocol(workspace.p)
    assert calls == []
    # ...unless the workspace holds it
    teacher_fold = join(ws, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", "fold_0")
    os.makedirs(teacher_fold)
    open(join(teacher_fold, "checkpoint_final.pth"), "w").close()
    run_protocol(workspace.p)
    assert "teacher" in calls


def test_records_name_the_machine_that_trained_each_model_and_a_restored_teacher_keeps_its_own(tmp_path):
    from nnunet_kd.evidence.collect import collect, save_workspace_records
    from nnunet_kd.evidence.records import TRAINED_ON_FILE, archive_teacher, load_records, restore_teacher, this_machine
    from nnunet_kd.evidence.report import trained_on_of

    budget = _budget(4)
    ws, records = join(str(tmp_path), "ws"), join(str(tmp_path), "records")
    teacher = fake_model_folder(ws, "nnUNetTrainerBudget__nnUNetPlans_evidence_teacher__2d", {"plans_name": "t"})
    student = fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d", budget, weight=1.2)
    workspace = _RecordWorkspace(ws, records)
    found = collect(workspace)
    here = this_machine("cpu")
    assert found["students"][("plain", 0.25)][0]["trained_on"] == here
    save_workspace_records(workspace, found)
    assert load_records(records)[basename_of(student)]["trained_on"] == here
    # the stamp sticks: a record made later, elsewhere, names the machine of the first one
    with open(join(student, TRAINED_ON_FILE), "w") as f:
        json.dump({"device": "cpu-2cores", "name": "Another CPU", "torch": "2.14.1"}, f)
    described = trained_on_of(collect(workspace))
    assert described[basename_of(student)] == "Another CPU (cpu-2cores, torch 2.14.1)"
    # a committed record from before records named their machine says so
    assert "not recorded" in trained_on_of({"teacher": {"folder": None, "model": "old"}, "students": {}})["old"]
    # a teacher restored from its archive names the archive's machine, not the restoring one
    os.remove(join(teacher, TRAINED_ON_FILE))
    archive = join(str(tmp_path), "archive")
    archive_teacher(teacher, archive, 0, {"trained_on": {"device": "cpu-2cores", "name": "Archiving CPU", "torch": "x"}})
    fresh = join(str(tmp_path), "fresh", "nnUNetTrainerBudget__nnUNetPlans_evidence_teacher__2d")
    plans_file = join(str(tmp_path), "plans.json")
    shutil.copy(join(teacher, "plans.json"), plans_file)
    assert restore_teacher(archive, fresh, 0, plans_file, {})
    with open(join(fresh, TRAINED_ON_FILE)) as f:
        assert json.load(f)["name"] == "Archiving CPU"


def basename_of(folder: str) -> str:
    return os.path.basename(folder.rstrip("/"))


def test_a_width_known_only_from_committed_records_is_timed_through_its_plans_on_this_machine(workspace, monkeypatch):
    """Latency is a figure of the architecture and the machine: a model of another session (a committed record, no
    checkpoint here) is timed through the network its plans define, on the same real volume and in the same way as
    a model with a checkpoint, so one results file never mixes machines."""
    from types import SimpleNamespace

    from batchgenerators.utilities.file_and_folder_operations import load_json

    from conftest import CONFIGURATION
    from nnunet_kd.evidence.collect import latency

    workspace.set_env(monkeypatch)
    test_images = join(workspace.raw, "imagesTs")
    case = sorted(os.listdir(test_images))[0].rsplit("_", 1)[0]
    ws = SimpleNamespace(p=SimpleNamespace(device="cpu", fold=0, configuration=CONFIGURATION, latency_repeats=2),
                         split={"test": [case]}, test_images=test_images, env=workspace.env,
                         dataset_json=lambda: load_json(join(workspace.preprocessed, "dataset.json")))
    from_checkpoint = latency(ws, workspace.teacher_folder)
    from_plans = latency(ws, None, load_json(join(workspace.teacher_folder, "plans.json")))
    assert from_checkpoint["weights"].startswith("trained")
    assert from_plans["weights"].startswith("freshly initialised")
    assert from_plans["case"] == from_checkpoint["case"] == case
    assert from_plans["preprocessed_shape"] == from_checkpoint["preprocessed_shape"]
    for result in (from_checkpoint, from_plans):
        one_thread = result["threads_1"]
        assert one_thread["runs"] == 2 and 0 < one_thread["min_s"] <= one_thread["median_s"] <= one_thread["max_s"]
    with pytest.raises(ValueError, match="model folder or the plans"):
        latency(ws, None, None)


def test_a_recipe_variant_runs_under_the_protocol_with_plans_of_its_own(tmp_path, monkeypatch):
    from nnunet_kd.evidence import workspace as workspace_module
    from nnunet_kd.evidence.protocol import ALL_LABELS_PLAIN
    from nnunet_kd.evidence.report import baselines_of, label_of
    from nnunet_kd.evidence.workspace import run_protocol

    assert parse_runs(["multiscale_contrastive:noContrastive@0.25"]) == [("multiscale_contrastive:noContrastive", 0.25)]
    # the plain student and the peer at its defaults have no recipe to vary; a variant name becomes part of a file name
    for bad in ("plain:seg1@0.25", "logit_all_folds:x@0.5", "adaptive:@0.25", "adaptive:kl_05@0.25", "nokd:a@0.25"):
        with pytest.raises(ValueError, match="METHOD"):
            parse_runs([bad])
    plans = student_plans_name(0.25, 1, 0.5, variant="noContrastive")
    assert plans == "nnUNetPlans_evidence_w0p25_f0p5_vnoContrastive_s1"
    assert parse_student_folder(f"nnUNetTrainerKD_MultiScaleContrastive__{plans}__2d", "2d") == \
        ("multiscale_contrastive:noContrastive", 0.25, 1, 0.5, None)
    assert parse_student_folder(f"nnUNetTrainerBudget__{plans}__2d", "2d") is None
    name = f"nnUNetTrainerKD_MultiTeacher__{student_plans_name(0.25, 0, subset_teachers=3, variant='uniform')}__2d"
    assert parse_student_folder(name, "2d") == ("multi_teacher:uniform", 0.25, 0, None, 3)
    # names no planner of ours writes are not read as the preset: an empty variant, a variant of the peer's folds
    for odd in ("nnUNetPlans_evidence_w0p25_v_s0", "nnUNetPlans_evidence_w0p5_folds5_vx_s0"):
        assert parse_student_folder(f"nnUNetTrainerKD_Logit__{odd}__2d", "2d") is None
    # compared with everything its method is compared with, and with the method's preset (what the variant changes)
    assert baselines_of("multiscale_contrastive:noContrastive", True) == \
        baselines_of("multiscale_contrastive", True) + ["multiscale_contrastive"]
    assert ALL_LABELS_PLAIN in baselines_of("multiscale_contrastive:noContrastive", True)
    assert baselines_of("multiscale_contrastive", False) == baselines_of("mskd", False) == \
        ["plain", "plain_seg_weight", "label_teacher", "adaptive", "logit", "logit_all_folds"]
    assert label_of("multiscale_contrastive:noContrastive") == "multi-scale contrastive KD, variant noContrastive"

    # run_protocol plans the variant with its sweep file's overrides, under its own name, and trains the method's trainer
    sweeps = _write_sweep(tmp_path, {"noContrastive": ["methods.multiscale_contrastive.weights.contrastive=0.0"]})
    planned, trained = [], []

    class Recorder:
        def __init__(self, protocol):
            self.p = protocol

        def plan_student(self, teacher, width, seed, **kwargs):
            planned.append((width, seed, kwargs))
            return "plans"

        def train(self, trainer, plans):
            trained.append(trainer)
            return "folder"

        def __getattr__(self, name):
            return lambda *args, **kwargs: "teacher folder"

    monkeypatch.setattr(workspace_module, "Workspace", Recorder)
    workspace = _RecordWorkspace(str(tmp_path), None, sweeps_dir=sweeps)
    workspace.p.runs = parse_runs(["multiscale_contrastive:noContrastive@0.25", "multiscale_contrastive@0.25"])
    run_protocol(workspace.p)
    assert planned == [(0.25, 0, {"overrides": ["methods.multiscale_contrastive.weights.contrastive=0.0"],
                                  "variant": "noContrastive"}),
                       (0.25, 0, {"overrides": [], "variant": None})]
    assert trained == ["nnUNetTrainerKD_MultiScaleContrastive"] * 2


def _write_sweep(tmp_path, variants: dict, method: str = "multiscale_contrastive", compare_with: dict | None = None) -> str:
    """A sweep file of ``method`` in <tmp_path>/sweeps with the preset and ``variants`` (name -> overrides), each
    compared with the variants ``compare_with`` names for it (name -> [variant, ...])."""
    sweeps = join(str(tmp_path), "sweeps")
    os.makedirs(sweeps, exist_ok=True)
    with open(join(sweeps, f"{method}.json"), "w") as f:
        json.dump({"method": method, "baseline": "default",
                   "variants": {"default": {"why": "the preset", "set": []},
                                **{name: {"why": "a test", "set": overrides,
                                          **({"compare_with": compare_with[name]} if name in (compare_with or {}) else {})}
                                   for name, overrides in variants.items()}}},
                  f)
    return sweeps


def test_a_variant_is_what_its_sweep_file_says_now_and_an_older_definition_is_left_out(tmp_path):
    from nnunet_kd.evidence.collect import collect
    from nnunet_kd.evidence.protocol import (TEACHER_PLANS, TEACHER_TRAINER, EvidenceError, Protocol, check_variants,
                                             variant_recipe)
    from nnunet_kd.evidence.report import compared_variants, paired_comparisons

    seg05 = ["methods.multiscale_contrastive.weights.segmentation=0.5"]
    sweeps = _write_sweep(tmp_path, {"seg05": seg05})

    def plans(overrides: list[str]) -> dict:
        """Plans as the student planner writes them for these overrides."""
        recipe = variant_recipe("multiscale_contrastive:x", overrides)
        return {"kd": {"2d": {"training": {"num_epochs": 4, "num_iterations_per_epoch": 10,
                                           "num_val_iterations_per_epoch": 10}, "methods": recipe["methods"]}}}

    ws = join(str(tmp_path), "ws")
    fake_model_folder(ws, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", {"plans_name": TEACHER_PLANS})
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d", plans([]), weight=1.2)
    fake_model_folder(ws, f"nnUNetTrainerKD_MultiScaleContrastive__{student_plans_name(0.25, 0)}__2d", plans([]),
                      weight=1.3)
    fake_model_folder(ws, f"nnUNetTrainerKD_MultiScaleContrastive__{student_plans_name(0.25, 0, variant='seg05')}__2d",
                      plans(seg05), weight=1.5)
    found = collect(_RecordWorkspace(ws, None, sweeps_dir=sweeps))
    assert sorted(found["students"]) == [("multiscale_contrastive", 0.25), ("multiscale_contrastive:seg05", 0.25),
                                         ("plain", 0.25)]
    assert found["skipped"] == []
    comparisons = {(c["method"], c["baseline"]): c["mean_diff"] for c in
                   paired_comparisons(found["students"], found["teacher"], ["case_010"], labelled_fraction=False)}
    assert comparisons[("multiscale_contrastive:seg05", "multiscale_contrastive")] == pytest.approx(0.75 - 0.65)
    assert comparisons[("multiscale_contrastive:seg05", "plain")] == pytest.approx(0.75 - 0.6)

    # An ablation of a variant is compared held out with the variant it ablates, as its sweep file's "compare_with"
    # says (as the validation sweep compares them), besides the plain student and the preset.
    seg05_kl = seg05 + ["methods.multiscale_contrastive.weights.kl=0.5"]
    _write_sweep(tmp_path, {"seg05": seg05, "seg05Kl": seg05_kl}, compare_with={"seg05Kl": ["seg05"]})
    fake_model_folder(ws, f"nnUNetTrainerKD_MultiScaleContrastive__{student_plans_name(0.25, 0, variant='seg05Kl')}__2d",
                      plans(seg05_kl), weight=1.7)
    found = collect(_RecordWorkspace(ws, None, sweeps_dir=sweeps))
    also = compared_variants(sweeps, [m for m, _ in found["students"]])
    assert also == {"multiscale_contrastive:seg05": [], "multiscale_contrastive:seg05Kl": ["multiscale_contrastive:seg05"]}
    comparisons = {(c["method"], c["baseline"]): c["mean_diff"] for c in paired_comparisons(
        found["students"], found["teacher"], ["case_010"], labelled_fraction=False, variants_compared=also)}
    assert comparisons[("multiscale_contrastive:seg05Kl", "multiscale_contrastive:seg05")] == pytest.approx(0.85 - 0.75)
    assert comparisons[("multiscale_contrastive:seg05Kl", "multiscale_contrastive")] == pytest.approx(0.85 - 0.65)
    assert ("multiscale_contrastive:seg05", "multiscale_contrastive:seg05Kl") not in comparisons
    shutil.rmtree(join(ws, f"nnUNetTrainerKD_MultiScaleContrastive__{student_plans_name(0.25, 0, variant='seg05Kl')}__2d"))

    # The sweep file now defines seg05 otherwise, or drops its override: the model trained as the old seg05 is another
    # recipe, left out with the setting that differs.
    for redefined in (["methods.multiscale_contrastive.weights.segmentation=0.8"], []):
        _write_sweep(tmp_path, {"seg05": redefined})
        found = collect(_RecordWorkspace(ws, None, sweeps_dir=sweeps))
        assert ("multiscale_contrastive:seg05", 0.25) not in found["students"]
        assert len(found["skipped"]) == 1 and "methods.multiscale_contrastive.weights" in found["skipped"][0]

    # Refused before any training, naming the file: a variant the sweep file does not define, a setting the recipe
    # does not have (the planner would add the misspelt key and train the preset under the variant's name), a sweep
    # file of another method.
    _write_sweep(tmp_path, {"seg05": seg05, "typo": ["methods.multiscale_contrastive.weights.segmentaton=1.0"]})
    _write_sweep(tmp_path, {"x": []}, method="adaptive")
    with open(join(sweeps, "adaptive.json")) as f:
        other = json.load(f)
    other["method"] = "logit"
    with open(join(sweeps, "adaptive.json"), "w") as f:
        json.dump(other, f)
    for run, message in (("multiscale_contrastive:seg2@0.25", r"multiscale_contrastive\.json has no variant 'seg2'.*default, seg05"),
                         ("multiscale_contrastive:typo@0.25", r"weights\.segmentaton, which the shipped recipe .* does not have"),
                         ("adaptive:x@0.25", r"adaptive\.json is a sweep of 'logit', not of 'adaptive'")):
        protocol = Protocol(raw_dataset="/nowhere/Dataset777_Fake", split_file="", n_test=1, workdir="",
                            configuration="2d", runs=parse_runs([run]), seeds=[0], teacher_epochs=5, student_epochs=4,
                            iterations_per_epoch=10, sweeps_dir=sweeps)
        with pytest.raises(EvidenceError, match=message):
            check_variants(protocol)


def _hand_record(dice_per_case: dict, plans: dict, validation: float, curve: list[float], fp_voxels: float = 0.0) -> dict:
    """A finished model as collect() hands it to build_report: per-case test metrics of labels '1' and '2' (both the
    given Dice), validation Dice, validation curves, plans; not in this workspace (a committed record)."""
    return {"folder": None, "plans": plans, "validation_mean_dice": validation, "network_weights_sha256": "0" * 64,
            "curves": {"pseudo_dice": list(curve), "ema_fg_dice": list(curve)},
            "test": {case: {label: {"Dice": d, "FP": fp_voxels, "FN": 0.0, "TP": 1.0, "n_ref": 1.0, "n_pred": 1.0}
                            for label in ("1", "2")} for case, d in dice_per_case.items()}}


def test_the_report_pools_seeds_pairs_each_kd_student_with_the_plain_one_and_chooses_kd_on_validation(workspace,
                                                                                                      tmp_path):
    """One row per model (mean over its seeds and the test cases; false positives in mL from the label files'
    spacing), every KD student paired case by case and seed by seed with the plain student and with the teacher, the
    plain student's plateau read from its validation curve, and the best KD method of a width chosen on validation,
    never a control and never on test cases."""
    from types import SimpleNamespace

    from batchgenerators.utilities.file_and_folder_operations import load_json

    from conftest import CONFIGURATION, STUDENT_PLANS
    from nnunet_kd.evidence.protocol import Protocol
    from nnunet_kd.evidence.report import build_report

    cases = ["case_a", "case_b", "case_c", "case_d"]
    raw = join(str(tmp_path), "Dataset991_KDTest")
    labels_dir = join(str(tmp_path), "test_labels")
    os.makedirs(raw)
    os.makedirs(labels_dir)
    with open(join(raw, "dataset.json"), "w") as f:
        json.dump({"file_ending": ".nii.gz"}, f)
    for case in cases:  # voxels of 1 x 2 x 5 mm: 0.01 mL
        image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8))
        image.SetSpacing((1.0, 2.0, 5.0))
        sitk.WriteImage(image, join(labels_dir, case + ".nii.gz"))
    teacher_plans = load_json(join(workspace.teacher_folder, "plans.json"))
    student_plans = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    protocol = Protocol(raw_dataset=raw, split_file="benchmarks/splits/Dataset991_KDTest.json", n_test=len(cases),
                        workdir=str(tmp_path), configuration=CONFIGURATION, runs=[], seeds=[0, 1], teacher_epochs=5,
                        student_epochs=5, iterations_per_epoch=10)
    ws = SimpleNamespace(p=protocol, dataset_json=lambda: load_json(join(workspace.preprocessed, "dataset.json")),
                         test_labels=labels_dir,
                         split={"test": cases, "train": cases + ["t1", "t2"],
                                "crossval": [{"train": ["t1"], "val": ["t2"]}]})
    plain = {0: [0.70, 0.80, 0.60, 0.90], 1: [0.72, 0.78, 0.62, 0.88]}
    flat, rising = [0.5, 0.8, 0.85, 0.85, 0.85], [0.1, 0.2, 0.3, 0.4, 0.6]

    def row_of(offset: float) -> dict:
        return {seed: dict(zip(cases, (d + offset for d in dice))) for seed, dice in plain.items()}

    found = {"teacher": _hand_record(dict(zip(cases, [0.9, 0.9, 0.8, 0.95])), teacher_plans, 0.9, flat),
             "skipped": [],
             "students": {
                 ("plain", 0.25): {s: _hand_record(d, student_plans, 0.80, flat, fp_voxels=100.0)
                                   for s, d in row_of(0.0).items()},
                 ("adaptive", 0.25): {s: _hand_record(d, student_plans, 0.82, rising)
                                      for s, d in row_of(0.02).items()},
                 ("mskd", 0.25): {s: _hand_record(d, student_plans, 0.81, rising) for s, d in row_of(0.05).items()},
                 # the control validates best of all: it is no KD method, so it is never "the best KD"
                 ("label_teacher", 0.25): {s: _hand_record(d, student_plans, 0.95, rising)
                                           for s, d in row_of(-0.01).items()}}}
    cache = join(str(tmp_path), "latency.json")  # measured before: this test times nothing
    with open(cache, "w") as f:
        json.dump({"teacher": {"threads_1": {"median_s": 2.0, "min_s": 1.9, "max_s": 2.2}},
                   "width 0.25": {"threads_1": {"median_s": 0.5, "min_s": 0.4, "max_s": 0.6}}}, f)

    result = build_report(ws, "python benchmarks/run_evidence.py (test)", latency_cache_file=cache, found=found)

    rows = {row["method"]: row for row in result["models"]}
    assert [row["method"] for row in result["models"]] == ["teacher", "plain", "adaptive", "mskd", "label_teacher"]
    assert rows["plain"]["seeds"] == [0, 1]
    assert rows["plain"]["test_mean_dice"] == pytest.approx(np.mean([plain[0], plain[1]]))
    assert rows["plain"]["test_mean_dice_per_seed"] == pytest.approx([np.mean(plain[0]), np.mean(plain[1])])
    assert rows["plain"]["fp_ml_per_case"] == pytest.approx({"1": 1.0, "2": 1.0})  # 100 voxels of 0.01 mL
    assert rows["adaptive"]["fp_ml_per_case"] == {"1": 0.0, "2": 0.0}
    assert rows["teacher"]["parameters"] > rows["plain"]["parameters"] == rows["adaptive"]["parameters"]
    assert rows["plain"]["latency"]["threads_1"]["median_s"] == 0.5  # one figure per width, read from the cache

    def comparison(method: str, baseline: str) -> dict:
        return next(c for c in result["comparisons"] if c["method"] == method and c["baseline"] == baseline)

    # a constant paired difference has itself as mean and as both ends of the interval
    assert comparison("adaptive", "plain")["mean_diff"] == pytest.approx(0.02)
    assert comparison("adaptive", "plain")["ci95"] == pytest.approx([0.02, 0.02])
    assert comparison("adaptive", "label_teacher")["mean_diff"] == pytest.approx(0.03)
    assert comparison("mskd", "plain")["mean_diff"] == pytest.approx(0.05)
    assert comparison("label_teacher", "plain")["mean_diff"] == pytest.approx(-0.01)
    assert comparison("adaptive", "plain")["seeds"] == [0, 1]
    assert comparison("plain", "teacher")["mean_diff"] == pytest.approx(
        np.mean([np.array(plain[s]) - [0.9, 0.9, 0.8, 0.95] for s in (0, 1)]))
    assert not any(c["baseline"] == "plain_all_labels" for c in result["comparisons"])  # all labels here

    assert result["plateau_of_plain_student"]["0.25"]["seeds"] == [0, 1]
    assert result["plateau_of_plain_student"]["0.25"]["flat"] is True
    # Adaptive validates higher than MSKD (0.82 against 0.81) though MSKD is the better one on test cases
    assert result["best_kd_by_validation"] == {"0.25": {"method": "adaptive", "validation_mean_dice": 0.82}}
    protocol_out = result["protocol"]
    assert protocol_out["n_test"] == 4 and protocol_out["seeds"] == [0, 1]
    assert protocol_out["budgets"]["student_iterations"] == 50
    assert protocol_out["command"] == "python benchmarks/run_evidence.py (test)"
    assert "variants" not in protocol_out and "labels" not in protocol_out
    assert "| Adaptive KD | plain student | 0.25 | 2 | 4 | +0.0200 | [+0.0200, +0.0200] | yes |" in result["table"]


def test_a_lost_teacher_archive_stops_the_protocol_before_a_new_teacher_trains_beside_its_records(tmp_path):
    """The committed records learned from a teacher that neither the workspace nor the archive holds (a fresh machine,
    the archive gone with the old one): training another teacher would end, hours later, in a report that refuses its
    students' records. It stops before training and names the fixes; the workspace's own finished teacher, an archive
    to restore, a protocol without records, and a records folder without a teacher record all go ahead."""
    from nnunet_kd.evidence.collect import collect, save_workspace_records
    from nnunet_kd.evidence.protocol import TEACHER_PLANS, TEACHER_TRAINER, EvidenceError
    from nnunet_kd.evidence.workspace import refuse_a_new_teacher_beside_committed_records

    teacher_name = f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d"
    records = join(str(tmp_path), "records")
    old_machine = join(str(tmp_path), "old")
    fake_model_folder(old_machine, teacher_name, {"plans_name": TEACHER_PLANS})
    first = _RecordWorkspace(old_machine, records)
    save_workspace_records(first, collect(first))
    refuse_a_new_teacher_beside_committed_records(first)  # its teacher is here: nothing to refuse

    fresh = _RecordWorkspace(join(str(tmp_path), "fresh"), records)
    fresh.p.teacher_archive = join(str(tmp_path), "teachers", "lost")
    with pytest.raises(EvidenceError, match=r"(?s)learned from the teacher of .*records.*" + teacher_name +
                       r"\.json.*--tag \(e\.g\. --tag teacher2\).*--no-records\. Nothing was trained"):
        refuse_a_new_teacher_beside_committed_records(fresh)
    os.makedirs(fresh.p.teacher_archive)
    with open(join(fresh.p.teacher_archive, "manifest.json"), "w") as f:  # an archive: restore_teacher checks it
        json.dump({"files": {}}, f)
    refuse_a_new_teacher_beside_committed_records(fresh)
    refuse_a_new_teacher_beside_committed_records(_RecordWorkspace(join(str(tmp_path), "fresh"), None))
    refuse_a_new_teacher_beside_committed_records(
        _RecordWorkspace(join(str(tmp_path), "fresh"), join(str(tmp_path), "records-teacher2")))


def test_plain_students_of_a_longer_budget_can_take_their_teacher_from_another_records_folder(tmp_path):
    """The teacher archive of a committed series is lost with its machine; the plain student's budget-doubling check
    still needs only the teacher's plans (its architecture) and its record (the report's teacher row and the series'
    identity), never its weights. Anything that distils, another dataset's teacher, or a workspace or records folder
    of another teacher is refused before training."""
    from nnunet_kd.evidence.collect import collect, save_workspace_records
    from nnunet_kd.evidence.protocol import TEACHER_PLANS, TEACHER_TRAINER, EvidenceError
    from nnunet_kd.evidence.records import check_teacher_from_records, load_records
    from nnunet_kd.evidence.workspace import Workspace

    teacher_name = f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d"
    old_records, new_records = join(str(tmp_path), "records-t"), join(str(tmp_path), "records-t-long")
    old_machine = join(str(tmp_path), "old")
    teacher_plans = {"plans_name": TEACHER_PLANS, "configurations": {"2d": {"patch_size": [8, 8]}}}
    fake_model_folder(old_machine, teacher_name, teacher_plans)
    first = _RecordWorkspace(old_machine, old_records)
    save_workspace_records(first, collect(first))

    fresh = _RecordWorkspace(join(str(tmp_path), "fresh"), new_records)
    fresh.p.student_epochs = 8
    fresh.p.teacher_from_records = old_records
    fresh.p.runs = [("plain", 0.25)]
    fresh.split = {"test": ["case_010"], "crossval": [{}, {}]}
    fresh.dataset_json = lambda: {"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    folder = Workspace.teacher_from_records(fresh)
    # the student planner's inputs, and no checkpoint: nothing can distil from it or evaluate it
    assert load_json(join(folder, "plans.json")) == teacher_plans
    assert load_json(join(folder, "dataset.json"))["labels"] == {"background": 0, "a": 1}
    assert not os.path.exists(join(folder, "fold_0"))
    teacher = load_records(old_records)[teacher_name]
    assert load_records(new_records)[teacher_name] == teacher  # the series' teacher row, copied once
    fake_model_folder(fresh.results, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d", _budget(8), weight=1.3)
    found = collect(fresh)
    assert found["teacher"]["folder"] is None and found["students"][("plain", 0.25)][0]["folder"]
    save_workspace_records(fresh, found)
    student = load_records(new_records)[f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d"]
    assert student["teacher_network_weights_sha256"] == teacher["network_weights_sha256"]
    Workspace.teacher_from_records(fresh)  # again (a resumed session): the same record, nothing to refuse

    fresh.p.runs = [("plain", 0.25), ("adaptive", 0.25)]
    with pytest.raises(EvidenceError, match=r"only plain students .* --runs names adaptive"):
        check_teacher_from_records(fresh.p, fresh.split)
    fresh.p.runs = [("plain", 0.25)]
    with pytest.raises(EvidenceError, match=r"evaluated on other test cases"):
        check_teacher_from_records(fresh.p, {"test": ["case_011"]})
    fresh.p.split_file = join(str(tmp_path), "no_split.json")
    with pytest.raises(EvidenceError, match=r"no split file .*no_split\.json.*--split-file"):
        check_teacher_from_records(fresh.p)
    fresh.p.teacher_from_records = new_records + "-missing"
    with pytest.raises(EvidenceError, match=r"no teacher record .*records-t-long-missing/" + teacher_name):
        check_teacher_from_records(fresh.p, fresh.split)
    fresh.p.teacher_from_records = old_records
    other = dict(teacher, network_weights_sha256="0" * 64)
    with open(join(new_records, teacher_name + ".json"), "w") as f:
        json.dump(other, f)
    with pytest.raises(EvidenceError, match=r"not the one of the committed records .*other network weights"):
        Workspace.teacher_from_records(fresh)
    os.makedirs(join(folder, "fold_0"))
    open(join(folder, "fold_0", "checkpoint_final.pth"), "w").close()
    with pytest.raises(EvidenceError, match=r"holds a trained teacher already; use a new --workdir"):
        Workspace.teacher_from_records(fresh)

def test_a_results_tag_is_refused_when_it_would_not_make_a_plain_file_name():
    from nnunet_kd.evidence.protocol import results_tag_error

    for fine in (None, "teacher2", "6000it", "40it_val50", "v1.2"):
        assert results_tag_error(fine) is None
    for bad in ("bad/x", "", ".hidden", "a b", "-x"):
        assert "letters, digits, '_' and '.' only" in results_tag_error(bad)


def test_a_results_file_names_the_command_that_reproduces_every_row_not_only_the_last_invocation():
    """A results file gathers the models of several invocations of one protocol (one seed per session, a variant
    added later): its command keeps the invocation's protocol and lists every METHOD@WIDTH and seed the file holds;
    the all-labels plain rows of a labelled-fraction file get the command without the fraction."""
    from nnunet_kd.evidence.protocol import reproducing_commands

    last = ("--raw-dataset ../shared/data/Dataset004_Hippocampus -c 2d --labelled-fraction=0.25 --runs "
            "multiscale_contrastive:encoderHintsOnly@0.25 --seeds 2 --commit --tag teacher2 --unlabelled-images "
            "/data/imagesTs --labelled-fraction-seed 0 --max-batch-size 32").split()
    students = {("multiscale_contrastive:encoderHintsOnly", 0.25): {2: {}},
                ("plain", 0.25): {0: {}, 1: {}}, ("adaptive", 0.125): {1: {}},
                ("plain_all_labels", 0.25): {0: {}, 1: {}, 2: {}}}
    commands = reproducing_commands(last, students)
    assert commands["command"] == (
        "python benchmarks/run_evidence.py --raw-dataset ../shared/data/Dataset004_Hippocampus -c 2d "
        "--labelled-fraction=0.25 --tag teacher2 --unlabelled-images /data/imagesTs --labelled-fraction-seed 0 "
        "--max-batch-size 32 --runs plain@0.25 multiscale_contrastive:encoderHintsOnly@0.25 adaptive@0.125 "
        "--seeds 0 1 2")
    assert commands["all_labels"] == (
        "python benchmarks/run_evidence.py --raw-dataset ../shared/data/Dataset004_Hippocampus -c 2d --tag teacher2 "
        "--max-batch-size 32 --runs plain@0.25 --seeds 0 1 2")
    # a file on all labels has no second command; its plain rows are its own
    assert reproducing_commands(["-c", "2d", "--seeds", "0", "--runs", "plain@0.5"],
                                {("plain", 0.5): {0: {}, 1: {}}}) == {
        "command": "python benchmarks/run_evidence.py -c 2d --runs plain@0.5 --seeds 0 1"}


def _record(model: str, dice_per_case: dict, epochs: int = 60, validation: float | None = 0.8,
            teacher: str | None = "t" * 64) -> dict:
    """A committed model record as run_evidence.py writes it, reduced to what a comparison reads (one label)."""
    return {"model": model, "test": {case: {"1": {"Dice": d}} for case, d in dice_per_case.items()},
            "validation_mean_dice": validation, "teacher_network_weights_sha256": teacher,
            "plans": {"kd": {"2d": {"training": {"num_epochs": epochs, "num_iterations_per_epoch": 50,
                                                 "num_val_iterations_per_epoch": 10}}}}}


def test_two_record_sets_pair_seed_by_seed_over_the_same_test_cases():
    from nnunet_kd.evidence.budget_check import compare_record_sets

    cases = ["c0", "c1", "c2"]
    long = [_record(f"long_s{s}", dict(zip(cases, d)), epochs=120) for s, d in enumerate([[.9, .8, .7], [.8, .8, .8]])]
    short = [_record(f"short_s{s}", dict(zip(cases, d))) for s, d in enumerate([[.8, .8, .6], [.8, .7, .8]])]
    result = compare_record_sets(long, short, "2d")
    # seed 0: +0.1, 0, +0.1; seed 1: 0, +0.1, 0 -> the same numbers as the protocol's own paired statistics
    expected = paired_bootstrap(np.array([[.1, 0, .1], [0, .1, 0]]))
    assert result["mean_diff"] == pytest.approx(0.05)
    assert result["ci95"] == pytest.approx(expected["ci95"])
    assert result["mean_diff_per_seed"] == pytest.approx([0.2 / 3, 0.1 / 3])
    assert result["n_cases"] == 3
    assert result["a"]["test_mean_dice_per_seed"] == pytest.approx([0.8, 0.8])
    assert result["a"]["budgets"] == ["120 x 50 iterations (10 validation iterations per epoch)"]
    assert result["b"]["budgets"] == ["60 x 50 iterations (10 validation iterations per epoch)"]
    # seeds pair in the order given: swapping b's seeds changes the per-seed differences
    assert compare_record_sets(long, short[::-1], "2d")["mean_diff_per_seed"] != pytest.approx([0.2 / 3, 0.1 / 3])


def test_records_of_different_test_cases_or_unequal_seed_counts_do_not_pair():
    from nnunet_kd.evidence.budget_check import compare_record_sets
    from nnunet_kd.evidence.protocol import EvidenceError

    a = [_record("a_s0", {"c0": .9, "c1": .8})]
    with pytest.raises(EvidenceError, match="b_s0.*other test cases"):
        compare_record_sets(a, [_record("b_s0", {"c0": .9, "c2": .8})], "2d")
    with pytest.raises(EvidenceError, match="one model per seed"):
        compare_record_sets(a, [_record("b_s0", {"c0": .9, "c1": .8})] * 2, "2d")


def test_the_record_comparison_command_names_a_missing_record_and_needs_the_seed_in_its_paths(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_records", join(os.path.dirname(__file__), "..", "benchmarks", "compare_records.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for seed in (0, 1):
        for side, shift in (("a", 0.1), ("b", 0.0)):
            with open(tmp_path / f"{side}_s{seed}.json", "w") as f:
                json.dump(_record(f"{side}_s{seed}", {"c0": .7 + shift, "c1": .6 + shift}), f)
    pattern = str(tmp_path / "{side}_s{{seed}}.json")
    tool.main(["-c", "2d", "--a", pattern.format(side="a"), "--b", pattern.format(side="b"), "--seeds", "0", "1"])
    out = capsys.readouterr().out
    assert "a - b: +0.1000 [+0.1000, +0.1000]" in out and "Command: `python benchmarks/compare_records.py -c 2d" in out
    # --out: the printed table as a results file, and the comparison with its records and command as JSON
    tool.main(["-c", "2d", "--a", pattern.format(side="a"), "--b", pattern.format(side="b"), "--seeds", "0", "1",
               "--out", str(tmp_path / "a_vs_b")])
    printed = capsys.readouterr().out
    with open(tmp_path / "a_vs_b.md") as f:
        assert f.read() in printed
    with open(tmp_path / "a_vs_b.json") as f:
        written = json.load(f)
    assert written["mean_diff"] == pytest.approx(0.1) and written["seeds"] == [0, 1]
    assert written["records"]["b"] == [str(tmp_path / "b_s0.json"), str(tmp_path / "b_s1.json")]
    assert "--out" in written["command"]
    with pytest.raises(SystemExit, match=r"no folder .*nowhere.*Nothing was written"):
        tool.main(["-c", "2d", "--a", pattern.format(side="a"), "--b", pattern.format(side="b"), "--seeds", "0",
                   "--out", str(tmp_path / "nowhere" / "a_vs_b")])
    with open(tmp_path / "a_s2.json", "w") as f:  # side b lacks seed 2
        json.dump(_record("a_s2", {"c0": .7, "c1": .6}), f)
    with pytest.raises(SystemExit, match=r"--b: no record .*b_s2\.json"):
        tool.main(["-c", "2d", "--a", pattern.format(side="a"), "--b", pattern.format(side="b"), "--seeds", "0", "2"])
    with pytest.raises(SystemExit, match=r"needs '\{seed\}'"):
        tool.main(["-c", "2d", "--a", str(tmp_path / "a_s0.json"), "--b", pattern.format(side="b"),
                   "--seeds", "0", "1"])


def _validated_record(model: str, test: dict, validation: dict, epochs: int) -> dict:
    """A plain student's record with per-case validation Dice (run_evidence.py records them since the budget check)."""
    record = _record(model, test, epochs=epochs, validation=float(np.nanmean(list(validation.values()))))
    return dict(record, validation=dict(validation))


def test_a_budget_is_final_quality_only_when_doubling_it_rules_out_a_validation_gain_of_001():
    """The budget check pairs each seed of the plain student with the same model trained for longer, over the
    fold's validation cases: a gain whose whole 95% interval lies below 0.01 means the student had stopped improving;
    a larger one means the comparisons at this budget measure learning speed."""
    from nnunet_kd.evidence.budget_check import budget_doubling_check

    test = {"t0": .8, "t1": .7}
    shorter = {s: _validated_record(f"plain_s{s}", test, {"v0": .80, "v1": .70, "v2": .60}, 60) for s in (0, 1)}
    small = {s: _validated_record(f"plain_s{s}", test, {"v0": .805, "v1": .705, "v2": .605}, 120) for s in (0, 1)}
    large = {s: _validated_record(f"plain_s{s}", {"t0": .82, "t1": .72}, {"v0": .82, "v1": .72, "v2": .62}, 120)
             for s in (0, 1)}

    final = budget_doubling_check(shorter, small, "2d", "records/longer")
    assert final["stopped_improving"] is True and final["seeds"] == [0, 1]
    assert final["validation_gain"]["mean_diff"] == pytest.approx(0.005)
    assert final["validation_gain"]["ci95"] == pytest.approx([0.005, 0.005]) and final["validation_gain"]["n_cases"] == 3
    assert (final["iterations"], final["longer_iterations"]) == (3000, 6000)
    assert final["test_gain"]["mean_diff"] == pytest.approx(0.0)

    speed = budget_doubling_check(shorter, large, "2d", "records/longer")
    assert speed["stopped_improving"] is False
    assert speed["validation_gain"]["mean_diff"] == pytest.approx(0.02)
    assert speed["test_gain"]["mean_diff"] == pytest.approx(0.02)

    # a case without foreground anywhere (NaN Dice) is left out of the pairing, not allowed to make the gain NaN
    with_empty = {s: dict(r, validation={**r["validation"], "v3": float("nan")}) for s, r in shorter.items()}
    longer_empty = {s: dict(r, validation={**r["validation"], "v3": float("nan")}) for s, r in small.items()}
    assert budget_doubling_check(with_empty, longer_empty, "2d", "x")["validation_gain"]["n_cases"] == 3

    # only the seeds both sides hold are paired
    assert budget_doubling_check(shorter, {1: small[1]}, "2d", "x")["seeds"] == [1]


def test_the_budget_check_refuses_records_it_cannot_pair_and_leaves_older_records_undecided():
    from nnunet_kd.evidence.budget_check import budget_doubling_check
    from nnunet_kd.evidence.protocol import EvidenceError

    test = {"t0": .8, "t1": .7}
    shorter = {0: _validated_record("plain_s0", test, {"v0": .8, "v1": .7}, 60)}
    with pytest.raises(EvidenceError, match=r"records/longer: no record of the plain student's seeds \[0\]"):
        budget_doubling_check(shorter, {}, "2d", "records/longer")
    same_budget = {0: _validated_record("plain_s0", test, {"v0": .9, "v1": .8}, 60)}
    with pytest.raises(EvidenceError, match=r"trained for \[3000\] iterations, this protocol's for \[3000\]"):
        budget_doubling_check(shorter, same_budget, "2d", "records/longer")
    other_fold = {0: _validated_record("plain_s0", test, {"v7": .9, "v8": .8}, 120)}
    with pytest.raises(EvidenceError, match="validated on other cases"):
        budget_doubling_check(shorter, other_fold, "2d", "records/longer")
    # records written before per-case validation Dice was kept: the mean gain, and no decision either way
    older = {0: _record("plain_s0", test, epochs=120, validation=0.9)}
    undecided = budget_doubling_check(shorter, older, "2d", "records/longer")
    assert undecided["stopped_improving"] is None and undecided["validation_gain"]["ci95"] is None
    assert undecided["validation_gain"]["mean_diff"] == pytest.approx(0.15)


def test_every_comparison_says_whether_it_is_final_quality_or_learning_speed_by_its_widths_budget_check(tmp_path):
    from nnunet_kd.evidence.budget_check import budget_checks_of, budget_result
    from nnunet_kd.evidence.protocol import EvidenceError, Protocol
    from nnunet_kd.evidence.report import format_tables

    longer_dir = tmp_path / "records_6000it"
    longer_dir.mkdir()
    test = {"t0": .8, "t1": .7}
    for seed in (0, 1):
        with open(longer_dir / f"plain_w0p25_s{seed}.json", "w") as f:
            json.dump(_validated_record(f"plain_w0p25_s{seed}", test, {"v0": .85, "v1": .75}, 120), f)
    students = {("plain", 0.25): {s: _validated_record(f"plain_w0p25_s{s}", test, {"v0": .8, "v1": .7}, 60)
                                  for s in (0, 1)},
                ("plain", 0.5): {0: _validated_record("plain_w0p5_s0", test, {"v0": .8, "v1": .7}, 60)},
                ("adaptive", 0.25): {0: _validated_record("adaptive_w0p25_s0", test, {"v0": .8, "v1": .7}, 60)}}
    protocol = Protocol(raw_dataset="x", split_file="x", n_test=2, workdir=str(tmp_path), configuration="2d", runs=[],
                        seeds=[0, 1], teacher_epochs=5, student_epochs=60, iterations_per_epoch=50,
                        budget_check_records=str(longer_dir))
    checks = budget_checks_of(students, protocol)
    assert set(checks) == {"0.25", "0.5"}  # plain students only
    assert checks["0.25"]["stopped_improving"] is False and checks["0.25"]["validation_gain"]["mean_diff"] == \
        pytest.approx(0.05)
    assert checks["0.5"]["stopped_improving"] is None and "no record of this width" in checks["0.5"]["reason"]
    assert [budget_result(checks.get(w)) for w in ("0.25", "0.5", "0.125")] == ["learning speed", "unchecked",
                                                                                "unchecked"]
    assert budget_result({"seeds": [0], "stopped_improving": True}) == "final quality"
    assert budget_result({"seeds": [0], "stopped_improving": None}) == "undecided"  # older records

    comparison = {"method": "adaptive", "baseline": "plain", "width": 0.25, "seeds": [0], "n_cases": 2,
                  "mean_diff": 0.01, "ci95": [0.0, 0.02], "mean_diff_per_seed": [0.01],
                  "result_at_this_budget": "learning speed"}
    table = format_tables({"labels": {}, "models": [], "comparisons": [comparison], "plateau_of_plain_student": {},
                           "budget_check_of_plain_student": checks})
    assert "| +0.0100 | learning speed |" in table
    assert "| 0.25 | 2 | 3,000 | 6,000 | +0.0500 [+0.0500, +0.0500] | +0.0000 [+0.0000, +0.0000] | " \
           "NO: learning-speed result |" in table
    assert "| 0.5 | | | | | | no: no record of this width's plain students there |" in table

    empty = tmp_path / "records_empty"
    empty.mkdir()
    with pytest.raises(EvidenceError, match="none of this protocol's plain students .*plain_w0p25_s0"):
        budget_checks_of(students, Protocol(**{**protocol.__dict__, "budget_check_records": str(empty)}))
    with pytest.raises(EvidenceError, match="no such folder"):
        budget_checks_of(students, Protocol(**{**protocol.__dict__, "budget_check_records": str(tmp_path / "gone")}))


def test_a_model_of_an_earlier_preset_is_another_recipe_and_is_left_out_with_the_settings_that_differ(tmp_path):
    """A preset chosen anew on validation must not lend its name to models trained with the preset before it: those
    are left out of the report (with the reason), while the models of the shipped preset are reported."""
    from nnunet_kd.evidence.collect import collect
    from nnunet_kd.evidence.protocol import TEACHER_PLANS, TEACHER_TRAINER

    ws = join(str(tmp_path), "ws")
    fake_model_folder(ws, f"{TEACHER_TRAINER}__{TEACHER_PLANS}__2d", {"plans_name": TEACHER_PLANS})
    now = _budget(4)
    earlier = json.loads(json.dumps(now))
    earlier["kd"]["2d"]["methods"]["multiscale_contrastive"]["weights"]["segmentation"] = 0.4
    fake_model_folder(ws, f"nnUNetTrainerBudget__{student_plans_name(0.25, 0)}__2d", now, weight=1.2)
    fake_model_folder(ws, f"nnUNetTrainerKD_Adaptive__{student_plans_name(0.25, 0)}__2d", now, weight=1.4)
    fake_model_folder(ws, f"nnUNetTrainerKD_MultiScaleContrastive__{student_plans_name(0.25, 0)}__2d", earlier,
                      weight=1.6)
    found = collect(_RecordWorkspace(ws, None))
    assert sorted(found["students"]) == [("adaptive", 0.25), ("plain", 0.25)]
    assert len(found["skipped"]) == 1
    assert "nnUNetTrainerKD_MultiScaleContrastive" in found["skipped"][0]
    assert "plans/multiscale_contrastive.json" in found["skipped"][0]
    assert "methods.multiscale_contrastive.weights" in found["skipped"][0]
    assert "multiscale_contrastive:default@0.25" in found["skipped"][0]  # how to train that recipe again
