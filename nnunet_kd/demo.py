"""``nnUNetv2_kd_demo``: the whole workflow on a small dataset, end to end, in minutes on a CPU.

1. dataset: a generated prostate-MRI-like one (nnunet_kd.synthetic), since no data can be downloaded at run time
   (``--data`` and ``-c`` run it on a dataset of yours in nnU-Net raw format instead; the output says which);
2. nnU-Net planning and preprocessing (nnUNetv2_plan_and_preprocess);
3. a teacher: nnU-Net's default network, trained briefly;
4. student plans at a quarter of the teacher's width (nnUNetv2_kd_plan_student; 16x fewer parameters and FLOPs);
5. the same student trained without KD (nnUNetTrainerBudget), with our peer's logit KD (Fast-nnUNet's recipe,
   nnUNetTrainerKD_Logit) and with Adaptive KD (nnUNetTrainerKD_Adaptive), on the same budget, seed and fold;
6. one table: Dice per class (nnU-Net's evaluation of the fold's validation cases), parameters, FLOPs per patch,
   sliding-window inference time (the engine is nnunet_kd.compare, shared with benchmarks/run_quality.py).
"""
from __future__ import annotations

import argparse
import os
import re
from os.path import abspath, isdir, join

import torch

from nnunet_kd.compare import Budget, Comparison, plot_results, run_comparison, save_result
from nnunet_kd.pipeline import fresh_folder, nnunet_env
from nnunet_kd.resources import warn_ext_trainer
from nnunet_kd.synthetic import make_synthetic_prostate_dataset

DATASET_ID = 990
DATASET_NAME = "Dataset990_KDDemoProstate"
CONFIGURATION = "3d_fullres"
# Sized so the whole demo stays within about a quarter of an hour on a 2-core CPU (README states the measured time).
DEMO_SHAPE = (16, 48, 48)
# The students' budget is long enough for the quarter-width student *without* KD to segment both zones (it
# predicts no foreground for its first ~200 iterations on this data): a table at a budget where the baseline
# predicts nothing would show learning speed, not what distillation buys.
DEFAULT_BUDGET = Budget(teacher_epochs=6, student_epochs=24, iterations_per_epoch=25, val_iterations_per_epoch=5)
# A class Dice below this means the model has not learned that class yet (nnU-Net's Dice of an empty prediction is 0).
NOT_LEARNED_DICE = 0.05


def link_raw_dataset(source: str, raw_root: str) -> tuple[int, str]:
    """Link a DatasetXXX_Name folder (nnU-Net raw format) into raw_root; returns (id, folder name)."""
    name = os.path.basename(os.path.normpath(source))
    match = re.fullmatch(r"Dataset(\d{3})_.+", name)
    if not match or not os.path.isfile(join(source, "dataset.json")):
        raise ValueError(f"{source} is not an nnU-Net raw dataset folder (DatasetXXX_Name with a dataset.json).")
    target = join(raw_root, name)
    if not os.path.exists(target):
        os.symlink(os.path.abspath(source), target)  # read only: nnU-Net never writes into raw data
    return int(match.group(1)), name


def unlearned_classes(result: dict) -> dict:
    """{model: [class names]} of the classes a model's validation Dice says it has not learned yet."""
    return {r["model"]: [result["labels"][k] for k, d in r["dice_per_class"].items() if d < NOT_LEARNED_DICE]
            for r in result["models"] if any(d < NOT_LEARNED_DICE for d in r["dice_per_class"].values())}


def run_demo(workdir: str, budget: Budget, fold: int = 0, width: float = 0.25, overwrite: bool = False,
             device: str = "cpu", data: str | None = None, configuration: str = CONFIGURATION) -> dict:
    workdir = abspath(workdir)
    fresh_folder(workdir, overwrite)
    env = nnunet_env(workdir, cpu_friendly=(device == "cpu"))
    print("\n=== dataset", flush=True)
    if data is not None:
        dataset_id, dataset_name = link_raw_dataset(data, env["nnUNet_raw"])
        print(f"using your dataset {data} (configuration {configuration})")
    else:
        configuration = CONFIGURATION
        dataset_id, dataset_name = DATASET_ID, DATASET_NAME
        folder = make_synthetic_prostate_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID,
                                                 dataset_name="KDDemoProstate", num_training=20, num_test=2,
                                                 shape=DEMO_SHAPE)
        print(f"generated data (not real scans): the prostate-MRI-like dataset {folder} (20 training cases, "
              f"{'x'.join(map(str, DEMO_SHAPE))} voxels, 3.0x0.8x0.8 mm). Pass --data <DatasetXXX_Name> -c <config> "
              f"to run the demo on real data.")
    comparison = Comparison(dataset_id=dataset_id, dataset_name=dataset_name, configuration=configuration,
                            budget=budget, folds=[fold], methods=["plain", "logit", "adaptive"], width=width,
                            device=device,
                            teacher_plans="nnUNetPlans_demoteacher", student_plans="nnUNetPlans_demostudent")
    result = run_comparison(comparison, env, join(workdir, "demo_commands.log"))
    save_result(result, join(workdir, "demo_results.json"))
    plot_results(result, join(workdir, "demo"))
    labels = ", ".join(f"{k}={v}" for k, v in result["labels"].items())
    kind = "your data" if data is not None else "generated data, not real scans"
    print(f"\nDemo results ({dataset_name}: {kind}; {configuration}, fold {fold}, nnU-Net's evaluation of the "
          f"validation cases; labels {labels}; {result['device_name']}; teacher {budget.teacher_epochs} epochs, students "
          f"{budget.student_epochs} epochs x {budget.iterations_per_epoch} iterations, one seed):\n")
    print(result["table"])
    unlearned = unlearned_classes(result)
    if unlearned:
        print(f"\nNOTE: at this budget {unlearned} predict(s) (almost) nothing for these classes (Dice < "
              f"{NOT_LEARNED_DICE}). Where the plain student is among them the table shows learning speed, not final "
              f"quality: raise --student-epochs until every student has learned every class.")
    print("\nOne seed, one fold, validation cases: read differences of a few 0.01 Dice as noise. The held-out, "
          "several-seed evidence is benchmarks/run_evidence.py (README).")
    print(f"\nTotal {result['seconds']:.0f} s. Results: {join(workdir, 'demo_results.json')} (+ .md, demo_*.png); "
          f"models under {env['nnUNet_results']}.")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_kd_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="kd_demo_workdir", help="Where nnU-Net's raw/preprocessed/results go")
    parser.add_argument("--teacher-epochs", type=int, default=DEFAULT_BUDGET.teacher_epochs)
    parser.add_argument("--student-epochs", type=int, default=DEFAULT_BUDGET.student_epochs)
    parser.add_argument("--iterations-per-epoch", type=int, default=DEFAULT_BUDGET.iterations_per_epoch)
    parser.add_argument("--seed", type=int, default=DEFAULT_BUDGET.seed)
    parser.add_argument("--fold", type=int, default=0)
    # Quarter width, as in the README's main command. Measured on the demo data: at half width the student without KD
    # is already within 0.006 Dice of the briefly trained teacher (0.886 vs 0.892), so the table could not tell the
    # methods apart; at quarter width the budget separates them (see the README's demo table).
    parser.add_argument("--width", type=float, default=0.25, help="Student width multiplier (default 0.25)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --workdir")
    parser.add_argument("--data", default=None, help="A raw nnU-Net dataset folder (DatasetXXX_Name) to use instead "
                        "of the generated one, e.g. ../shared/data/Dataset004_Hippocampus with -c 2d")
    parser.add_argument("-c", "--configuration", default=CONFIGURATION,
                        help="nnU-Net configuration for --data (the generated dataset always uses 3d_fullres)")
    parser.add_argument("--synthetic", action="store_true",
                        help="Use the generated dataset (the default; kept for older scripts)")
    args = parser.parse_args(argv)
    if args.data is not None and args.synthetic:
        parser.error("--data and --synthetic contradict each other: pass one.")
    data = args.data
    if isdir(args.workdir) and os.listdir(args.workdir) and not args.overwrite:
        parser.error(f"{args.workdir} exists and is not empty: pass --overwrite to replace it, or another --workdir.")
    budget = Budget(teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
                    iterations_per_epoch=args.iterations_per_epoch,
                    val_iterations_per_epoch=DEFAULT_BUDGET.val_iterations_per_epoch, seed=args.seed)
    run_demo(args.workdir, budget, args.fold, args.width, args.overwrite, args.device, data, args.configuration)
    warn_ext_trainer("nnUNetv2_kd_demo", note="The demo set it for its own commands only; your shell still needs it "
                     "to train or predict with the KD trainers yourself.")


if __name__ == "__main__":
    main()
