"""Running the real nnU-Net commands for a teacher / plain student / KD student comparison.

Used by the demo (``nnUNetv2_kd_demo``), the benchmark runner and the end-to-end tests: every step is the
command a user would type (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``, ``nnUNetv2_kd_plan_student``),
run as a subprocess with its output streamed, so what is measured is the real workflow.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from os.path import isfile, join

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_kd.recipe import PLANS_KEY
from nnunet_kd.resources import trainers_dir

# Single-process data augmentation and export: on a 2-core machine the worker processes cost more than
# they save (nnU-Net's validation of a tiny dataset: 55 s with workers, 14 s without).
CPU_FRIENDLY_ENV = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}


def nnunet_env(workdir: str, cpu_friendly: bool = True) -> dict:
    """Environment with nnU-Net's three folders inside ``workdir`` and our trainers on nnUNet_extTrainer."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": join(workdir, "nnUNet_raw"),
        "nnUNet_preprocessed": join(workdir, "nnUNet_preprocessed"),
        "nnUNet_results": join(workdir, "nnUNet_results"),
        "nnUNet_extTrainer": str(trainers_dir()),
        "PYTHONUNBUFFERED": "1",
    })
    if cpu_friendly:
        env.update(CPU_FRIENDLY_ENV)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key], exist_ok=True)
    return env


def console_script(name: str) -> list[str]:
    """A console script of this environment (also when its bin/ folder is not on PATH)."""
    candidate = join(os.path.dirname(sys.executable), name)
    return [candidate] if isfile(candidate) else [name]


def run(command: list[str], env: dict, log_file: str | None = None, quiet: bool = False) -> float:
    """Run a command, streaming its output (and appending it to log_file). Returns seconds; raises on failure."""
    start = time.time()
    print(f"$ {' '.join(command)}", flush=True)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        log = open(log_file, "a") if log_file else None
        tail = []
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            if log:
                log.write(line)
            if not quiet:
                print("  " + line, end="", flush=True)
        if log:
            log.close()
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"Command failed with exit code {proc.returncode}: {' '.join(command)}\n"
                           + "".join(tail))
    return time.time() - start


def write_budget_plans(preprocessed_base: str, source_plans: str, plans_name: str, configuration: str,
                       num_epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int,
                       seed: int | None = None, max_batch_size: int | None = None) -> str:
    """A copy of nnU-Net's own plans whose only change is a training length (and seed), for nnUNetTrainerBudget.

    This is how the demo trains a teacher briefly: the network is exactly nnU-Net's default one, and the folder
    nnUNetTrainerBudget writes is a plain nnU-Net model.
    ``max_batch_size`` caps the configuration's batch size (nnU-Net plans a 2d batch of several hundred tiny slices
    on small datasets, which a CPU cannot train at any useful pace); students planned from this teacher inherit it.
    """
    plans = load_json(join(preprocessed_base, source_plans + ".json"))
    plans = copy.deepcopy(plans)
    plans["plans_name"] = plans_name
    if max_batch_size is not None:
        cfg = plans["configurations"][configuration]
        cfg["batch_size"] = min(int(cfg.get("batch_size", max_batch_size)), max_batch_size)
    plans[PLANS_KEY] = {configuration: {"training": {"num_epochs": num_epochs,
                                                     "num_iterations_per_epoch": iterations_per_epoch,
                                                     "num_val_iterations_per_epoch": val_iterations_per_epoch,
                                                     "seed": seed}}}
    out = join(preprocessed_base, plans_name + ".json")
    save_json(plans, out, sort_keys=False)
    return out


def model_folder(results_root: str, dataset_name: str, trainer: str, plans_name: str, configuration: str) -> str:
    return join(results_root, dataset_name, f"{trainer}__{plans_name}__{configuration}")


# Trainer -> the names older versions of this project trained the same model with. A run of a workspace made by an
# older version (finished or interrupted) is reused or resumed under its own name instead of being trained again.
LEGACY_TRAINERS = {"nnUNetTrainerBudget": ("nnUNetTrainerKD_NoKD",)}


def trainer_of_existing_run(results_root: str, dataset_name: str, trainer: str, plans_name: str, configuration: str,
                            fold: int | str) -> str:
    """``trainer``, unless only an older name of it has a checkpoint of this plans, configuration and fold."""
    def has_checkpoint(name: str) -> bool:
        fold_folder = join(model_folder(results_root, dataset_name, name, plans_name, configuration), f"fold_{fold}")
        return any(isfile(join(fold_folder, f"checkpoint_{c}.pth")) for c in ("final", "latest", "best"))
    if has_checkpoint(trainer):
        return trainer
    return next((old for old in LEGACY_TRAINERS.get(trainer, ()) if has_checkpoint(old)), trainer)


def validation_summary(folder: str, fold: int | str) -> dict:
    """Per-class and mean foreground Dice from nnU-Net's own evaluation of the fold's validation cases."""
    summary = load_json(join(folder, f"fold_{fold}", "validation", "summary.json"))
    return {"dice_per_class": {k: v["Dice"] for k, v in summary["mean"].items()},
            "mean_dice": summary["foreground_mean"]["Dice"]}


def fresh_folder(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty. Pass --overwrite to replace it, or choose "
                                  f"another --workdir.")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
