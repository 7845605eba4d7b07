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
from nnunet_kd.teacher import atomic_torch_save, load_nnunet_checkpoint, nonfinite_tensors, strip_wrapper_prefixes
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
    """Strict load into the network plain nnU-Net builds for inference: what nnUNetv2_predict will do."""
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


def default_output_folder(student_folder: str, plans: dict, configuration: str) -> str:
    """Beside the student, under nnU-Net's own naming, so `nnUNetv2_predict -tr nnUNetTrainer -p <plans>` finds it."""
    return join(os.path.dirname(os.path.abspath(student_folder)),
                f"{VANILLA_TRAINER}__{plans['plans_name']}__{configuration}")


def export_student(student_folder: str, output_folder: str | None = None, folds=None,
                   checkpoints=("checkpoint_final.pth", "checkpoint_best.pth"), overwrite: bool = False) -> str:
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
    for src, _, _, checkpoint in work:
        bad = nonfinite_tensors(checkpoint["network_weights"])
        if bad:
            raise ExportError(
                f"{src}: the student's weights hold NaN or infinite values in {len(bad)} tensor(s) (e.g. {bad[:3]}); "
                f"its training diverged and it would predict nothing useful. Nothing was exported. Check the "
                f"teacher and the recipe's weights, and retrain the student (or export an intact checkpoint with "
                f"--checkpoints / -f).")
        check_loads_in_plain_nnunet(plans_out, dataset_json, configuration, checkpoint["network_weights"], src)

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
    args = parser.parse_args(argv)
    try:
        export_student(args.i, args.o, args.f, tuple(args.checkpoints), args.overwrite)
    except (ExportError, RuntimeError) as e:
        print(f"nnUNetv2_kd_export: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
