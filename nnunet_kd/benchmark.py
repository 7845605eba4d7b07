"""``nnUNetv2_kd_benchmark``: what distillation costs, measured with the real trainer, networks and predictor.

For one dataset / configuration / fold it measures, on one device:

* parameters and FLOPs per patch of every teacher of the recipe, of all of them together (what the student
  replaces), and of the student (the networks nnU-Net deploys, i.e. without deep-supervision heads; FLOPs from
  torch's FlopCounterMode, a multiply-add = 2 FLOPs, see nnunet_kd.cost);
* sliding-window inference time of each on a real preprocessed case, with nnU-Net's own predictor, test-time
  mirroring off and on, and the peak memory of each (several teachers: also run in turn, as their ensemble);
* training step times, all on the SAME fixed batches (drawn once from the trainer's own training dataloader):
  (a) the plain student step: the KD trainer's ``train_step`` with the teacher switched off, so it computes
      nnU-Net's segmentation loss only (checked: it returns exactly one loss term);
  (b) the KD step: ``trainer.train_step(batch)`` (student forward, teacher forward, all distillation terms,
      backward, optimiser step);
  (c) the teachers' no-grad forward alone (every teacher of the recipe, under the step's autocast);
  and the ratios KD / (plain + teacher forward) (1.0: distillation costs no more than running the teacher next
  to plain training) and KD / plain.

Every time is a median over ``--steps`` timed repetitions after ``--warmup`` untimed ones. The three training
measurements are interleaved (teacher forward, plain step, KD step, teacher forward, ...), so a drift in the
machine's speed touches all three alike; on CUDA the device is synchronised before and after each timed call
(never inside a step).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (absolute peak, and its increase over what was allocated when
the measurement started). On the CPU the process's resident set size (RSS), sampled every 5 ms from
/proc/self/statm during the measurement, minus the RSS at its start (``resource.getrusage``'s lifetime maximum
where /proc is missing); freed memory that the allocator keeps makes CPU numbers approximate lower bounds. Memory
is measured in the untimed calls only (the warm-up steps, at least one; the first warm-up prediction, one untimed
prediction even with ``--inference-warmup 0``): the CPU sampler is a thread, and beside a timed call on a 2-core
machine it would slow that call.

Students: with ``--student-plans`` (plans written by nnUNetv2_kd_plan_student) the student is untrained; its
inference time is measured with the trainer's in-memory network (weights do not change the time). With
``--student <trained model folder>`` its plans, trainer class and trained checkpoint are used.

The trainer writes its log to a temporary results folder, removed afterwards: nothing is written under
nnUNet_results. The benchmark trains nothing that is evaluated, so the recipe's teacher / validation-case overlap
check is waived (in memory only).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from os.path import abspath, basename, dirname, isdir, isfile, join, splitext

import numpy as np
import torch
from torch import nn

from nnunet_kd.cost import count_flops, count_parameters, format_count, make_predictor, median_inference_seconds
from nnunet_kd.recipe import PLANS_KEY, RecipeError
from nnunet_kd.resources import trainers_dir
from nnunet_kd.teacher import TeacherError

DEFAULT_TRAINER = "nnUNetTrainerKD_BalancedHints"
PROG = "nnUNetv2_kd_benchmark"


class BenchmarkError(RuntimeError):
    """Bad input to the benchmark. The message names the file or argument and the fix."""


# ---------------------------------------------------------------------------------------------- small helpers
@contextlib.contextmanager
def _environ(**values):
    """Temporarily set environment variables (nnU-Net reads its folders from os.environ at call time)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ext_trainer_path() -> str:
    """nnUNet_extTrainer with this plugin's trainers folder on it (nnU-Net finds KD trainers by name there)."""
    ours = str(trainers_dir())
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    return os.pathsep.join(current if ours in current else current + [ours])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _ru_maxrss_bytes() -> int:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as m:``; ``m.result()`` after the block."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_memory_allocated"
        elif _rss_bytes() is not None:
            self.kind = "cpu_rss_sampled_5ms"
            self.start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.kind = "cpu_ru_maxrss"
            self.start = _ru_maxrss_bytes()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
        else:
            self.peak = _ru_maxrss_bytes()
        return False

    def result(self) -> dict:
        return {"peak_memory_bytes": int(self.peak), "peak_memory_increase_bytes": int(max(0, self.peak - self.start)),
                "memory_measure": self.kind}


def time_interleaved(measurements: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Median wall time of each measurement, timed in rounds: round i calls every ``fn(inputs[i % len(inputs)])``
    of ``measurements`` (name -> (fn, inputs)) once, in turn.

    Interleaving is what makes the ratios trustworthy: a shared machine drifts in speed by 10% and more over a
    minute (measured here), and timed one after the other, whole blocks would land in slow or fast periods. The
    device is synchronised before and after each timed call. Memory is the peak over the untimed warm-up rounds (at
    least one, even with ``warmup=0``), each call measured from its own start, and never sampled while a call is
    timed: on the CPU the sampler is a thread, which on a 2-core machine competes with the timed call for the cores
    and the GIL, the more so the more Python-level work the call does.
    """
    times = {name: [] for name in measurements}
    memory = {name: [] for name in measurements}
    untimed = max(1, warmup)
    for i in range(untimed + steps):
        for name, (fn, inputs) in measurements.items():
            _synchronize(device)
            if i < untimed:
                with PeakMemory(device) as peak:
                    fn(inputs[i % len(inputs)])
                    _synchronize(device)
                memory[name].append(peak.result())
                continue
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            _synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": float(statistics.median(times[name])), "all_s": [float(t) for t in times[name]],
                   "peak_memory_bytes": max(m["peak_memory_bytes"] for m in memory[name]),
                   "peak_memory_increase_bytes": max(m["peak_memory_increase_bytes"] for m in memory[name]),
                   "memory_measure": memory[name][0]["memory_measure"]} for name in measurements}


def device_description(device: torch.device) -> dict:
    info = {"device": str(device), "cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")]
        cpu_name = names[0] if names else cpu_name
    except OSError:
        pass
    info["cpu_name"] = cpu_name
    info["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name} ({os.cpu_count()} logical CPUs, torch uses {torch.get_num_threads()} threads)"
    return info


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"torch": torch.__version__}
    for name in ("nnunetv2", "nnunet-kd", "dynamic_network_architectures"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------------- set-up
def _dataset_name(dataset: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not os.environ.get("nnUNet_preprocessed"):
        raise BenchmarkError("nnUNet_preprocessed is not set. Export nnUNet_raw, nnUNet_preprocessed and "
                             "nnUNet_results as for nnUNetv2_train (documentation/setting_up_paths.md in nnU-Net).")
    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise BenchmarkError(f"-d {dataset}: no such dataset under nnUNet_preprocessed="
                             f"{os.environ['nnUNet_preprocessed']} ({e}). Run nnUNetv2_plan_and_preprocess -d "
                             f"{dataset} first, or point nnUNet_preprocessed at the right folder.") from e


def _parse_model_folder_name(folder: str) -> tuple[str, str, str]:
    parts = basename(abspath(folder)).split("__")
    if len(parts) != 3:
        raise BenchmarkError(f"--student {folder}: the folder name is not <Trainer>__<Plans>__<configuration>, so "
                             f"its trainer cannot be told. Pass the folder nnUNetv2_train wrote, or -tr <trainer>.")
    return parts[0], parts[1], parts[2]


def _resolve_inputs(dataset: str, configuration: str | None, fold, teacher: str | None, student_plans: str | None,
                    student: str | None, trainer: str | None) -> dict:
    """Check every input file before anything heavy runs; the errors name the file and the fix."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if (student_plans is None) == (student is None):
        raise BenchmarkError("Pass exactly one of --student-plans <student plans name> (an untrained student, planned "
                             "with nnUNetv2_kd_plan_student) or --student <trained student model folder>.")
    dataset_name = _dataset_name(dataset)
    preprocessed_base = join(os.environ["nnUNet_preprocessed"], dataset_name)
    out = {"dataset_name": dataset_name, "preprocessed_base": preprocessed_base, "student_folder": None}

    if student is not None:
        student = abspath(student)
        if not isdir(student):
            raise BenchmarkError(f"--student {student}: no such folder. Pass a trained student's model folder "
                                 f"($nnUNet_results/{dataset_name}/<KD trainer>__<student plans>__<configuration>), "
                                 f"or benchmark the untrained student with --student-plans <plans name>.")
        folder_trainer, _, folder_configuration = _parse_model_folder_name(student)
        for name in ("plans.json", "dataset.json"):
            if not isfile(join(student, name)):
                raise BenchmarkError(f"{join(student, name)} is missing: --student {student} is not a complete "
                                     f"nnU-Net model folder. Pass the folder nnUNetv2_train wrote.")
        plans_file = join(student, "plans.json")
        plans = load_json(plans_file)
        dataset_json = load_json(join(student, "dataset.json"))
        if configuration is None:
            configuration = folder_configuration
        elif configuration != folder_configuration:
            raise BenchmarkError(f"-c {configuration} but --student {student} was trained with configuration "
                                 f"'{folder_configuration}'. Drop -c or pass -c {folder_configuration}.")
        trainer = trainer or folder_trainer
        if plans.get("dataset_name") != dataset_name:
            raise BenchmarkError(f"{plans_file} belongs to dataset {plans.get('dataset_name')}, not -d {dataset} "
                                 f"({dataset_name}). Pass the matching -d.")
        out["student_folder"] = student
    else:
        if configuration is None:
            raise BenchmarkError("-c <configuration> is required with --student-plans (e.g. -c 3d_fullres).")
        plans_file = join(preprocessed_base, student_plans + ".json")
        if not isfile(plans_file):
            present = sorted(splitext(f)[0] for f in os.listdir(preprocessed_base) if f.endswith(".json")
                             and f not in ("dataset.json", "dataset_fingerprint.json", "splits_final.json")) \
                if isdir(preprocessed_base) else []
            raise BenchmarkError(f"Student plans not found: {plans_file}. Write them with nnUNetv2_kd_plan_student -d "
                                 f"{dataset} -c {configuration} --teacher <teacher model folder> -o {student_plans} "
                                 f"(plans present: {present or 'none'}).")
        plans = load_json(plans_file)
        dataset_json_file = join(preprocessed_base, "dataset.json")
        if not isfile(dataset_json_file):
            raise BenchmarkError(f"{dataset_json_file} is missing. Run nnUNetv2_plan_and_preprocess -d {dataset}.")
        dataset_json = load_json(dataset_json_file)
        trainer = trainer or DEFAULT_TRAINER

    recipe = plans.get(PLANS_KEY, {}).get(configuration) if isinstance(plans.get(PLANS_KEY), dict) else None
    if not isinstance(recipe, dict):
        raise BenchmarkError(f"{plans_file} has no distillation recipe for configuration '{configuration}' "
                             f"(plans['{PLANS_KEY}']['{configuration}']): these are not student plans. Write student "
                             f"plans with nnUNetv2_kd_plan_student -d {dataset} -c {configuration} --teacher <teacher "
                             f"model folder> -o <name> and pass --student-plans <name>.")
    plans = copy.deepcopy(plans)
    recipe = plans[PLANS_KEY][configuration]
    # One teacher ('teacher') or several ('teachers'): every one is checked, loaded and timed.
    entries = recipe["teachers"] if isinstance(recipe.get("teachers"), list) else [recipe.setdefault("teacher", {})]
    where = [f"kd.{configuration}.teachers[{i}]" if "teachers" in recipe else f"kd.{configuration}.teacher"
             for i in range(len(entries))]
    if teacher is not None:
        if len(entries) != 1:
            raise BenchmarkError(f"--teacher replaces the one teacher of the recipe, but {plans_file} names "
                                 f"{len(entries)} teachers ({where[0]}...). Leave --teacher out to benchmark them "
                                 f"all, or edit their model_folder entries in the plans.")
        teacher = abspath(teacher)
        if not isdir(teacher):
            raise BenchmarkError(
                f"--teacher {teacher}: teacher model folder not found. Pass the folder nnUNetv2_train wrote for the "
                f"teacher ($nnUNet_results/{dataset_name}/<Trainer>__<Plans>__<configuration>, the one given to "
                f"nnUNetv2_kd_plan_student), or leave --teacher out to use the one in {plans_file} "
                f"({entries[0].get('model_folder')}).")
        entries[0]["model_folder"] = teacher
    folders = []
    for entry, place in zip(entries, where):
        folder = entry.get("model_folder") if isinstance(entry, dict) else None
        if not folder or not isdir(folder):
            raise BenchmarkError(f"Teacher model folder not found: {folder} ({place}.model_folder in {plans_file}). "
                                 f"Pass --teacher <teacher model folder>" + (" (one-teacher plans only)."
                                                                             if len(entries) > 1 else "."))
        for name in ("plans.json", "dataset.json"):
            if not isfile(join(folder, name)):
                raise BenchmarkError(f"{join(folder, name)} is missing: the teacher {folder} ({place} in {plans_file})"
                                     f" is not a complete nnU-Net model folder. Pass the teacher's whole results "
                                     f"folder.")
        # Nothing is evaluated here, so a teacher that saw the student's validation cases does not matter.
        entry["allow_validation_overlap"] = True
        folders.append(folder)
    if configuration not in plans.get("configurations", {}):
        raise BenchmarkError(f"{plans_file} defines no configuration '{configuration}' (has "
                             f"{sorted(plans.get('configurations', {}))}). Pass one of them with -c.")
    fold = fold if fold == "all" else int(fold)
    out.update(plans=plans, plans_file=plans_file, dataset_json=dataset_json, configuration=configuration, fold=fold,
               teacher_folder=folders[0], teacher_folders=folders, trainer_name=trainer)
    return out


def _find_trainer_class(name: str):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_kd.trainer import nnUNetTrainerKD
    folder = str(trainers_dir())
    # nnU-Net's own search, over this plugin's trainers folder first, then nnU-Net's and nnUNet_extTrainer's.
    cls = recursive_find_python_class(folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True)
    if cls is None:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                cls = recursive_find_trainer_class_by_name(name)
        except RuntimeError as e:
            raise BenchmarkError(f"-tr {name}: no such trainer class in {folder}, nnU-Net or nnUNet_extTrainer. "
                                 f"Use a KD trainer such as {DEFAULT_TRAINER}.") from e
    if not (isinstance(cls, type) and issubclass(cls, nnUNetTrainer) and issubclass(cls, nnUNetTrainerKD)):
        raise BenchmarkError(f"-tr {name} is not a distillation trainer (not a subclass of nnUNetTrainerKD). "
                             f"Use a KD trainer such as {DEFAULT_TRAINER}.")
    if cls.kd_method == "none":
        raise BenchmarkError(f"-tr {name} trains without a teacher, so there is no distillation to benchmark. Use a "
                             f"KD trainer such as {DEFAULT_TRAINER}.")
    return cls


def draw_fixed_batches(trainer, count: int, device: torch.device) -> list[dict]:
    """``count`` batches from the trainer's own training dataloader (in-process, seeded), kept on the host."""
    with _environ(nnUNet_n_proc_DA="0"):  # single-threaded: no worker processes to manage for a few batches
        train_gen, val_gen = trainer.get_dataloaders()
    batches = []
    try:
        for _ in range(count):
            b = next(train_gen)
            target = [t.clone() for t in b["target"]] if isinstance(b["target"], (list, tuple)) else b["target"].clone()
            batch = {"data": b["data"].clone(), "target": target}
            if device.type == "cuda":  # as nnU-Net's augmenter does for GPU training
                batch["data"] = batch["data"].pin_memory()
                batch["target"] = [t.pin_memory() for t in target] if isinstance(target, list) else target.pin_memory()
            batches.append(batch)
    finally:
        for gen in (train_gen, val_gen):
            if hasattr(gen, "_finish"):
                gen._finish()
    return batches


def load_case_volume(trainer, case: str | None) -> tuple[str, torch.Tensor]:
    """A preprocessed case (default: the fold's first validation case), as nnU-Net's validation reads it."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    _, val_keys = trainer.do_split()
    folder = trainer.preprocessed_dataset_folder
    case = case or sorted(val_keys)[0]
    dataset = infer_dataset_class(folder)(folder, [case])
    try:
        data = dataset.load_case(case)[0][:]
    except (FileNotFoundError, OSError, KeyError) as e:
        raise BenchmarkError(f"--case {case}: not found in {folder} ({e}). Pass the identifier of a preprocessed "
                             f"case of this configuration.") from e
    return case, torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def _quiet_predictor(device: torch.device, use_mirroring: bool):
    import io
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    with contextlib.redirect_stdout(io.StringIO()):
        return nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                               perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                               verbose_preprocessing=False, allow_tqdm=False)


def in_memory_student_predictor(trainer, device: torch.device):
    """nnU-Net's predictor around a copy of the trainer's student (deep supervision off), as nnU-Net validates."""
    manager, cfg = trainer.plans_manager, trainer.configuration_manager
    network = type(trainer).build_network_architecture(manager, cfg, trainer.num_input_channels,
                                                       trainer.label_manager.num_segmentation_heads,
                                                       enable_deep_supervision=False)
    network.load_state_dict(trainer._student_module().state_dict())
    predictor = _quiet_predictor(device, use_mirroring=False)
    predictor.manual_initialization(network.to(device), manager, cfg, None, trainer.dataset_json,
                                    type(trainer).__name__, trainer.inference_allowed_mirroring_axes)
    return predictor


def _unwrapped(network: nn.Module) -> nn.Module:
    from torch._dynamo import OptimizedModule
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def _cost(network: nn.Module, input_channels: int, patch_size) -> dict:
    network = _unwrapped(network)
    return {"parameters": count_parameters(network),
            "flops_per_patch": count_flops(network, (1, input_channels, *[int(p) for p in patch_size])),
            "patch_size": [int(p) for p in patch_size]}


@contextlib.contextmanager
def teacher_disabled(trainer):
    """The trainer's own step with the teachers off: segmentation loss only (no teacher pass, no KD term)."""
    saved = trainer.distillation_enabled, trainer.loss_terms
    trainer.distillation_enabled, trainer.loss_terms = False, ["segmentation"]
    try:
        yield
    finally:
        trainer.distillation_enabled, trainer.loss_terms = saved
        if trainer.student_taps is not None:
            trainer.student_taps.pop()


def _equivalent_command(args: dict) -> str:
    argv = [PROG, "-d", str(args["dataset"])]
    for flag, key in (("-c", "configuration"), ("-f", "fold"), ("--teacher", "teacher"),
                      ("--student-plans", "student_plans"), ("--student", "student"),
                      ("--student-checkpoint", "student_checkpoint"), ("-tr", "trainer"), ("--device", "device"),
                      ("--steps", "steps"), ("--warmup", "warmup"), ("--inference-repeats", "inference_repeats"),
                      ("--inference-warmup", "inference_warmup"), ("--case", "case"), ("--seed", "seed"),
                      ("-o", "output")):
        if args.get(key) is not None:
            argv += [flag, str(args[key])]
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------------------- benchmark
def _benchmark_device(device: str | None) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda, but torch sees no CUDA device. Pass --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise BenchmarkError(f"--device {device}: use cpu or cuda.")
    # nnU-Net's trainer uses cuda:0; choose the GPU with CUDA_VISIBLE_DEVICES
    return torch.device("cuda", 0) if device.type == "cuda" else device


def _network_costs(kd, teacher_predictors: dict, student_predictor) -> dict:
    """Parameters and FLOPs per patch of every teacher, of the student and of the KD modules (adapters, heads)."""
    patch = kd.configuration_manager.patch_size
    cost = {"teachers": {name: _cost(p.network, kd.num_input_channels, patch) for name, p in teacher_predictors.items()},
            "student": _cost(student_predictor.network, kd.num_input_channels, patch),
            "adapters_parameters": count_parameters(kd.distillation)}
    # "teacher": what the student replaces, i.e. every teacher (one teacher: that teacher)
    cost["teacher"] = {k: sum(c[k] for c in cost["teachers"].values()) for k in ("parameters", "flops_per_patch")}
    cost["parameter_ratio_teacher_over_student"] = cost["teacher"]["parameters"] / cost["student"]["parameters"]
    cost["flops_ratio_teacher_over_student"] = cost["teacher"]["flops_per_patch"] / cost["student"]["flops_per_patch"]
    return cost


def time_training_steps(kd, batches: list[dict], steps: int, warmup: int, device: torch.device) -> tuple[dict, dict]:
    """The teacher's no-grad forward, the plain student step (the trainer with its teacher switched off) and the KD
    step, timed in turn on the same fixed batches; returns (timings, ratios). Checks that the plain step computed
    only the segmentation loss and the KD step every logged term."""
    kd.network.train()
    device_data = [b["data"].to(device) for b in batches]

    def teacher_forward(data):
        with torch.no_grad(), kd._autocast():
            for teacher in kd.teachers.values():
                teacher(data)
        for taps in kd.teacher_taps.values():
            taps.pop()

    plain_terms, kd_step_terms = [], []

    def plain_step_teacher_off(batch):
        with teacher_disabled(kd):
            out = kd.train_step(batch)
            plain_terms.append(len(out["terms"]))
            if kd.student_taps is not None:  # nobody pops the student's features when the teacher is off
                kd.student_taps.pop()

    def kd_step(batch):
        out = kd.train_step(batch)
        kd_step_terms.append(sorted(out["terms"]))

    training = time_interleaved({"teacher_forward": (teacher_forward, device_data),
                                 "plain_student_step": (plain_step_teacher_off, batches),
                                 "kd_step": (kd_step, batches)}, steps, warmup, device)
    if set(plain_terms) != {1}:
        raise RuntimeError(f"The plain student step computed {plain_terms} loss terms, expected only the "
                           f"segmentation loss: the teacher was not switched off.")
    if any(names != sorted(kd.logged_terms) for names in kd_step_terms) or len(kd.loss_terms) < 2:
        raise RuntimeError(f"The KD step returned the terms {kd_step_terms}, expected {kd.logged_terms}.")
    training["plain_student_step"]["loss_terms"] = ["segmentation"]
    training["kd_step"]["loss_terms"] = list(kd.logged_terms)
    plain_s, kd_s = training["plain_student_step"]["median_s"], training["kd_step"]["median_s"]
    teacher_s = training["teacher_forward"]["median_s"]
    # The same ratio round by round (the three calls of a round run back to back), then its median and quartiles:
    # a shared CPU's speed drifts between rounds, and the ratio of separate medians mixes rounds of different speed
    # (the README's KD-step section compares the two estimates over repeated identical runs)
    per_round = [k / (p + t) for k, p, t in zip(training["kd_step"]["all_s"], training["plain_student_step"]["all_s"],
                                                 training["teacher_forward"]["all_s"])]
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    ratios = {"kd_over_student_plus_teacher": kd_s / (plain_s + teacher_s),
              "kd_over_student_plus_teacher_paired": {"median": float(statistics.median(per_round)),
                                                      "quartiles": [float(quartiles[0]), float(quartiles[2])]},
              "kd_over_plain": kd_s / plain_s, "teacher_forward_over_plain": teacher_s / plain_s}
    return training, ratios


def time_inference(student_predictor, teacher_predictors: dict, volume: torch.Tensor, case: str, repeats: int,
                   warmup: int, device: torch.device, say) -> dict:
    """Sliding-window inference of the student and of every teacher on one volume, without and with mirroring:
    median seconds and peak memory (measured in the first, untimed call, never while timing)."""
    inference = {"teachers": {}}
    for who, predictor in (("student", student_predictor), *teacher_predictors.items()):
        record = inference[who] = {} if who == "student" else inference["teachers"].setdefault(who, {})
        record["mirror_axes"] = list(predictor.allowed_mirroring_axes or [])
        for mode, mirroring in (("mirroring_off", False), ("mirroring_on", True)):
            say(f"sliding-window inference, {who}, {mode.replace('_', ' ')} ({warmup} warm-up + {repeats} timed) on "
                f"case {case} {list(volume.shape)}")
            predictor.use_mirroring = mirroring
            with PeakMemory(device) as memory:
                predictor.predict_sliding_window_return_logits(volume)
                _synchronize(device)
            timing = median_inference_seconds(predictor, volume, repeats=repeats, warmup=max(0, warmup - 1))
            record[mode] = {**timing, **memory.result()}
    # "teacher": every teacher run in turn on the volume (one teacher: that teacher), as an ensemble of them would
    # be; its peak memory is the largest of theirs.
    per_teacher = list(inference["teachers"].values())
    inference["teacher"] = per_teacher[0] if len(per_teacher) == 1 else {
        mode: {"median_s": sum(t[mode]["median_s"] for t in per_teacher),
               "peak_memory_increase_bytes": max(t[mode]["peak_memory_increase_bytes"] for t in per_teacher)}
        for mode in ("mirroring_off", "mirroring_on")}
    for mode in ("mirroring_off", "mirroring_on"):
        inference[f"speedup_{mode}_teacher_over_student"] = \
            inference["teacher"][mode]["median_s"] / inference["student"][mode]["median_s"]
    return inference


def _write_results(results: dict, output: str, say) -> None:
    """The results as .json and the summary as .md beside it."""
    output = abspath(output)
    os.makedirs(dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    with open(splitext(output)[0] + ".md", "w") as f:
        f.write(format_summary(results) + "\n")
    say(f"wrote {output} and {splitext(output)[0] + '.md'}")


def run_benchmark(dataset: str, configuration: str | None = None, fold="0", teacher: str | None = None,
                  student_plans: str | None = None, student: str | None = None, trainer: str | None = None,
                  device: str | None = None, steps: int = 20, warmup: int = 3, inference_repeats: int = 3,
                  inference_warmup: int = 1, case: str | None = None, output: str | None = None, seed: int = 12345,
                  student_checkpoint: str = "checkpoint_final.pth", command: str | None = None,
                  verbose: bool = True) -> dict:
    """Run the benchmark (see the module docstring) and return its results; write ``output`` (.json) and the
    markdown table beside it (.md) when given. Prints the ratios, then the table."""
    arguments = dict(locals())
    if steps < 1 or warmup < 0 or inference_repeats < 1 or inference_warmup < 0:
        raise BenchmarkError(f"--steps and --inference-repeats must be >= 1, --warmup and --inference-warmup >= 0 "
                             f"(got {steps}, {inference_repeats}, {warmup}, {inference_warmup}).")
    device = _benchmark_device(device)
    arguments["device"] = device.type
    command = command or _equivalent_command(arguments)

    def say(*a):
        if verbose:
            print(f"[{PROG}]", *a, flush=True)

    inputs = _resolve_inputs(dataset, configuration, fold, teacher, student_plans, student, trainer)
    configuration, fold = inputs["configuration"], inputs["fold"]
    if inputs["student_folder"]:
        checkpoint_file = join(inputs["student_folder"], f"fold_{fold}", student_checkpoint)
        if not isfile(checkpoint_file):
            raise BenchmarkError(f"Student checkpoint not found: {checkpoint_file}. Train fold {fold} of the student "
                                 f"first, pass --student-checkpoint <name>, or benchmark the untrained student with "
                                 f"--student-plans {inputs['plans']['plans_name']}.")

    scratch = tempfile.mkdtemp(prefix="nnunet_kd_benchmark_")
    try:
        # The trainer writes its log (and nothing else here) under nnUNet_results: keep it in a scratch folder.
        with _environ(nnUNet_results=scratch, nnUNet_extTrainer=_ext_trainer_path()):
            trainer_class = _find_trainer_class(inputs["trainer_name"])
            plans = copy.deepcopy(inputs["plans"])
            plans["continue_training"] = False
            torch.manual_seed(seed)
            np.random.seed(seed)
            import random
            random.seed(seed)
            kd = trainer_class(plans, configuration, fold, inputs["dataset_json"], device=device)
            if kd.is_cascaded:
                raise BenchmarkError(f"Configuration '{configuration}' is cascaded (needs the previous stage's "
                                     f"predictions); benchmark its previous stage or a non-cascaded configuration.")
            kd.initialize()
            recipe = kd.kd_recipe
            n_batches = max(1, min(steps, 4))
            patch = kd.configuration_manager.patch_size
            say(f"drawing {n_batches} fixed batch(es) of {kd.batch_size} x {list(patch)} from the training dataloader")
            batches = draw_fixed_batches(kd, n_batches, device)
            case, volume = load_case_volume(kd, case)

            teacher_predictors = {t.name: make_predictor(folder, t.fold_for_student(fold), t.checkpoint, device=device)
                                  for t, folder in zip(recipe.teachers, inputs["teacher_folders"])}
            if inputs["student_folder"]:
                student_predictor = make_predictor(inputs["student_folder"], fold, student_checkpoint, device=device)
                student_weights = f"trained checkpoint {join(inputs['student_folder'], f'fold_{fold}', student_checkpoint)}"
            else:
                student_predictor = in_memory_student_predictor(kd, device)
                student_weights = ("in-memory network of the trainer (untrained: only --student-plans was given; "
                                   "inference time does not depend on the weight values)")
            cost = _network_costs(kd, teacher_predictors, student_predictor)
            say(f"timing the teacher's no-grad forward, the plain student step and the KD step, in turn "
                f"({warmup} warm-up + {steps} timed rounds)")
            training, ratios = time_training_steps(kd, batches, steps, warmup, device)
            inference = time_inference(student_predictor, teacher_predictors, volume, case, inference_repeats,
                                       inference_warmup, device, say)
            from torch._dynamo import OptimizedModule
            compiled = isinstance(kd.network, OptimizedModule)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    results = {
        "command": command,
        "environment": {**device_description(device), "versions": _versions()},
        "setup": {
            "dataset": inputs["dataset_name"], "configuration": configuration, "fold": fold,
            "trainer": inputs["trainer_name"], "kd_method": trainer_class.kd_method,
            "student_plans_file": inputs["plans_file"], "student_folder": inputs["student_folder"],
            "student_inference_weights": student_weights,
            "teacher_folder": inputs["teacher_folder"], "teacher_fold": recipe.teacher.fold_for_student(fold),
            "teacher_checkpoint": recipe.teacher.checkpoint, "kd_weights": dict(kd.loss_weights),
            "teachers": [{"name": t.name, "folder": folder, "fold": t.fold_for_student(fold), "checkpoint": t.checkpoint}
                         for t, folder in zip(recipe.teachers, inputs["teacher_folders"])],
            "batch_size": int(kd.batch_size), "patch_size": [int(p) for p in patch],
            "fixed_batches": n_batches, "batch_source": "trainer.get_dataloaders() training stream, single-threaded, "
                                                        f"seed {seed}, drawn once and reused cyclically",
            "steps": steps, "warmup": warmup, "inference_repeats": inference_repeats,
            "inference_warmup": inference_warmup, "case": case, "case_shape": list(volume.shape),
            "torch_compile": compiled, "autocast": device.type == "cuda",
            "memory_measure": training["kd_step"]["memory_measure"],
        },
        "ratios": ratios,
        "cost": cost,
        "training": training,
        "inference": inference,
    }
    if verbose:
        print(format_summary(results), flush=True)
    if output:
        _write_results(results, output, say)
    return results


# ------------------------------------------------------------------------------------------------- report
def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


def format_ratios(results: dict) -> str:
    r, t = results["ratios"], results["training"]
    paired = r["kd_over_student_plus_teacher_paired"]
    return "\n".join([
        f"KD step / (plain student step + teacher forward) = {r['kd_over_student_plus_teacher']:.3f}  "
        f"({_ms(t['kd_step']['median_s'])} / ({_ms(t['plain_student_step']['median_s'])} + "
        f"{_ms(t['teacher_forward']['median_s'])}))",
        f"KD step / (plain student step + teacher forward), round by round: median {paired['median']:.3f} "
        f"(quartiles {paired['quartiles'][0]:.3f}-{paired['quartiles'][1]:.3f})",
        f"KD step / plain student step = {r['kd_over_plain']:.3f}",
    ])


def format_table(results: dict) -> str:
    """Markdown: ratios first, then one table of cost, inference and training numbers."""
    s, c, inf, tr = results["setup"], results["cost"], results["inference"], results["training"]
    env = results["environment"]
    mem = {"cuda_max_memory_allocated": "peak CUDA memory allocated (increase)",
           "cpu_rss_sampled_5ms": "peak RSS increase (CPU, sampled)",
           "cpu_ru_maxrss": "peak RSS increase (CPU, getrusage)"}[s["memory_measure"]]
    several = len(c.get("teachers", {})) > 1
    # columns: each teacher (when there are several), all teachers together (or the one teacher), the student
    names = list(c["teachers"]) if several else []
    costs = [c["teachers"][n] for n in names] + [c["teacher"], c["student"]]
    runs = [inf["teachers"][n] for n in names] + [inf["teacher"], inf["student"]]
    rows = [("parameters", *[format_count(x["parameters"]) for x in costs]),
            (f"FLOPs / patch {s['patch_size']}", *[format_count(x["flops_per_patch"]) for x in costs])]
    for mode, label in (("mirroring_off", "no mirroring"), ("mirroring_on", "mirroring")):
        rows.append((f"inference, {label} (median s)", *[f"{x[mode]['median_s']:.3f}" for x in runs]))
        rows.append((f"inference, {label}: {mem}", *[_mib(x[mode]["peak_memory_increase_bytes"]) for x in runs]))
    columns = names + (["all teachers (in turn)"] if several else ["teacher"]) + ["student"]
    lines = [f"Device: {env['device_name']}; torch {env['versions']['torch']}, nnunetv2 "
             f"{env['versions']['nnunetv2']}. {s['dataset']} {s['configuration']} fold {s['fold']}, trainer "
             f"{s['trainer']}, batch {s['batch_size']} x {s['patch_size']}; medians of {s['steps']} steps after "
             f"{s['warmup']} warm-up; inference on case {s['case']} {s['case_shape']} ({s['inference_repeats']} "
             f"repeats). Student inference weights: {s['student_inference_weights']}.", "",
             "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", f"| training step | median | {mem} |", "|---|---|---|"]
    for key, label in (("plain_student_step", "plain student step (segmentation loss only)"),
                       ("teacher_forward", "teacher forward, no grad" + (" (every teacher)" if several else "")),
                       ("kd_step", f"KD step ({' + '.join(tr['kd_step']['loss_terms'])})")):
        lines.append(f"| {label} | {_ms(tr[key]['median_s'])} | {_mib(tr[key]['peak_memory_increase_bytes'])} |")
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    return format_ratios(results) + "\n\n" + format_table(results)


# ------------------------------------------------------------------------------------------------- CLI
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help text does not state the default itself, X is a real value (not
    None) and the option is not required, so no option shows two contradicting defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-d", required=True, help="Dataset name or ID")
    parser.add_argument("-c", default=None, help="Configuration, e.g. 3d_fullres (required with --student-plans; "
                                                 "default with --student: the one in its folder name)")
    parser.add_argument("-f", default="0", help="Fold (a number or 'all')")
    parser.add_argument("--teacher", default=None, help="Teacher model folder (default: the one in the student "
                                                        "plans' recipe)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--student-plans", default=None, help="Student plans name in nnUNet_preprocessed/<dataset> "
                                                           "(written by nnUNetv2_kd_plan_student); untrained student")
    who.add_argument("--student", default=None, help="Trained student model folder <Trainer>__<Plans>__<config>")
    parser.add_argument("--student-checkpoint", default="checkpoint_final.pth", help="With --student")
    parser.add_argument("-tr", default=None, help=f"KD trainer class (default: {DEFAULT_TRAINER}, or the trainer "
                                                  f"of the --student folder)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="Device (default: cuda if torch sees a CUDA device, else cpu)")
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed warm-up steps per measurement")
    parser.add_argument("--inference-repeats", type=int, default=3, help="Timed sliding-window predictions")
    parser.add_argument("--inference-warmup", type=int, default=1, help="Untimed sliding-window predictions")
    parser.add_argument("--case", default=None, help="Preprocessed case for inference (default: the fold's first "
                                                     "validation case in splits_final.json)")
    parser.add_argument("--seed", type=int, default=12345,
                        help="Seed (python, numpy, torch) set before the trainer is built and the batches are drawn")
    parser.add_argument("-o", default=None, help="Output JSON (the markdown table goes beside it as .md; default: "
                                                 "kd_benchmark_<d>_<configuration>_fold<f>_<device>.json in the "
                                                 "current folder)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Threads as nnUNetv2_train sets them.
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    command = " ".join(shlex.quote(a) for a in [PROG] + list(sys.argv[1:] if argv is None else argv))
    configuration_name = args.c
    if configuration_name is None and args.student is not None:  # as the help says: the --student folder's one
        parts = basename(abspath(args.student)).split("__")
        configuration_name = parts[2] if len(parts) == 3 else None
    output = args.o or f"kd_benchmark_{args.d}_{configuration_name or 'cfg'}_fold{args.f}_{device}.json"
    try:
        run_benchmark(args.d, args.c, args.f, teacher=args.teacher, student_plans=args.student_plans,
                      student=args.student, trainer=args.tr, device=device, steps=args.steps, warmup=args.warmup,
                      inference_repeats=args.inference_repeats, inference_warmup=args.inference_warmup, case=args.case,
                      output=output, seed=args.seed, student_checkpoint=args.student_checkpoint, command=command)
    except (BenchmarkError, RecipeError, TeacherError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
