"""Loading a frozen nnU-Net teacher, and refusing teachers that would silently train a wrong student.

Every check runs before the first training step and raises TeacherError with the file at fault and the fix.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from os.path import isdir, isfile, join

import numpy as np
import torch
from torch import nn

from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager


class TeacherError(RuntimeError):
    """The teacher cannot be used for this student. The message names the file and the fix."""


class CorruptCheckpointError(TeacherError):
    """A checkpoint file that is truncated, empty or not a torch.save file at all (as opposed to a malicious one)."""


class UnsafeCheckpointError(TeacherError):
    """A checkpoint that holds pickled Python objects torch.load(weights_only=True) refuses to build."""


# nnU-Net checkpoints hold numpy scalars (logged losses, EMA Dice) next to the tensors. Allowing exactly
# these lets torch.load run with weights_only=True, i.e. without executing arbitrary pickled code. A checkpoint
# written under numpy 1.x names them numpy.core.multiarray.* (numpy 2 moved them to numpy._core), and the
# weights-only unpickler matches names exactly: the old names are allowed as aliases of the same objects.
_NUMPY_SAFE_GLOBALS = [np.dtype, np._core.multiarray.scalar, np._core.multiarray._reconstruct, np.ndarray] + [
    type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")] + [
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


# What the weights-only unpickler says when a file asks for an object it does not allow. Anything else it refuses
# (an unknown opcode, a string that is too long, ...) is what random or damaged bytes look like.
_OBJECT_REFUSALS = ("GLOBAL", "global", "allowlisted", "Can only build", "Can only create new object")


def _asks_for_python_objects(error: pickle.UnpicklingError) -> bool:
    reason = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
    return any(word in str(reason) for word in _OBJECT_REFUSALS)


def load_nnunet_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load with weights_only=True (numpy scalars allowed); clear errors for missing or corrupt files.

    Raises UnsafeCheckpointError for a file that asks to build Python objects (a poisoned or non-nnU-Net
    checkpoint), CorruptCheckpointError for one that is empty, truncated or random bytes."""
    if not isfile(path):
        raise TeacherError(f"Checkpoint not found: {path}")
    corrupt = ("The file is corrupt or truncated (an interrupted copy or save, a full disk): copy it again, "
               "or retrain that fold.")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the unpickler's own reason in advice to retry with weights_only=False: keep only the reason
        reason = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
        reason = " ".join(str(reason).split()) or type(e).__name__
        if not _asks_for_python_objects(e):
            raise CorruptCheckpointError(f"{path} is not a readable PyTorch checkpoint (UnpicklingError: "
                                         f"{reason[:300]}). {corrupt}") from e
        raise UnsafeCheckpointError(
            f"{path} holds Python objects that torch.load(weights_only=True) refuses to unpickle ({reason[:300]}). "
            f"nnU-Net's own checkpoints do not, and loading it with weights_only=False could run code hidden in it; "
            f"re-save the checkpoint from a plain nnU-Net run, or load it in a trusted session and keep only the "
            f"standard keys.") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CorruptCheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}). "
                                     f"{corrupt}") from e
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise TeacherError(f"{path} is not an nnU-Net checkpoint (no 'network_weights' entry). Point the recipe's "
                           f"teacher at a folder written by nnUNetv2_train.")
    return checkpoint


def nonfinite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or an infinity (a tensor shared under
    several names, as nnU-Net's U-Nets share the encoder with the decoder, is named once)."""
    seen, names = set(), []
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if key in seen:
            continue
        seen.add(key)
        if not torch.isfinite(value).all():
            names.append(name)
    return names


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Weights saved from DDP ('module.') or torch.compile ('_orig_mod.') wrappers, as nnU-Net tolerates them."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


@dataclass
class TeacherModel:
    """A teacher model folder resolved for one student fold."""
    model_folder: str
    fold: int | str
    checkpoint_file: str
    plans: dict
    dataset_json: dict
    configuration: str
    trainer_name: str

    @property
    def plans_manager(self) -> PlansManager:
        return PlansManager(self.plans)

    @property
    def configuration_manager(self) -> ConfigurationManager:
        return self.plans_manager.get_configuration(self.configuration)


def configuration_named_by(model_folder: str) -> str:
    """The configuration a model folder <Trainer>__<Plans>__<configuration> names (nnU-Net's folder layout)."""
    return model_folder.rstrip("/").split("__")[-1]


def locate_teacher(model_folder: str, fold: int | str, checkpoint_name: str) -> tuple[TeacherModel, dict]:
    """Find and read a teacher model folder. Returns the description and the loaded checkpoint."""
    if not isdir(model_folder):
        raise TeacherError(
            f"Teacher model folder not found: {model_folder}. It is the folder nnUNetv2_train wrote "
            f"($nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>); fix teacher.model_folder in the "
            f"student plans (nnUNetv2_kd_plan_student --teacher ...).")
    for name in ("plans.json", "dataset.json"):
        if not isfile(join(model_folder, name)):
            raise TeacherError(f"{join(model_folder, name)} is missing: {model_folder} is not a complete nnU-Net model "
                               f"folder. Copy the teacher's whole results folder, including {name}.")
    fold_folder = join(model_folder, f"fold_{fold}")
    checkpoint_file = join(fold_folder, checkpoint_name)
    if not isfile(checkpoint_file):
        present = sorted(d for d in os.listdir(model_folder) if d.startswith("fold_"))
        raise TeacherError(
            f"Teacher checkpoint not found: {checkpoint_file}. Folds present in {model_folder}: {present or 'none'}. "
            f"Train that teacher fold first (nnUNetv2_train ... {fold}), or set the teacher fold / checkpoint in the "
            f"student plans (nnUNetv2_kd_plan_student --teacher-fold N --teacher-checkpoint NAME); note that a "
            f"teacher fold other than the student's may have trained on the student's validation cases.")
    checkpoint = load_nnunet_checkpoint(checkpoint_file)
    bad = nonfinite_tensors(checkpoint["network_weights"])
    if bad:
        raise TeacherError(
            f"The teacher checkpoint {checkpoint_file} holds NaN or infinite values in {len(bad)} tensor(s) (e.g. "
            f"{bad[:3]}): its training diverged or the file was damaged, and a student distilled from it would "
            f"learn NaN. Use another checkpoint of that teacher (nnUNetv2_kd_plan_student --teacher-checkpoint "
            f"checkpoint_best.pth, or teacher.checkpoint in the student plans) or retrain that teacher fold.")
    from batchgenerators.utilities.file_and_folder_operations import load_json
    init_args = checkpoint.get("init_args", {})
    teacher = TeacherModel(model_folder=model_folder, fold=fold, checkpoint_file=checkpoint_file,
                           plans=load_json(join(model_folder, "plans.json")),
                           dataset_json=load_json(join(model_folder, "dataset.json")),
                           configuration=init_args.get("configuration") or configuration_named_by(model_folder),
                           trainer_name=checkpoint.get("trainer_name", "nnUNetTrainer"))
    if teacher.configuration not in teacher.plans.get("configurations", {}):
        raise TeacherError(f"{checkpoint_file} was trained with configuration '{teacher.configuration}', which "
                           f"{join(model_folder, 'plans.json')} does not define. The model folder is inconsistent: "
                           f"copy plans.json from the teacher's training run.")
    return teacher, checkpoint


def check_teacher_compatible(teacher: TeacherModel, student_plans_manager: PlansManager,
                             student_configuration: ConfigurationManager, student_dataset_json: dict,
                             student_plans_file: str, student_dataset_json_file: str) -> None:
    """The teacher must see the same input and predict the same labels as the student, else KD is meaningless."""
    t_plans, t_cfg = teacher.plans_manager, teacher.configuration_manager
    t_where = join(teacher.model_folder, "dataset.json")

    if teacher.dataset_json.get("labels") != student_dataset_json.get("labels"):
        raise TeacherError(
            f"Label mismatch: the teacher ({t_where}) predicts {teacher.dataset_json.get('labels')} but the student "
            f"dataset ({student_dataset_json_file}) has {student_dataset_json.get('labels')}. Output channels would "
            f"be distilled onto the wrong classes. Use a teacher trained on the same label definition, or map the "
            f"teacher's labels onto the student's (nnUNetv2_kd_plan_student --label-map TEACHER_LABEL=STUDENT_LABEL "
            f"..., written to the recipe's teacher entry as \"label_map\").")
    t_channels = teacher.dataset_json.get("channel_names", teacher.dataset_json.get("modality"))
    s_channels = student_dataset_json.get("channel_names", student_dataset_json.get("modality"))
    t_n = determine_num_input_channels(t_plans, t_cfg, teacher.dataset_json)
    s_n = determine_num_input_channels(student_plans_manager, student_configuration, student_dataset_json)
    if t_n != s_n or t_channels != s_channels:
        raise TeacherError(
            f"Input channel mismatch: the teacher ({t_where}) takes {t_n} channel(s) {t_channels}, the student "
            f"({student_dataset_json_file}) {s_n} channel(s) {s_channels}. Use a teacher trained on the same "
            f"image channels in the same order.")

    t_plan_file = join(teacher.model_folder, "plans.json")
    if list(t_plans.transpose_forward) != list(student_plans_manager.transpose_forward):
        raise TeacherError(
            f"Axis order mismatch: teacher plans {t_plan_file} transpose_forward {t_plans.transpose_forward}, student "
            f"plans {student_plans_file} {student_plans_manager.transpose_forward}. Plan the student from this teacher "
            f"with nnUNetv2_kd_plan_student so both see identically preprocessed data.")
    if len(t_cfg.spacing) != len(student_configuration.spacing):
        raise TeacherError(
            f"Dimension mismatch: the teacher's configuration '{teacher.configuration}' ({t_plan_file}) is "
            f"{len(t_cfg.spacing)}D, the student's ({student_plans_file}) {len(student_configuration.spacing)}D: its "
            f"outputs and features cannot be compared voxel by voxel. Use a teacher trained in the student's "
            f"configuration (e.g. a ...__2d teacher folder for a 2d student).")
    if not np.allclose(t_cfg.spacing, student_configuration.spacing):
        raise TeacherError(
            f"Spacing mismatch: the teacher's configuration '{teacher.configuration}' ({t_plan_file}) uses spacing "
            f"{t_cfg.spacing}, the student's ({student_plans_file}) {student_configuration.spacing}. Plan the student "
            f"from this teacher with nnUNetv2_kd_plan_student (it keeps spacing and data_identifier).")
    if (list(t_cfg.normalization_schemes) != list(student_configuration.normalization_schemes)
            or list(t_cfg.use_mask_for_norm) != list(student_configuration.use_mask_for_norm)):
        raise TeacherError(
            f"Normalisation mismatch: teacher ({t_plan_file}) {t_cfg.normalization_schemes} "
            f"(mask {t_cfg.use_mask_for_norm}), student ({student_plans_file}) "
            f"{student_configuration.normalization_schemes} (mask {student_configuration.use_mask_for_norm}). "
            f"Plan the student from this teacher with nnUNetv2_kd_plan_student.")
    # Intensity statistics only enter the CT normalisation (clip + z-score with dataset statistics).
    t_props = teacher.plans.get("foreground_intensity_properties_per_channel", {})
    s_props = student_plans_manager.plans.get("foreground_intensity_properties_per_channel", {})
    for c, scheme in enumerate(student_configuration.normalization_schemes):
        if scheme == "CTNormalization" and t_props.get(str(c)) != s_props.get(str(c)):
            raise TeacherError(
                f"CT normalisation statistics of channel {c} differ between the teacher ({t_plan_file}) and the "
                f"student ({student_plans_file}): the same voxel would be normalised differently. Plan the student "
                f"from this teacher with nnUNetv2_kd_plan_student.")

    strides = np.prod(np.array(t_cfg.pool_op_kernel_sizes), axis=0)
    if any(p % s for p, s in zip(student_configuration.patch_size, strides)):
        raise TeacherError(
            f"The student's patch size {student_configuration.patch_size} ({student_plans_file}) is not divisible by "
            f"the teacher's total downsampling {strides.tolist()} ({t_plan_file}), so the teacher cannot process the "
            f"student's patches. Keep the teacher's patch size (nnUNetv2_kd_plan_student does).")


def _other_dataset_message(teacher: TeacherModel, source: str, teacher_identity: dict, student_identity: dict,
                           student_dataset_folder: str) -> str | None:
    """Why the teacher fold was trained on another dataset than the student's (None: the same one, as far as the
    names and, where both are known, the fingerprints tell)."""
    if teacher_identity["dataset_name"] != student_identity["dataset_name"]:
        what = (f"dataset {teacher_identity['dataset_name']}, not the student's {student_identity['dataset_name']} "
                f"({student_dataset_folder})")
    elif None not in (teacher_identity["dataset_fingerprint_sha256"], student_identity["dataset_fingerprint_sha256"]) \
            and teacher_identity["dataset_fingerprint_sha256"] != student_identity["dataset_fingerprint_sha256"]:
        what = (f"a dataset named {teacher_identity['dataset_name']} whose dataset_fingerprint.json differs from the "
                f"student's ({join(student_dataset_folder, 'dataset_fingerprint.json')}): other images under the same "
                f"name, or the dataset was changed and re-planned after the teacher was trained")
    else:
        return None
    return (f"Teacher fold {teacher.fold} ({teacher.model_folder}) was trained on {what} ({source}). Its case "
            f"identifiers cannot be compared with the student's by name, so the leakage check cannot tell whether it "
            f"saw the student's validation cases.")


def teacher_training_cases(teacher: TeacherModel, preprocessed_root: str | None = None, *,
                           student_dataset_folder: str | None = None, log=None,
                           allow_other_dataset: bool = False) -> set[str] | None:
    """The case identifiers the teacher fold was trained on (None: unknown).

    Read first from the fold's own record (``fold_X/training_cases.json``, written by this project's trainers when
    training starts), so a splits_final.json edited after the teacher was trained does not change the answer. A
    teacher without a record (trained with nnU-Net's own trainer) falls back to the student dataset's
    splits_final.json, with a warning through ``log``. ``student_dataset_folder`` is the student's
    nnUNet_preprocessed/<dataset> folder (default: the teacher's dataset under ``preprocessed_root``). A teacher
    trained on another dataset (name or dataset fingerprint differ) raises TeacherError, unless
    ``allow_other_dataset``: then it is accepted with a warning and has no cases in common with the student."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_kd.provenance import (ProvenanceError, dataset_fingerprint_sha256, dataset_identity,
                                      read_training_cases)
    log = log or print
    if student_dataset_folder is None:
        if preprocessed_root is None or teacher.plans.get("dataset_name") is None:
            return None
        student_dataset_folder = join(preprocessed_root, teacher.plans["dataset_name"])
    fold_folder = join(teacher.model_folder, f"fold_{teacher.fold}")
    try:
        record = read_training_cases(fold_folder)
    except ProvenanceError as e:
        raise TeacherError(str(e)) from e
    if record is not None:
        source = f"its record {join(fold_folder, 'training_cases.json')}"
        teacher_identity = {"dataset_name": record["dataset_name"],
                            "dataset_fingerprint_sha256": record.get("dataset_fingerprint_sha256")}
    else:
        source = (f"its plans {join(teacher.model_folder, 'plans.json')} and the dataset_fingerprint.json nnU-Net "
                  f"copied beside them")
        teacher_identity = {"dataset_name": teacher.plans.get("dataset_name"), "dataset_fingerprint_sha256":
                            dataset_fingerprint_sha256(join(teacher.model_folder, "dataset_fingerprint.json"))}
    other = _other_dataset_message(teacher, source, teacher_identity, dataset_identity(student_dataset_folder),
                                   student_dataset_folder)
    if other is not None:
        if not allow_other_dataset:
            raise TeacherError(
                f"{other} Use a teacher trained on the student's dataset, or, if it was deliberately trained on other "
                f"data (so it cannot have seen the student's validation cases), set \"allow_validation_overlap\": "
                f"true for this teacher in the student plans (kd.<configuration>.teacher, or its entry of "
                f"kd.<configuration>.teachers; nnUNetv2_kd_plan_student --allow-validation-overlap).")
        log(f"WARNING: {other} Accepted because allow_validation_overlap is set.")
        return set()
    if record is not None:  # an image seen without its label counts too: the teacher may have memorised it
        return set(record["training_cases"]) | set(record.get("unlabelled_training_cases", ()))

    splits_file = join(student_dataset_folder, "splits_final.json")
    log(f"WARNING: {fold_folder} has no training_cases.json (the teacher was trained with nnU-Net's own trainer, or "
        f"an older version of this project): its training cases are taken from today's {splits_file}, which may have "
        f"been edited since the teacher was trained. Train teachers with -tr nnUNetTrainerBudget to record them.")
    if not isfile(splits_file):
        return None
    splits = load_json(splits_file)
    if teacher.fold == "all":
        return {k for split in splits for k in split["train"] + split["val"]}
    if int(teacher.fold) < len(splits):
        return set(splits[int(teacher.fold)]["train"])
    return None


class FrozenTeacher(nn.Module):
    """The teacher network, permanently in eval mode with no gradients.

    eval() freezes BatchNorm statistics and disables dropout; `train()` is overridden so a caller that switches
    a whole module tree to training mode cannot unfreeze it. It is kept outside the student network, so it is
    never part of the student's state dict or checkpoint.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.network.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x):
        with torch.no_grad():
            return self.network(x)


def build_trained_network(trainer_name: str, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                          dataset_json: dict, network_weights: dict, checkpoint_file: str, plans_file: str,
                          deep_supervision: bool) -> nn.Module:
    """The network the trainer class ``trainer_name`` builds (so custom architectures work), with the checkpoint's
    weights loaded. Errors name the checkpoint and plans files and the fix."""
    import inspect

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError as e:
        raise TeacherError(f"{checkpoint_file} was written by trainer class '{trainer_name}', which nnU-Net cannot "
                           f"find. Add its folder to nnUNet_extTrainer (separate several folders with "
                           f"'{os.pathsep}').") from e
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                                           num_outputs, enable_deep_supervision=deep_supervision)
    else:  # nnU-Net's older signature, as its initialize_from_trained_model_folder still accepts it
        network = trainer_class.build_network_architecture(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, num_inputs, num_outputs,
            enable_deep_supervision=deep_supervision)
    try:
        network.load_state_dict(strip_wrapper_prefixes(network_weights))
    except RuntimeError as e:
        raise TeacherError(f"{checkpoint_file} does not fit the network of {plans_file} ({str(e).splitlines()[0]}). "
                           f"The checkpoint and plans come from different runs: copy the model folder as a whole."
                           ) from e
    return network


# The submodule (and state-dict prefix) of the multi-task teacher's auxiliary head (nnunet_kd.multitask adds it): here,
# where a teacher is loaded without it, so the loader needs nothing of the trainer that trains it.
RECONSTRUCTION_HEAD = "reconstruction_head"


def segmentation_part(trainer_name: str, network_weights: dict) -> tuple[str, dict]:
    """A multi-task teacher (nnunet_kd.multitask: nnU-Net's network plus a reconstruction head) is used through its
    segmentation network: nnU-Net's own network class and the weights without the auxiliary head. The shared
    encoder/decoder features and the segmentation outputs are the student's to distil; the head is not. Any other
    teacher: unchanged."""
    prefix = RECONSTRUCTION_HEAD + "."
    if trainer_name != "nnUNetTrainerMultiTask" or not any(k.startswith(prefix) for k in network_weights):
        return trainer_name, network_weights
    return "nnUNetTrainer", {k: v for k, v in network_weights.items() if not k.startswith(prefix)}


def build_frozen_teacher(teacher: TeacherModel, checkpoint: dict, device: torch.device) -> FrozenTeacher:
    """Build the teacher with its own trainer class's network builder (so custom teacher architectures work); a
    multi-task teacher as its segmentation network (``segmentation_part``)."""
    trainer_name, weights = segmentation_part(teacher.trainer_name, checkpoint["network_weights"])
    network = build_trained_network(trainer_name, teacher.plans_manager, teacher.configuration_manager,
                                    teacher.dataset_json, weights, teacher.checkpoint_file,
                                    join(teacher.model_folder, "plans.json"), deep_supervision=True)
    return FrozenTeacher(network).to(device)
