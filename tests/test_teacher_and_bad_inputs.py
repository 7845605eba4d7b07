"""The teacher is frozen, and every bad input is refused before training with a message naming the file and fix."""
from __future__ import annotations

import copy
import errno
import glob
import os
import shutil
from os.path import isdir, join

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import CONFIGURATION, DATASET_ID, DATASET_NAME, STUDENT_PLANS
from nnunet_kd.atomic_files import atomic_torch_save
from nnunet_kd.planning import PlanningError, plan_student
from nnunet_kd.recipe import RecipeError
from nnunet_kd.teacher import CorruptCheckpointError, TeacherError, UnsafeCheckpointError, load_nnunet_checkpoint


def make_trainer(ws, monkeypatch, plans_name=STUDENT_PLANS, fold=0, trainer="nnUNetTrainerKD_Adaptive"):
    ws.set_env(monkeypatch)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    plans = load_json(join(ws.preprocessed, plans_name + ".json"))
    plans["continue_training"] = False
    cls = recursive_find_trainer_class_by_name(trainer)
    return cls(plans, CONFIGURATION, fold, load_json(join(ws.preprocessed, "dataset.json")), device=torch.device("cpu"))


def student_plans_with(ws, name, teacher_folder=None, **teacher_settings) -> str:
    """A copy of the student plans under another name, with its recipe's teacher entry changed."""
    plans = load_json(join(ws.preprocessed, STUDENT_PLANS + ".json"))
    plans["plans_name"] = name
    if teacher_folder is not None:
        teacher_settings["model_folder"] = teacher_folder
    plans["kd"][CONFIGURATION]["teacher"].update(teacher_settings)
    save_json(plans, join(ws.preprocessed, name + ".json"), sort_keys=False)
    return name


def teacher_copy(ws, tmp_path, edit=None) -> str:
    """A copy of the trained teacher folder, optionally with plans.json / dataset.json edited."""
    folder = str(tmp_path / os.path.basename(ws.teacher_folder))
    shutil.copytree(ws.teacher_folder, folder)
    if edit:
        edit(folder)
    return folder


def edit_json(path, change):
    data = load_json(path)
    change(data)
    save_json(data, path, sort_keys=False)


def test_teacher_is_frozen_outside_the_student_and_untouched_by_a_training_step(workspace, monkeypatch):
    trainer = make_trainer(workspace, monkeypatch)
    trainer.initialize()
    teacher = trainer.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(m is teacher.network for m in trainer.network.modules())  # never saved with the student
    trainer.network.train()
    teacher.train()
    assert not teacher.training and not teacher.network.training

    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    labels = torch.randint(0, 3, (2, 1, *patch)).float()
    target = [torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest") for s in scales]
    batch = {"data": torch.randn(2, 1, *patch), "target": target}
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(trainer.network.state_dict())
    adapters_before = copy.deepcopy(trainer.distillation.state_dict())
    out = trainer.train_step(batch)

    assert list(out["terms"]) == ["segmentation", "kl", "lovasz", "feature"]
    assert all(torch.isfinite(v) and v > 0 for v in out["terms"].values())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, trainer.network.state_dict()[k]) for k, v in student_before.items())
    assert any(not torch.equal(v, trainer.distillation.state_dict()[k]) for k, v in adapters_before.items())


def test_missing_teacher_fold_checkpoint(workspace, monkeypatch):
    name = student_plans_with(workspace, "nnUNetPlans_bad_fold", fold=3)
    trainer = make_trainer(workspace, monkeypatch, name)
    with pytest.raises(TeacherError, match=r"Teacher checkpoint not found: .*fold_3.*checkpoint_final\.pth.*fold_0"):
        trainer.initialize()


def test_corrupt_teacher_checkpoint(workspace, monkeypatch, tmp_path):
    def truncate(folder):
        path = join(folder, "fold_0", "checkpoint_final.pth")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    folder = teacher_copy(workspace, tmp_path, truncate)
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, "nnUNetPlans_bad_corrupt", folder))
    with pytest.raises(TeacherError, match=r"checkpoint_final\.pth is not a readable PyTorch checkpoint.*corrupt"):
        trainer.initialize()


# (what is wrong, how to break a copy of the teacher, the trainer's error, the planner's error)
@pytest.mark.parametrize("what, edit, message, planner_error", [
    ("labels", lambda f: edit_json(join(f, "dataset.json"), lambda d: d["labels"].update(extra=3)),
     r"Label mismatch: the teacher \(.*dataset\.json\)", (TeacherError, r"Label mismatch")),
    ("channels", lambda f: edit_json(join(f, "dataset.json"), lambda d: d["channel_names"].update({"1": "ADC"})),
     r"Input channel mismatch", (TeacherError, r"Input channel mismatch")),
    # The planner copies the teacher's preprocessing into the student, so it finds the mismatch against the
    # preprocessed data on disk instead.
    ("normalisation", lambda f: edit_json(join(f, "plans.json"), lambda p: p["configurations"][CONFIGURATION].update(
        normalization_schemes=["CTNormalization"])), r"Normalisation mismatch: teacher \(.*plans\.json\)",
     (PlanningError, r"Preprocessing mismatch: .*normalisation \['ZScoreNormalization'\].*'CTNormalization'")),
    ("spacing", lambda f: edit_json(join(f, "plans.json"), lambda p: p["configurations"][CONFIGURATION].update(
        spacing=[1.0, 1.0, 1.0])), r"Spacing mismatch", (PlanningError, r"Preprocessing mismatch: .*spacing")),
])
def test_incompatible_teacher_is_refused_before_training(workspace, monkeypatch, tmp_path, what, edit, message,
                                                         planner_error):
    folder = teacher_copy(workspace, tmp_path, edit)
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, f"nnUNetPlans_bad_{what}", folder))
    with pytest.raises(TeacherError, match=message):
        trainer.initialize()
    assert not glob.glob(join(trainer.output_folder, "checkpoint_*.pth"))
    # The planner refuses the same teacher when the student is planned.
    workspace.set_env(monkeypatch)
    error_class, planner_message = planner_error
    with pytest.raises(error_class, match=planner_message):
        plan_student(str(DATASET_ID), CONFIGURATION, folder, f"nnUNetPlans_never_{what}", verbose=False)
    assert not os.path.exists(join(workspace.preprocessed, f"nnUNetPlans_never_{what}.json"))


def test_a_teacher_of_another_dimensionality_is_refused_by_the_planner_by_its_own_configuration(workspace, monkeypatch,
                                                                                                tmp_path):
    # the planner checked a teacher folder under the student's configuration name, so a ...__2d teacher passed for a
    # 3d student and training later failed with a raw broadcast error comparing a 2- and a 3-entry spacing
    source = teacher_copy(workspace, tmp_path)
    folder = source.rsplit("__", 1)[0] + "__2d"
    os.rename(source, folder)

    def add_2d(plans):
        config = copy.deepcopy(plans["configurations"][CONFIGURATION])
        config.update(spacing=config["spacing"][1:], patch_size=config["patch_size"][1:])
        plans["configurations"]["2d"] = config
    edit_json(join(folder, "plans.json"), add_2d)
    workspace.set_env(monkeypatch)
    with pytest.raises(TeacherError, match=r"Dimension mismatch: the teacher's configuration '2d' .* is 2D, the "
                                           r"student's .* 3D"):
        plan_student(str(DATASET_ID), CONFIGURATION, folder, "nnUNetPlans_never_2dteacher", verbose=False)
    assert not os.path.exists(join(workspace.preprocessed, "nnUNetPlans_never_2dteacher.json"))


def test_teacher_trained_on_student_validation_cases_is_refused_unless_allowed(workspace, monkeypatch):
    splits = load_json(join(workspace.preprocessed, "splits_final.json"))
    leaked = sorted(set(splits[1]["val"]) & set(splits[0]["train"]))
    assert leaked  # teacher fold 0 trained on part of fold 1's validation cases
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, "nnUNetPlans_bad_leak", fold=0),
                           fold=1)
    with pytest.raises(TeacherError, match=rf"was trained on {len(leaked)} of the student's .*allow_validation_overlap"):
        trainer.initialize()

    allowed = make_trainer(workspace, monkeypatch, student_plans_with(
        workspace, "nnUNetPlans_leak_allowed", fold=0, allow_validation_overlap=True), fold=1)
    allowed.initialize()
    assert "WARNING: Teacher fold 0" in open(allowed.log_file).read()


def test_plans_without_recipe_are_refused_and_leave_nothing_on_disk(workspace, monkeypatch):
    trainer_folder = join(workspace.results, os.path.basename(workspace.preprocessed),
                          f"nnUNetTrainerKD_Adaptive__nnUNetPlans__{CONFIGURATION}")
    with pytest.raises(RecipeError, match=r"nnUNetPlans\.json has no distillation recipe .*nnUNetv2_kd_plan_student"):
        make_trainer(workspace, monkeypatch, "nnUNetPlans")
    assert not isdir(trainer_folder)


def test_recipe_typo_is_refused(workspace, monkeypatch):
    plans = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    plans["plans_name"] = "nnUNetPlans_bad_typo"
    plans["kd"][CONFIGURATION]["methods"]["adaptive"]["weights"]["lovasz_weigth"] = 1.0
    save_json(plans, join(workspace.preprocessed, "nnUNetPlans_bad_typo.json"), sort_keys=False)
    with pytest.raises(RecipeError, match=r"nnUNetPlans_bad_typo\.json.*unknown key 'lovasz_weigth'"):
        make_trainer(workspace, monkeypatch, "nnUNetPlans_bad_typo")


def test_planner_never_overwrites_existing_plans(workspace, monkeypatch):
    workspace.set_env(monkeypatch)
    existing = join(workspace.preprocessed, STUDENT_PLANS + ".json")
    before = open(existing).read()
    with pytest.raises(PlanningError, match="already plans configuration '3d_fullres'.*--overwrite"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, STUDENT_PLANS, verbose=False)
    with pytest.raises(PlanningError, match="teacher's plans name"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans_testteacher",
                     verbose=False)
    with pytest.raises(PlanningError, match="not a student plans file"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans", verbose=False)
    assert open(existing).read() == before


def test_planner_output_keeps_the_data_and_shrinks_the_network(workspace):
    teacher = load_json(join(workspace.teacher_folder, "plans.json"))["configurations"][CONFIGURATION]
    plans = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    student = plans["configurations"][CONFIGURATION]
    assert plans["plans_name"] == STUDENT_PLANS
    for key in ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "data_identifier", "batch_size"):
        assert student[key] == teacher[key], key
    t_arch, s_arch = teacher["architecture"]["arch_kwargs"], student["architecture"]["arch_kwargs"]
    assert s_arch["features_per_stage"] == [max(min(8, f), round(f / 4)) for f in t_arch["features_per_stage"]]
    assert s_arch["strides"] == t_arch["strides"] and s_arch["kernel_sizes"] == t_arch["kernel_sizes"]
    recipe = plans["kd"][CONFIGURATION]
    assert recipe["teacher"]["model_folder"] == workspace.teacher_folder and recipe["teacher"]["fold"] == "same"
    assert recipe["training"] == {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
                                  "seed": None}
    assert {"adaptive", "logit"} <= set(recipe["methods"])
    ratio = recipe["student"]["teacher_parameters"] / recipe["student"]["student_parameters"]
    assert ratio > 8  # a quarter of the width: about 16x fewer parameters
    assert np.isclose(recipe["student"]["teacher_flops_per_patch"] / recipe["student"]["student_flops_per_patch"],
                      ratio, rtol=0.5)


def test_seeded_recipe_gives_plain_and_kd_students_the_same_initial_weights(workspace, monkeypatch):
    plans = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    plans["plans_name"] = "nnUNetPlans_seeded"
    plans["kd"][CONFIGURATION]["training"]["seed"] = 3
    save_json(plans, join(workspace.preprocessed, "nnUNetPlans_seeded.json"), sort_keys=False)
    plain = make_trainer(workspace, monkeypatch, "nnUNetPlans_seeded", trainer="nnUNetTrainerKD_NoKD")
    plain.initialize()
    kd = make_trainer(workspace, monkeypatch, "nnUNetPlans_seeded", trainer="nnUNetTrainerKD_Adaptive")
    kd.initialize()
    for name, value in plain.network.state_dict().items():
        assert torch.equal(value, kd.network.state_dict()[name]), name

    plans["kd"][CONFIGURATION]["training"]["seed"] = -1
    save_json(plans, join(workspace.preprocessed, "nnUNetPlans_seeded.json"), sort_keys=False)
    with pytest.raises(RecipeError, match=r"nnUNetPlans_seeded\.json: kd\.3d_fullres\.training\.seed must be null or"):
        make_trainer(workspace, monkeypatch, "nnUNetPlans_seeded", trainer="nnUNetTrainerKD_NoKD")


# ---------------------------------------------------------------------------------------- checkpoint files
class _Payload:
    """Pickled into a poisoned checkpoint: unpickling it without weights_only runs os.makedirs(marker)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_random_empty_and_truncated_files_are_reported_as_corrupt_not_as_python_objects(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"network_weights": {"w": torch.ones(1000)}}, good)
    files = {"random.pth": np.random.default_rng(0).bytes(4096), "empty.pth": b"",
             "pickle_opcode_then_noise.pth": b"\x80\x02" + np.random.default_rng(1).bytes(4096),
             "truncated.pth": good.read_bytes()[: good.stat().st_size // 3]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=r"is not a readable PyTorch checkpoint") as error:
            load_nnunet_checkpoint(str(tmp_path / name))
        assert str(tmp_path / name) in str(error.value), name
        assert "corrupt or truncated" in str(error.value) and "copy it again, or retrain" in str(error.value), name
        assert "holds Python objects" not in str(error.value), name


def test_poisoned_checkpoint_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "payload_ran")
    path = str(tmp_path / "checkpoint_final.pth")
    torch.save({"network_weights": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_final\.pth holds Python objects .*re-save"):
        load_nnunet_checkpoint(path)
    assert not os.path.exists(marker)


def test_a_checkpoint_written_under_numpy_1_loads_with_its_numpy_scalars(tmp_path):
    # numpy 1.x pickles its scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core), and nnU-Net checkpoints
    # hold such scalars; the weights-only loader matches global names exactly, so the old name must be allowed too
    import zipfile

    new = str(tmp_path / "numpy2.pth")
    torch.save({"network_weights": {"w": torch.ones(2)}, "_best_ema": np.float64(0.75),
                "logging": {"ema_fg_dice": [np.float64(0.5)]}}, new)
    old = str(tmp_path / "checkpoint_final.pth")
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info.filename, data)
    checkpoint = load_nnunet_checkpoint(old)
    assert checkpoint["_best_ema"] == 0.75 and checkpoint["logging"]["ema_fg_dice"] == [0.5]
    assert torch.equal(checkpoint["network_weights"]["w"], torch.ones(2))


def _disk_full_after(n_bytes: int):
    """A torch.save that writes ``n_bytes`` of the real file, then fails as a full disk does."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:n_bytes])
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_atomic_save_keeps_the_previous_file_when_the_disk_fills(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_latest.pth")
    atomic_torch_save({"network_weights": {"w": torch.ones(10)}, "current_epoch": 1}, path)
    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", _disk_full_after(100))
        with pytest.raises(OSError, match=r"Could not write .*checkpoint_latest\.pth .*No space left.*unchanged.*Free"):
            atomic_torch_save({"network_weights": {"w": torch.zeros(10)}, "current_epoch": 2}, path)
    assert load_nnunet_checkpoint(path)["current_epoch"] == 1  # the previous checkpoint, intact
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]  # no temporary file left behind


def test_results_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import json
    from nnunet_kd.atomic_files import write_json_atomically, write_text_atomically
    path = str(tmp_path / "results.json")
    write_json_atomically({"rows": [1, 2]}, path)
    assert open(path).read() == json.dumps({"rows": [1, 2]}, indent=1)  # the bytes of a plain json.dump
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's owner-only mode

    def half_written(content, f, **kwargs):
        f.write('{"rows": [')
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as patched:
        patched.setattr(json, "dump", half_written)
        with pytest.raises(OSError, match=r"Could not write .*results\.json .*No space left.*unchanged.*Free"):
            write_json_atomically({"rows": [3]}, path)
    assert json.load(open(path)) == {"rows": [1, 2]}
    write_text_atomically(str(tmp_path / "results.md"), "| a |\n")
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_teacher_with_a_nan_weight_is_refused(workspace, monkeypatch, tmp_path):
    def poison(folder):
        path = join(folder, "fold_0", "checkpoint_final.pth")
        checkpoint = torch.load(path, weights_only=False)
        name = next(k for k, v in checkpoint["network_weights"].items() if v.is_floating_point())
        checkpoint["network_weights"][name].view(-1)[0] = float("nan")
        torch.save(checkpoint, path)
    folder = teacher_copy(workspace, tmp_path, poison)
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, "nnUNetPlans_bad_nanteacher", folder))
    with pytest.raises(TeacherError, match=r"teacher checkpoint .*fold_0/checkpoint_final\.pth holds NaN or infinite "
                                           r"values in 1 tensor.*--teacher-checkpoint.*retrain that teacher fold"):
        trainer.initialize()
    assert not glob.glob(join(trainer.output_folder, "checkpoint_*.pth"))


def test_non_finite_loss_term_stops_training_naming_the_term(workspace, monkeypatch):
    from nnunet_kd.trainer import NonFiniteLossError
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, "nnUNetPlans_bad_nanloss"))
    trainer.initialize()
    with torch.no_grad():  # a teacher that turned NaN in memory: the distillation terms follow it
        next(trainer.teacher.network.parameters()).fill_(float("nan"))
    patch = trainer.configuration_manager.patch_size
    labels = torch.randint(0, 3, (2, 1, *patch)).float()
    target = [torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest")
              for s in trainer._get_deep_supervision_scales()]
    out = trainer.train_step({"data": torch.randn(2, 1, *patch), "target": target})
    with pytest.raises(NonFiniteLossError, match=r"loss term\(s\) \['feature', 'kl'\] became non-finite") as error:
        trainer.on_train_epoch_end([out])
    message = str(error.value)
    assert "nnUNetPlans_bad_nanloss.json" in message and "methods.adaptive.weights" in message
    assert "'segmentation'" not in message.split("Fix:")[1]  # the segmentation term was finite
    assert "became non-finite" in open(trainer.log_file).read()

    finite = {"loss": torch.tensor(1.0), "terms": {name: torch.tensor(1.0) for name in trainer.logged_terms}}
    trainer.on_train_epoch_end([finite])  # finite epochs pass


def test_checkpoints_are_atomic_and_resume_falls_back_to_the_newest_intact_one(workspace, monkeypatch):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    name = student_plans_with(workspace, "nnUNetPlans_resume_intact")
    trainer = make_trainer(workspace, monkeypatch, name, trainer="nnUNetTrainerKD_NoKD")
    trainer.initialize()
    folder = trainer.output_folder
    os.makedirs(folder, exist_ok=True)
    final, latest, best = (join(folder, f"checkpoint_{n}.pth") for n in ("final", "latest", "best"))

    def save(path, epoch):
        trainer.current_epoch = epoch - 1  # nnU-Net stores the next epoch to run
        trainer.save_checkpoint(path)
    save(latest, 6)
    save(best, 4)
    # A full disk (or a kill) while saving leaves the previous checkpoint as it was, and no partial file.
    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", _disk_full_after(1000))
        with pytest.raises(OSError, match=r"Could not write .*checkpoint_latest\.pth.*Free disk space"):
            save(latest, 7)
    assert load_nnunet_checkpoint(latest)["current_epoch"] == 6
    assert sorted(f for f in os.listdir(folder) if f.endswith(".pth") or ".tmp" in f) == \
        ["checkpoint_best.pth", "checkpoint_latest.pth"]

    def resume():  # what nnUNetv2_train ... --c does: final, else latest, else best, then load_checkpoint
        resumed = make_trainer(workspace, monkeypatch, name, trainer="nnUNetTrainerKD_NoKD")
        maybe_load_checkpoint(resumed, continue_training=True, validation_only=False)
        return resumed, open(resumed.log_file).read()

    # A truncated latest (as a non-atomic writer leaves it): --c resumes from best, with a warning.
    open(latest, "r+b").truncate(os.path.getsize(latest) // 3)
    resumed, log = resume()
    assert resumed.current_epoch == 4
    assert f"WARNING: {latest} is truncated or corrupt" in log and f"newest intact checkpoint {best} (epoch 4)" in log

    # An empty final: the newest intact sibling is latest (epoch 6), not best (epoch 4).
    save(latest, 6)
    open(final, "wb").close()
    resumed, log = resume()
    assert resumed.current_epoch == 6 and f"newest intact checkpoint {latest} (epoch 6)" in log

    # Nothing intact: stop, naming the corrupt file and the fix.
    for path in (latest, best):
        open(path, "r+b").truncate(100)
    with pytest.raises(CorruptCheckpointError, match=r"Cannot resume: .*checkpoint_final\.pth is truncated or corrupt "
                                                     r"and no intact .*without --c"):
        resume()


def test_export_refuses_a_student_with_non_finite_weights(workspace, monkeypatch, tmp_path, capsys):
    from nnunet_kd.export import ExportError, export_student, main as export_main
    trainer = make_trainer(workspace, monkeypatch, student_plans_with(workspace, "nnUNetPlans_bad_nanstudent"),
                           trainer="nnUNetTrainerKD_NoKD")
    trainer.initialize()
    with torch.no_grad():
        next(trainer.network.parameters()).view(-1)[0] = float("inf")
    os.makedirs(trainer.output_folder, exist_ok=True)
    trainer.save_checkpoint(join(trainer.output_folder, "checkpoint_final.pth"))
    save_json(trainer.plans_manager.plans, join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, join(trainer.output_folder_base, "dataset.json"), sort_keys=False)

    out = str(tmp_path / "exported")
    with pytest.raises(ExportError, match=r"fold_0/checkpoint_final\.pth: the student's weights hold NaN or infinite "
                                          r"values in 1 tensor.*Nothing was exported.*retrain the student"):
        export_student(trainer.output_folder_base, out)
    with pytest.raises(SystemExit) as exit_code:
        export_main(["-i", trainer.output_folder_base, "-o", out])
    assert exit_code.value.code == 2 and "NaN or infinite" in capsys.readouterr().err
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------- planner
@pytest.mark.parametrize("name", ["sub/nnUNetPlans_x", "nnUNetPlans_x.json", "..\\nnUNetPlans_x", "ABSOLUTE"])
def test_planner_refuses_a_path_as_plans_name(workspace, monkeypatch, tmp_path, name):
    workspace.set_env(monkeypatch)
    name = str(tmp_path / "nnUNetPlans_x") if name == "ABSOLUTE" else name
    before = sorted(os.listdir(workspace.preprocessed))
    with pytest.raises(PlanningError, match=r"-o .* is not a plans name: pass a bare name .*\(e\.g\. -o nnUNetPlans_x\)"):
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, name, verbose=False)
    assert sorted(os.listdir(workspace.preprocessed)) == before and not os.listdir(tmp_path)


def test_planner_never_overwrites_plans_it_did_not_write_for_this_dataset(workspace, monkeypatch):
    from nnunet_kd.pipeline import write_budget_plans
    workspace.set_env(monkeypatch)
    # Another teacher's plans: their 'kd' key holds only a training budget.
    write_budget_plans(workspace.preprocessed, "nnUNetPlans", "nnUNetPlans_otherteacher", CONFIGURATION,
                       num_epochs=1, iterations_per_epoch=3, val_iterations_per_epoch=1)
    student = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))
    copied = dict(student)  # a copy under another file name, still naming itself STUDENT_PLANS
    save_json(copied, join(workspace.preprocessed, "nnUNetPlans_copied.json"), sort_keys=False)
    foreign = dict(student, plans_name="nnUNetPlans_foreign", dataset_name="Dataset992_Other")
    save_json(foreign, join(workspace.preprocessed, "nnUNetPlans_foreign.json"), sort_keys=False)
    for plans_name, reason in (("nnUNetPlans_otherteacher", r"has a 'kd\.3d_fullres' entry without the teacher/"
                                                             r"methods/student sections"),
                               ("nnUNetPlans_copied", rf"names itself plans_name '{STUDENT_PLANS}'"),
                               ("nnUNetPlans_foreign", r"belongs to dataset 'Dataset992_Other'")):
        path = join(workspace.preprocessed, plans_name + ".json")
        before = open(path).read()
        with pytest.raises(PlanningError, match=rf"{plans_name}\.json exists and {reason}.*not a student plans file "
                                                rf"written by nnUNetv2_kd_plan_student for {DATASET_NAME}.*another -o"):
            plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, plans_name, overwrite=True,
                         verbose=False)
        assert open(path).read() == before, plans_name


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": ("methods.adaptive.temperature=NaN",)}, r"methods\.adaptive\.temperature must be a finite number > 0"),
    ({"overrides": ("methods.logit.weights.kl=Infinity",)}, r"methods\.logit\.weights\.kl must be a finite number"),
    ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0\.0"),
])
def test_planner_refuses_non_finite_or_zero_settings_and_writes_nothing(workspace, monkeypatch, kwargs, message):
    workspace.set_env(monkeypatch)
    output = join(workspace.preprocessed, "nnUNetPlans_never_nonfinite.json")
    with pytest.raises(PlanningError, match=message) as error:
        plan_student(str(DATASET_ID), CONFIGURATION, workspace.teacher_folder, "nnUNetPlans_never_nonfinite",
                     verbose=False, **kwargs)
    assert output in str(error.value)
    # the planner's own advice, not the recipe's (which would send the user back to the planner)
    assert str(error.value).endswith("Nothing was written: change the setting with --set KEY=VALUE (the presets are "
                                     "plans/*.json).") and "Write the student plans" not in str(error.value)
    assert not os.path.exists(output)
