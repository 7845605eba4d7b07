"""The leakage guard reads what each teacher fold trained on from its own record (fold_X/training_cases.json), not
from today's splits_final.json, and refuses a teacher of another dataset."""
from __future__ import annotations

import os
import shutil
from os.path import join

import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import DATASET_NAME, TEACHER_PLANS
from nnunet_kd.provenance import TRAINING_CASES_FILE, dataset_fingerprint_sha256, record_training_cases
from nnunet_kd.teacher import TeacherError, locate_teacher, teacher_training_cases
from test_budget_trainer import BUDGET, plans_copy
from test_teacher_and_bad_inputs import edit_json, make_trainer, student_plans_with, teacher_copy


def _teacher(folder: str):
    return locate_teacher(folder, 0, "checkpoint_final.pth")[0]


def _cases(ws, folder: str, **kwargs) -> tuple[set | None, list[str]]:
    messages = []
    cases = teacher_training_cases(_teacher(folder), student_dataset_folder=ws.preprocessed, log=messages.append,
                                   **kwargs)
    return cases, messages


def test_the_teacher_records_the_cases_and_the_dataset_it_trained_on(workspace):
    ws = workspace
    record = load_json(join(ws.teacher_folder, "fold_0", TRAINING_CASES_FILE))
    splits = load_json(join(ws.preprocessed, "splits_final.json"))
    assert record["dataset_name"] == DATASET_NAME and record["trainer"] == BUDGET
    assert record["dataset_fingerprint_sha256"] == dataset_fingerprint_sha256(
        join(ws.preprocessed, "dataset_fingerprint.json"))
    assert record["training_cases"] == sorted(splits[0]["train"])
    cases, messages = _cases(ws, ws.teacher_folder)
    assert cases == set(splits[0]["train"]) and messages == []


@pytest.fixture
def splits_restored(workspace):
    """The workspace's splits_final.json as it was, whatever the test did to it."""
    path = join(workspace.preprocessed, "splits_final.json")
    original = load_json(path)
    yield path, original
    save_json(original, path, sort_keys=False)


def test_a_splits_file_edited_after_the_teacher_was_trained_does_not_fool_the_guard(workspace, monkeypatch,
                                                                                  splits_restored):
    ws = workspace
    splits_file, clean = splits_restored
    student_validation = clean[0]["val"]
    # The teacher is trained while fold 0 of splits_final.json includes the student's fold-0 validation cases ...
    leaky = [dict(clean[0], train=clean[0]["train"] + clean[0]["val"])] + clean[1:]
    save_json(leaky, splits_file, sort_keys=False)
    teacher = make_trainer(ws, monkeypatch, plans_copy(ws, TEACHER_PLANS, "nnUNetPlans_leaky_teacher"),
                           trainer=BUDGET)
    teacher.initialize()
    record_training_cases(teacher)  # what on_train_start writes
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):  # what nnU-Net's on_train_start copies
        shutil.copyfile(join(ws.teacher_folder, name), join(teacher.output_folder_base, name))
    teacher.save_checkpoint(join(teacher.output_folder, "checkpoint_final.pth"))
    # ... and the file is put back afterwards: today's splits say teacher fold 0 never saw them.
    save_json(clean, splits_file, sort_keys=False)
    assert not set(student_validation) & set(load_json(splits_file)[0]["train"])

    student = make_trainer(ws, monkeypatch, student_plans_with(ws, "nnUNetPlans_leaky_teacher_student",
                                                               teacher_folder=teacher.output_folder_base))
    with pytest.raises(TeacherError, match=rf"was trained on {len(student_validation)} of the student's "
                                           rf"{len(student_validation)} fold-0 validation cases"):
        student.initialize()


def test_a_teacher_of_another_dataset_is_refused_unless_allowed(workspace, monkeypatch, tmp_path):
    ws = workspace
    record_file = join("fold_0", TRAINING_CASES_FILE)
    renamed = teacher_copy(ws, tmp_path / "renamed", lambda f: edit_json(
        join(f, record_file), lambda r: r.update(dataset_name="Dataset992_Other")))
    with pytest.raises(TeacherError, match=rf"trained on dataset Dataset992_Other, not the student's {DATASET_NAME}"
                                           rf".*training_cases\.json.*allow_validation_overlap"):
        _cases(ws, renamed)
    # Same name, other images: the record's dataset fingerprint tells them apart.
    other_images = teacher_copy(ws, tmp_path / "other_images", lambda f: edit_json(
        join(f, record_file), lambda r: r.update(dataset_fingerprint_sha256="0" * 64)))
    with pytest.raises(TeacherError, match=rf"a dataset named {DATASET_NAME} whose dataset_fingerprint\.json differs"):
        _cases(ws, other_images)

    refused = make_trainer(ws, monkeypatch, student_plans_with(ws, "nnUNetPlans_other_dataset", renamed))
    with pytest.raises(TeacherError, match="Dataset992_Other"):
        refused.initialize()
    allowed = make_trainer(ws, monkeypatch, student_plans_with(ws, "nnUNetPlans_other_dataset_allowed", renamed,
                                                               allow_validation_overlap=True))
    allowed.initialize()
    log = open(allowed.log_file).read()
    assert "WARNING: Teacher fold 0" in log and "Dataset992_Other" in log and "Accepted because" in log


def test_a_teacher_without_a_record_falls_back_to_the_splits_file_with_a_warning(workspace, monkeypatch, tmp_path):
    ws = workspace
    # A teacher trained with nnU-Net's own trainer: no record, nnU-Net's copy of dataset_fingerprint.json beside it.
    plain = teacher_copy(ws, tmp_path / "plain", lambda f: os.remove(join(f, "fold_0", TRAINING_CASES_FILE)))
    cases, messages = _cases(ws, plain)
    assert cases == set(load_json(join(ws.preprocessed, "splits_final.json"))[0]["train"])
    assert len(messages) == 1 and "WARNING:" in messages[0] and "has no training_cases.json" in messages[0] \
        and "today's" in messages[0] and join(ws.preprocessed, "splits_final.json") in messages[0]
    trainer = make_trainer(ws, monkeypatch, student_plans_with(ws, "nnUNetPlans_teacher_without_record", plain))
    trainer.initialize()
    assert "has no training_cases.json" in open(trainer.log_file).read()

    # Without a record the fingerprint nnU-Net copied into the teacher folder still identifies its dataset.
    edit_json(join(plain, "dataset_fingerprint.json"), lambda fp: fp.update(spacings=[[9.0, 9.0, 9.0]]))
    with pytest.raises(TeacherError, match=r"whose dataset_fingerprint\.json differs.*its plans"):
        _cases(ws, plain)


def test_an_unreadable_record_is_refused_naming_the_file(workspace, tmp_path):
    ws = workspace
    broken = teacher_copy(ws, tmp_path / "broken", lambda f: open(join(f, "fold_0", TRAINING_CASES_FILE), "w").write(
        '{"dataset_name": "x"'))
    with pytest.raises(TeacherError, match=rf"{join(broken, 'fold_0', TRAINING_CASES_FILE)} is not readable JSON.*"
                                           r"Delete"):
        _cases(ws, broken)


def test_an_exported_model_keeps_its_training_case_record(workspace, tmp_path):
    from nnunet_kd.export import export_student
    ws = workspace
    exported = export_student(ws.teacher_folder, str(tmp_path / "exported"))
    assert load_json(join(exported, "fold_0", TRAINING_CASES_FILE)) == \
        load_json(join(ws.teacher_folder, "fold_0", TRAINING_CASES_FILE))
    cases, messages = _cases(ws, exported)
    assert cases == set(load_json(join(ws.preprocessed, "splits_final.json"))[0]["train"]) and messages == []
