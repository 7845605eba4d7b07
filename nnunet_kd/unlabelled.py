"""Unlabelled cases in a distillation run: the fold's training cases outside the labelled fraction and extra images
without labels (``nnUNetv2_kd_plan_student --unlabelled-images``) enter training with the segmentation loss masked
to zero, so only the teacher terms learn from them.

- Planning: ``check_unlabelled_images`` validates an images folder as nnU-Net's raw ``imagesTr`` layout
  (``<case>_<XXXX><file_ending>``, every channel of dataset.json) before anything is written;
  ``preprocess_unlabelled_images`` runs nnU-Net's own preprocessor of the configuration (the teacher's plans) on
  them into a new folder of the dataset's nnUNet_preprocessed folder (the source folder is only read).
- Training: ``CombinedDataset`` serves the labelled cases, the rest of the fold's training cases and the extra
  images to nnU-Net's data loader, whose batches carry the case ``keys``; ``labelled_samples``,
  ``segmentation_loss_on_labelled`` and ``pseudo_labels_for_unlabelled`` mask the segmentation loss and give the
  teacher terms the teacher's prediction as the class of an unlabelled voxel.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from os.path import isdir, join
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset


class UnlabelledImagesError(ValueError):
    """An unlabelled images folder that cannot be used; the message names the file and the fix."""


# ------------------------------------------------------------------ planning
def check_unlabelled_images(folder: str, dataset_json: dict, dataset_json_file: str,
                            existing_cases: Sequence[str]) -> dict[str, list[str]]:
    """{case identifier: [its channel files, in channel order]} of ``folder``; refuses a missing or empty folder, a
    file that is not ``<case>_<XXXX><file_ending>``, a case without every channel of dataset.json, and a case whose
    identifier is already a case of the dataset (its preprocessed files would be confused)."""
    ending = dataset_json["file_ending"]
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    n_channels = len(channels)
    layout = (f"nnU-Net's imagesTr layout: <case>_<XXXX>{ending}, one file per channel ({n_channels} channel(s) "
              f"{dict(channels)} in {dataset_json_file})")
    if not isdir(folder):
        raise UnlabelledImagesError(f"--unlabelled-images {folder} is not a folder. Give a folder of images in "
                                    f"{layout}.")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    cases: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        path = join(folder, name)
        if name.startswith(".") or isdir(path):
            continue
        match = pattern.match(name)
        if match is None:
            raise UnlabelledImagesError(f"{path} is not named <case>_<XXXX>{ending} (the file ending of "
                                        f"{dataset_json_file} is {ending!r}): convert or rename it, or move it out "
                                        f"of {folder}. Expected {layout}.")
        case, channel = match.group(1), int(match.group(2))
        if channel >= n_channels:
            raise UnlabelledImagesError(f"{path} is channel {channel}, but the dataset has {n_channels} channel(s) "
                                        f"{dict(channels)} ({dataset_json_file}): remove it or fix its name.")
        cases.setdefault(case, {})[channel] = path
    if not cases:
        raise UnlabelledImagesError(f"{folder} holds no image ending in {ending}. Expected {layout}.")
    for case, files in cases.items():
        missing = [f"{case}_{c:04d}{ending}" for c in range(n_channels) if c not in files]
        if missing:
            raise UnlabelledImagesError(f"Case {case} in {folder} lacks {missing}: every case needs all {n_channels} "
                                        f"channel(s) {dict(channels)} of {dataset_json_file}.")
    taken = sorted(set(cases) & set(existing_cases))
    if taken:
        raise UnlabelledImagesError(f"{len(taken)} case(s) of {folder} have the identifier of a case of the dataset "
                                    f"(e.g. {taken[:5]}): rename them (e.g. with a prefix such as unlabelled_) so "
                                    f"the two cannot be confused.")
    return {case: [files[c] for c in range(n_channels)] for case, files in sorted(cases.items())}


def empty_class_locations(label_manager) -> dict:
    """The ``class_locations`` of a case without labels: every key nnU-Net's preprocessor would write, with no
    location, so its data loader crops such a case at random (nnU-Net's own fallback for a case without
    foreground)."""
    keys = list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        keys.append(tuple([-1] + label_manager.all_labels))
    return {(tuple(k) if isinstance(k, list) else k): np.zeros((0, 4), dtype=np.int64) for k in keys}


def preprocess_unlabelled_images(cases: dict[str, list[str]], output_folder: str, plans: dict, configuration: str,
                                 dataset_json: dict, overwrite: bool = False) -> None:
    """nnU-Net's preprocessor of ``configuration`` (``plans``: the teacher's) on every case, written to
    ``output_folder`` in nnU-Net's preprocessed format. Written to a temporary folder beside it first and renamed
    into place at the end: an error (or a kill) leaves no partial folder, and an existing folder is replaced only
    with ``overwrite``, once the new one is complete."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if os.path.exists(output_folder) and not overwrite:
        raise UnlabelledImagesError(f"{output_folder} exists (unlabelled images preprocessed for these plans before): "
                                    f"pass --overwrite to preprocess them again, or choose another -o.")
    manager = PlansManager(plans)
    configuration_manager = manager.get_configuration(configuration)
    label_manager = manager.get_label_manager(dataset_json)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    parent = os.path.dirname(output_folder)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_folder)}.")
    try:
        for case, files in cases.items():
            try:
                data, seg, properties = preprocessor.run_case(files, None, manager, configuration_manager,
                                                              dataset_json)
            except Exception as e:  # nnU-Net's reader: an unreadable or inconsistent image
                raise UnlabelledImagesError(f"nnU-Net could not preprocess {files} ({type(e).__name__}: {e}). Check "
                                            f"that the files are readable images of the dataset's format.") from e
            properties["class_locations"] = empty_class_locations(label_manager)
            data = data.astype(np.float32, copy=False)
            seg = seg.astype(np.int16, copy=False)  # 0 inside the image, -1 outside: no label anywhere
            patch = tuple(configuration_manager.patch_size)
            blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
            nnUNetDatasetBlosc2.save_case(data, seg, properties, join(work, case), chunks=chunks, blocks=blocks,
                                          chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        if os.path.exists(output_folder):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_folder)}.old.")
            os.rmdir(old)
            os.replace(output_folder, old)
            os.replace(work, output_folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, output_folder)
    finally:
        if os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ training data
class _DatasetView(nnUNetBaseDataset):
    """A read-only view of nnU-Net datasets, built from datasets rather than from a folder."""

    @classmethod
    def save_case(cls, data, seg, properties, output_filename_truncated):
        raise NotImplementedError(f"{cls.__name__} only reads")

    @classmethod
    def get_identifiers(cls, folder: str):
        raise NotImplementedError(f"{cls.__name__} is built from datasets, not from a folder")


def draws_per_case(n_labelled: int, n_unlabelled: int, unlabelled_share: float,
                   max_draws: int = 64) -> tuple[int, int]:
    """(a, b): list every labelled case a times and every unlabelled case b times among the identifiers that nnU-Net's
    data loader draws from uniformly, so that unlabelled cases fill ``unlabelled_share`` of a batch's samples in
    expectation: b n_u / (a n_l + b n_u) as close to the share as integers up to ``max_draws`` allow (the smallest
    such pair). nnU-Net's loader takes sampling probabilities only where the trainer's get_dataloaders builds it, and
    starts its workers there, so the weights travel as multiplicities of the dataset's identifiers."""
    if n_labelled < 1 or n_unlabelled < 1 or not 0 < unlabelled_share < 1:
        raise ValueError(f"draws_per_case needs labelled and unlabelled cases and a share in (0, 1), got "
                         f"{n_labelled}, {n_unlabelled}, {unlabelled_share}")
    best = None
    for b in range(1, max_draws + 1):
        for a in {max(1, min(max_draws, int(b * n_unlabelled * (1 - unlabelled_share) / (n_labelled * unlabelled_share)) + d))
                  for d in (0, 1)}:
            error = abs(b * n_unlabelled / (a * n_labelled + b * n_unlabelled) - unlabelled_share)
            if best is None or error < best[0] - 1e-12:
                best = (error, a, b)
    return best[1], best[2]


class CombinedDataset(_DatasetView):
    """Several nnU-Net datasets (each its own folder and format) served as one: ``identifiers`` is their union, and
    ``load_case`` reads a case from the dataset that holds it. ``draws``: identifier -> how many times it is listed
    (default once), the weight of a case in nnU-Net's uniform draw over ``identifiers``."""

    def __init__(self, datasets: Sequence[nnUNetBaseDataset], draws: dict | None = None):
        self.datasets = list(datasets)
        self.owner = {}
        for dataset in self.datasets:
            for identifier in dataset.identifiers:
                if identifier in self.owner:
                    raise ValueError(f"case {identifier} is in {self.owner[identifier].source_folder} and in "
                                     f"{dataset.source_folder}")
                self.owner[identifier] = dataset
        self.identifiers = [i for i in sorted(self.owner) for _ in range((draws or {}).get(i, 1))]
        self.source_folder = self.datasets[0].source_folder
        self.folder_with_segs_from_previous_stage = None

    def load_case(self, identifier):
        return self.owner[identifier].load_case(identifier)


class WithoutClassLocations(_DatasetView):
    """One nnU-Net dataset whose cases are served with no ``class_locations``: the fold's training cases that train
    without their labels must not steer nnU-Net's foreground oversampling (its data loader crops a third of the patches
    around locations read from the ground truth), or their labels would leak into training that claims not to use
    them. Such cases are then cropped at random, like the unlabelled images."""

    def __init__(self, dataset: nnUNetBaseDataset, class_locations: dict):
        self.dataset = dataset
        self.class_locations = class_locations
        self.identifiers = list(dataset.identifiers)
        self.source_folder = dataset.source_folder
        self.folder_with_segs_from_previous_stage = getattr(dataset, "folder_with_segs_from_previous_stage", None)

    def load_case(self, identifier):
        *arrays, properties = self.dataset.load_case(identifier)
        properties = dict(properties, class_locations=self.class_locations)
        return (*arrays, properties)


# ------------------------------------------------------------------ training step
def labelled_samples(keys, unlabelled_keys, device) -> Optional[torch.Tensor]:
    """(B,) bool, True where the batch's case is labelled; None when every case is (nothing to mask)."""
    if not unlabelled_keys or keys is None:
        return None
    labelled = [str(k) not in unlabelled_keys for k in keys]
    if all(labelled):
        return None
    return torch.tensor(labelled, dtype=torch.bool, device=device)


def segmentation_loss_on_labelled(loss, output, target, labelled: torch.Tensor) -> torch.Tensor:
    """nnU-Net's (deep-supervised) segmentation loss on the labelled samples of the batch only; an exact 0, still in
    the autograd graph, when no sample is labelled."""
    outputs = output if isinstance(output, (list, tuple)) else [output]
    if not bool(labelled.any()):
        return sum(o.sum() for o in outputs) * 0.0
    index = torch.nonzero(labelled).flatten()
    if isinstance(output, (list, tuple)):
        return loss([o[index] for o in output], [t[index] for t in target])
    return loss(output[index], target[index])


def _teacher_prediction(teachers: dict, shape, region_based: bool) -> torch.Tensor:
    """The teachers' mean prediction (B, C, *shape) on the student's labels: softmax probabilities, or sigmoid
    probabilities per region. A level whose shape no teacher output has is resampled from the full resolution."""
    probabilities = []
    for teacher in teachers.values():
        index = next((i for i, o in enumerate(teacher.outputs) if tuple(o.shape[2:]) == tuple(shape)), None)
        logits = teacher.logits(index if index is not None else 0, 1.0).float()
        p = torch.sigmoid(logits) if region_based else torch.softmax(logits, 1)
        if index is None:
            p = F.interpolate(p, size=tuple(shape), mode="nearest-exact")
        probabilities.append(p)
    return torch.stack(probabilities).mean(0)


def pseudo_labels_for_unlabelled(labels: list, valid: list, teachers: dict, labelled: torch.Tensor,
                                 region_based: bool) -> tuple[list, list]:
    """The labels of every deep-supervision level with the unlabelled samples' replaced by the teachers'
    prediction (argmax, or > 0.5 per region), and their voxels all valid: the class-balanced and class-based teacher
    terms then read what the teacher sees there. Labelled samples keep their labels."""
    unlabelled = ~labelled
    new_labels, new_valid = [], []
    for lab, mask in zip(labels, valid):
        prediction = _teacher_prediction(teachers, lab.shape[2:], region_based)
        pseudo = (prediction > 0.5) if region_based else prediction.argmax(1, keepdim=True)
        where = unlabelled.view(-1, *([1] * (lab.dim() - 1)))
        new_labels.append(torch.where(where, pseudo.to(lab.dtype), lab))
        new_valid.append(None if mask is None else mask | where)
    return new_labels, new_valid
