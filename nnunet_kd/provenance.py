"""What a model fold was trained on, recorded in its own results folder when its training starts.

The leakage guard (nnunet_kd.teacher.teacher_training_cases) must know which cases a teacher fold actually saw.
Today's ``splits_final.json`` cannot tell: it may have been edited after the teacher was trained, and it says nothing
about which dataset a copied teacher came from. So every trainer of this project writes
``fold_X/training_cases.json`` from ``on_train_start``: the dataset's name, a hash of its
``dataset_fingerprint.json`` (nnU-Net's summary of every case's shape, spacing and intensities: another dataset, or
the same name with other images, has another one), and the fold's training and validation case identifiers. A
student trained on part of the labels (recipe train_on_unlabelled) also saw the rest of the fold's training cases
without their labels (``unlabelled_training_cases``: the guard counts them as seen, since a teacher that saw an image
may have memorised it) and extra images from outside the dataset (``unlabelled_images``: source folder and names).
"""
from __future__ import annotations

import hashlib
import json
import os
from os.path import basename, isfile, join, normpath

from nnunet_kd.atomic_files import write_json_atomically

TRAINING_CASES_FILE = "training_cases.json"
RECORD_FORMAT = 1


class ProvenanceError(RuntimeError):
    """A training-case record that cannot be read. The message names the file and the fix."""


def dataset_fingerprint_sha256(dataset_fingerprint_file: str) -> str | None:
    """sha256 of ``dataset_fingerprint.json`` in a canonical form (key order and whitespace do not count); None when
    the file does not exist."""
    if not isfile(dataset_fingerprint_file):
        return None
    with open(dataset_fingerprint_file) as f:
        content = json.load(f)
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_identity(preprocessed_dataset_folder: str) -> dict:
    """{"dataset_name", "dataset_fingerprint_sha256"} of a dataset's nnUNet_preprocessed/<dataset> folder."""
    return {"dataset_name": basename(normpath(preprocessed_dataset_folder)),
            "dataset_fingerprint_sha256": dataset_fingerprint_sha256(
                join(preprocessed_dataset_folder, "dataset_fingerprint.json"))}


def read_training_cases(fold_folder: str) -> dict | None:
    """The record of ``fold_folder`` (None when the fold was trained without one, e.g. by nnU-Net's own trainer)."""
    path = join(fold_folder, TRAINING_CASES_FILE)
    if not isfile(path):
        return None
    fix = (f"Delete {path} to fall back to the dataset's splits_final.json, or copy the model folder again from the "
           f"machine that trained it.")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ProvenanceError(f"{path} is not readable JSON ({type(e).__name__}: {e}). {fix}") from e
    if not isinstance(record, dict) or not isinstance(record.get("dataset_name"), str) or not (
            isinstance(record.get("training_cases"), list)
            and all(isinstance(c, str) for c in record["training_cases"])):
        raise ProvenanceError(f"{path} is not a training-case record (it needs 'dataset_name' and a list of "
                              f"'training_cases'). {fix}")
    if not (isinstance(record.get("unlabelled_training_cases", []), list)
            and all(isinstance(c, str) for c in record.get("unlabelled_training_cases", []))):
        raise ProvenanceError(f"{path}: 'unlabelled_training_cases' is not a list of case identifiers. {fix}")
    return record


def record_training_cases(trainer) -> str | None:
    """Write the fold's record into ``trainer.output_folder`` (rank 0; call it from ``on_train_start``, after
    nnU-Net's, so the split is the one the data loaders use). A resumed run (``--c``) keeps the cases of its earlier
    record too: the fold has trained on both. Returns the file written (None on other ranks)."""
    if trainer.local_rank != 0:
        return None
    training, validation = trainer.do_split()
    path = join(trainer.output_folder, TRAINING_CASES_FILE)
    cases = set(training)
    recipe = getattr(trainer, "kd_recipe", None)
    extra_images = (getattr(recipe, "unlabelled_images", None) or {}) if getattr(trainer, "unlabelled_keys", None) else {}
    extra = set(extra_images.get("cases", ()))
    unlabelled = set(getattr(trainer, "unlabelled_keys", ())) - extra
    earlier = read_training_cases(trainer.output_folder) if trainer.current_epoch > 0 else None
    if earlier is not None:
        cases |= set(earlier["training_cases"])
        unlabelled |= set(earlier.get("unlabelled_training_cases", ()))
    record = {
        "format": RECORD_FORMAT,
        "description": "The cases this fold was trained on, written by nnunet-kd when its training started (the "
                       "union over resumed runs). The leakage guard reads this, not today's splits_final.json.",
        **dataset_identity(trainer.preprocessed_dataset_folder_base),
        "fold": trainer.fold,
        "trainer": type(trainer).__name__,
        "plans_name": trainer.plans_manager.plans_name,
        "configuration": trainer.configuration_name,
        "training_cases": sorted(cases),
        "validation_cases": sorted(validation),
    }
    if unlabelled or extra:
        record["unlabelled_training_cases"] = sorted(unlabelled - cases)
        record["unlabelled_images"] = {"source": extra_images.get("source"), "cases": sorted(extra)}
    os.makedirs(trainer.output_folder, exist_ok=True)
    write_json_atomically(record, path)
    trainer.print_to_log_file(f"Recorded the {len(cases)} training cases of fold {trainer.fold}"
                              + (f" (and {len(unlabelled - cases)} of its cases and {len(extra)} extra images trained "
                                 f"on without labels)" if unlabelled or extra else "") + f" in {path}.")
    return path
