"""The fixed held-out test split and the workspace that never sees its test cases."""
from __future__ import annotations

import os
import random
from os.path import basename, isfile, join

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

SPLIT_SEED = 20261125
CROSSVAL_SEED = 12345  # nnU-Net's own seed for its 5-fold split


def raw_case_ids(raw_dataset: str) -> list[str]:
    """Case identifiers of a raw nnU-Net dataset (the label files of labelsTr)."""
    dataset_json = load_json(join(raw_dataset, "dataset.json"))
    ending = dataset_json["file_ending"]
    labels = join(raw_dataset, "labelsTr")
    return sorted(f[:-len(ending)] for f in os.listdir(labels) if f.endswith(ending))


def make_split(raw_dataset: str, n_test: int, seed: int = SPLIT_SEED, n_folds: int = 5) -> dict:
    """A seeded held-out split: ``test`` (n_test cases), ``train`` (the rest) and nnU-Net's cross-validation
    folds of the training cases (``crossval``, nnU-Net's generate_crossval_split with its own seed)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = raw_case_ids(raw_dataset)
    if not 0 < n_test < len(cases) - n_folds:
        raise ValueError(f"{raw_dataset} has {len(cases)} labelled cases: cannot hold out {n_test} for testing and "
                         f"still run a {n_folds}-fold cross-validation on the rest.")
    rng = random.Random(seed)
    test = sorted(rng.sample(cases, n_test))
    train = [c for c in cases if c not in set(test)]
    return {"dataset": basename(os.path.normpath(raw_dataset)), "split_seed": seed, "n_cases": len(cases),
            "test": test, "train": train, "crossval_seed": CROSSVAL_SEED,
            "crossval": generate_crossval_split(train, seed=CROSSVAL_SEED, n_splits=n_folds)}


def load_or_make_split(split_file: str, raw_dataset: str, n_test: int) -> dict:
    """The fixed split: read it when it exists (checking it still fits the data), else write it once."""
    if isfile(split_file):
        split = load_json(split_file)
        missing = sorted(set(split["train"] + split["test"]) - set(raw_case_ids(raw_dataset)))
        if missing:
            raise ValueError(f"{split_file} names cases that {raw_dataset} does not have ({missing[:5]}...). The split "
                             f"belongs to other data: point --raw-dataset at the data it was written for.")
        if set(split["train"]) & set(split["test"]):
            raise ValueError(f"{split_file}: cases are both in train and test. Restore the file from git.")
        return split
    split = make_split(raw_dataset, n_test)
    os.makedirs(os.path.dirname(os.path.abspath(split_file)), exist_ok=True)
    save_json(split, split_file, sort_keys=False)
    return split


def prepare_workspace(raw_dataset: str, split: dict, raw_root: str, test_root: str) -> tuple[str, str, str]:
    """Link the split into a workspace: ``raw_root/<dataset>`` holds the training cases only (so nnU-Net's planning
    never sees a test case), ``test_root/imagesTs`` and ``labelsTs`` the test cases. Returns (raw folder,
    test images folder, test labels folder). The source stays untouched (read-only data)."""
    dataset_json = load_json(join(raw_dataset, "dataset.json"))
    ending = dataset_json["file_ending"]
    channels = sorted(int(k) for k in dataset_json["channel_names"])
    raw_folder = join(raw_root, split["dataset"])
    images_ts, labels_ts = join(test_root, "imagesTs"), join(test_root, "labelsTs")
    for folder in (join(raw_folder, "imagesTr"), join(raw_folder, "labelsTr"), images_ts, labels_ts):
        os.makedirs(folder, exist_ok=True)

    def link(source: str, target: str) -> None:
        if not os.path.lexists(target):
            os.symlink(os.path.abspath(source), target)

    for cases, images, labels in ((split["train"], join(raw_folder, "imagesTr"), join(raw_folder, "labelsTr")),
                                  (split["test"], images_ts, labels_ts)):
        for case in cases:
            for ch in channels:
                name = f"{case}_{ch:04d}{ending}"
                link(join(raw_dataset, "imagesTr", name), join(images, name))
            link(join(raw_dataset, "labelsTr", case + ending), join(labels, case + ending))
    workspace_json = dict(dataset_json, numTraining=len(split["train"]),
                          description=f"{dataset_json.get('description', '')} [training cases of the held-out split "
                                      f"{split['dataset']} (seed {split['split_seed']}); {len(split['test'])} test "
                                      f"cases kept outside]")
    save_json(workspace_json, join(raw_folder, "dataset.json"), sort_keys=False)
    return raw_folder, images_ts, labels_ts


def write_crossval_split(preprocessed_base: str, split: dict) -> None:
    """The split's folds as nnU-Net's splits_final.json (so nnU-Net does not draw its own)."""
    target = join(preprocessed_base, "splits_final.json")
    if isfile(target) and load_json(target) != split["crossval"]:
        raise ValueError(f"{target} differs from the fixed split's cross-validation folds: this workspace was made "
                         f"with another split. Use a new --workdir.")
    save_json(split["crossval"], target, sort_keys=False)
