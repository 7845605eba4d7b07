#!/usr/bin/env python
"""The deployed student on held-out real cases: nnU-Net's own predictor (PyTorch) against nnUNetv2_kd_predict_onnx
(float32 and static int8) on the same model and images, Dice from nnU-Net's evaluation.

    python benchmarks/onnx_heldout.py --student <trained student folder> --images <test imagesTs> \
        --labels <test labelsTs> --preprocessed $nnUNet_preprocessed/DatasetXXX_Name/<data_identifier> \
        --name Dataset004_Hippocampus-2d-adaptive-s0

Exports the student (nnUNetv2_kd_export --onnx --int8, int8 calibrated on --preprocessed), predicts every image
three times with one thread and without test-time mirroring (the held-out protocol's setting), and writes
benchmarks/results/<name>-onnx-heldout.{json,md}: mean Dice of each, per-case Dice differences (ONNX - PyTorch,
int8 - float32 ONNX) and the fraction of voxels whose label differs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from os.path import abspath, basename, dirname, join

import numpy as np

RESULTS = join(dirname(abspath(__file__)), "results")


def _dice_per_case(pred_folder: str, labels: str, dataset_json: dict) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    foreground = [v for k, v in dataset_json["labels"].items() if k != "background"]
    summary = compute_metrics_on_folder(labels, pred_folder, join(pred_folder, "summary.json"), SimpleITKIO(),
                                        dataset_json["file_ending"], foreground, num_processes=1)
    return {basename(c["prediction_file"])[:-len(dataset_json["file_ending"])]:
            float(np.nanmean([c["metrics"][k]["Dice"] for k in c["metrics"]])) for c in summary["metric_per_case"]}


def _labels_of(folder: str, ending: str) -> dict:
    import SimpleITK as sitk
    return {basename(f)[:-len(ending)]: sitk.GetArrayFromImage(sitk.ReadImage(f))
            for f in sorted(glob.glob(join(folder, "*" + ending)))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--preprocessed", required=True, help="Preprocessed training data to calibrate int8 on")
    parser.add_argument("--name", required=True)
    parser.add_argument("--fold", default="0")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_kd.cost import make_predictor
    from nnunet_kd.export import export_student
    from nnunet_kd.onnx_predict import OnnxPredictor

    dataset_json = load_json(join(args.student, "dataset.json"))
    ending = dataset_json["file_ending"]
    out = {}
    with tempfile.TemporaryDirectory() as work:
        exported = export_student(args.student, join(work, "exported"), folds=[args.fold], onnx=True, int8=True,
                                  int8_calibration_folder=args.preprocessed)
        runs = {}
        pytorch = make_predictor(exported, args.fold, device="cpu", use_mirroring=False)
        runs["pytorch"] = pytorch
        for name, int8 in (("onnx", False), ("onnx_int8", True)):
            predictor = OnnxPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                      perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                      allow_tqdm=False)
            predictor.initialize_from_onnx_folder(exported, [args.fold], int8=int8, threads=1)
            runs[name] = predictor
        for name, predictor in runs.items():
            folder = join(work, name)
            os.makedirs(folder)
            t0 = time.perf_counter()
            predictor.predict_from_files_sequential(args.images, folder, save_probabilities=False, overwrite=True)
            out[name] = {"seconds_all_cases": time.perf_counter() - t0,
                         "dice": _dice_per_case(folder, args.labels, dataset_json), "labels": _labels_of(folder, ending)}
        record = json.load(open(join(exported, f"fold_{args.fold}", "onnx_model.json")))

    cases = sorted(out["pytorch"]["dice"])
    rows, comparisons = {}, {}
    for name in out:
        rows[name] = {"mean_dice": float(np.mean([out[name]["dice"][c] for c in cases])),
                      "seconds_all_cases_1_thread": out[name]["seconds_all_cases"]}
    for a, b in (("onnx", "pytorch"), ("onnx_int8", "onnx"), ("onnx_int8", "pytorch")):
        diff = np.array([out[a]["dice"][c] - out[b]["dice"][c] for c in cases])
        changed = sum(int((out[a]["labels"][c] != out[b]["labels"][c]).sum()) for c in cases)
        voxels = sum(out[b]["labels"][c].size for c in cases)
        comparisons[f"{a} - {b}"] = {"mean_dice_difference": float(diff.mean()),
                                     "max_abs_case_dice_difference": float(np.abs(diff).max()),
                                     "fraction_of_voxels_with_another_label": changed / voxels}
    result = {"protocol": {"student": abspath(args.student), "fold": args.fold, "cases": len(cases),
                           "images": abspath(args.images), "setting": "1 thread, no mirroring, step 0.5",
                           "int8": record.get("int8"), "onnx_parity": record["parity"],
                           "command": "python benchmarks/onnx_heldout.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv)},
              "models": rows, "comparisons": comparisons,
              "per_case_dice": {name: out[name]["dice"] for name in out}}
    stem = join(RESULTS, f"{args.name}-onnx-heldout")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"{len(cases)} held-out cases, {result['protocol']['setting']}; command: `{result['protocol']['command']}`",
             "", "| predictor | mean Dice | wall s, all cases |", "|---|---|---|"]
    lines += [f"| {n} | {r['mean_dice']:.4f} | {r['seconds_all_cases_1_thread']:.1f} |" for n, r in rows.items()]
    lines += ["", "| comparison | mean Dice difference | max per-case |difference| | voxels with another label |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {c['mean_dice_difference']:+.5f} | {c['max_abs_case_dice_difference']:.5f} | "
              f"{c['fraction_of_voxels_with_another_label']:.2e} |" for n, c in comparisons.items()]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
