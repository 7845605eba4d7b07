"""``nnUNetv2_kd_export``: turn a trained KD student into a plain nnU-Net model folder.

The result names trainer ``nnUNetTrainer``, has no adapters, no recipe and no other KD key, so
``nnUNetv2_predict``, ``nnUNetv2_predict_from_modelfolder`` and ``nnUNetv2_export_model_to_zip`` use it
without this plugin installed.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from os.path import basename, isdir, isfile, join

from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p, save_json

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_kd.provenance import TRAINING_CASES_FILE
from nnunet_kd.recipe import PLANS_KEY
from nnunet_kd.atomic_files import atomic_torch_save
from nnunet_kd.teacher import load_nnunet_checkpoint, nonfinite_tensors, strip_wrapper_prefixes
from nnunet_kd.trainer import TRAINING_ONLY_KEYS

VANILLA_TRAINER = "nnUNetTrainer"
# training_cases.json: what the fold trained on, so the exported model, used as a teacher, keeps its leakage record.
FOLD_FILES = ("progress.png", "debug.json", TRAINING_CASES_FILE)


class ExportError(RuntimeError):
    pass


def vanilla_plans(plans: dict) -> dict:
    plans = copy.deepcopy(plans)
    plans.pop(PLANS_KEY, None)
    return plans


def network_only_optimizer_state(optimizer_state: dict) -> dict:
    """Keep the student's parameter group (group 0); the adapters' group does not exist in a plain nnU-Net run."""
    group = optimizer_state["param_groups"][0]
    keep = set(group["params"])
    return {"state": {k: v for k, v in optimizer_state["state"].items() if k in keep}, "param_groups": [group]}


def vanilla_checkpoint(checkpoint: dict) -> dict:
    out = {k: v for k, v in checkpoint.items() if k not in TRAINING_ONLY_KEYS}
    out["trainer_name"] = VANILLA_TRAINER
    out["network_weights"] = strip_wrapper_prefixes(checkpoint["network_weights"])
    init_args = dict(checkpoint["init_args"])
    init_args["plans"] = vanilla_plans(init_args["plans"])
    out["init_args"] = init_args
    out["optimizer_state"] = network_only_optimizer_state(checkpoint["optimizer_state"])
    return out


def check_loads_in_plain_nnunet(plans: dict, dataset_json: dict, configuration: str, weights: dict, where: str):
    """Strict load into the network plain nnU-Net builds for inference: what nnUNetv2_predict will do.

    Returns that network (weights loaded) and the number of input channels."""
    manager = PlansManager(plans)
    cfg = manager.get_configuration(configuration)
    network = nnUNetTrainer.build_network_architecture(
        manager, cfg, determine_num_input_channels(manager, cfg, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    try:
        network.load_state_dict(weights)
    except RuntimeError as e:
        raise ExportError(f"{where}: the student's weights do not load into plain nnU-Net's network "
                          f"({str(e).splitlines()[0]}).") from e
    return network.eval(), determine_num_input_channels(manager, cfg, dataset_json)


def default_output_folder(student_folder: str, plans: dict, configuration: str) -> str:
    """Beside the student, under nnU-Net's own naming, so `nnUNetv2_predict -tr nnUNetTrainer -p <plans>` finds it."""
    return join(os.path.dirname(os.path.abspath(student_folder)),
                f"{VANILLA_TRAINER}__{plans['plans_name']}__{configuration}")


def export_student(student_folder: str, output_folder: str | None = None, folds=None,
                   checkpoints=("checkpoint_final.pth", "checkpoint_best.pth"), overwrite: bool = False,
                   onnx: bool = False, int8: bool = False, int8_calibration_folder: str | None = None) -> str:
    """Write a plain nnU-Net model folder; with ``onnx`` also ``fold_X/model.onnx`` (+ ``model.int8.onnx`` with
    ``int8``) of each fold's first exported checkpoint (``checkpoints`` order: the final one by default).

    int8 calibrates on patches of the preprocessed training data: ``int8_calibration_folder`` or
    ``$nnUNet_preprocessed/<dataset>/<the configuration's data_identifier>``."""
    if int8 and not onnx:
        raise ExportError("--int8 quantises the ONNX export: pass --onnx too.")
    for name in ("plans.json", "dataset.json"):
        if not isfile(join(student_folder, name)):
            raise ExportError(f"{join(student_folder, name)} not found: -i must be a trained student's model folder "
                              f"($nnUNet_results/DatasetXXX/<KD trainer>__<student plans>__<configuration>).")
    plans = load_json(join(student_folder, "plans.json"))
    dataset_json = load_json(join(student_folder, "dataset.json"))
    fold_dirs = sorted(d for d in os.listdir(student_folder) if d.startswith("fold_") and isdir(join(student_folder, d)))
    if folds is not None:
        wanted = [f"fold_{f}" for f in folds]
        missing = [d for d in wanted if d not in fold_dirs]
        if missing:
            raise ExportError(f"{student_folder} has no {missing} (has {fold_dirs}).")
        fold_dirs = wanted
    work = []  # (source, destination, checkpoint) for every checkpoint, all read and checked before writing
    for fold_dir in fold_dirs:
        for name in checkpoints:
            src = join(student_folder, fold_dir, name)
            if isfile(src):
                work.append((src, fold_dir, name, vanilla_checkpoint(load_nnunet_checkpoint(src))))
    if not work:
        raise ExportError(f"No {list(checkpoints)} in {student_folder}/{fold_dirs}: train the student first "
                          f"(or name the checkpoint with --checkpoints).")
    configuration = work[0][3]["init_args"]["configuration"]
    plans_out = vanilla_plans(plans)
    onnx_networks = {}  # fold_dir -> (checkpoint file, (network, input channels))
    for src, fold_dir, _, checkpoint in work:
        bad = nonfinite_tensors(checkpoint["network_weights"])
        if bad:
            raise ExportError(
                f"{src}: the student's weights hold NaN or infinite values in {len(bad)} tensor(s) (e.g. {bad[:3]}); "
                f"its training diverged and it would predict nothing useful. Nothing was exported. Check the "
                f"teacher and the recipe's weights, and retrain the student (or export an intact checkpoint with "
                f"--checkpoints / -f).")
        loaded = check_loads_in_plain_nnunet(plans_out, dataset_json, configuration, checkpoint["network_weights"], src)
        if onnx:  # each fold's first checkpoint goes to ONNX: keep its network rather than build it again
            onnx_networks.setdefault(fold_dir, (src, loaded))
    if onnx:
        try:
            import onnxruntime  # noqa: F401  (checked before anything is written)
        except ImportError as e:
            raise ExportError("--onnx needs onnxruntime and onnx: pip install 'nnunet-kd[onnx]' (or onnxruntime "
                              "onnx). Nothing was exported.") from e
    calibration = None
    if int8:
        from nnunet_kd.onnx_export import calibration_patches
        cfg = PlansManager(plans_out).get_configuration(configuration)
        folder = int8_calibration_folder or join(os.environ.get("nnUNet_preprocessed", "$nnUNet_preprocessed"),
                                                 plans["dataset_name"], cfg.data_identifier)
        if not isdir(folder) or not os.listdir(folder):
            raise ExportError(f"--int8 calibrates activation ranges on the preprocessed training data, and {folder} "
                              f"is not there: set nnUNet_preprocessed as for training, or name the folder with "
                              f"--int8-calibration. Nothing was exported.")
        calibration = calibration_patches(folder, cfg.patch_size)

    output_folder = output_folder or default_output_folder(student_folder, plans, configuration)
    if isdir(output_folder) and os.listdir(output_folder) and not overwrite:
        raise ExportError(f"{output_folder} exists and is not empty; refusing to overwrite it. Pass --overwrite or "
                          f"choose another -o.")
    maybe_mkdir_p(output_folder)
    save_json(plans_out, join(output_folder, "plans.json"), sort_keys=False)
    save_json(dataset_json, join(output_folder, "dataset.json"), sort_keys=False)
    if isfile(join(student_folder, "dataset_fingerprint.json")):
        shutil.copyfile(join(student_folder, "dataset_fingerprint.json"), join(output_folder, "dataset_fingerprint.json"))
    for src, fold_dir, name, checkpoint in work:
        maybe_mkdir_p(join(output_folder, fold_dir))
        atomic_torch_save(checkpoint, join(output_folder, fold_dir, name))  # never a partial checkpoint
    for fold_dir in fold_dirs:
        for name in FOLD_FILES:
            if isfile(join(student_folder, fold_dir, name)):
                shutil.copyfile(join(student_folder, fold_dir, name), join(output_folder, fold_dir, name))
        summary = join(student_folder, fold_dir, "validation", "summary.json")
        if isfile(summary):
            maybe_mkdir_p(join(output_folder, fold_dir, "validation"))
            shutil.copyfile(summary, join(output_folder, fold_dir, "validation", "summary.json"))
    if onnx:
        from nnunet_kd.onnx_export import export_fold_onnx
        patch_size = PlansManager(plans_out).get_configuration(configuration).patch_size
        for src, fold_dir, name, checkpoint in work:
            if onnx_networks[fold_dir][0] != src:
                continue
            network, channels = onnx_networks[fold_dir][1]
            record = export_fold_onnx(network, patch_size, channels, join(output_folder, fold_dir),
                                      configuration=configuration, checkpoint_name=name,
                                      mirroring_axes=checkpoint.get("inference_allowed_mirroring_axes"),
                                      int8_calibration=calibration)
            print(f"{fold_dir}: {record['onnx_file']} from {name}, ONNX Runtime vs PyTorch max |logit difference| "
                  f"{record['parity']['max_abs_logit_difference']:.2g}"
                  + (f"; int8 on calibration patches: "
                     f"{record['int8']['max_abs_logit_difference_on_calibration_patches']:.2g}" if int8 else ""))
    print(f"Exported {len(work)} checkpoint(s) of {basename(os.path.abspath(student_folder))} as a plain nnU-Net "
          f"model: {output_folder}")
    return output_folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_kd_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, help="Trained student model folder")
    parser.add_argument("-o", default=None, help="Output model folder (default: nnUNetTrainer__<plans>__<config> "
                                                 "beside the student)")
    parser.add_argument("-f", nargs="+", default=None, help="Folds to export (default: all present)")
    parser.add_argument("--checkpoints", nargs="+", default=["checkpoint_final.pth", "checkpoint_best.pth"])
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--onnx", action="store_true",
                        help="Also write fold_X/model.onnx (dynamic batch and spatial axes, parity-checked against "
                             "PyTorch) for nnUNetv2_kd_predict_onnx; needs onnxruntime and onnx")
    parser.add_argument("--int8", action="store_true",
                        help="With --onnx, also write fold_X/model.int8.onnx (ONNX Runtime static int8 quantisation, "
                             "calibrated on preprocessed training patches); the predictor uses it only with --int8. "
                             "See the README for its measured Dice change and speed")
    parser.add_argument("--int8-calibration", default=None,
                        help="Preprocessed data folder to calibrate int8 on (default: $nnUNet_preprocessed/<dataset>/"
                             "<data_identifier> of the student's configuration)")
    args = parser.parse_args(argv)
    try:
        export_student(args.i, args.o, args.f, tuple(args.checkpoints), args.overwrite, onnx=args.onnx, int8=args.int8,
                       int8_calibration_folder=args.int8_calibration)
    except (ExportError, RuntimeError) as e:
        print(f"nnUNetv2_kd_export: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
