"""Recipe sweep on validation cases: which settings of a KD method to ship, decided without the test cases.

``benchmarks/run_recipe_sweep.py`` drives it. It reuses the held-out protocol's workspace (nnunet_kd.evidence:
the same split, the same teacher, trained on fold 0 of the training cases only) and trains, for every seed, the
plain student and one student per *variant* of the method's recipe (a variant is a list of the student planner's
``--set KEY=VALUE`` overrides, defined in a sweep file, e.g. ``benchmarks/sweeps/adaptive.json``). Every model is
scored on fold 0's validation cases, full volumes, by nnU-Net's own end-of-training validation
(``fold_0/validation/summary.json``); the test cases are never predicted. Each variant is compared, paired by case
and seed, with the sweep's baseline variant (the shipped preset) and with the plain student.
"""
from __future__ import annotations

import os
from os.path import isfile, join

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_kd.atomic_files import write_json_atomically, write_text_atomically
from nnunet_kd.evidence.protocol import number_tag, variant_differences
from nnunet_kd.evidence.records import validation_curves, voxel_volume_ml
from nnunet_kd.evidence.report import format_ci
from nnunet_kd.evidence.statistics import mean_foreground_dice, paired_bootstrap, per_case_metrics, plateau
from nnunet_kd.evidence.workspace import Workspace
from nnunet_kd.methods import TRAINERS, Sweep


def sweep_plans_name(method: str, variant: str, width: float, seed: int, epochs: int,
                     labelled_fraction: float | None = None, subset_teachers: int | None = None) -> str:
    """One plans file per model; a sweep of students on part of the labels (Protocol.labelled_fraction) has its own,
    and so has a multi-teacher sweep per number of subset teachers."""
    fraction = "" if labelled_fraction is None else f"_f{number_tag(labelled_fraction)}"
    teachers = f"_k{subset_teachers}" if method == "multi_teacher" and subset_teachers else ""
    return f"nnUNetPlans_sweep_{method}_{variant}_w{number_tag(width)}{fraction}{teachers}_s{seed}_e{epochs}"


def run_sweep(ws: Workspace, sweep: Sweep, width: float, seeds: list[int], variants: list[str], report=None) -> None:
    """Train what is missing: the teacher, then per seed the plain student and every variant (in sweep order)."""
    ws.preprocess()
    # multi-teacher KD learns from the protocol's subset teachers (each variant plans the same ones); a sweep never
    # predicts the test cases
    teacher = ws.subset_teachers(evaluate=False) if sweep.method == "multi_teacher" else ws.teacher()
    for seed in seeds:
        for variant in [None] + variants:  # None: the plain student (trained from the baseline variant's plans)
            name = variant or sweep.baseline
            plans = sweep_plans_name(sweep.method, name, width, seed, ws.p.student_epochs, ws.p.labelled_fraction,
                                     ws.p.subset_teachers)
            ws.plan_student(teacher, width, seed, plans_name=plans, overrides=sweep.overrides(name))
            before = ws.commands_run
            ws.train(TRAINERS["plain" if variant is None else sweep.method], plans)
            if report and ws.commands_run > before:
                report()


def _validation_record(folder: str, fold: int) -> dict | None:
    summary = join(folder, f"fold_{fold}", "validation", "summary.json")
    if not (isfile(summary) and isfile(join(folder, f"fold_{fold}", "checkpoint_final.pth"))):
        return None
    return {"folder": folder, "validation": per_case_metrics(summary), "curves": validation_curves(folder, fold)}


def build_sweep_report(ws: Workspace, sweep: Sweep, width: float, seeds: list[int], variants: list[str],
                       command: str) -> dict:
    """Rows per model (validation Dice, per class, FP/FN volumes) and paired comparisons of every variant with the
    baseline variant and with the plain student, from the finished models of the requested seeds."""
    from nnunet_kd.compare import device_label

    p, fold = ws.p, ws.p.fold
    models, skipped = {}, []
    for seed in seeds:
        for variant in [None] + variants:
            name = variant or sweep.baseline
            trainer = TRAINERS["plain" if variant is None else sweep.method]
            folder = ws.folder(trainer, sweep_plans_name(sweep.method, name, width, seed, p.student_epochs,
                                                         p.labelled_fraction, p.subset_teachers))
            record = _validation_record(folder, fold)
            if record is None:
                continue
            if variant is not None:
                # a model trained before its variant (or the sweep's base) was redefined is another recipe: reported
                # under the variant's name it would credit the new definition with the old one's Dice
                differences = variant_differences(load_json(join(folder, "plans.json")), p.configuration,
                                                  f"{sweep.method}:{variant}", sweep.overrides(variant))
                if differences:
                    skipped.append(f"{os.path.basename(folder)}: its plans differ from variant {variant} as "
                                   f"{os.path.relpath(sweep.file)} defines it now in {', '.join(differences)}; move "
                                   f"the model folder away to train the variant as defined now")
                    continue
            models.setdefault(variant or "plain", {})[seed] = record
    if not models:
        return {}
    cases = list(ws.split["crossval"][fold]["val"])
    ending = load_json(join(p.raw_dataset, "dataset.json"))["file_ending"]
    voxel_ml = {c: voxel_volume_ml(join(p.raw_dataset, "labelsTr", c + ending)) for c in cases}
    first = next(iter(next(iter(models.values())).values()))
    labels = sorted(next(iter(first["validation"].values())), key=lambda k: (len(k), k))
    names = {str(v): k for k, v in ws.dataset_json()["labels"].items()
             if isinstance(v, int)}

    def matrix(by_seed: dict, use: list[int]) -> np.ndarray:
        return np.array([[mean_foreground_dice(by_seed[s]["validation"][c]) for c in cases] for s in use])

    rows = []
    for key in ["plain"] + [v for v in variants if v in models]:
        if key not in models:
            continue
        by_seed = models[key]
        use = sorted(by_seed)
        recs = [by_seed[s] for s in use]
        dice = matrix(by_seed, use)
        ci = paired_bootstrap(dice)
        rows.append({
            "variant": key, "why": "the same student without KD" if key == "plain" else sweep.variants[key]["why"],
            "set": [] if key == "plain" else sweep.variants[key]["set"], "seeds": use,
            "validation_mean_dice": ci["mean_diff"], "validation_mean_dice_ci95": ci["ci95"],
            "validation_mean_dice_per_seed": [float(v) for v in dice.mean(axis=1)],
            "dice_per_class": {k: float(np.nanmean([[r["validation"][c][k]["Dice"] for c in cases] for r in recs]))
                               for k in labels},
            "fp_ml_per_case": {k: float(np.mean([[r["validation"][c][k]["FP"] * voxel_ml[c] for c in cases]
                                                 for r in recs])) for k in labels},
            "fn_ml_per_case": {k: float(np.mean([[r["validation"][c][k]["FN"] * voxel_ml[c] for c in cases]
                                                 for r in recs])) for k in labels},
            "pseudo_dice_plateau": plateau(list(np.mean(
                [r["curves"]["pseudo_dice"][:min(len(x["curves"]["pseudo_dice"]) for x in recs)] for r in recs],
                axis=0))),
        })
    comparisons = sweep_comparisons(sweep, variants, models, matrix)
    result = {
        "protocol": {
            "dataset": p.dataset_name, "configuration": p.configuration, "fold": fold, "method": sweep.method,
            "width": width, "sweep_file": os.path.relpath(sweep.file), "baseline_variant": sweep.baseline,
            "base_overrides": list(sweep.base),
            "split_file": os.path.relpath(p.split_file), "n_validation": len(cases),
            "scored_on": "fold 0's validation cases of the training split (never the test cases), full volumes, "
                         "nnU-Net's end-of-training validation (fold_0/validation/summary.json, with its mirroring)",
            "seeds": seeds, "budgets": {"student_iterations": p.student_epochs * p.iterations_per_epoch,
                                        "student_epochs": p.student_epochs,
                                        "teacher_iterations": p.teacher_epochs * p.iterations_per_epoch},
            "device": p.device, "device_name": device_label(p.device), "command": command,
            "ci": "95% percentile bootstrap over validation cases and seeds, paired by case and seed"},
        "labels": {k: names.get(k, k) for k in labels}, "models": rows, "comparisons": comparisons,
        "skipped": skipped}
    result["table"] = format_sweep_table(result)
    return result


def sweep_comparisons(sweep: Sweep, variants: list[str], models: dict, matrix) -> list[dict]:
    """Paired comparisons (by case and shared seed) of every finished variant with the plain student and the shipped
    preset, and with the variants its "compare_with" names: a variant that changes two things of the preset is also
    compared with the one that changes one of them, which isolates the other. ``models``: key -> seed -> record;
    ``matrix(by_seed, seeds)``: (seeds, cases) Dice."""
    comparisons = []
    for key in [v for v in variants if v in models]:
        for baseline in dict.fromkeys(("plain", sweep.baseline, *sweep.variants[key].get("compare_with", []))):
            if baseline == key or baseline not in models:
                continue
            use = sorted(set(models[key]) & set(models[baseline]))
            if use:
                diffs = matrix(models[key], use) - matrix(models[baseline], use)
                comparisons.append({"variant": key, "baseline": baseline, "seeds": use, **paired_bootstrap(diffs)})
    return comparisons


def format_sweep_table(result: dict) -> str:
    labels, names = list(result["labels"]), result["labels"]
    header = (["variant", "what it changes", "seeds", "val mean Dice [95% CI]"] + [f"Dice {names[k]}" for k in labels]
              + [f"FP mL {names[k]}" for k in labels] + [f"FN mL {names[k]}" for k in labels])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["models"]:
        lines.append("| " + " | ".join(
            [r["variant"], r["why"], str(len(r["seeds"])), format_ci(r["validation_mean_dice"],
                                                                   r["validation_mean_dice_ci95"])]
            + [f"{r['dice_per_class'][k]:.4f}" for k in labels] + [f"{r['fp_ml_per_case'][k]:.4f}" for k in labels]
            + [f"{r['fn_ml_per_case'][k]:.4f}" for k in labels]) + " |")
    lines += ["", "| variant | baseline | seeds | cases | mean paired diff (val Dice) | 95% CI | per seed |",
              "|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        per_seed = " / ".join(f"{v:+.4f}" for v in c.get("mean_diff_per_seed", []))  # older results: none
        lines.append(f"| {c['variant']} | {c['baseline']} | {len(c['seeds'])} | {c['n_cases']} | {c['mean_diff']:+.4f} "
                     f"| [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {per_seed} |")
    if result.get("skipped"):
        lines += ["", "Left out (another recipe than the sweep file defines now):", ""]
        lines += [f"- {reason}" for reason in result["skipped"]]
    return "\n".join(lines)


def write_sweep_report(result: dict, json_path: str) -> list[str]:
    write_json_atomically(result, json_path)
    md = json_path[:-len(".json")] + ".md"
    write_text_atomically(md, result["table"] + "\n")
    return [json_path, md]
