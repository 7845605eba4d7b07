"""Teacher vs plain student vs distilled students, trained with the real nnU-Net commands on one budget.

This is the engine of both ``nnUNetv2_kd_demo`` (a generated dataset, minutes on a CPU) and the quality runner
``benchmarks/run_quality.py`` (any dataset in nnU-Net raw format, longer budgets). Every step is the command a
user types, run as a subprocess:

1. ``nnUNetv2_plan_and_preprocess`` (skipped when the dataset is already preprocessed);
2. a teacher: nnU-Net's default network, trained on the budget (``nnUNetTrainerBudget`` with a copy of
   nnU-Net's plans that only changes the training length; a plain nnU-Net model), or an existing teacher model folder;
3. ``nnUNetv2_kd_plan_student``: one student plans file for every student;
4. ``nnUNetv2_train`` for each student trainer and fold, same budget and same seed: the plain student and each
   distillation method start from the same weights and see the same batches (single-process augmentation);
5. nnU-Net's own validation of each fold (``summary.json``) gives Dice per class; parameters and FLOPs come
   from the plans, inference time from nnU-Net's predictor.

Runs that already finished (``checkpoint_final.pth`` present) are reused, so an interrupted comparison resumes; a
finished run trained with other plans (another budget, width or seed) is refused, never silently reported.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from os.path import isfile, join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_kd.cost import format_count, make_predictor, median_inference_seconds, network_cost
from nnunet_kd.pipeline import (console_script, model_folder, run, trainer_of_existing_run, validation_summary,
                                write_budget_plans)
from nnunet_kd.recipe import PLANS_KEY

TEACHER_TRAINER = "nnUNetTrainerBudget"
# Row label -> trainer class. "plain student" is the baseline every KD row is measured against; "logit KD" is the
# recipe of Fast-nnUNet's distillation trainer (logit KL only, T=3, alpha=0.3, full resolution), our peer.
STUDENT_TRAINERS = {
    "plain student": "nnUNetTrainerBudget",
    "logit KD (Fast-nnUNet recipe)": "nnUNetTrainerKD_Logit",
    "Adaptive KD": "nnUNetTrainerKD_Adaptive",
    "MSKD": "nnUNetTrainerMSKD",
}
METHOD_ALIASES = {"plain": "plain student", "logit": "logit KD (Fast-nnUNet recipe)", "adaptive": "Adaptive KD",
                  "mskd": "MSKD"}


@dataclass
class Budget:
    teacher_epochs: int
    student_epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int = 10
    seed: int = 12345


@dataclass
class Comparison:
    """What to compare. ``methods``: keys of METHOD_ALIASES (the plain student is always included)."""
    dataset_id: int
    dataset_name: str  # DatasetXXX_Name
    configuration: str
    budget: Budget
    folds: list = field(default_factory=lambda: [0])
    methods: list = field(default_factory=lambda: ["plain", "adaptive"])
    width: float = 0.25
    device: str = "cpu"
    teacher_folder: str | None = None  # an existing teacher; else one is trained on the budget
    teacher_plans: str = "nnUNetPlans_kdcompare_teacher"
    student_plans: str = "nnUNetPlans_kdcompare_student"
    inference_repeats: int = 3


def _step(title: str, started: float) -> None:
    print(f"\n=== [{time.time() - started:6.0f} s] {title}", flush=True)


def device_label(device: str) -> str:
    """'cpu-2cores' or the GPU's name, for results file names and tables."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "-")
    return f"cpu-{os.cpu_count()}cores"


def train_or_reuse(env: dict, log: str, dataset_id: int, dataset_name: str, configuration: str, fold: int,
                   trainer: str, plans: str, device: str, quiet: bool = False) -> tuple[str, bool]:
    """``nnUNetv2_train`` unless the run is finished (then it is reused, after checking it was trained with these
    plans); an interrupted run resumes with ``--c``. A run an older version of this project trained under an older
    trainer name (pipeline.LEGACY_TRAINERS) is reused or resumed under that name. Returns (model folder, whether
    nnU-Net ran)."""
    trainer = trainer_of_existing_run(env["nnUNet_results"], dataset_name, trainer, plans, configuration, fold)
    folder = model_folder(env["nnUNet_results"], dataset_name, trainer, plans, configuration)
    if isfile(join(folder, f"fold_{fold}", "checkpoint_final.pth")) and \
            isfile(join(folder, f"fold_{fold}", "validation", "summary.json")):
        _check_same_plans(folder, join(env["nnUNet_preprocessed"], dataset_name, plans + ".json"), fold)
        print(f"reusing finished run {folder}/fold_{fold}")
        return folder, False
    command = console_script("nnUNetv2_train") + [str(dataset_id), configuration, str(fold), "-tr", trainer,
                                                  "-p", plans, "-device", device]
    if isfile(join(folder, f"fold_{fold}", "checkpoint_latest.pth")):
        command.append("--c")  # an interrupted run: nnU-Net resumes it
    if quiet:  # nnU-Net's output goes to the log only
        print(f"  training {trainer} {plans}", flush=True)
    run(command, env, log, quiet=quiet)
    return folder, True


def _train(env: dict, log: str, comparison: Comparison, trainer: str, plans: str, fold: int) -> str:
    c = comparison
    return train_or_reuse(env, log, c.dataset_id, c.dataset_name, c.configuration, fold, trainer, plans, c.device)[0]


class StaleRunError(RuntimeError):
    """A finished run in the workdir was trained with other plans than the comparison asks for now."""


def _check_same_plans(folder: str, plans_file: str, fold: int) -> None:
    """A finished run is reused only when it was trained with exactly the plans of this comparison (the plans copy
    nnU-Net keeps in the model folder): a rerun with a longer budget, another width or seed must not silently
    report the old models. Nothing is deleted: the user chooses."""
    from nnunet_kd.recipe import without_nulls

    used = join(folder, "plans.json")
    if isfile(used) and isfile(plans_file) and without_nulls(load_json(used)) != without_nulls(load_json(plans_file)):
        raise StaleRunError(
            f"{folder}/fold_{fold} is a finished run, but it was trained with other plans ({used}) than this "
            f"comparison asks for ({plans_file}: another budget, width or seed). Use a new --workdir, or delete "
            f"{folder}/fold_{fold} to train it again.")


def inference_seconds(folder: str, fold: int, data: torch.Tensor, device: str, repeats: int) -> dict:
    """Sliding-window prediction times of one preprocessed case with nnU-Net's predictor (no mirroring), after one
    untimed call: {'median_s', 'all_s'}."""
    predictor = make_predictor(folder, fold, device=torch.device(device), use_mirroring=False)
    return median_inference_seconds(predictor, data, repeats=repeats, warmup=1)


def _inference_text(median_s: float, all_s: list | None) -> str:
    from nnunet_kd.cost import seconds_with_range
    several = all_s is not None and len(all_s) > 1
    return seconds_with_range(median_s, min(all_s) if several else None, max(all_s) if several else None, digits=2)


def training_curves(folder: str, fold: int) -> dict:
    """nnU-Net's per-epoch log (losses, pseudo Dice, EMA pseudo Dice) from the final checkpoint."""
    from nnunet_kd.teacher import load_nnunet_checkpoint
    logging = load_nnunet_checkpoint(join(folder, f"fold_{fold}", "checkpoint_final.pth"))["logging"]
    keys = ("train_losses", "val_losses", "ema_fg_dice")
    return {k: [float(v) for v in logging[k]] for k in keys if k in logging}


def run_comparison(comparison: Comparison, env: dict, log: str, preprocess: bool = True) -> dict:
    """Train what is missing and measure everything. ``env``: nnU-Net's folders + nnUNet_extTrainer set."""
    started = time.time()
    c, b = comparison, comparison.budget
    preprocessed_base = join(env["nnUNet_preprocessed"], c.dataset_name)

    _step("nnU-Net planning and preprocessing", started)
    if preprocess and not isfile(join(preprocessed_base, "nnUNetPlans.json")):
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0: plan without it.
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        run(console_script("nnUNetv2_plan_and_preprocess") + ["-d", str(c.dataset_id), "-c", c.configuration,
                                                              "-np", "1", "--verify_dataset_integrity"], plan_env, log)
    else:
        print(f"using the existing preprocessed data in {preprocessed_base}")

    if c.teacher_folder is None:
        _step(f"teacher: nnU-Net's default network, {b.teacher_epochs} x {b.iterations_per_epoch} iterations", started)
        write_budget_plans(preprocessed_base, "nnUNetPlans", c.teacher_plans, c.configuration, b.teacher_epochs,
                           b.iterations_per_epoch, b.val_iterations_per_epoch, seed=b.seed)
        for fold in c.folds:
            teacher_folder = _train(env, log, c, TEACHER_TRAINER, c.teacher_plans, fold)
    else:
        teacher_folder = c.teacher_folder

    _step(f"student plans (width {c.width}) from {teacher_folder}", started)
    run(console_script("nnUNetv2_kd_plan_student") + [
        "-d", str(c.dataset_id), "-c", c.configuration, "--teacher", teacher_folder, "--width", str(c.width),
        "-o", c.student_plans, "--epochs", str(b.student_epochs), "--iterations-per-epoch", str(b.iterations_per_epoch),
        "--val-iterations-per-epoch", str(b.val_iterations_per_epoch), "--seed", str(b.seed), "--overwrite"], env, log)

    models = {"teacher": teacher_folder}
    labels = ["plain student"] + [METHOD_ALIASES[m] for m in c.methods if METHOD_ALIASES[m] != "plain student"]
    for label in labels:
        for fold in c.folds:
            _step(f"{label}, fold {fold}: {b.student_epochs} x {b.iterations_per_epoch} iterations", started)
            models[label] = _train(env, log, c, STUDENT_TRAINERS[label], c.student_plans, fold)

    _step("evaluation, cost and inference time", started)
    # nnU-Net's predictor runs in this process and finds trainer classes through os.environ.
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")})
    splits = load_json(join(preprocessed_base, "splits_final.json"))
    dataset_json = load_json(join(preprocessed_base, "dataset.json"))
    student_plans = load_json(join(preprocessed_base, c.student_plans + ".json"))
    data_folder = join(preprocessed_base, student_plans["configurations"][c.configuration]["data_identifier"])
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    case = splits[c.folds[0]]["val"][0]
    volume = torch.from_numpy(np.asarray(infer_dataset_class(data_folder)(data_folder, [case]).load_case(case)[0][:]))
    rows = []
    for label, folder in models.items():
        plans = load_json(join(folder, "plans.json"))
        per_fold = [validation_summary(folder, fold) for fold in c.folds]
        dice = {k: float(np.mean([f["dice_per_class"][k] for f in per_fold])) for k in per_fold[0]["dice_per_class"]}
        cost = network_cost(plans, dataset_json, c.configuration)
        inference = inference_seconds(folder, c.folds[0], volume, c.device, c.inference_repeats)
        rows.append({"model": label, "trainer": os.path.basename(folder).split("__")[0], "folder": folder,
                     "dice_per_class": dice, "mean_dice": float(np.mean([f["mean_dice"] for f in per_fold])),
                     "mean_dice_per_fold": [f["mean_dice"] for f in per_fold],
                     "parameters": cost["parameters"], "flops_per_patch": cost["flops_per_patch"],
                     "iterations_per_epoch": int(plans.get(PLANS_KEY, {}).get(c.configuration, {}).get(
                         "training", {}).get("num_iterations_per_epoch") or NNUNET_DEFAULT_ITERATIONS_PER_EPOCH),
                     "inference_s": inference["median_s"], "inference_all_s": inference["all_s"],
                     "curves": {str(fold): training_curves(folder, fold) for fold in c.folds}})
    add_gap_closed(rows)
    class_ids = sorted(rows[0]["dice_per_class"], key=int)
    names = {str(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    return {"dataset": c.dataset_name, "configuration": c.configuration, "device": c.device,
            "device_name": device_label(c.device), "host": platform.node(), "torch": torch.__version__,
            "budget": asdict(b), "folds": c.folds, "width": c.width, "case_for_inference": case,
            "inference_volume_shape": list(volume.shape), "labels": {k: names.get(k, k) for k in class_ids},
            "models": rows, "table": format_table(rows, class_ids, names),
            "seconds": round(time.time() - started, 1)}


def add_gap_closed(rows: list[dict]) -> None:
    """gap closed = (KD - plain) / (teacher - plain) on mean Dice; None where the teacher is not better."""
    by_model = {r["model"]: r for r in rows}
    teacher, plain = by_model["teacher"]["mean_dice"], by_model["plain student"]["mean_dice"]
    for r in rows:
        r["gap_closed"] = None
        if r["model"] not in ("teacher", "plain student") and teacher - plain > 1e-9:
            r["gap_closed"] = (r["mean_dice"] - plain) / (teacher - plain)


def format_table(rows: list[dict], class_ids: list[str], names: dict | None = None) -> str:
    """Markdown table; with several folds a column shows each fold's mean Dice, so the spread is visible."""
    names = names or {}
    several_folds = any(len(r.get("mean_dice_per_fold") or []) > 1 for r in rows)
    runs = max((len(r.get("inference_all_s") or []) for r in rows), default=0)
    infer = f"infer s, median [range] of {runs}" if runs > 1 else "infer s"
    header = (["model", "params", "FLOPs/patch", infer] + [f"Dice {names.get(k, k)}" for k in class_ids]
              + ["mean Dice"] + (["mean Dice per fold"] if several_folds else []) + ["gap closed"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        gap = "" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f}%"
        per_fold = [" / ".join(f"{d:.4f}" for d in r["mean_dice_per_fold"])] if several_folds else []
        cells = ([r["model"], format_count(r["parameters"]), format_count(r["flops_per_patch"]),
                  _inference_text(r["inference_s"], r.get("inference_all_s"))]
                 + [f"{r['dice_per_class'][k]:.4f}" for k in class_ids]
                 + [f"{r['mean_dice']:.4f}"] + per_fold + [gap])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NNUNET_DEFAULT_ITERATIONS_PER_EPOCH = 250  # nnUNetTrainer's, for a model whose plans carry no training budget


def _iterations_per_epoch(result: dict, row: dict) -> int:
    """The row's own iterations per epoch (recorded by run_comparison from its plans), else the budget's."""
    return int(row.get("iterations_per_epoch") or result["budget"]["iterations_per_epoch"])


def plot_results(result: dict, out_prefix: str) -> list[str]:
    """<prefix>_dice_vs_params.png and <prefix>_curves.png; returns the written paths.

    Dice vs parameters: one marker shape and colour per model, named in a legend beside the axes (students share a
    parameter count and often a Dice, so text labels at the points would overlap); markers are hollow and of
    decreasing size, so coinciding points stay visible. Curves: every model on one x axis of training iterations
    (epoch x iterations per epoch), so a teacher trained longer than the students is drawn to scale.
    """
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    paths = []
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = result["models"]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for i, r in enumerate(models):
        ax.scatter(r["parameters"], r["mean_dice"], marker=markers[i % len(markers)],
                   s=max(150 - 25 * i, 30), facecolors="none", edgecolors=colours[i % len(colours)], linewidths=1.8,
                   label=f"{r['model']}: {format_count(r['parameters'])} params, Dice {r['mean_dice']:.3f}", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("mean foreground Dice (validation)")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    ax.set_title(f"{result['dataset']} {result['configuration']} ({result['device_name']})", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, borderaxespad=0.0)
    fig.tight_layout()
    paths.append(out_prefix + "_dice_vs_params.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    fold = str(result["folds"][0])
    for i, r in enumerate(models):
        curves = r["curves"][fold]
        step = _iterations_per_epoch(result, r)
        style = dict(color=colours[i % len(colours)], label=r["model"],
                     linestyle="--" if r["model"] == "teacher" else "-")
        for ax, key in ((axes[0], "ema_fg_dice"), (axes[1], "val_losses")):
            if curves.get(key):
                # nnU-Net logs each value at the end of an epoch: epoch index e (from 0) is after (e+1)*step iterations
                iterations = (np.arange(len(curves[key])) + 1) * step
                ax.plot(iterations, curves[key], marker=".", **style)
    axes[0].set_title("EMA pseudo Dice (nnU-Net's progress metric)", fontsize=9)
    axes[1].set_title("validation loss (Dice + CE)", fontsize=9)
    b = result["budget"]
    for ax in axes:
        ax.set_xlabel(f"training iterations (teacher {b['teacher_epochs']}, students {b['student_epochs']} epochs "
                      f"x {b['iterations_per_epoch']})", fontsize=8)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 5)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    paths.append(out_prefix + "_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def save_result(result: dict, json_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    with open(json_path[:-len(".json")] + ".md", "w") as f:
        f.write(result["table"] + "\n")
