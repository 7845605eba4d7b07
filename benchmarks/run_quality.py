#!/usr/bin/env python
"""Real-data quality runner: teacher, plain student and distilled students on one dataset, one budget.

    python benchmarks/run_quality.py --raw-dataset /path/to/Dataset004_Hippocampus -c 2d \
        --teacher-epochs 50 --student-epochs 50 --iterations-per-epoch 100 --methods plain logit adaptive mskd

trains what is missing inside --workdir (nnU-Net's raw / preprocessed / results folders), evaluates every model
with nnU-Net's evaluation on the validation fold(s), and writes
benchmarks/results/<dataset>-<configuration>-<device>.json (+ .md table, Dice-vs-parameters and training-curve
PNGs). With --synthetic it generates the project's prostate-MRI-like dataset instead (for machines without data).
The engine is nnunet_kd.compare, shared with nnUNetv2_kd_demo.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from os.path import abspath, basename, dirname, isdir, join

import torch

from nnunet_kd.compare import METHOD_ALIASES, Budget, Comparison, device_label, plot_results, run_comparison, save_result
from nnunet_kd.pipeline import nnunet_env
from nnunet_kd.synthetic import make_synthetic_prostate_dataset

RESULTS = join(dirname(abspath(__file__)), "results")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--raw-dataset", help="A DatasetXXX_Name folder in nnU-Net raw format (linked into --workdir)")
    source.add_argument("--synthetic", action="store_true", help="Generate the synthetic prostate-MRI-like dataset")
    parser.add_argument("--synthetic-cases", type=int, default=40)
    parser.add_argument("--synthetic-shape", type=int, nargs=3, default=[24, 64, 64], help="z y x voxels")
    parser.add_argument("--workdir", default="kd_quality_workdir")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["plain", "logit", "adaptive", "mskd"],
                        choices=sorted(METHOD_ALIASES))
    parser.add_argument("--teacher", help="An existing teacher model folder (default: train one on the budget)")
    parser.add_argument("--teacher-epochs", type=int, required=True)
    parser.add_argument("--student-epochs", type=int, required=True)
    parser.add_argument("--iterations-per-epoch", type=int, required=True)
    parser.add_argument("--val-iterations-per-epoch", type=int, default=10)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS, help=f"Results folder (default {RESULTS})")
    args = parser.parse_args(argv)

    workdir = abspath(args.workdir)
    env = nnunet_env(workdir, cpu_friendly=(args.device == "cpu"))
    if args.synthetic:
        dataset_id, name = 980, "KDSyntheticProstate"
        dataset_folder = join(env["nnUNet_raw"], f"Dataset{dataset_id:03d}_{name}")
        if not isdir(dataset_folder):
            make_synthetic_prostate_dataset(env["nnUNet_raw"], dataset_id=dataset_id, dataset_name=name,
                                            num_training=args.synthetic_cases, num_test=2,
                                            shape=tuple(args.synthetic_shape), seed=args.seed)
    else:
        source = abspath(args.raw_dataset)
        match = re.fullmatch(r"Dataset(\d{3})_(.+)", basename(source.rstrip("/")))
        if not match or not os.path.isfile(join(source, "dataset.json")):
            parser.error(f"--raw-dataset {source} must be a DatasetXXX_Name folder with a dataset.json (nnU-Net raw "
                         f"format).")
        dataset_id = int(match.group(1))
        dataset_folder = join(env["nnUNet_raw"], basename(source.rstrip("/")))
        if not os.path.exists(dataset_folder):
            os.symlink(source, dataset_folder)  # read-only use: nnU-Net never writes into raw data
    dataset_name = basename(dataset_folder)

    budget = Budget(args.teacher_epochs, args.student_epochs, args.iterations_per_epoch,
                    args.val_iterations_per_epoch, args.seed)
    comparison = Comparison(dataset_id=dataset_id, dataset_name=dataset_name, configuration=args.configuration,
                            budget=budget, folds=args.folds, methods=args.methods, width=args.width,
                            device=args.device, teacher_folder=args.teacher)
    result = run_comparison(comparison, env, join(workdir, "quality_commands.log"))
    result["command"] = " ".join(["python", "benchmarks/run_quality.py"] + (argv if argv is not None else sys.argv[1:]))
    result["dataset_source"] = "synthetic (nnunet_kd.synthetic, no real data available)" if args.synthetic \
        else abspath(args.raw_dataset)
    stem = join(args.out, f"{dataset_name}-{args.configuration}-{device_label(args.device)}")
    result["plots"] = [basename(p) for p in plot_results(result, stem)]
    save_result(result, stem + ".json")
    print(f"\n{result['table']}\n\nwritten: {stem}.json, {stem}.md, {', '.join(result['plots'])}")
    return result


if __name__ == "__main__":
    main()
