"""``nnUNetv2_kd_demo``: the whole workflow on a small dataset, end to end, in minutes on a CPU.

1. dataset: a generated prostate-MRI-like one (nnunet_kd.synthetic), since no data can be downloaded at run time;
2. nnU-Net planning and preprocessing (nnUNetv2_plan_and_preprocess);
3. a teacher: nnU-Net's default network, trained briefly;
4. student plans at a quarter of the teacher's width (nnUNetv2_kd_plan_student);
5. the same student trained without KD (nnUNetTrainerKD_NoKD) and with Adaptive KD (nnUNetTrainerKD_Adaptive),
   on the same budget, seed and fold;
6. one table: Dice per class (nnU-Net's evaluation of the fold's validation cases), parameters, FLOPs per patch,
   sliding-window inference time.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from os.path import abspath, isdir, join

import torch

from nnunet_kd.cost import format_count, make_predictor, median_inference_seconds, network_cost
from nnunet_kd.pipeline import (console_script, fresh_folder, model_folder, nnunet_env, run, validation_summary,
                                write_budget_plans)
from nnunet_kd.synthetic import make_synthetic_prostate_dataset

DATASET_ID = 990
DATASET_NAME = "Dataset990_KDDemoProstate"
CONFIGURATION = "3d_fullres"
TEACHER_PLANS = "nnUNetPlans_demoteacher"
STUDENT_PLANS = "nnUNetPlans_demostudent"


def _step(title: str, started: float) -> None:
    print(f"\n=== [{time.time() - started:6.0f} s] {title}", flush=True)


def inference_seconds(folder: str, fold: int, preprocessed_folder: str, case: str, device: torch.device) -> float:
    """Median sliding-window prediction time of one preprocessed case with nnU-Net's predictor (no mirroring)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    dataset = infer_dataset_class(preprocessed_folder)(preprocessed_folder, [case])
    data = torch.from_numpy(dataset.load_case(case)[0][:])
    predictor = make_predictor(folder, fold, device=device, use_mirroring=False)
    return median_inference_seconds(predictor, data, repeats=3, warmup=1)["median_s"]


def format_table(rows: list[dict], labels: list[str]) -> str:
    header = ["model", "params", "FLOPs/patch", "infer s"] + [f"Dice {l}" for l in labels] + ["mean Dice"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], format_count(r["parameters"]), format_count(r["flops_per_patch"]),
                 f"{r['inference_s']:.2f}"] + [f"{r['dice_per_class'][l]:.4f}" for l in labels] + [f"{r['mean_dice']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(workdir: str, teacher_epochs: int, student_epochs: int, iterations: int, fold: int = 0,
             width: float = 0.25, overwrite: bool = False, device: str = "cpu") -> dict:
    started = time.time()
    workdir = abspath(workdir)
    fresh_folder(workdir, overwrite)
    env = nnunet_env(workdir, cpu_friendly=(device == "cpu"))
    log = join(workdir, "demo_commands.log")
    preprocessed_base = join(env["nnUNet_preprocessed"], DATASET_NAME)
    results = env["nnUNet_results"]

    _step("1/6 dataset", started)
    folder = make_synthetic_prostate_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, dataset_name="KDDemoProstate")
    print(f"generated prostate-MRI-like dataset {folder} (20 training cases, 24x64x64 voxels, 3.0x0.8x0.8 mm)")

    _step("2/6 nnU-Net planning and preprocessing", started)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0: plan without it.
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run(console_script("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "1",
                                                          "--verify_dataset_integrity"], plan_env, log)

    train = console_script("nnUNetv2_train")
    _step(f"3/6 teacher: nnU-Net's default network, {teacher_epochs} x {iterations} iterations", started)
    write_budget_plans(preprocessed_base, "nnUNetPlans", TEACHER_PLANS, CONFIGURATION, teacher_epochs, iterations, 10)
    run(train + [str(DATASET_ID), CONFIGURATION, str(fold), "-tr", "nnUNetTrainerKD_NoKD", "-p", TEACHER_PLANS,
                 "-device", device], env, log)
    teacher_folder = model_folder(results, DATASET_NAME, "nnUNetTrainerKD_NoKD", TEACHER_PLANS, CONFIGURATION)

    _step(f"4/6 student plans (width {width})", started)
    run(console_script("nnUNetv2_kd_plan_student") + [
        "-d", str(DATASET_ID), "-c", CONFIGURATION, "--teacher", teacher_folder, "--width", str(width),
        "-o", STUDENT_PLANS, "--epochs", str(student_epochs), "--iterations-per-epoch", str(iterations),
        "--val-iterations-per-epoch", "10"], env, log)

    models = {"teacher": teacher_folder}
    for label, trainer in (("plain student", "nnUNetTrainerKD_NoKD"), ("KD student (Adaptive)", "nnUNetTrainerKD_Adaptive")):
        _step(f"5/6 {label}: {student_epochs} x {iterations} iterations", started)
        run(train + [str(DATASET_ID), CONFIGURATION, str(fold), "-tr", trainer, "-p", STUDENT_PLANS,
                     "-device", device], env, log)
        models[label] = model_folder(results, DATASET_NAME, trainer, STUDENT_PLANS, CONFIGURATION)

    _step("6/6 evaluation, cost and inference time", started)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    splits = load_json(join(preprocessed_base, "splits_final.json"))
    dataset_json = load_json(join(preprocessed_base, "dataset.json"))
    plans_of = {"teacher": load_json(join(teacher_folder, "plans.json"))}
    student_plans = load_json(join(preprocessed_base, STUDENT_PLANS + ".json"))
    data_folder = join(preprocessed_base, student_plans["configurations"][CONFIGURATION]["data_identifier"])
    rows = []
    for label, folder in models.items():
        plans = plans_of.get(label, student_plans)
        cost = network_cost(plans, dataset_json, CONFIGURATION)
        rows.append({"model": label, "folder": folder, **validation_summary(folder, fold),
                     "parameters": cost["parameters"], "flops_per_patch": cost["flops_per_patch"],
                     "inference_s": inference_seconds(folder, fold, data_folder, splits[fold]["val"][0],
                                                      torch.device(device))})
    labels = sorted(rows[0]["dice_per_class"], key=int)
    names = {str(v): k for k, v in dataset_json["labels"].items()}
    table = format_table(rows, labels)
    result = {"device": device, "torch": torch.__version__, "teacher_epochs": teacher_epochs,
              "student_epochs": student_epochs, "iterations_per_epoch": iterations, "fold": fold, "width": width,
              "labels": {l: names.get(l, l) for l in labels}, "models": rows, "table": table,
              "seconds": round(time.time() - started, 1)}
    with open(join(workdir, "demo_results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nDemo results ({DATASET_NAME}, fold {fold}, {len(splits[fold]['val'])} validation cases; labels "
          f"{', '.join(f'{l}={names.get(l, l)}' for l in labels)}; {device}):\n")
    print(table)
    print(f"\nTotal {result['seconds']:.0f} s. Results: {join(workdir, 'demo_results.json')}; models under {results}.")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_kd_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="kd_demo_workdir", help="Where nnU-Net's raw/preprocessed/results go")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--iterations-per-epoch", type=int, default=25)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --workdir")
    args = parser.parse_args(argv)
    if isdir(args.workdir) and os.listdir(args.workdir) and not args.overwrite:
        parser.error(f"{args.workdir} exists and is not empty: pass --overwrite to replace it, or another --workdir.")
    run_demo(args.workdir, args.teacher_epochs, args.student_epochs, args.iterations_per_epoch, args.fold, args.width,
             args.overwrite, args.device)


if __name__ == "__main__":
    main()
