"""Model records (what a results file is built from) and the teacher archive: written atomically, read back, and
checked against the weights they describe."""
from __future__ import annotations

import os
import shutil
import time
from os.path import basename, isdir, isfile, join
from typing import TYPE_CHECKING

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_kd.atomic_files import write_json_atomically
from nnunet_kd.evidence.protocol import TEACHER_PLANS, TEACHER_TRAINER, EvidenceError, model_folder_name
from nnunet_kd.methods import method_and_variant

if TYPE_CHECKING:
    from nnunet_kd.evidence.protocol import Protocol

# A working session ends after a few hours and the next one may run on a fresh machine where the workspace is gone;
# on a 2-core CPU one session trains the teacher and a seed or two. Two things therefore outlive the workspace, so that
# later runs add seeds and widths to the same evidence instead of starting over:
# * the teacher (Protocol.teacher_archive, a folder outside the repository: its checkpoint exceeds the project's limit
#   on tracked files): its nnU-Net model folder without optimiser state, with a manifest of every file's SHA-256; a
#   fresh workspace restores it instead of training another teacher (whose soft targets would differ: a CPU run is
#   repeatable on one machine, not across machines);
# * one committed record per finished, evaluated model (Protocol.records_dir/<model folder>.json): per-case test
#   metrics, validation Dice, curves, the plans it trained with and the SHA-256 of the network weights of the teacher
#   it learned from. The report pools the workspace's models with the records of the models it does not hold (same
#   budget, same teacher weights).
TEACHER_MANIFEST = "manifest.json"


def sha256_of(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def network_weights_sha256(checkpoint_file: str) -> str:
    """A model's identity: the SHA-256 of its network weights (sorted names, shapes, dtypes and bytes). Unlike the
    file's hash it survives re-saving, and the archive drops the optimiser state."""
    import hashlib

    import torch
    from nnunet_kd.teacher import load_nnunet_checkpoint

    digest = hashlib.sha256()
    for name, tensor in sorted(load_nnunet_checkpoint(checkpoint_file)["network_weights"].items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _archived_files(fold: int) -> list[str]:
    """What a restored teacher needs: nnU-Net's model files (predictor, student planner, leakage guard) and the two
    evaluations the report reads (so a restored teacher is not predicted again)."""
    return ["plans.json", "dataset.json", "dataset_fingerprint.json", f"fold_{fold}/checkpoint_final.pth",
            f"fold_{fold}/training_cases.json", f"fold_{fold}/validation/summary.json",
            f"fold_{fold}/test_predictions/summary.json"]


def archive_teacher(folder: str, archive: str, fold: int, description: dict) -> list[str]:
    """Write the teacher archive once (an existing one is never replaced); returns the files written. The checkpoint
    keeps nnU-Net's keys but its optimiser state (half its size, needed only to resume the teacher's training)."""
    import torch
    from nnunet_kd.teacher import load_nnunet_checkpoint

    if isfile(join(archive, TEACHER_MANIFEST)):
        return []
    staging = archive.rstrip("/") + ".partial"
    if isdir(staging):
        shutil.rmtree(staging)
    files = {}
    missing = [rel for rel in _archived_files(fold) if not isfile(join(folder, rel))]
    if missing:
        raise EvidenceError(f"The teacher {folder} lacks {missing}: only a finished, evaluated teacher is archived.")
    if os.path.exists(archive):
        raise EvidenceError(f"{archive} exists but holds no {TEACHER_MANIFEST} (an interrupted archive or another "
                            f"folder): move it away, then run again.")
    for rel in _archived_files(fold):
        source, target = join(folder, rel), join(staging, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if rel.endswith("checkpoint_final.pth"):
            checkpoint = load_nnunet_checkpoint(source)
            checkpoint.pop("optimizer_state", None)
            checkpoint.pop("grad_scaler_state", None)
            torch.save(checkpoint, target)
        else:
            shutil.copyfile(source, target)
        files[rel] = sha256_of(target)
    save_json({"model_folder": basename(folder.rstrip("/")), "fold": fold, "files": files, **description},
              join(staging, TEACHER_MANIFEST), sort_keys=False)
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    os.replace(staging, archive)  # all or nothing: a killed session leaves only the .partial folder
    return [join(archive, rel) for rel in (*files, TEACHER_MANIFEST)]


def restore_teacher(archive: str, folder: str, fold: int, plans_file: str, expected: dict | None = None) -> bool:
    """Copy the archived teacher into this workspace when the workspace has no finished teacher. Refuses, before
    copying anything, an archive whose files do not match its manifest, whose manifest disagrees with ``expected``
    (dataset, configuration, the split file's SHA-256: a teacher of another split may have trained on today's test
    cases) or the fold, or that was trained with other plans (budget, batch size, seed) than ``plans_file``.
    Returns whether it restored."""
    manifest_file = join(archive, TEACHER_MANIFEST)
    if not isfile(manifest_file) or isfile(join(folder, f"fold_{fold}", "checkpoint_final.pth")):
        return False
    manifest = load_json(manifest_file)
    for key, value in {"fold": fold, **(expected or {})}.items():
        if manifest.get(key) != value:
            raise EvidenceError(f"The archived teacher {archive} was made for {key} {manifest.get(key)!r}, this "
                                f"protocol has {value!r} ({manifest_file}): restore the split file and settings it "
                                f"was made with, or pass --no-teacher-archive (and --no-records) to train another "
                                f"teacher in the workspace.")
    for rel, digest in manifest["files"].items():
        path = join(archive, rel)
        if not isfile(path) or sha256_of(path) != digest:
            raise EvidenceError(f"The archived teacher file {path} does not match its SHA-256 in {manifest_file} "
                                f"(a partial checkout or an edit): restore it with git checkout -- {archive}, or "
                                f"delete the archive to train a new teacher.")
    if load_json(join(archive, "plans.json")) != load_json(plans_file):
        raise EvidenceError(f"The archived teacher {archive} was trained with other plans than this protocol's teacher "
                            f"({plans_file}: another budget, batch size, seed or nnU-Net version): run with the "
                            f"budget in {manifest_file}, or pass --no-teacher-archive to train a teacher in the "
                            f"workspace.")
    for rel in manifest["files"]:
        os.makedirs(os.path.dirname(join(folder, rel)), exist_ok=True)
        shutil.copyfile(join(archive, rel), join(folder, rel))
    if manifest.get("trained_on"):  # the machine that trained it, not this one
        save_json(manifest["trained_on"], join(folder, TRAINED_ON_FILE), sort_keys=False)
    now = time.time() + 1  # the evaluations are newer than the checkpoint: evaluate_on_test reuses them
    for rel in manifest["files"]:
        if rel.endswith("summary.json"):
            os.utime(join(folder, rel), (now, now))
    return True


def write_record(records_dir: str, document: dict) -> str:
    """<records_dir>/<model>.json, written atomically (a kill mid-write leaves the previous record)."""
    os.makedirs(records_dir, exist_ok=True)
    path = join(records_dir, document["model"] + ".json")
    write_json_atomically(document, path)
    return path


def save_record(records_dir: str, record: dict, teacher_sha256: str | None) -> str:
    """Commit-ready record of one finished, evaluated model (atomic write). ``teacher_sha256``: the checkpoint the
    student learned from (None for the teacher itself)."""
    folder = record["folder"]
    document = {"model": basename(folder.rstrip("/")), "plans": load_json(join(folder, "plans.json")),
                "network_weights_sha256": record["network_weights_sha256"],
                "teacher_network_weights_sha256": teacher_sha256,
                **{k: v for k, v in record.items() if k not in ("folder", "network_weights_sha256")}}
    return write_record(records_dir, document)


def record_name(record: dict) -> str:
    """The model folder name of a record: committed records carry it, a workspace's records their folder."""
    return record.get("model") or basename(record["folder"].rstrip("/"))


def load_records(records_dir: str | None) -> dict:
    """Model folder name -> record (``folder`` None: the model is not in this workspace)."""
    if not records_dir or not isdir(records_dir):
        return {}
    out = {}
    for name in sorted(os.listdir(records_dir)):
        if name.endswith(".json") and name != "latency.json":
            document = load_json(join(records_dir, name))
            out[document["model"]] = dict(document, folder=None)
    return out


def voxel_volume_ml(label_file: str) -> float:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(label_file)
    reader.ReadImageInformation()
    return float(np.prod(reader.GetSpacing())) / 1000.0


def validation_curves(folder: str, fold: int) -> dict:
    from nnunet_kd.teacher import load_nnunet_checkpoint

    logging = load_nnunet_checkpoint(join(folder, f"fold_{fold}", "checkpoint_final.pth"))["logging"]
    pseudo = [float(np.nanmean(v)) for v in logging.get("dice_per_class_or_region", [])]
    return {"ema_fg_dice": [float(v) for v in logging.get("ema_fg_dice", [])], "pseudo_dice": pseudo}


TRAINED_ON_FILE = "trained_on.json"


def this_machine(device: str) -> dict:
    """The machine a model trains on, as its record names it: device label, CPU or GPU name, torch version."""
    import torch

    from nnunet_kd.benchmark import device_description
    from nnunet_kd.compare import device_label

    info = device_description(torch.device(device))
    # the CPU's or GPU's name, not the reporting process's thread count
    name = info["device_name"] if device.startswith("cuda") else f"{info['cpu_name']} ({info['cpu_count']} logical CPUs)"
    return {"device": device_label(device), "name": name, "torch": torch.__version__}


def trained_on(folder: str, device: str) -> dict:
    """Where a workspace's model was trained: the stamp in its folder, written the first time its record is made (in
    the workspace that trained it: records are made right after training; a restored archive's teacher gets its
    archive's stamp), else this machine, stamped now."""
    path = join(folder, TRAINED_ON_FILE)
    if not isfile(path):
        save_json(this_machine(device), path, sort_keys=False)
    return load_json(path)


def training_section(plans: dict, configuration: str) -> dict:
    """A model's budget plans' ``kd.<configuration>.training`` (empty when absent: a record is read, not validated)."""
    return plans.get("kd", {}).get(configuration, {}).get("training", {})


def training_budget(training: dict) -> tuple:
    """(epochs, iterations per epoch, validation iterations per epoch) of a training section."""
    return (training.get("num_epochs"), training.get("num_iterations_per_epoch"),
            training.get("num_val_iterations_per_epoch"))


def budget_text(budget: tuple) -> str:
    return f"{budget[0]} x {budget[1]} iterations ({budget[2]} validation iterations per epoch)"


def check_teacher_from_records(p: "Protocol", split: dict | None = None) -> dict:
    """Before any training: Protocol.teacher_from_records is a records folder holding this protocol's teacher (same
    dataset, configuration and held-out test cases) and every run is a plain student. Returns that teacher's record."""
    option = f"--teacher-from-records {p.teacher_from_records}"
    others = sorted({m for m, _ in p.runs if method_and_variant(m)[0] != "plain"})
    if others:
        raise EvidenceError(f"{option}: only plain students can do without the teacher's weights, but --runs names "
                            f"{', '.join(others)}. Run those where the teacher is (its archive, or a retrained teacher "
                            f"with its own --tag).")
    name = model_folder_name(TEACHER_TRAINER, TEACHER_PLANS, p.configuration)
    path = join(p.teacher_from_records, name + ".json")
    if not isfile(path):
        raise EvidenceError(f"{option}: no teacher record {path}. It is a records folder written by this runner, "
                            f"e.g. benchmarks/records/<dataset>-<configuration>-<tag>.")
    record = load_records(p.teacher_from_records)[name]
    if split is None:
        if not isfile(p.split_file):
            raise EvidenceError(f"{option}: no split file {p.split_file}. The teacher of {path} was evaluated on the "
                                f"held-out cases of its series' split file (benchmarks/splits/<dataset>.json): pass "
                                f"that file with --split-file.")
        split = load_json(p.split_file)
    if sorted(record["test"]) != sorted(split["test"]):
        raise EvidenceError(f"{option}: the teacher of {path} was evaluated on other test cases than the split "
                            f"{p.split_file} holds out: it belongs to another dataset or split.")
    return record
