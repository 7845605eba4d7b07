"""The widest student that meets a latency or speed-up budget ("considering the desired accuracy and fast inference
time"): ``nnUNetv2_kd_plan_student --max-latency S`` / ``--min-speedup X``.

Every candidate width's network (and the teacher's) is built from the plans, freshly initialised (the weights do not
change the time), and timed with nnU-Net's own predictor (sliding window, Gaussian weighting, step 0.5, no mirroring)
on one real preprocessed case of the dataset, on this machine (``--latency-device``), median of several runs after a
warm-up (nnunet_kd.cost.median_inference_seconds). The widest candidate within every budget is chosen; every candidate
measured is printed and recorded in the student plans (``kd.<configuration>.student.width_budget``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
from os.path import isdir, join

import numpy as np
import torch

DEFAULT_CANDIDATES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125)


def reference_case(preprocessed_base: str, data_identifier: str, case: str | None = None) -> tuple[str, torch.Tensor]:
    """One preprocessed case (default: the first identifier in the configuration's data folder)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = join(preprocessed_base, data_identifier)
    if not isdir(folder):
        raise FileNotFoundError(f"{folder} not found: preprocess the configuration first (nnUNetv2_plan_and_preprocess)")
    dataset_class = infer_dataset_class(folder)
    case = case or sorted(dataset_class.get_identifiers(folder))[0]
    data = dataset_class(folder, [case]).load_case(case)[0][:]
    return case, torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def time_plans(plans: dict, dataset_json: dict, configuration: str, volume: torch.Tensor, device: torch.device,
               repeats: int = 3, warmup: int = 1) -> dict:
    """Sliding-window latency of the network ``plans`` define for ``configuration`` on ``volume``."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.cost import build_network_from_plans, median_inference_seconds

    manager = PlansManager(copy.deepcopy(plans))
    network = build_network_from_plans(plans, dataset_json, configuration).to(device).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network, manager, manager.get_configuration(configuration), None, dataset_json,
                                        "nnUNetTrainer", None)
        return median_inference_seconds(predictor, volume, repeats=repeats, warmup=warmup)


def choose_width(teacher_plans: dict, student_plans_for, dataset_json: dict, configuration: str,
                 preprocessed_base: str, candidates=DEFAULT_CANDIDATES, max_latency: float | None = None,
                 min_speedup: float | None = None, device: str = "cpu", case: str | None = None,
                 repeats: int = 3, say=print) -> dict:
    """Measure the teacher and every candidate (``student_plans_for(width)`` gives the plans of that width) and
    return {"width": the widest within the budgets or None, "candidates": [...], ...the measurement's setup}."""
    if max_latency is None and min_speedup is None:
        raise ValueError("give max_latency and/or min_speedup")
    for name, value in (("--max-latency", max_latency), ("--min-speedup", min_speedup)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value}")
    device = torch.device(device)
    data_identifier = teacher_plans["configurations"][configuration]["data_identifier"]
    case, volume = reference_case(preprocessed_base, data_identifier, case)
    teacher = time_plans(teacher_plans, dataset_json, configuration, volume, device, repeats)
    say(f"Latency budget: nnU-Net's predictor (no mirroring) on case {case} {list(volume.shape)}, {device}, "
        f"{torch.get_num_threads()} thread(s), median of {repeats}: teacher {teacher['median_s']:.3f} s")
    rows = []
    for width in sorted(candidates, reverse=True):
        timing = time_plans(student_plans_for(width), dataset_json, configuration, volume, device, repeats)
        speedup = teacher["median_s"] / timing["median_s"]
        ok = (max_latency is None or timing["median_s"] <= max_latency) and \
             (min_speedup is None or speedup >= min_speedup)
        rows.append({"width": width, "median_s": timing["median_s"], "all_s": timing["all_s"],
                     "speedup_over_teacher": speedup, "within_budget": ok})
        say(f"  width {width:<6g} {timing['median_s']:.3f} s  speed-up {speedup:5.2f}x  "
            f"{'within budget' if ok else 'over budget'}")
    chosen = next((r["width"] for r in rows if r["within_budget"]), None)
    return {"width": chosen, "max_latency_s": max_latency, "min_speedup": min_speedup, "case": case,
            "volume_shape": list(volume.shape), "device": str(device), "threads": torch.get_num_threads(),
            "repeats": repeats, "teacher_median_s": teacher["median_s"], "candidates": rows,
            "host": os.uname().nodename}
