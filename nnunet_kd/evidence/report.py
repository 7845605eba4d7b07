"""The results document: paired comparisons, budget labels, tables and plots of one protocol run."""
from __future__ import annotations

import os
from os.path import basename, isfile, join

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_kd.atomic_files import write_json_atomically, write_text_atomically
from nnunet_kd.evidence.budget_check import budget_checks_of, budget_result
from nnunet_kd.evidence.collect import collect, latency
from nnunet_kd.evidence.protocol import (ALL_LABELS_PLAIN, CONTROLS, VALIDATION_SEEN_BY_TEACHERS, row_order, shown_path,
                                         sweep_file_of, variant_overrides)
from nnunet_kd.evidence.records import voxel_volume_ml
from nnunet_kd.evidence.statistics import dice_matrix, paired_bootstrap, plateau
from nnunet_kd.evidence.workspace import Workspace, crossval_folds
from nnunet_kd.methods import VARIANT_SEPARATOR, load_sweep, method_and_variant

LABELS = {
    "teacher": "teacher",
    "plain": "plain student",
    "adaptive": "Adaptive KD",
    "logit": "logit KD (Fast-nnUNet recipe)",
    "logit_all_folds": "logit KD from all folds (Fast-nnUNet defaults)",
    "mskd": "MSKD",
    "plain_seg_weight": "control: plain, segmentation x0.7",
    "label_teacher": "control: label teacher",
    "multiscale_contrastive": "multi-scale contrastive KD",
    "multi_teacher": "multi-teacher KD (subset teachers)",
    ALL_LABELS_PLAIN: "plain student, all labels",
    "subset_teacher": "subset teacher",
    "subset_teachers_ensemble": "ensemble of the subset teachers",
}

# One colour per method in every plot (the plain student is blue everywhere).
COLORS = {"plain": "tab:blue", "adaptive": "tab:red", "logit": "tab:green", "mskd": "tab:purple",
          "plain_seg_weight": "tab:gray", "label_teacher": "tab:orange", "multiscale_contrastive": "tab:brown",
          "multi_teacher": "tab:olive", "logit_all_folds": "darkgreen",
          ALL_LABELS_PLAIN: "tab:cyan"}


def label_of(method: str) -> str:
    """A row's name in tables and plots; a variant is its method's name and the variant's."""
    base, variant = method_and_variant(method)
    name = LABELS.get(base, base)
    return name if variant is None else f"{name}, variant {variant}"


def trained_on_of(found: dict) -> dict:
    """Model name -> the machine that trained it (records made before records named it: 'not recorded')."""
    records = [found["teacher"], *subset_teacher_rows(found)[0],
               *(r for by_seed in found["students"].values() for r in by_seed.values())]
    out = {}
    for r in records:
        if r is None:
            continue
        name = basename(r["folder"].rstrip("/")) if r.get("folder") else r.get("model")
        machine = r.get("trained_on")
        out[name] = (f"{machine.get('name', machine.get('device'))} ({machine.get('device')}, torch "
                     f"{machine.get('torch')})" if machine
                     else "not recorded (a record made before records named their machine)")
    return out


def baselines_of(method: str, labelled_fraction: bool, variants_compared: dict | None = None) -> list[str]:
    """What a row is compared with (besides the teacher): KD methods with the plain student and with each control
    (what the teacher adds beyond the control's re-weighting), the mission's other methods also with Adaptive KD;
    controls with the plain student; with a labelled fraction, the plain student and the methods also with the plain
    student on all labels (what the missing labels cost, and how much of it a method recovers). A variant also with
    its method's preset and with the runs of ``variants_compared[method]`` (compared_variants: the variants its sweep file's "compare_with" names)."""
    if method == ALL_LABELS_PLAIN:
        return []
    base, variant = method_and_variant(method)
    if variant is not None:  # and with the method's preset: what the variant's overrides change
        return [*baselines_of(base, labelled_fraction), base, *(variants_compared or {}).get(method, [])]
    baselines = [] if method == "plain" else ["plain"] if method in CONTROLS else ["plain", *CONTROLS]
    if method in ("multi_teacher", "mskd", "multiscale_contrastive"):
        # against Adaptive KD, the first method, from one teacher on all the cases (for multi-teacher KD: what k subset
        # teachers give against it): which of the mission's methods to use, paired on the same cases and seeds
        baselines.append("adaptive")
    if method == "logit_all_folds":  # what the peer's fold ensemble adds to its recipe from the one teacher
        baselines.append("logit")
    elif method not in ("plain", "logit") + CONTROLS:  # ours against the peer, from one teacher and at its defaults
        baselines += ["logit", "logit_all_folds"]
    return baselines + ([ALL_LABELS_PLAIN] if labelled_fraction and method not in CONTROLS else [])


def compared_variants(sweeps_dir: str | None, methods) -> dict:
    """For each variant run 'METHOD:VARIANT' of ``methods``, the runs 'METHOD:OTHER' of the variants that its sweep
    file's "compare_with" names: an ablation of a variant (e.g. the chosen recipe without its contrastive term) is
    compared with the variant it ablates, held out as on validation (nnunet_kd.sweep.sweep_comparisons)."""
    out = {}
    for method in methods:
        base, variant = method_and_variant(method)
        if variant is not None:
            also = load_sweep(sweep_file_of(sweeps_dir, method)).variants[variant].get("compare_with", [])
            out[method] = [f"{base}{VARIANT_SEPARATOR}{other}" for other in also]
    return out


def paired_comparisons(students: dict, teacher: dict, cases: list[str], labelled_fraction: bool,
                       subset_ensemble: dict | None = None, variants_compared: dict | None = None) -> list[dict]:
    """Paired per-case (and per-seed) Dice differences of every row with its baselines (seeds both have) and with the
    teacher (a multi-teacher student also with the ensemble of its subset teachers); bootstrap CIs."""
    teacher_dice = dice_matrix([teacher], cases)
    comparisons = []
    for (method, width), by_seed in sorted(students.items(), key=lambda kv: row_order(kv[0])):
        if method == ALL_LABELS_PLAIN:
            continue  # a reference row
        for baseline in dict.fromkeys(baselines_of(method, labelled_fraction, variants_compared)):
            other = students.get((baseline, width), {})
            seeds = sorted(set(by_seed) & set(other))
            if seeds:
                diffs = dice_matrix([by_seed[s] for s in seeds], cases) - dice_matrix([other[s] for s in seeds], cases)
                comparisons.append({"method": method, "baseline": baseline, "width": width, "seeds": seeds,
                                    **paired_bootstrap(diffs)})
        seeds = sorted(by_seed)
        dice = dice_matrix([by_seed[s] for s in seeds], cases)
        comparisons.append({"method": method, "baseline": "teacher", "width": width, "seeds": seeds,
                            **paired_bootstrap(dice - teacher_dice)})
        if method_and_variant(method)[0] == "multi_teacher" and subset_ensemble is not None:
            comparisons.append({"method": method, "baseline": "subset_teachers_ensemble", "width": width,
                                "seeds": seeds, **paired_bootstrap(dice - dice_matrix([subset_ensemble], cases))})
    return comparisons


def _summarise(records: list[dict], cases: list[str], voxel_ml: dict, labels: list[str]) -> dict:
    dice = dice_matrix(records, cases)
    ci = paired_bootstrap(dice)
    per_class = {k: float(np.nanmean([[r["test"][c][k]["Dice"] for c in cases] for r in records])) for k in labels}
    fp = {k: float(np.mean([[r["test"][c][k]["FP"] * voxel_ml[c] for c in cases] for r in records])) for k in labels}
    fn = {k: float(np.mean([[r["test"][c][k]["FN"] * voxel_ml[c] for c in cases] for r in records])) for k in labels}
    return {"test_mean_dice": ci["mean_diff"], "test_mean_dice_ci95": ci["ci95"], "test_dice_per_class": per_class,
            "fp_ml_per_case": fp, "fn_ml_per_case": fn,
            "validation_mean_dice": None if any(r["validation_mean_dice"] is None for r in records) else  # ensemble
            float(np.mean([r["validation_mean_dice"] for r in records])),
            # a plain mean like the headline's: a case with no foreground Dice (NaN) shows in both, not in one only
            "test_mean_dice_per_seed": [float(v) for v in dice.mean(axis=1)]}


def subset_teacher_rows(found: dict) -> tuple[list[dict], dict | None]:
    """The subset teachers and their ensemble that a results file reports: only a file with multi-teacher students has
    them (a workspace holds them for every protocol it runs, e.g. one on part of the labels, where they would be rows
    that nothing is compared with)."""
    if not any(method_and_variant(m)[0] == "multi_teacher" for m, _ in found["students"]):
        return [], None
    return found.get("subset_teachers") or [], found.get("subset_ensemble")


def build_report(ws: "Workspace", command: str, latency_cache_file: str | None = None,
                 found: dict | None = None, all_labels_command: str | None = None,
                 last_invocation: str | None = None) -> dict:
    """The results document: protocol, one row per model (mean over seeds and test cases), paired comparisons,
    plateau of the plain students, latency per width, best KD per width (chosen on validation). ``command`` reproduces
    the file (reproducing_commands), ``all_labels_command`` its all-labels plain rows, ``last_invocation`` is the run
    that wrote it (informative only: it may name a part of the rows)."""
    import platform

    import torch
    from nnunet_kd.compare import device_label
    from nnunet_kd.cost import network_cost

    p, found = ws.p, found if found is not None else collect(ws)  # collect() reads and hashes every model
    teacher = found["teacher"]
    if teacher is None:
        raise RuntimeError("The teacher is not trained and evaluated yet: nothing to report.")
    cases = list(ws.split["test"])
    ending = load_json(join(p.raw_dataset, "dataset.json"))["file_ending"]
    voxel_ml = {c: voxel_volume_ml(join(ws.test_labels, c + ending)) for c in cases}
    labels = sorted(next(iter(teacher["test"].values())), key=lambda k: (len(k), k))
    dataset_json = ws.dataset_json()
    names = {str(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}

    cache = load_json(latency_cache_file) if latency_cache_file and isfile(latency_cache_file) else {}

    def timed(key: str, records: list[dict]) -> dict:
        """Measured once per width on this machine: with a model of this workspace, else through the architecture of a
        committed record."""
        folder = next((r["folder"] for r in records if r["folder"]), None)
        if key not in cache and (folder is not None or records[0].get("plans")):
            cache[key] = latency(ws, folder, records[0].get("plans"))
            if latency_cache_file:
                os.makedirs(os.path.dirname(os.path.abspath(latency_cache_file)), exist_ok=True)
                save_json(cache, latency_cache_file, sort_keys=False)
        return cache.get(key, {})

    rows = []
    teacher_plans = teacher["plans"]
    teacher_cost = network_cost(teacher_plans, dataset_json, p.configuration)
    rows.append({"model": "teacher", "method": "teacher", "width": 1.0, "seeds": [p.teacher_seed],
                 "parameters": teacher_cost["parameters"], "flops_per_patch": teacher_cost["flops_per_patch"],
                 "latency": timed("teacher", [teacher]),
                 **_summarise([teacher], cases, voxel_ml, labels)})
    subset_teachers, subset_ensemble = subset_teacher_rows(found)
    k = len(subset_teachers)
    for i, record in enumerate(subset_teachers, 1):
        rows.append({"model": f"{LABELS['subset_teacher']} {i} of {k}", "method": "subset_teacher", "width": 1.0,
                     "seeds": [p.teacher_seed], "parameters": teacher_cost["parameters"],
                     "flops_per_patch": teacher_cost["flops_per_patch"], "latency": timed("teacher", [teacher]),
                     **_summarise([record], cases, voxel_ml, labels)})
    if subset_ensemble:
        rows.append({"model": f"{LABELS['subset_teachers_ensemble']} ({k})", "method": "subset_teachers_ensemble",
                     "width": 1.0, "seeds": [p.teacher_seed], "parameters": k * teacher_cost["parameters"],
                     "flops_per_patch": k * teacher_cost["flops_per_patch"], "latency": {},
                     **_summarise([subset_ensemble], cases, voxel_ml, labels)})
    for (method, width), by_seed in sorted(found["students"].items(), key=lambda kv: row_order(kv[0])):
        seeds = sorted(by_seed)
        records = [by_seed[s] for s in seeds]
        plans = records[0]["plans"]
        cost = network_cost(plans, dataset_json, p.configuration)
        rows.append({"model": label_of(method), "method": method, "width": width, "seeds": seeds,
                     "parameters": cost["parameters"], "flops_per_patch": cost["flops_per_patch"],
                     "latency": timed(f"width {width}", records),
                     **_summarise(records, cases, voxel_ml, labels)})

    variants = sorted({m for m, _ in found["students"] if method_and_variant(m)[1] is not None})
    comparisons = paired_comparisons(found["students"], teacher, cases, p.labelled_fraction is not None,
                                     subset_ensemble, compared_variants(p.sweeps_dir, variants))

    plateaus = {}
    for (method, width), by_seed in found["students"].items():
        if method == "plain":
            # The decision uses nnU-Net's per-epoch pseudo Dice on validation patches (mean over seeds): its EMA,
            # nnU-Net's progress metric, lags by about ten epochs and would call a curve that has levelled off
            # "still rising"; the EMA's gain is reported beside it.
            raw = [r["curves"]["pseudo_dice"] for r in by_seed.values()]
            ema = [r["curves"]["ema_fg_dice"] for r in by_seed.values()]
            n = min(len(c) for c in raw)
            ema_check = plateau(list(np.mean([c[:n] for c in ema], axis=0)))
            plateaus[str(width)] = {"seeds": sorted(by_seed), "curve": "validation pseudo Dice per epoch",
                                    **plateau(list(np.mean([c[:n] for c in raw], axis=0))),
                                    "ema_gain_over_last_fifth": ema_check["gain_over_last_fifth"]}
    budget_checks = budget_checks_of(found["students"], p)
    for c in comparisons:
        check = budget_checks.get(str(c["width"]))
        c["result_at_this_budget"] = budget_result(check)
    best = {}
    for (method, width) in found["students"]:
        if method_and_variant(method)[0] in ("plain", ALL_LABELS_PLAIN) + CONTROLS + VALIDATION_SEEN_BY_TEACHERS:
            continue
        row = next(r for r in rows if r["method"] == method and r["width"] == width)
        if str(width) not in best or row["validation_mean_dice"] > best[str(width)]["validation_mean_dice"]:
            best[str(width)] = {"method": method, "validation_mean_dice": row["validation_mean_dice"]}

    teacher_cfg = teacher_plans["configurations"][p.configuration]
    protocol = {
        "dataset": p.dataset_name, "configuration": p.configuration, "fold": p.fold,
        "split_file": shown_path(p.split_file),
        "n_train": len(ws.split["train"]), "n_test": len(cases),
        "n_fold_train": len(ws.split["crossval"][p.fold]["train"]), "n_validation": len(ws.split["crossval"][p.fold]["val"]),
        "seeds": sorted({s for v in found["students"].values() for s in v}), "teacher_seed": p.teacher_seed,
        "labelled_fraction": p.labelled_fraction,
        **({"variants": {m: {"sweep_file": os.path.relpath(sweep_file_of(p.sweeps_dir, m)),  # as split_file
                             "set": variant_overrides(p.sweeps_dir, m)} for m in variants}} if variants else {}),
        **({"subset_teachers": f"{k} teachers, each trained for {p.subset_teacher_budget * p.iterations_per_epoch} "
                               f"iterations ({p.subset_teacher_budget} epochs) with the teacher's seed on one of {k} disjoint "
                               f"seeded subsets of the fold's training cases (nnUNetv2_kd_plan_subset_teachers -k {k} "
                               f"--seed 0); the ensemble row is nnUNetv2_ensemble of their test probabilities"}
           if k else {}),
        **({"fold_teachers": f"'{LABELS['logit_all_folds']}': the teacher's {crossval_folds(ws)} cross-validation "
                             f"folds of the training cases (same plans, budget and seed; fold {p.fold} is the teacher "
                             f"row), their logits averaged (teacher_aggregation logit_mean, T and weights of "
                             f"plans/logit.json); the other folds trained on this fold's validation cases, so its "
                             f"validation Dice is optimistic and it is never the best KD by validation"}
           if any(m == "logit_all_folds" for m, _ in found["students"]) else {}),
        **({"labelled_fraction_seed": p.labelled_fraction_seed,
            "labels": f"every student of this file except '{LABELS[ALL_LABELS_PLAIN]}' trains with labels on the same "
                      f"seeded fraction {p.labelled_fraction:g} of the fold's training cases (one draw, seed "
                      f"{p.labelled_fraction_seed}); methods with train_on_unlabelled also train on the rest of them"
                      f"{' and on the unlabelled images' if p.unlabelled_images else ''} without labels; validation and "
                      f"test cases are never trained on",
            "unlabelled_images": p.unlabelled_images} if p.labelled_fraction is not None else {}),
        "budgets": {"teacher_iterations": p.teacher_epochs * p.iterations_per_epoch,
                    "teacher_epochs": p.teacher_epochs,
                    **({"subset_teacher_iterations": p.subset_teacher_budget * p.iterations_per_epoch,
                        "subset_teacher_epochs": p.subset_teacher_budget} if k else {}),
                    "student_iterations": p.student_epochs * p.iterations_per_epoch,
                    "student_epochs": p.student_epochs, "iterations_per_epoch": p.iterations_per_epoch,
                    "val_iterations_per_epoch": p.val_iterations_per_epoch,
                    "student_val_iterations_per_epoch": p.student_val_iterations,
                    **({"budget_check_records": shown_path(p.budget_check_records)}
                       if p.budget_check_records else {}),
                    "batch_size": teacher_cfg["batch_size"], "patch_size": teacher_cfg["patch_size"]},
        **({"teacher_from_records": f"the teacher row and the students' plans come from the teacher record in "
                                    f"{shown_path(p.teacher_from_records)} (no teacher was trained or restored here: "
                                    f"the plain students learn nothing from its weights)"}
           if p.teacher_from_records else {}),
        "device": p.device, "device_name": device_label(p.device), "torch": torch.__version__,
        "host": platform.node(), "command": command,
        **({"all_labels_command": all_labels_command} if all_labels_command else {}),
        **({"last_invocation": last_invocation} if last_invocation and last_invocation != command else {}),
        # the models of one file may come from several sessions and machines (committed records); latency is measured
        # on the reporting machine only
        "trained_on": trained_on_of(found),
        "test_evaluation": "nnUNetv2_predict --disable_tta (nnU-Net's sliding window, step 0.5, Gaussian weighting, no "
                           "mirroring: the same for every model, and how a speed-minded deployment runs a student) on "
                           "the held-out test images, nnU-Net's nnUNetv2_evaluate_folder; per-case mean foreground Dice",
        "ci": "95% percentile bootstrap, 10000 resamples of test cases and (independently) seeds; paired by case "
              "and seed (seed s of every method shares initial weights and batches)",
    }
    result = {"protocol": protocol, "labels": {k: names.get(k, k) for k in labels}, "models": rows,
              "comparisons": comparisons, "plateau_of_plain_student": plateaus,
              "budget_check_of_plain_student": budget_checks, "best_kd_by_validation": best,
              "skipped": found["skipped"],
              "curves": {f"{m}@{w}": {str(s): r["curves"] for s, r in v.items()}
                         for (m, w), v in found["students"].items()} | {"teacher": {str(p.teacher_seed): teacher["curves"]}}}
    result["table"] = format_tables(result)
    return result


def format_ci(mean: float, ci: list) -> str:
    return f"{mean:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def format_tables(result: dict) -> str:
    """Markdown: the models table, then the paired comparisons, then the plateau check."""
    from nnunet_kd.cost import format_count, seconds_with_range

    labels, names = list(result["labels"]), result["labels"]
    header = (["model", "width", "seeds", "params", "latency s (1 thread)", "test mean Dice [95% CI]"]
              + [f"Dice {names[k]}" for k in labels] + [f"FP mL {names[k]}" for k in labels]
              + [f"FN mL {names[k]}" for k in labels] + ["val mean Dice"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["models"]:
        lat = r["latency"].get("threads_1", {})
        lat_text = seconds_with_range(lat["median_s"], lat["min_s"], lat["max_s"]) if lat else ""
        cells = ([r["model"], f"{r['width']:g}", str(len(r["seeds"])), format_count(r["parameters"]), lat_text,
                  format_ci(r["test_mean_dice"], r["test_mean_dice_ci95"])]
                 + [f"{r['test_dice_per_class'][k]:.4f}" for k in labels]
                 + [f"{r['fp_ml_per_case'][k]:.4f}" for k in labels] + [f"{r['fn_ml_per_case'][k]:.4f}" for k in labels]
                 + ["" if r["validation_mean_dice"] is None else f"{r['validation_mean_dice']:.4f}"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | baseline | width | seeds | cases | mean paired diff (Dice) | 95% CI | CI above 0 | "
                  "per seed | result at this budget |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        per_seed = " / ".join(f"{v:+.4f}" for v in c.get("mean_diff_per_seed", []))  # older results: none
        lines.append(f"| {label_of(c['method'])} | {label_of(c['baseline'])} | {c['width']:g} | {len(c['seeds'])} | {c['n_cases']} "
                     f"| {c['mean_diff']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | "
                     f"{'yes' if c['ci95'][0] > 0 else 'no'} | {per_seed} | {c.get('result_at_this_budget', '')} |")
    lines += ["", "Result at this budget: *final quality* where doubling the budget is shown not to raise the plain "
                  "student's validation Dice by 0.01, *learning speed* where it does, *undecided* where the longer "
                  "budget's records lack per-case validation Dice, *unchecked* where no longer budget was trained (the "
                  "last-fifth test below cannot tell: nnU-Net's poly learning rate flattens the end of every budget)."]
    lines += ["", "| plain student width | seeds | validation pseudo-Dice gain over the last fifth (fit) | EMA gain "
                  "(lags) | flat over the last fifth (gain < 0.01; no proof of a plateau) |", "|---|---|---|---|---|"]
    for width, pl in sorted(result["plateau_of_plain_student"].items(), key=lambda kv: -float(kv[0])):
        gain = "" if pl["gain_over_last_fifth"] is None else f"{pl['gain_over_last_fifth']:+.4f}"
        ema = "" if pl.get("ema_gain_over_last_fifth") is None else f"{pl['ema_gain_over_last_fifth']:+.4f}"
        lines.append(f"| {width} | {len(pl['seeds'])} | {gain} | {ema} | "
                     f"{'yes' if pl['flat'] else 'NO: learning-speed result'} |")
    checks = result.get("budget_check_of_plain_student") or {}
    if checks:
        lines += ["", "Budget check: the plain student against the same seeds trained for longer, paired over the "
                      "fold's validation cases (nnU-Net's poly learning rate flattens every curve's last fifth, so the "
                      "table above cannot tell final quality from learning speed).", "",
                  "| plain student width | seeds | iterations | longer | validation Dice gain [95% CI] | test Dice gain "
                  "[95% CI] | stopped improving (CI below +0.01) |", "|---|---|---|---|---|---|---|"]
        for width, ch in sorted(checks.items(), key=lambda kv: -float(kv[0])):
            if not ch["seeds"]:
                lines.append(f"| {width} | | | | | | no: {ch['reason']} |")
                continue
            val, test = ch["validation_gain"], ch["test_gain"]
            val_text = f"{val['mean_diff']:+.4f}" + ("" if val["ci95"] is None else
                                                     f" [{val['ci95'][0]:+.4f}, {val['ci95'][1]:+.4f}]")
            stopped = {True: "yes: final quality", False: "NO: learning-speed result",
                       None: "undecided (records without per-case validation)"}[ch["stopped_improving"]]
            lines.append(f"| {width} | {len(ch['seeds'])} | {ch['iterations']:,} | {ch['longer_iterations']:,} | "
                         f"{val_text} | {test['mean_diff']:+.4f} [{test['ci95'][0]:+.4f}, {test['ci95'][1]:+.4f}] | "
                         f"{stopped} |")
    return "\n".join(lines)


def plot_report(result: dict, out_prefix: str) -> list[str]:
    """<prefix>_width_sweep.png (test Dice against parameters and against 1-thread latency, plain vs the best KD
    method per width, 95% CI bars) and <prefix>_curves.png (nnU-Net's per-epoch validation pseudo Dice against
    training iterations, mean over seeds; the curve the plateau check reads)."""
    import textwrap

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    rows = result["models"]
    best = result["best_kd_by_validation"]
    series = {"plain student": [r for r in rows if r["method"] == "plain"],
              "best KD (chosen on validation)": [r for r in rows if best.get(str(r["width"]), {}).get("method") == r["method"]]}
    teacher = next(r for r in rows if r["method"] == "teacher")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x_of, xlabel in ((axes[0], lambda r: r["parameters"], "parameters (log)"),
                             (axes[1], lambda r: r["latency"].get("threads_1", {}).get("median_s"),
                              "latency of one test volume, 1 CPU thread, median s (log)")):
        for (name, srs), marker, color in zip(series.items(), ("o", "s"), ("tab:blue", "tab:red")):
            srs = sorted((r for r in srs if x_of(r) is not None), key=x_of)
            if not srs:
                continue
            x = [x_of(r) for r in srs]  # true positions: an offset would misstate the latency
            y = [r["test_mean_dice"] for r in srs]
            err = [[r["test_mean_dice"] - r["test_mean_dice_ci95"][0] for r in srs],
                   [r["test_mean_dice_ci95"][1] - r["test_mean_dice"] for r in srs]]
            ax.errorbar(x, y, yerr=err, marker=marker, color=color, capsize=4 if marker == "o" else 7,
                        elinewidth=1 if marker == "o" else 2.5, alpha=1 if marker == "o" else 0.6,
                        mfc="white" if marker == "o" else color, label=name)
            for r, xi in zip(srs, x):
                # below the plain student's lower whisker, above the KD point's upper whisker: never on a bar, and
                # the two labels of one width on opposite sides of its bars
                seeds = f"{len(r['seeds'])} seed" + ("s" if len(r["seeds"]) != 1 else "")
                # short lines: neighbouring widths sit about 100 pixels apart on the latency axis
                if marker == "o":
                    text, anchor, dy, va = f"w={r['width']:g}\n{seeds}", r["test_mean_dice_ci95"][0], -4, "top"
                else:
                    base, variant = method_and_variant(r["method"])
                    method_name = LABELS.get(base, base).split(" (")[0] + ("" if variant is None else f", {variant}")
                    text, anchor, dy, va = f"{textwrap.fill(method_name, 16)}\n{seeds}", r["test_mean_dice_ci95"][1], \
                        4, "bottom"
                ax.annotate(text, (xi, anchor), textcoords="offset points", xytext=(0, dy), fontsize=7, color=color,
                            ha="center", va=va, annotation_clip=False, linespacing=1.0)
        if x_of(teacher) is not None:
            ax.errorbar([x_of(teacher)], [teacher["test_mean_dice"]],
                        yerr=[[teacher["test_mean_dice"] - teacher["test_mean_dice_ci95"][0]],
                              [teacher["test_mean_dice_ci95"][1] - teacher["test_mean_dice"]]],
                        marker="*", markersize=12, color="black", capsize=3, linestyle="none", label="teacher")
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.16)  # room for the labels beyond the outermost whiskers
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("test mean foreground Dice", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    pr = result["protocol"]
    fig.suptitle(f"{pr['dataset']} {pr['configuration']}: {pr['n_test']} held-out test cases, "
                 f"{pr['budgets']['student_iterations']} student iterations"
                 + (f", students on {pr['labelled_fraction']:g} of the labels" if pr.get("labelled_fraction") else "")
                 + ", 95% CI over cases and seeds "
                 f"({pr['device_name']})", fontsize=9)
    fig.tight_layout()
    paths = [out_prefix + "_width_sweep.png"]
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    teachers = ("teacher", "subset_teacher", "subset_teachers_ensemble")  # teacher curves are drawn in every panel
    widths = sorted({r["width"] for r in rows if r["method"] not in teachers}, reverse=True)
    fig, axes = plt.subplots(1, max(1, len(widths)), figsize=(5 * max(1, len(widths)), 4), squeeze=False)
    its = pr["budgets"]["iterations_per_epoch"]
    t_curve = np.mean([c["pseudo_dice"] for c in result["curves"]["teacher"].values()], axis=0)
    variants = sorted({key.split("@")[0] for key in result["curves"] if VARIANT_SEPARATOR in key})
    linestyles = {v: style for v, style in zip(variants, [":", "-.", (0, (5, 2)), (0, (1, 3)), (0, (3, 1, 1, 1, 1, 1))] * 4)}
    for ax, width in zip(axes[0], widths):
        ax.plot(np.arange(1, len(t_curve) + 1) * its, t_curve, color="black", linestyle="--", label="teacher")
        for key, by_seed in sorted(result["curves"].items()):
            if key == "teacher":
                continue
            method, key_width = key.split("@")
            if float(key_width) != width:
                continue
            curves = [c["pseudo_dice"] for c in by_seed.values()]
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            base, variant = method_and_variant(method)
            ax.plot(np.arange(1, n + 1) * its, mean, marker="o" if n < 5 else None, markersize=3,
                    color=COLORS.get(base), linestyle=linestyles.get(method, "-"),  # a variant: its method's colour
                    label=f"{label_of(method)} ({len(curves)} seed{'' if len(curves) == 1 else 's'})")
        ax.set_title(f"width {width:g}", fontsize=9)
        ax.set_xlabel("training iterations", fontsize=9)
        ax.set_ylabel("validation pseudo Dice per epoch (mean over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(out_prefix + "_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(result: dict, json_path: str) -> list[str]:
    """JSON (atomically: a killed session never leaves half a results file), markdown table and PNGs."""
    stem = json_path[:-len(".json")]
    plots = plot_report(result, stem)
    result["plots"] = [basename(x) for x in plots]
    write_json_atomically(result, json_path)
    protocol = result["protocol"]
    reproduce = "".join(f"\n{what}: `{protocol[key]}`\n" for key, what in (
        ("command", "Command (trains what is missing, then rewrites this file)"),
        ("all_labels_command", "The all-labels plain rows")) if protocol.get(key))
    write_text_atomically(stem + ".md", result["table"] + "\n" + reproduce)
    return [json_path, stem + ".md"] + plots
