#!/usr/bin/env python
"""Whole-volume inference latency of the deployed forms of a student, next to its teacher, on one real volume.

    python benchmarks/deploy_latency.py --preprocessed $nnUNet_preprocessed/Dataset024_PROMISE12 -c 3d_fullres \
        --width 0.25 --threads 1 2 --repeats 5

Models: the teacher (PyTorch, the plans' network), the student of --width (PyTorch; the network
nnUNetv2_kd_plan_student derives), the student through ONNX Runtime (nnUNetv2_kd_export --onnx), and two int8
forms of it: ONNX Runtime's static QDQ quantisation calibrated on patches of real preprocessed cases (what --int8
writes) and its dynamic quantisation (no calibration). Every model runs nnU-Net's sliding window (Gaussian weighting, step 0.5, no
mirroring) over the whole preprocessed volume (by default the dataset's largest case) in its own process, so its
peak resident memory is its own: --warmup untimed runs, then --repeats timed ones; the median and the range are
reported. Networks are freshly initialised with one seed: weights do not change the time of these float and
quantised kernels (int8 accuracy is measured on trained students, not here). Run it on an idle machine.
Writes benchmarks/results/<dataset>-<configuration>-<device>-deploy-latency.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from os.path import abspath, basename, dirname, isdir, join

RESULTS = join(dirname(abspath(__file__)), "results")
MODELS = ("teacher_pytorch", "student_pytorch", "student_onnx", "student_onnx_int8_dynamic",
          "student_onnx_int8_static")


def _plans(args) -> tuple[dict, dict, dict]:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_kd.planning import derive_student_architecture
    import copy
    teacher = load_json(join(args.preprocessed, args.plans + ".json"))
    dataset_json = load_json(join(args.preprocessed, "dataset.json"))
    student = copy.deepcopy(teacher)
    cfg = student["configurations"][args.configuration]
    cfg["architecture"] = derive_student_architecture(cfg["architecture"], args.width)
    return teacher, student, dataset_json


def _cases(preprocessed: str, data_identifier: str) -> list[str]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = join(preprocessed, data_identifier)
    return sorted(infer_dataset_class(folder).get_identifiers(folder))


def _largest_case(args, teacher_plans: dict) -> str:
    import numpy as np
    from nnunet_kd.width_budget import reference_case
    identifier = teacher_plans["configurations"][args.configuration]["data_identifier"]
    sizes = {case: int(np.prod(reference_case(args.preprocessed, identifier, case)[1].shape))
             for case in _cases(args.preprocessed, identifier)}
    return max(sizes, key=sizes.get)


def _network(plans, dataset_json, configuration):
    import torch
    from nnunet_kd.cost import build_network_from_plans
    torch.manual_seed(0)
    return build_network_from_plans(plans, dataset_json, configuration).eval()


def _prepare_onnx(args, student_plans, dataset_json, workdir) -> dict:
    """Export the student as nnUNetv2_kd_export --onnx --int8 does (float32 + static int8 calibrated on real
    preprocessed patches), and a copy whose int8 model is ONNX Runtime's dynamic quantisation."""
    import shutil

    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from nnunet_kd.onnx_export import INT8_FILE, ONNX_FILE, calibration_patches, export_fold_onnx
    from nnunet_kd.onnx_predict import ONNX_RECORD_FILE

    cfg = PlansManager(student_plans).get_configuration(args.configuration)
    folders = {name: join(workdir, name) for name in ("static", "dynamic")}
    for folder in folders.values():
        os.makedirs(join(folder, "fold_0"), exist_ok=True)
        save_json(student_plans, join(folder, "plans.json"))
        save_json(dataset_json, join(folder, "dataset.json"))
    network = _network(student_plans, dataset_json, args.configuration)
    patches = calibration_patches(join(args.preprocessed, cfg.data_identifier), cfg.patch_size,
                                  cases=args.calibration_cases)
    export_fold_onnx(network, cfg.patch_size, 1, join(folders["static"], "fold_0"), configuration=args.configuration,
                     checkpoint_name="(freshly initialised, seed 0)", mirroring_axes=None, int8_calibration=patches)
    for name in (ONNX_FILE, ONNX_RECORD_FILE):
        shutil.copy(join(folders["static"], "fold_0", name), join(folders["dynamic"], "fold_0", name))
    quantize_dynamic(join(folders["static"], "fold_0", ONNX_FILE), join(folders["dynamic"], "fold_0", INT8_FILE),
                     weight_type=QuantType.QInt8)
    return folders


def worker(args) -> None:
    """One model, one thread count: time it and print a JSON line."""
    import torch
    torch.set_num_threads(args.threads[0])
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.benchmark import PeakMemory
    from nnunet_kd.cost import count_parameters
    from nnunet_kd.onnx_predict import OnnxPredictor
    from nnunet_kd.width_budget import reference_case

    teacher, student, dataset_json = _plans(args)
    device = torch.device(args.device)
    kwargs = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                  perform_everything_on_device=device.type == "cuda", device=device, verbose=False, allow_tqdm=False)
    model = args.worker
    if model.endswith("_pytorch"):
        plans = teacher if model.startswith("teacher") else student
        manager = PlansManager(plans)
        network = _network(plans, dataset_json, args.configuration).to(device)
        predictor = nnUNetPredictor(**kwargs)
        predictor.manual_initialization(network, manager, manager.get_configuration(args.configuration), None,
                                        dataset_json, "nnUNetTrainer", None)
        params = count_parameters(network)
    else:
        folder = join(args.workdir, "dynamic" if model.endswith("dynamic") else "static")
        predictor = OnnxPredictor(**kwargs)
        predictor.initialize_from_onnx_folder(folder, ["0"], int8="int8" in model, threads=args.threads[0])
        params = count_parameters(_network(student, dataset_json, args.configuration))
    cfg = PlansManager(teacher).get_configuration(args.configuration)
    case, volume = reference_case(args.preprocessed, cfg.data_identifier, args.case)
    with torch.inference_mode(), PeakMemory(device) as memory:  # peak over warm-up and timed runs
        for _ in range(args.warmup):
            predictor.predict_sliding_window_return_logits(volume)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            predictor.predict_sliding_window_return_logits(volume)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    slicers = predictor._internal_get_sliding_window_slicers(volume.shape[1:])
    print("RESULT " + json.dumps({"model": model, "threads": args.threads[0], "case": case,
                                  "volume_shape": list(volume.shape), "windows": len(slicers),
                                  "patch_size": list(cfg.patch_size), "parameters": params,
                                  "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                                  "all_s": times, **memory.result()}))


def main(argv=None) -> None:
    from nnunet_kd.cost import seconds_with_range

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", required=True, help="$nnUNet_preprocessed/DatasetXXX_Name (plans + data)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--plans", default="nnUNetPlans", help="The teacher's plans in --preprocessed")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--case", default=None, help="Preprocessed case (default: the largest)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--calibration-cases", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not isdir(args.preprocessed):
        parser.error(f"--preprocessed {args.preprocessed} is not a folder")
    teacher, student, dataset_json = _plans(args)
    args.case = args.case or _largest_case(args, teacher)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        if any("onnx" in m for m in args.models):
            _prepare_onnx(args, student, dataset_json, workdir)
        for threads in args.threads:
            for model in args.models:
                command = [sys.executable, abspath(__file__), "--preprocessed", args.preprocessed, "-c",
                           args.configuration, "--plans", args.plans, "--width", str(args.width), "--case", args.case,
                           "--threads", str(threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                           "--device", args.device, "--workdir", workdir, "--worker", model]
                out = subprocess.run(command, capture_output=True, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                if out.returncode or not lines:
                    raise SystemExit(f"{model} ({threads} threads) failed:\n{out.stderr[-3000:]}")
                row = json.loads(lines[-1][len("RESULT "):])
                rows.append(row)
                print(f"{model:28s} {threads} thread(s): median {row['median_s']:.3f} s "
                      f"({row['min_s']:.3f}-{row['max_s']:.3f}), peak RSS {row['peak_memory_bytes'] / 2**20:.0f} MiB "
                      f"(+{row['peak_memory_increase_bytes'] / 2**20:.0f})",
                      flush=True)
    for row in rows:
        teacher_row = next(r for r in rows if r["model"] == "teacher_pytorch" and r["threads"] == row["threads"])
        student_row = next((r for r in rows if r["model"] == "student_pytorch" and r["threads"] == row["threads"]),
                           None)
        row["speedup_over_teacher"] = teacher_row["median_s"] / row["median_s"]
        if student_row:
            row["speedup_over_student_pytorch"] = student_row["median_s"] / row["median_s"]
    import onnxruntime
    import torch
    dataset = basename(os.path.normpath(args.preprocessed))
    device = f"{args.device}-{os.cpu_count()}cores" if args.device == "cpu" else args.device
    result = {
        "protocol": {"dataset": dataset, "configuration": args.configuration, "plans": args.plans,
                     "student_width": args.width, "case": args.case, "device": device,
                     "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                     "repeats": args.repeats, "warmup": args.warmup,
                     "sliding_window": "nnU-Net's predictor: Gaussian weighting, step 0.5, no mirroring",
                     "weights": "freshly initialised (seed 0): latency only",
                     "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
                     "command": "python benchmarks/deploy_latency.py " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv)},
        "rows": rows,
    }
    stem = join(RESULTS, f"{dataset}-{args.configuration}-{device}-deploy-latency")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = ["| model | threads | parameters | median s [min-max] | speed-up vs teacher | vs PyTorch student | "
             "peak RSS MiB (increase while predicting) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        timing = seconds_with_range(r["median_s"], r["min_s"], r["max_s"])
        lines.append(f"| {r['model']} | {r['threads']} | {r['parameters']:,} | {timing} | "
                     f"{r['speedup_over_teacher']:.2f}x | "
                     f"{r.get('speedup_over_student_pytorch', float('nan')):.2f}x | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} (+{r['peak_memory_increase_bytes'] / 2**20:.0f}) |")
    r0 = rows[0]
    header = (f"{dataset} {args.configuration}, case {r0['case']} (preprocessed {r0['volume_shape']}, "
              f"{r0['windows']} windows of {r0['patch_size']}), {device}, median of {args.repeats} after "
              f"{args.warmup} warm-up; command: `{result['protocol']['command']}`\n\n")
    with open(stem + ".md", "w") as f:
        f.write(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
