"""Held-out evidence: does a distilled student beat the same student trained without KD, on real scans?

The protocol (``benchmarks/run_evidence.py`` drives it; every step is a real nnU-Net command):

1. **A fixed held-out test split** (``benchmarks/splits/<dataset>.json``, written once with a seed and then only
   read): ``test`` cases never enter the workspace's raw training folder, so no model, plan or fingerprint sees
   them. The ``train`` cases get nnU-Net's own 5-fold cross-validation split (``crossval``, written as the
   workspace's ``splits_final.json``); fold 0's validation cases are where recipe choices are made.
2. **Models**: one teacher (nnU-Net's default network, plain nnU-Net loss) and, for every (method, width, seed),
   a student trained on the same fold's training cases. Seed s of every method starts from the same weights and
   sees the same batches (``nnUNet_n_proc_DA=0``), so per-case differences are paired.
3. **Test evaluation**: ``nnUNetv2_predict`` of every model on the test images, then nnU-Net's own
   ``nnUNetv2_evaluate_folder``: Dice, false-positive and false-negative voxels per case and class.
4. **Statistics**: for every KD method, the paired per-case difference to the plain student of the same width
   (and to the teacher), with a 95% bootstrap interval that resamples cases and seeds (``paired_bootstrap``).
5. **Budget**: the plain student's validation curve (nnU-Net's per-epoch pseudo Dice) over the last fifth of
   training, and the budget-doubling check (``budget_doubling_check``: the same seeds trained for longer, paired over
   validation cases). The last-fifth test alone is fooled by nnU-Net's polynomial learning rate, which flattens the
   end of every budget; every comparison is labelled final quality only where doubling the budget is shown not to
   raise the plain student's validation Dice by 0.01, learning speed where it does, and unchecked otherwise.

Everything that trains is resumable: a finished model (``checkpoint_final.pth`` + validation summary) is reused,
an interrupted one resumes with ``--c``, and the results file is rewritten after every model.
"""
from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from os.path import basename, dirname, isdir, isfile, join

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_kd.atomic_files import write_json_atomically, write_text_atomically
from nnunet_kd.methods import (NO_VARIANTS, TRAINERS, VARIANT_NAME, VARIANT_SEPARATOR, SweepError, load_sweep,
                               method_and_variant)

SPLIT_SEED = 20261125
CROSSVAL_SEED = 12345  # nnU-Net's own seed for its 5-fold split


# ---------------------------------------------------------------------------------------------------- split
def raw_case_ids(raw_dataset: str) -> list[str]:
    """Case identifiers of a raw nnU-Net dataset (the label files of labelsTr)."""
    dataset_json = load_json(join(raw_dataset, "dataset.json"))
    ending = dataset_json["file_ending"]
    labels = join(raw_dataset, "labelsTr")
    return sorted(f[:-len(ending)] for f in os.listdir(labels) if f.endswith(ending))


def make_split(raw_dataset: str, n_test: int, seed: int = SPLIT_SEED, n_folds: int = 5) -> dict:
    """A seeded held-out split: ``test`` (n_test cases), ``train`` (the rest) and nnU-Net's cross-validation
    folds of the training cases (``crossval``, nnU-Net's generate_crossval_split with its own seed)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = raw_case_ids(raw_dataset)
    if not 0 < n_test < len(cases) - n_folds:
        raise ValueError(f"{raw_dataset} has {len(cases)} labelled cases: cannot hold out {n_test} for testing and "
                         f"still run a {n_folds}-fold cross-validation on the rest.")
    rng = random.Random(seed)
    test = sorted(rng.sample(cases, n_test))
    train = [c for c in cases if c not in set(test)]
    return {"dataset": basename(os.path.normpath(raw_dataset)), "split_seed": seed, "n_cases": len(cases),
            "test": test, "train": train, "crossval_seed": CROSSVAL_SEED,
            "crossval": generate_crossval_split(train, seed=CROSSVAL_SEED, n_splits=n_folds)}


def load_or_make_split(split_file: str, raw_dataset: str, n_test: int) -> dict:
    """The fixed split: read it when it exists (checking it still fits the data), else write it once."""
    if isfile(split_file):
        split = load_json(split_file)
        missing = sorted(set(split["train"] + split["test"]) - set(raw_case_ids(raw_dataset)))
        if missing:
            raise ValueError(f"{split_file} names cases that {raw_dataset} does not have ({missing[:5]}...). The split "
                             f"belongs to other data: point --raw-dataset at the data it was written for.")
        if set(split["train"]) & set(split["test"]):
            raise ValueError(f"{split_file}: cases are both in train and test. Restore the file from git.")
        return split
    split = make_split(raw_dataset, n_test)
    os.makedirs(os.path.dirname(os.path.abspath(split_file)), exist_ok=True)
    save_json(split, split_file, sort_keys=False)
    return split


def prepare_workspace(raw_dataset: str, split: dict, raw_root: str, test_root: str) -> tuple[str, str, str]:
    """Link the split into a workspace: ``raw_root/<dataset>`` holds the training cases only (so nnU-Net's planning
    never sees a test case), ``test_root/imagesTs`` and ``labelsTs`` the test cases. Returns (raw folder,
    test images folder, test labels folder). The source stays untouched (read-only data)."""
    dataset_json = load_json(join(raw_dataset, "dataset.json"))
    ending = dataset_json["file_ending"]
    channels = sorted(int(k) for k in dataset_json["channel_names"])
    raw_folder = join(raw_root, split["dataset"])
    images_ts, labels_ts = join(test_root, "imagesTs"), join(test_root, "labelsTs")
    for folder in (join(raw_folder, "imagesTr"), join(raw_folder, "labelsTr"), images_ts, labels_ts):
        os.makedirs(folder, exist_ok=True)

    def link(source: str, target: str) -> None:
        if not os.path.lexists(target):
            os.symlink(os.path.abspath(source), target)

    for cases, images, labels in ((split["train"], join(raw_folder, "imagesTr"), join(raw_folder, "labelsTr")),
                                  (split["test"], images_ts, labels_ts)):
        for case in cases:
            for ch in channels:
                name = f"{case}_{ch:04d}{ending}"
                link(join(raw_dataset, "imagesTr", name), join(images, name))
            link(join(raw_dataset, "labelsTr", case + ending), join(labels, case + ending))
    workspace_json = dict(dataset_json, numTraining=len(split["train"]),
                          description=f"{dataset_json.get('description', '')} [training cases of the held-out split "
                                      f"{split['dataset']} (seed {split['split_seed']}); {len(split['test'])} test "
                                      f"cases kept outside]")
    save_json(workspace_json, join(raw_folder, "dataset.json"), sort_keys=False)
    return raw_folder, images_ts, labels_ts


def write_crossval_split(preprocessed_base: str, split: dict) -> None:
    """The split's folds as nnU-Net's splits_final.json (so nnU-Net does not draw its own)."""
    target = join(preprocessed_base, "splits_final.json")
    if isfile(target) and load_json(target) != split["crossval"]:
        raise ValueError(f"{target} differs from the fixed split's cross-validation folds: this workspace was made "
                         f"with another split. Use a new --workdir.")
    save_json(split["crossval"], target, sort_keys=False)


# ---------------------------------------------------------------------------------------------------- models
# The protocol's method names, their trainers and their recipe variants: nnunet_kd.methods.
# Methods whose teachers trained on the student's validation cases (the other folds of an all-fold ensemble): their
# validation Dice is optimistic, so they are never the "best KD by validation"; the held-out test cases stay unseen.
VALIDATION_SEEN_BY_TEACHERS = ("logit_all_folds",)
# A protocol with a labelled fraction (Protocol.labelled_fraction) also reports the plain students of the same widths
# trained on all labels (same teacher and budget, from the workspace or the records): what the missing labels cost and
# whether a method recovers it.
ALL_LABELS_PLAIN = "plain_all_labels"
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
# Controls are compared with the plain student like the methods, but are not candidates for "best KD".
CONTROLS = ("plain_seg_weight", "label_teacher")


def results_tag_error(tag: str | None) -> str | None:
    """Why ``tag`` (run_evidence.py's and run_recipe_sweep.py's --tag, which becomes part of results file names) is
    refused, or None when it is acceptable (None too: no tag)."""
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*", tag):
        return f"--tag {tag!r}: letters, digits, '_' and '.' only (it becomes part of file names)."
    return None


# run_evidence.py's options that choose which students train (replaced in a reproducing command) and those that make
# a protocol one of students on part of the labels (dropped from the command of its all-labels plain rows): option ->
# how many values it takes ("+": one or more).
_RUN_CHOICE_OPTIONS = {"--runs": "+", "--seeds": "+"}
# (the budget check's records are those of the labelled-fraction protocol: the all-labels rows' command drops them too)
_LABELLED_FRACTION_OPTIONS = {"--labelled-fraction": 1, "--labelled-fraction-seed": 1, "--unlabelled-images": 1,
                              "--budget-check-records": 1}
_NOTHING_MEASURED_OPTIONS = {"--report-only": 0, "--commit": 0}


def _is_option(token: str) -> bool:
    try:
        float(token)
        return False  # a negative number is a value
    except ValueError:
        return token.startswith("-") and len(token) > 1


def _without_options(tokens: list[str], options: dict) -> list[str]:
    """tokens less every option of ``options`` and its values (--name value, --name=value, --name v1 v2 ...)."""
    kept, skip, skip_until_option = [], 0, False
    for token in tokens:
        if _is_option(token):
            skip, skip_until_option = 0, False
            name, has_value = token.split("=", 1)[0], "=" in token
            if name in options:
                nargs = options[name]
                skip_until_option = nargs == "+" and not has_value
                skip = 0 if (has_value or nargs == "+") else nargs
                continue
            kept.append(token)
        elif skip_until_option:
            continue
        elif skip:
            skip -= 1
        else:
            kept.append(token)
    return kept


def reproducing_commands(invocation: list[str], students: dict) -> dict:
    """The run_evidence.py commands that train and report every student row of a results file. A file gathers the
    finished models of every invocation of one protocol (same budgets, teacher and labels), so the invocation that
    wrote it last names only some of them: its arguments are kept and --runs / --seeds replaced by every METHOD@WIDTH
    and seed the file holds (where rows differ in seeds, the union: the row's seed count says which exist).
    ``students`` maps (method, width) -> {seed: ...} (collect()'s "students"). The plain students on all labels of a
    labelled-fraction file come from that protocol without the fraction: their own command, under "all_labels"."""
    base = _without_options(list(invocation), {**_RUN_CHOICE_OPTIONS, **_NOTHING_MEASURED_OPTIONS})

    def command(tokens: list[str], rows: dict) -> str:
        runs = [f"{method}@{width:g}" for method, width in sorted(rows, key=_row_order)]
        seeds = sorted({s for by_seed in rows.values() for s in by_seed})
        return "python benchmarks/run_evidence.py " + " ".join(
            shlex.quote(a) for a in tokens + ["--runs", *runs, "--seeds", *map(str, seeds)])

    own = {k: v for k, v in students.items() if k[0] != ALL_LABELS_PLAIN}
    all_labels = {("plain", w): v for (m, w), v in students.items() if m == ALL_LABELS_PLAIN}
    commands = {"command": command(base, own) if own else None}
    if all_labels:
        commands["all_labels"] = command(_without_options(base, _LABELLED_FRACTION_OPTIONS), all_labels)
    return commands


def label_of(method: str) -> str:
    """A row's name in tables and plots; a variant is its method's name and the variant's."""
    base, variant = method_and_variant(method)
    name = LABELS.get(base, base)
    return name if variant is None else f"{name}, variant {variant}"


def _row_order(key: tuple) -> tuple:
    """Widest first; within a width the plain student, then the methods, then the controls."""
    method, width = key
    base = method_and_variant(method)[0]
    return -width, (-1 if method == ALL_LABELS_PLAIN else 0 if method == "plain" else 2 if base in CONTROLS else 1), \
        method


def _number_tag(value: float) -> str:
    return str(value).replace(".", "p")


def student_plans_name(width: float, seed: int, labelled_fraction: float | None = None,
                       unlabelled_images: bool = False, subset_teachers: int | None = None,
                       fold_teachers: int | None = None, variant: str | None = None) -> str:
    """One student plans file per (width, labelled fraction, extra unlabelled images or not, seed): every one-teacher
    method of those trains from it. 'x' marks plans with extra unlabelled images; '_k3' the plans of a student of 3
    subset teachers (their recipe lists those teachers instead of the protocol's teacher); '_folds5' those of a
    student of the teacher's 5 cross-validation folds; '_v<name>' those of a recipe variant (its overrides are in the
    plans, so it cannot share the method's)."""
    fraction = "" if labelled_fraction is None else f"_f{_number_tag(labelled_fraction)}{'x' if unlabelled_images else ''}"
    teachers = "" if subset_teachers is None else f"_k{subset_teachers}"
    folds = "" if fold_teachers is None else f"_folds{fold_teachers}"
    tag = "" if variant is None else f"_v{variant}"
    return f"nnUNetPlans_evidence_w{_number_tag(width)}{fraction}{teachers}{folds}{tag}_s{seed}"


def parse_runs(specs: list[str]) -> list[tuple[str, float]]:
    """'adaptive@0.25' -> ('adaptive', 0.25), 'multiscale_contrastive:noContrastive@0.25' ->
    ('multiscale_contrastive:noContrastive', 0.25); refuses unknown methods, malformed variants and widths outside
    (0, 4]. Whether the variant exists in its sweep file is checked before any training (check_variants)."""
    runs = []
    for spec in specs:
        method, sep, width = spec.partition("@")
        base, variant = method_and_variant(method)
        if base not in TRAINERS or not sep:
            raise ValueError(f"run '{spec}': expected METHOD@WIDTH or METHOD:VARIANT@WIDTH with METHOD one of "
                             f"{sorted(TRAINERS)}, e.g. adaptive@0.25.")
        if variant is not None and (base in NO_VARIANTS or not VARIANT_NAME.match(variant)):
            raise ValueError(f"run '{spec}': a variant is METHOD:VARIANT@WIDTH with VARIANT (letters and digits) a "
                             f"variant of the sweep file of METHOD, one of the KD methods "
                             f"{sorted(set(TRAINERS) - set(NO_VARIANTS))}, e.g. multiscale_contrastive:seg1@0.25.")
        try:
            value = float(width)
        except ValueError:
            raise ValueError(f"run '{spec}': width '{width}' is not a number.") from None
        if not 0 < value <= 4:
            raise ValueError(f"run '{spec}': width must be in (0, 4].")
        runs.append((method, value))
    return runs


def sweep_file_of(sweeps_dir: str | None, method: str) -> str:
    """<sweeps_dir>/<METHOD>.json: the sweep file that defines the variants of the method of 'METHOD[:VARIANT]'."""
    return join(sweeps_dir or "", f"{method_and_variant(method)[0]}.json")


def variant_overrides(sweeps_dir: str | None, method: str) -> list[str]:
    """The --set overrides of a variant 'METHOD:VARIANT' as its sweep file defines them now (the file's 'base' first,
    as the sweep ran them); raises EvidenceError naming the file when it has no such variant."""
    base, variant = method_and_variant(method)
    path = sweep_file_of(sweeps_dir, method)
    if not sweeps_dir or not isfile(path):
        raise EvidenceError(f"Run '{method}': no sweep file {path} defines the variants of '{base}'. Pass --sweeps-dir "
                            f"(the folder of benchmarks/sweeps/<method>.json) or run '{base}' without a variant.")
    try:
        sweep = load_sweep(path)
    except SweepError as e:
        raise EvidenceError(str(e)) from None
    if sweep.method != base:
        raise EvidenceError(f"Run '{method}': {path} is a sweep of '{sweep.method}', not of '{base}': fix its 'method' "
                            f"or pass the --sweeps-dir that holds the sweep file of '{base}'.")
    if variant not in sweep.variants:
        raise EvidenceError(f"Run '{method}': {path} has no variant '{variant}'; its variants: "
                            f"{', '.join(sweep.variants)}. Add it there (a name, 'why' and 'set') or pick one.")
    return sweep.overrides(variant)


def variant_recipe(method: str, overrides: list[str]) -> dict:
    """The recipe a variant's plans hold: the shipped presets with the variant's overrides applied, as the student
    planner applies them. Refuses (EvidenceError) an override of a setting the presets do not have: the planner would
    add a misspelt key silently and train the preset under the variant's name."""
    from nnunet_kd.planning import MISSING, PlanningError, apply_override, parse_override, setting_at
    from nnunet_kd.recipe import default_recipe

    recipe = default_recipe(None)
    for assignment in overrides:
        path, _ = parse_override(assignment)
        if setting_at(recipe, path) is MISSING:
            raise EvidenceError(f"Variant '{method}': '{assignment}' sets {path}, which the shipped recipe (plans/*.json "
                                f"presets) does not have: fix the name in its sweep file.")
        try:
            apply_override(recipe, assignment)
        except PlanningError as e:
            raise EvidenceError(f"Variant '{method}': {e}") from None
    return recipe


def check_variants(protocol: "Protocol") -> None:
    """Before any training: every variant the protocol runs is defined in its sweep file and sets settings that the
    recipe has."""
    for method, _ in protocol.runs:
        if method_and_variant(method)[1] is not None:
            variant_recipe(method, variant_overrides(protocol.sweeps_dir, method))


def variant_differences(plans: dict, configuration: str, method: str, overrides: list[str]) -> list[str]:
    """What a variant model's plans hold otherwise than the variant as defined now (its method's whole section of
    the recipe, preset plus overrides, and any override outside that section): empty when it is the variant. A model
    of an earlier definition of the variant, or of an earlier preset, is another recipe."""
    from nnunet_kd.recipe import without_nulls

    base = method_and_variant(method)[0]
    # null and absent are one setting (recipe.without_nulls): a preset that gains a setting at null is the same recipe
    wanted = without_nulls(variant_recipe(method, overrides)["methods"][base])
    held = without_nulls(plans.get("kd", {}).get(configuration, {}).get("methods", {}).get(base, {}))
    differences = [f"methods.{base}.{key}" for key in sorted(set(held) | set(wanted))
                   if key not in held or key not in wanted or not _same_setting(held[key], wanted[key])]
    prefix = f"methods.{base}."
    return differences + overrides_not_held(plans, configuration, [a for a in overrides if not a.startswith(prefix)])


def preset_differences(plans: dict, configuration: str, method: str) -> list[str]:
    """What a model of a method's preset (no variant) holds otherwise than the shipped preset now: empty when it is
    the preset. A method without a preset section of its own (logit_all_folds: the logit preset with the all-fold
    teachers' aggregation) is not checked here."""
    from nnunet_kd.recipe import default_recipe

    if method not in default_recipe(None)["methods"]:
        return []
    return variant_differences(plans, configuration, method, [])


def _same_setting(a, b) -> bool:
    """Equal settings, and of the same JSON type (true is not 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_setting(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    return (isinstance(a, bool), a) == (isinstance(b, bool), b)


def overrides_not_held(plans: dict, configuration: str, overrides: list[str]) -> list[str]:
    """The overrides (KEY=VALUE, KEY a path in the plans' kd.<configuration> recipe, VALUE as the planner's --set
    parses it) that a model's plans do not hold: a record of a variant whose definition has changed since."""
    from nnunet_kd.planning import MISSING, parse_override, setting_at

    recipe = plans.get("kd", {}).get(configuration, {})
    missing = []
    for assignment in overrides:
        path, value = parse_override(assignment)
        held = setting_at(recipe, path)
        if held is MISSING or not _same_setting(held, value):
            missing.append(assignment)
    return missing


# ---------------------------------------------------------------------------------------------------- test set
def per_case_metrics(summary_file: str) -> dict:
    """nnU-Net's evaluation summary -> {case: {label: {"Dice", "FP", "FN", "TP", "n_ref", "n_pred"}}} (labels as
    strings)."""
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    summary = load_summary_json(summary_file)
    out = {}
    for entry in summary["metric_per_case"]:
        case = basename(entry["reference_file"])
        case = case[:case.index(".")] if "." in case else case
        out[case] = {str(k): {m: float(v[m]) for m in ("Dice", "FP", "FN", "TP", "n_ref", "n_pred")}
                     for k, v in entry["metrics"].items()}
    return out


def mean_foreground_dice(case_metrics: dict) -> float:
    """Mean Dice over the foreground labels of one case (nnU-Net gives NaN Dice when a label is absent from both
    reference and prediction: such a label is skipped, as nnU-Net's foreground mean does)."""
    values = [m["Dice"] for m in case_metrics.values() if not np.isnan(m["Dice"])]
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------- statistics
def paired_bootstrap(diffs: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean and 95% percentile bootstrap interval of paired differences ``diffs`` (seeds x cases).

    Each resample draws cases with replacement (the test set is a sample of patients) and, independently,
    seeds with replacement (training is a random process), so the interval reflects both sources of variation; with
    few seeds (2-3 here) the seed part is coarse and understates the between-seed variance by (n - 1) / n. With a
    single seed it reduces to the ordinary case bootstrap."""
    diffs = np.atleast_2d(np.asarray(diffs, dtype=float))
    n_seeds, n_cases = diffs.shape
    rng = np.random.default_rng(seed)
    seeds_idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    cases_idx = rng.integers(0, n_cases, size=(n_boot, n_cases))
    # mean over the resampled seeds of the mean over the resampled cases
    per_seed_case_means = diffs[:, cases_idx]            # (n_seeds, n_boot, n_cases)
    per_seed_means = per_seed_case_means.mean(axis=2).T  # (n_boot, n_seeds)
    boot = np.take_along_axis(per_seed_means, seeds_idx, axis=1).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"mean_diff": float(diffs.mean()), "ci95": [float(low), float(high)], "n_cases": int(n_cases),
            "n_seeds": int(n_seeds), "mean_diff_per_seed": [float(v) for v in diffs.mean(axis=1)]}


def plateau(curve: list[float], fraction: float = 0.2, tolerance: float = 0.01) -> dict:
    """Has a validation curve stopped improving? The gain of a least-squares line over its last ``fraction`` of
    epochs (slope x span). ``flat`` when that gain is below ``tolerance`` (0.01 Dice by default)."""
    curve = [float(v) for v in curve]
    n = max(3, int(round(len(curve) * fraction)))
    if len(curve) < n:
        return {"flat": False, "gain_over_last_fifth": None, "epochs": len(curve)}
    tail = np.asarray(curve[-n:])
    slope = np.polyfit(np.arange(n), tail, 1)[0]
    gain = float(slope * (n - 1))
    return {"flat": bool(gain < tolerance), "gain_over_last_fifth": gain, "epochs_in_window": n,
            "tolerance": tolerance, "epochs": len(curve)}


BUDGET_CHECK_TOLERANCE = 0.01


def budget_doubling_check(shorter: dict, longer: dict, configuration: str, longer_records: str,
                          tolerance: float = BUDGET_CHECK_TOLERANCE) -> dict:
    """Has the plain student stopped improving at this budget? Its seeds (``shorter``: seed -> record) against the same
    models trained for longer (``longer``: seed -> record of a protocol at a larger student budget, same split and
    fold), paired by seed and validation case. The last-fifth test of ``plateau`` cannot answer it: nnU-Net's
    polynomial learning rate is near zero at the end of every budget, so every curve flattens there, and doubling the
    budget has still raised the validation Dice by more than that test's tolerance (Hippocampus 2d, 3,000 to 6,000
    iterations). The budget counts as final quality (``stopped_improving``) only when the upper end of the 95%
    interval of the validation gain is below ``tolerance``: a gain of that size is then ruled out. Records without
    per-case validation Dice (written before it was recorded) give the mean gain and no decision."""
    seeds = sorted(set(shorter) & set(longer))
    if not seeds:
        raise EvidenceError(f"{longer_records}: no record of the plain student's seeds {sorted(shorter)} there. The "
                            f"budget check pairs each seed with the same model at a longer budget: give the records "
                            f"folder of a protocol with more --student-epochs and the same split and seeds.")
    a, b = [longer[s] for s in seeds], [shorter[s] for s in seeds]
    budget_a = {_training_budget(_training_section(r["plans"], configuration)) for r in a}
    budget_b = {_training_budget(_training_section(r["plans"], configuration)) for r in b}
    iterations = {name: sorted({(e or 0) * (i or 0) for e, i, _ in budgets})
                  for name, budgets in (("longer", budget_a), ("shorter", budget_b))}
    if len(iterations["longer"]) != 1 or len(iterations["shorter"]) != 1 \
            or iterations["longer"][0] <= iterations["shorter"][0]:
        raise EvidenceError(f"{longer_records}: its plain students trained for {iterations['longer']} iterations, "
                            f"this protocol's for {iterations['shorter']}: the budget check needs one longer budget "
                            f"(e.g. twice --student-epochs, with its own --tag).")
    test = compare_record_sets(a, b, configuration)
    out = {"seeds": seeds, "longer_records": longer_records, "iterations": iterations["shorter"][0],
           "longer_iterations": iterations["longer"][0], "tolerance": tolerance,
           "test_gain": {k: test[k] for k in ("mean_diff", "ci95", "n_cases", "mean_diff_per_seed")}}
    if all(isinstance(r.get("validation"), dict) for r in a + b):
        cases = sorted(b[0]["validation"])
        if any(sorted(r["validation"]) != cases for r in a + b):
            raise EvidenceError(f"{longer_records}: its plain students were validated on other cases than this "
                                f"protocol's: the budget check pairs models of the same fold of the same split.")
        diffs = (np.array([[r["validation"][c] for c in cases] for r in a])
                 - np.array([[r["validation"][c] for c in cases] for r in b]))
        diffs = diffs[:, ~np.isnan(diffs).any(axis=0)]  # a case without foreground in reference and predictions
        gain = paired_bootstrap(diffs)
        out["validation_gain"] = {k: gain[k] for k in ("mean_diff", "ci95", "n_cases", "mean_diff_per_seed")}
        out["stopped_improving"] = bool(gain["ci95"][1] < tolerance)
    else:
        mean = float(np.mean([ra["validation_mean_dice"] - rb["validation_mean_dice"] for ra, rb in zip(a, b)]))
        out["validation_gain"] = {"mean_diff": mean, "ci95": None, "n_cases": None}
        out["stopped_improving"] = None
    return out


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class Protocol:
    raw_dataset: str               # the source DatasetXXX_Name folder (read only)
    split_file: str                # benchmarks/splits/<dataset>.json
    n_test: int
    workdir: str
    configuration: str
    runs: list                     # [(method, width)], in the order they are trained
    seeds: list
    teacher_epochs: int
    student_epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int = 10
    # The students' own (None: val_iterations_per_epoch). Their plateau test reads their validation curve: where a
    # validation batch holds few slices (PROMISE12 2d: 4) it needs more batches than the teacher was trained with,
    # and the teacher (archived, reused) keeps its own plans.
    student_val_iterations_per_epoch: int | None = None
    max_batch_size: int | None = None
    # Students on part of the labels (issue: multi-scale contrastive KD): every student of this protocol, plain and KD,
    # trains with labels on the same seeded fraction of the fold's training cases (one draw, seed
    # labelled_fraction_seed, for every training seed, so that seeds pair); methods with train_on_unlabelled also see
    # the rest of them, and the images of unlabelled_images (a folder, e.g. PROMISE12's imagesTs), without labels.
    labelled_fraction: float | None = None
    labelled_fraction_seed: int = 0
    unlabelled_images: str | None = None
    teacher_seed: int = 0
    # Multi-teacher KD: this many teachers, each trained on one of as many disjoint seeded subsets of the fold's
    # training cases (the student still learns from the fold's training cases), for subset_teacher_epochs (None: the
    # teacher's budget; k teachers at the full budget cost k teachers' training, more than a 2-core CPU session holds).
    subset_teachers: int = 3
    subset_teacher_epochs: int | None = None
    fold: int = 0
    device: str = "cpu"
    latency_repeats: int = 5
    # What outlives the session (committed; see "Across sessions" below). None: the workspace only.
    records_dir: str | None = None       # one record per finished model
    teacher_archive: str | None = None   # the teacher, as a plain nnU-Net model folder
    # Where the variants of runs 'METHOD:VARIANT' are defined: <sweeps_dir>/<METHOD>.json (benchmarks/sweeps).
    sweeps_dir: str | None = None
    # Records of this protocol's plain students at a longer student budget (another --tag's records folder): the
    # budget-doubling check (budget_doubling_check) that tells final quality from learning speed.
    budget_check_records: str | None = None
    # Plain students only: the teacher of another records folder (its record: plans, weights' SHA-256, test Dice)
    # instead of a teacher trained or restored here. A plain student learns nothing from the teacher's weights, only
    # its architecture (the student's plans are derived from the teacher's), so a longer budget of a series whose
    # teacher archive is lost can still be checked (check_teacher_from_records).
    teacher_from_records: str | None = None

    @property
    def student_val_iterations(self) -> int:
        return self.student_val_iterations_per_epoch or self.val_iterations_per_epoch

    @property
    def subset_teacher_budget(self) -> int:
        return self.teacher_epochs if self.subset_teacher_epochs is None else self.subset_teacher_epochs

    @property
    def dataset_name(self) -> str:
        return basename(os.path.normpath(self.raw_dataset))

    @property
    def dataset_id(self) -> int:
        return int(self.dataset_name[len("Dataset"):len("Dataset") + 3])


TEACHER_PLANS = "nnUNetPlans_evidence_teacher"
TEACHER_TRAINER = "nnUNetTrainerBudget"
# Subset teachers (multi-teacher KD): nnUNetv2_kd_plan_subset_teachers splits the fold's training cases into
# Protocol.subset_teachers disjoint seeded subsets; plans <SUBSET_TEACHER_PLANS><i>of<k>, the protocol teacher's budget.
SUBSET_TEACHER_PLANS = "nnUNetPlans_evidence_subset"
SUBSET_ENSEMBLE = "ensemble_of_subset_teachers"


class Workspace:
    """The nnU-Net folders of one protocol, outside the repository; every method here is idempotent."""

    def __init__(self, protocol: Protocol):
        from nnunet_kd.pipeline import nnunet_env

        self.p = protocol
        self.env = nnunet_env(protocol.workdir, cpu_friendly=protocol.device == "cpu")
        self.log = join(protocol.workdir, "commands.log")
        self.commands_run = 0  # how many nnU-Net commands this workspace object has run (reports only after work)
        self.preprocessed = join(self.env["nnUNet_preprocessed"], protocol.dataset_name)
        self.results = join(self.env["nnUNet_results"], protocol.dataset_name)
        self.split = load_or_make_split(protocol.split_file, protocol.raw_dataset, protocol.n_test)
        self.raw, self.test_images, self.test_labels = prepare_workspace(
            protocol.raw_dataset, self.split, self.env["nnUNet_raw"], join(protocol.workdir, "test"))

    def dataset_json(self) -> dict:
        """The training cases' dataset.json (nnU-Net copies it into the preprocessed folder; this one exists before
        preprocessing, so a report from committed records needs no preprocessed workspace)."""
        return load_json(join(self.raw, "dataset.json"))

    def command(self, name: str, args: list[str], env: dict | None = None) -> None:
        from nnunet_kd.pipeline import console_script, run

        run(console_script(name) + [str(a) for a in args], env or self.env, self.log, quiet=True)
        self.commands_run += 1

    def preprocess(self) -> None:
        if not isfile(join(self.preprocessed, "nnUNetPlans.json")):
            # nnU-Net 2.8.1's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0.
            plan_env = {k: v for k, v in self.env.items() if k != "nnUNet_n_proc_DA"}
            self.command("nnUNetv2_plan_and_preprocess", ["-d", self.p.dataset_id, "-c", self.p.configuration,
                                                          "-np", 2, "--verify_dataset_integrity"], plan_env)
        write_crossval_split(self.preprocessed, self.split)

    def folder(self, trainer: str, plans: str) -> str:
        """The run's folder; a workspace made by an older version keeps its older trainer names (LEGACY_TRAINERS)."""
        from nnunet_kd.pipeline import trainer_of_existing_run

        trainer = trainer_of_existing_run(self.env["nnUNet_results"], self.p.dataset_name, trainer, plans,
                                          self.p.configuration, self.p.fold)
        return join(self.results, model_folder_name(trainer, plans, self.p.configuration))

    def train(self, trainer: str, plans: str, fold: int | None = None) -> str:
        """``fold``: another cross-validation fold than the protocol's (a fold teacher)."""
        from nnunet_kd.compare import train_or_reuse

        folder, ran = train_or_reuse(self.env, self.log, self.p.dataset_id, self.p.dataset_name, self.p.configuration,
                                     self.p.fold if fold is None else fold, trainer, plans, self.p.device, quiet=True)
        self.commands_run += ran
        return folder

    def teacher(self) -> str:
        from nnunet_kd.pipeline import write_budget_plans

        plans_file = write_budget_plans(self.preprocessed, "nnUNetPlans", TEACHER_PLANS, self.p.configuration,
                                        self.p.teacher_epochs, self.p.iterations_per_epoch,
                                        self.p.val_iterations_per_epoch, seed=self.p.teacher_seed,
                                        max_batch_size=self.p.max_batch_size)
        expected = {"dataset": self.p.dataset_name, "configuration": self.p.configuration,
                    "split_sha256": sha256_of(self.p.split_file)}
        if self.p.teacher_archive and restore_teacher(self.p.teacher_archive, self.folder(TEACHER_TRAINER, TEACHER_PLANS),
                                                      self.p.fold, plans_file, expected):
            print(f"  restored the archived teacher {self.p.teacher_archive}", flush=True)
        return self.train(TEACHER_TRAINER, TEACHER_PLANS)

    def teacher_from_records(self) -> str:
        """The teacher of Protocol.teacher_from_records for plain students: its record joins this protocol's records
        (the report compares every student with it) and its model folder holds its plans and dataset.json only (what
        the student planner reads), never a checkpoint, so nothing here can distil from or evaluate it."""
        folder = self.folder(TEACHER_TRAINER, TEACHER_PLANS)
        record = check_teacher_from_records(self.p, self.split)
        if isfile(join(folder, f"fold_{self.p.fold}", "checkpoint_final.pth")):
            raise EvidenceError(f"--teacher-from-records: {folder} holds a trained teacher already; use a new --workdir "
                                f"for plain students of the teacher of {self.p.teacher_from_records}.")
        if self.p.records_dir:
            own = load_records(self.p.records_dir).get(record["model"])
            if own is None:
                os.makedirs(self.p.records_dir, exist_ok=True)
                write_json_atomically({k: v for k, v in record.items() if k != "folder"},
                                      join(self.p.records_dir, record["model"] + ".json"))
            elif own["network_weights_sha256"] != record["network_weights_sha256"]:
                raise EvidenceError(f"--teacher-from-records {self.p.teacher_from_records}: its teacher is not the one "
                                    f"of the committed records in {self.p.records_dir} (other network weights). Use a "
                                    f"new --tag for the plain students of that teacher.")
        os.makedirs(folder, exist_ok=True)
        write_json_atomically(record["plans"], join(folder, "plans.json"))
        write_json_atomically(self.dataset_json(), join(folder, "dataset.json"))
        return folder

    def archive_teacher(self, teacher_folder: str) -> list[str]:
        """The finished, evaluated teacher into Protocol.teacher_archive (once); returns the files written."""
        import platform

        if not self.p.teacher_archive:
            return []
        p = self.p
        return archive_teacher(teacher_folder, p.teacher_archive, p.fold, {
            "dataset": p.dataset_name, "configuration": p.configuration, "split_file": basename(p.split_file),
            "split_sha256": sha256_of(p.split_file), "teacher_epochs": p.teacher_epochs,
            "iterations_per_epoch": p.iterations_per_epoch, "val_iterations_per_epoch": p.val_iterations_per_epoch,
            "max_batch_size": p.max_batch_size, "teacher_seed": p.teacher_seed,
            "trained_on": {**this_machine(p.device), "host": platform.node()}})

    def subset_teachers(self, evaluate: bool = True) -> list[str]:
        """Protocol.subset_teachers teachers, each trained (teacher budget and seed) on one disjoint seeded subset of
        the fold's training cases, each evaluated on the test cases with probabilities, and their ensemble (nnU-Net's
        nnUNetv2_ensemble: the mean of their probabilities) evaluated (not with ``evaluate=False``: a recipe sweep
        never predicts the test cases); returns their model folders."""
        p, k = self.p, self.p.subset_teachers
        plan_env = {key: v for key, v in self.env.items() if key != "nnUNet_n_proc_DA"}  # see preprocess()
        self.command("nnUNetv2_kd_plan_subset_teachers", [
            "-d", p.dataset_id, "-c", p.configuration, "-f", p.fold, "-k", k, "-o", SUBSET_TEACHER_PLANS,
            "--seed", 0, "--epochs", p.subset_teacher_budget, "--iterations-per-epoch", p.iterations_per_epoch,
            "--val-iterations-per-epoch", p.val_iterations_per_epoch, "--training-seed", p.teacher_seed]
            + (["--max-batch-size", p.max_batch_size] if p.max_batch_size else []) + ["--overwrite"], plan_env)
        folders = [self.train(TEACHER_TRAINER, f"{SUBSET_TEACHER_PLANS}{i}of{k}") for i in range(1, k + 1)]
        if not evaluate:
            return folders
        summaries = [self.evaluate_on_test(f, save_probabilities=True) for f in folders]
        out = join(self.results, _subset_ensemble_name(p.configuration, k), f"fold_{p.fold}", "test_predictions")
        summary = join(out, "summary.json")
        if not isfile(summary) or os.path.getmtime(summary) < max(os.path.getmtime(x) for x in summaries):
            if isdir(out):
                shutil.rmtree(out)
            self.command("nnUNetv2_ensemble", ["-i"] + [dirname(x) for x in summaries] + ["-o", out, "-np", 1])
            self.command("nnUNetv2_evaluate_folder", [self.test_labels, out, "-djfile", join(folders[0], "dataset.json"),
                                                      "-pfile", join(folders[0], "plans.json"), "-o", summary, "-np", 1])
        return folders

    def fold_teachers(self) -> None:
        """The teacher of every other cross-validation fold of the split's training cases (self.teacher() is the
        protocol fold's; same plans, budget and seed, in its model folder), for the peer at its defaults
        (logit_all_folds). Not evaluated on the test cases: only the student distilled from them is a row."""
        for fold in range(crossval_folds(self)):
            if fold != self.p.fold:
                self.train(TEACHER_TRAINER, TEACHER_PLANS, fold)

    def plan_all_folds_student(self, teacher_folder: str, width: float, seed: int) -> str:
        """Plans of the peer at its defaults: every fold of the teacher as a teacher, their logits averaged (the folds
        other than the student's trained on its validation cases: accepted, as the peer does; the test cases are
        unseen by all of them)."""
        return self.plan_student(
            teacher_folder, width, seed,
            plans_name=student_plans_name(width, seed, self.p.labelled_fraction, self.p.unlabelled_images is not None,
                                          fold_teachers=crossval_folds(self)),
            overrides=["methods.logit.teacher_aggregation=logit_mean"],
            extra=["--teacher-fold", *range(crossval_folds(self)), "--allow-validation-overlap"])

    def plan_student(self, teacher_folder: str | list[str], width: float, seed: int, plans_name: str | None = None,
                     overrides: list[str] = (), extra: list = (), variant: str | None = None) -> str:
        """Student plans at this protocol's budget; ``teacher_folder``: one teacher, or a list (the student of those
        teachers, with plans of its own); ``overrides``: the planner's --set KEY=VALUE (a recipe sweep's variant);
        ``extra``: more planner arguments; ``variant``: the name of the recipe variant ``overrides`` define (plans of
        its own)."""
        teachers = [teacher_folder] if isinstance(teacher_folder, str) else list(teacher_folder)
        name = plans_name or student_plans_name(width, seed, self.p.labelled_fraction, self.p.unlabelled_images is not None,
                                                len(teachers) if len(teachers) > 1 else None, variant=variant)
        labels = [] if self.p.labelled_fraction is None else \
            ["--labelled-fraction", self.p.labelled_fraction, "--labelled-fraction-seed", self.p.labelled_fraction_seed]
        if self.p.unlabelled_images is not None:
            labels += ["--unlabelled-images", self.p.unlabelled_images]
        self.command("nnUNetv2_kd_plan_student", labels + [
            "-d", self.p.dataset_id, "-c", self.p.configuration, *[a for t in teachers for a in ("--teacher", t)],
            "--width", width,
            "-o", name, "--epochs", self.p.student_epochs, "--iterations-per-epoch", self.p.iterations_per_epoch,
            "--val-iterations-per-epoch", self.p.student_val_iterations, "--seed", seed, "--overwrite"]
            + [arg for assignment in overrides for arg in ("--set", assignment)] + list(extra))
        return name

    def evaluate_on_test(self, folder: str, save_probabilities: bool = False) -> str:
        """nnUNetv2_predict on the held-out images, then nnU-Net's evaluation; returns the summary file.
        ``save_probabilities``: keep nnU-Net's .npz probabilities too (for nnUNetv2_ensemble)."""
        out = join(folder, f"fold_{self.p.fold}", "test_predictions")
        summary = join(out, "summary.json")
        checkpoint = join(folder, f"fold_{self.p.fold}", "checkpoint_final.pth")
        has_probabilities = isdir(out) and any(f.endswith(".npz") for f in os.listdir(out))
        if isfile(summary) and os.path.getmtime(summary) > os.path.getmtime(checkpoint) and \
                (has_probabilities or not save_probabilities):
            return summary
        trainer, plans, configuration = basename(folder).split("__")
        if isdir(out):  # a prediction interrupted earlier (or of another test set): never evaluate stale files
            shutil.rmtree(out)
        self.command("nnUNetv2_predict", ["-i", self.test_images, "-o", out, "-d", self.p.dataset_id, "-c",
                                          configuration, "-tr", trainer, "-p", plans, "-f", self.p.fold,
                                          "-device", self.p.device, "-npp", 1, "-nps", 1, "--disable_tta"]
                     + (["--save_probabilities"] if save_probabilities else []))
        # nnU-Net's own evaluation command (labels, regions and ignore label from the model's dataset.json/plans)
        self.command("nnUNetv2_evaluate_folder", [self.test_labels, out, "-djfile", join(folder, "dataset.json"),
                                                  "-pfile", join(folder, "plans.json"), "-o", summary, "-np", 1])
        return summary


def run_protocol(protocol: Protocol, report=None) -> None:
    """Train and evaluate everything the protocol names that is not finished; ``report()`` after every model."""
    check_variants(protocol)  # a misspelt variant stops here, before hours of training
    ws = Workspace(protocol)
    # Multi-teacher students learn from the subset teachers only: the protocol's teacher is trained for them only
    # when no committed record holds it (the report compares every student with it).
    bases = [method_and_variant(m)[0] for m, _ in protocol.runs]
    needs_teacher = not protocol.teacher_from_records and (
        any(m != "multi_teacher" for m in bases) or not _teacher_is_committed(ws))
    if needs_teacher:
        refuse_a_new_teacher_beside_committed_records(ws)  # before preprocessing too: minutes of it for nothing
    ws.preprocess()
    teacher = ws.teacher_from_records() if protocol.teacher_from_records else None
    if needs_teacher:
        teacher = ws.teacher()
        ws.evaluate_on_test(teacher)
        ws.archive_teacher(teacher)
        if report:
            report(ws)
    subset_teachers = ws.subset_teachers() if "multi_teacher" in bases else None
    if subset_teachers and report:
        report(ws)
    if "logit_all_folds" in bases:
        ws.fold_teachers()
    for method, width in protocol.runs:
        base, variant = method_and_variant(method)
        for seed in protocol.seeds:
            if base == "logit_all_folds":
                plans = ws.plan_all_folds_student(teacher, width, seed)
            else:
                plans = ws.plan_student(subset_teachers if base == "multi_teacher" else teacher, width, seed,
                                        overrides=[] if variant is None else variant_overrides(protocol.sweeps_dir, method),
                                        variant=variant)
            before = ws.commands_run
            folder = ws.train(TRAINERS[base], plans)
            ws.evaluate_on_test(folder)
            if report and ws.commands_run > before:  # a reused, already reported model changes nothing
                report(ws)


# ------------------------------------------------------------------------------------------- across sessions
# A working session ends after a few hours and the next one may run on a fresh machine where the workspace is gone;
# on a 2-core CPU one session trains the teacher and a seed or two. Two things therefore outlive the workspace, so that
# later runs add seeds and widths to the same evidence instead of starting over:
# * the teacher (Protocol.teacher_archive, a folder outside the repository: its checkpoint exceeds the project's limit
#   on tracked files): its nnU-Net model folder without optimiser state, with a manifest of every file's SHA-256; a
#   fresh workspace restores it instead of training another teacher (whose soft targets would differ: a CPU run is
#   repeatable on one machine, not across machines);
# * one committed record per finished, evaluated model (Protocol.records_dir/<model folder>.json): per-case test
#   metrics, validation Dice, curves, the plans it trained with and the SHA-256 of the network weights of the teacher
#   it learned from. The report pools the workspace's models with the records of the models it does not hold (same
#   budget, same teacher weights).
TEACHER_MANIFEST = "manifest.json"


class EvidenceError(RuntimeError):
    """Committed evidence that cannot be used as it is; the message names the file and the fix."""


def sha256_of(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def network_weights_sha256(checkpoint_file: str) -> str:
    """A model's identity: the SHA-256 of its network weights (sorted names, shapes, dtypes and bytes). Unlike the
    file's hash it survives re-saving, and the archive drops the optimiser state."""
    import hashlib

    import torch
    from nnunet_kd.teacher import load_nnunet_checkpoint

    digest = hashlib.sha256()
    for name, tensor in sorted(load_nnunet_checkpoint(checkpoint_file)["network_weights"].items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _archived_files(fold: int) -> list[str]:
    """What a restored teacher needs: nnU-Net's model files (predictor, student planner, leakage guard) and the two
    evaluations the report reads (so a restored teacher is not predicted again)."""
    return ["plans.json", "dataset.json", "dataset_fingerprint.json", f"fold_{fold}/checkpoint_final.pth",
            f"fold_{fold}/training_cases.json", f"fold_{fold}/validation/summary.json",
            f"fold_{fold}/test_predictions/summary.json"]


def archive_teacher(folder: str, archive: str, fold: int, description: dict) -> list[str]:
    """Write the teacher archive once (an existing one is never replaced); returns the files written. The checkpoint
    keeps nnU-Net's keys but its optimiser state (half its size, needed only to resume the teacher's training)."""
    import torch
    from nnunet_kd.teacher import load_nnunet_checkpoint

    if isfile(join(archive, TEACHER_MANIFEST)):
        return []
    staging = archive.rstrip("/") + ".partial"
    if isdir(staging):
        shutil.rmtree(staging)
    files = {}
    missing = [rel for rel in _archived_files(fold) if not isfile(join(folder, rel))]
    if missing:
        raise EvidenceError(f"The teacher {folder} lacks {missing}: only a finished, evaluated teacher is archived.")
    if os.path.exists(archive):
        raise EvidenceError(f"{archive} exists but holds no {TEACHER_MANIFEST} (an interrupted archive or another "
                            f"folder): move it away, then run again.")
    for rel in _archived_files(fold):
        source, target = join(folder, rel), join(staging, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if rel.endswith("checkpoint_final.pth"):
            checkpoint = load_nnunet_checkpoint(source)
            checkpoint.pop("optimizer_state", None)
            checkpoint.pop("grad_scaler_state", None)
            torch.save(checkpoint, target)
        else:
            shutil.copyfile(source, target)
        files[rel] = sha256_of(target)
    save_json({"model_folder": basename(folder.rstrip("/")), "fold": fold, "files": files, **description},
              join(staging, TEACHER_MANIFEST), sort_keys=False)
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    os.replace(staging, archive)  # all or nothing: a killed session leaves only the .partial folder
    return [join(archive, rel) for rel in (*files, TEACHER_MANIFEST)]


def restore_teacher(archive: str, folder: str, fold: int, plans_file: str, expected: dict | None = None) -> bool:
    """Copy the archived teacher into this workspace when the workspace has no finished teacher. Refuses, before
    copying anything, an archive whose files do not match its manifest, whose manifest disagrees with ``expected``
    (dataset, configuration, the split file's SHA-256: a teacher of another split may have trained on today's test
    cases) or the fold, or that was trained with other plans (budget, batch size, seed) than ``plans_file``.
    Returns whether it restored."""
    manifest_file = join(archive, TEACHER_MANIFEST)
    if not isfile(manifest_file) or isfile(join(folder, f"fold_{fold}", "checkpoint_final.pth")):
        return False
    manifest = load_json(manifest_file)
    for key, value in {"fold": fold, **(expected or {})}.items():
        if manifest.get(key) != value:
            raise EvidenceError(f"The archived teacher {archive} was made for {key} {manifest.get(key)!r}, this "
                                f"protocol has {value!r} ({manifest_file}): restore the split file and settings it "
                                f"was made with, or pass --no-teacher-archive (and --no-records) to train another "
                                f"teacher in the workspace.")
    for rel, digest in manifest["files"].items():
        path = join(archive, rel)
        if not isfile(path) or sha256_of(path) != digest:
            raise EvidenceError(f"The archived teacher file {path} does not match its SHA-256 in {manifest_file} "
                                f"(a partial checkout or an edit): restore it with git checkout -- {archive}, or "
                                f"delete the archive to train a new teacher.")
    if load_json(join(archive, "plans.json")) != load_json(plans_file):
        raise EvidenceError(f"The archived teacher {archive} was trained with other plans than this protocol's teacher "
                            f"({plans_file}: another budget, batch size, seed or nnU-Net version): run with the "
                            f"budget in {manifest_file}, or pass --no-teacher-archive to train a teacher in the "
                            f"workspace.")
    for rel in manifest["files"]:
        os.makedirs(os.path.dirname(join(folder, rel)), exist_ok=True)
        shutil.copyfile(join(archive, rel), join(folder, rel))
    if manifest.get("trained_on"):  # the machine that trained it, not this one
        save_json(manifest["trained_on"], join(folder, TRAINED_ON_FILE), sort_keys=False)
    now = time.time() + 1  # the evaluations are newer than the checkpoint: evaluate_on_test reuses them
    for rel in manifest["files"]:
        if rel.endswith("summary.json"):
            os.utime(join(folder, rel), (now, now))
    return True


def _write_record(records_dir: str, document: dict) -> str:
    """<records_dir>/<model>.json, written atomically (a kill mid-write leaves the previous record)."""
    os.makedirs(records_dir, exist_ok=True)
    path = join(records_dir, document["model"] + ".json")
    write_json_atomically(document, path)
    return path


def save_record(records_dir: str, record: dict, teacher_sha256: str | None) -> str:
    """Commit-ready record of one finished, evaluated model (atomic write). ``teacher_sha256``: the checkpoint the
    student learned from (None for the teacher itself)."""
    folder = record["folder"]
    document = {"model": basename(folder.rstrip("/")), "plans": load_json(join(folder, "plans.json")),
                "network_weights_sha256": record["network_weights_sha256"],
                "teacher_network_weights_sha256": teacher_sha256,
                **{k: v for k, v in record.items() if k not in ("folder", "network_weights_sha256")}}
    return _write_record(records_dir, document)


def record_name(record: dict) -> str:
    """The model folder name of a record: committed records carry it, a workspace's records their folder."""
    return record.get("model") or basename(record["folder"].rstrip("/"))


def load_records(records_dir: str | None) -> dict:
    """Model folder name -> record (``folder`` None: the model is not in this workspace)."""
    if not records_dir or not isdir(records_dir):
        return {}
    out = {}
    for name in sorted(os.listdir(records_dir)):
        if name.endswith(".json") and name != "latency.json":
            document = load_json(join(records_dir, name))
            out[document["model"]] = dict(document, folder=None)
    return out


# ---------------------------------------------------------------------------------------------------- report
def _voxel_volume_ml(label_file: str) -> float:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(label_file)
    reader.ReadImageInformation()
    return float(np.prod(reader.GetSpacing())) / 1000.0


def _curves(folder: str, fold: int) -> dict:
    from nnunet_kd.teacher import load_nnunet_checkpoint

    logging = load_nnunet_checkpoint(join(folder, f"fold_{fold}", "checkpoint_final.pth"))["logging"]
    pseudo = [float(np.nanmean(v)) for v in logging.get("dice_per_class_or_region", [])]
    return {"ema_fg_dice": [float(v) for v in logging.get("ema_fg_dice", [])], "pseudo_dice": pseudo}


TRAINED_ON_FILE = "trained_on.json"


def this_machine(device: str) -> dict:
    """The machine a model trains on, as its record names it: device label, CPU or GPU name, torch version."""
    import torch

    from nnunet_kd.benchmark import device_description
    from nnunet_kd.compare import device_label

    info = device_description(torch.device(device))
    # the CPU's or GPU's name, not the reporting process's thread count
    name = info["device_name"] if device.startswith("cuda") else f"{info['cpu_name']} ({info['cpu_count']} logical CPUs)"
    return {"device": device_label(device), "name": name, "torch": torch.__version__}


def trained_on(folder: str, device: str) -> dict:
    """Where a workspace's model was trained: the stamp in its folder, written the first time its record is made (in
    the workspace that trained it: records are made right after training; a restored archive's teacher gets its
    archive's stamp), else this machine, stamped now."""
    path = join(folder, TRAINED_ON_FILE)
    if not isfile(path):
        save_json(this_machine(device), path, sort_keys=False)
    return load_json(path)


def _model_record(ws: "Workspace", folder: str) -> dict | None:
    """Everything measured for one finished model, or None when it is not finished and evaluated."""
    fold = ws.p.fold
    summary = join(folder, f"fold_{fold}", "test_predictions", "summary.json")
    validation = join(folder, f"fold_{fold}", "validation", "summary.json")
    if not (isfile(summary) and isfile(validation)):
        return None
    return {"folder": folder, "test": per_case_metrics(summary),
            "validation_mean_dice": float(load_json(validation)["foreground_mean"]["Dice"]),
            # per case, for the budget check's paired interval on validation cases (recipe and budget choices are
            # made on validation, never on test cases)
            "validation": {case: mean_foreground_dice(m) for case, m in per_case_metrics(validation).items()},
            "curves": _curves(folder, fold), "plans": load_json(join(folder, "plans.json")),
            "network_weights_sha256": network_weights_sha256(join(folder, f"fold_{fold}", "checkpoint_final.pth")),
            "trained_on": trained_on(folder, ws.p.device)}


def _dice_matrix(records: list[dict], cases: list[str]) -> np.ndarray:
    return np.array([[mean_foreground_dice(r["test"][c]) for c in cases] for r in records])


def latency(ws: "Workspace", folder: str | None, plans: dict | None = None) -> dict:
    """Sliding-window prediction of one real test volume with nnU-Net's predictor (no mirroring): median, min and max
    of ``latency_repeats`` runs after one warm-up, with 1 thread and with all of this machine's cores.

    A model of this workspace is timed from its checkpoint (``folder``). A model known only from a committed record
    (``folder`` None) is timed through the network its ``plans`` define, freshly initialised
    (nnunet_kd.width_budget.time_plans): the weights do not change the time, and every width of one results file is
    then timed on the same machine."""
    import copy

    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.cost import make_predictor, median_inference_seconds
    from nnunet_kd.width_budget import time_plans

    device = torch.device(ws.p.device)
    if folder is not None:
        # nnU-Net's predictor runs in this process and finds trainer classes through os.environ.
        os.environ.update({k: ws.env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                                  "nnUNet_extTrainer")})
        predictor = make_predictor(folder, ws.p.fold, device=device, use_mirroring=False)
        plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
        dataset_json = predictor.dataset_json

        def timing_of(data):
            return median_inference_seconds(predictor, data, repeats=ws.p.latency_repeats, warmup=1)
        weights = "trained (the model's checkpoint)"
    elif plans is not None:
        plans_manager = PlansManager(copy.deepcopy(plans))
        configuration_manager = plans_manager.get_configuration(ws.p.configuration)
        dataset_json = ws.dataset_json()

        def timing_of(data):
            return time_plans(plans, dataset_json, ws.p.configuration, data, device,
                              repeats=ws.p.latency_repeats, warmup=1)
        weights = "freshly initialised network of the record's plans (a model of another session: weights do not " \
                  "change the time)"
    else:
        raise ValueError("latency() needs a model folder or the plans of a committed record")
    case = ws.split["test"][0]
    image_files = sorted(join(ws.test_images, f) for f in os.listdir(ws.test_images) if f.startswith(case + "_"))
    data = _preprocess(plans_manager, configuration_manager, dataset_json, image_files)
    threads_before = torch.get_num_threads()
    result = {"case": case, "preprocessed_shape": list(data.shape), "device": ws.p.device, "weights": weights}
    try:
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            timing = timing_of(data)
            result[f"threads_{threads}"] = {"median_s": timing["median_s"], "min_s": min(timing["all_s"]),
                                            "max_s": max(timing["all_s"]), "runs": len(timing["all_s"])}
    finally:
        torch.set_num_threads(threads_before)
    return result


def _preprocess(plans_manager, configuration_manager, dataset_json: dict, image_files: list[str]):
    """nnU-Net's own preprocessing of one raw case, as its predictor does it."""
    import torch

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case(image_files, None, plans_manager, configuration_manager, dataset_json)
    return torch.from_numpy(data)


def _parse_student_folder(name: str, configuration: str) -> tuple[str, float, int, float | None, int | None] | None:
    """'<trainer>__nnUNetPlans_evidence_w0p25_s1__<cfg>' -> (method, 0.25, 1, None, None),
    '<trainer>__nnUNetPlans_evidence_w0p25_f0p5_s1__<cfg>' -> (method, 0.25, 1, 0.5, None) (labelled fraction) and
    'nnUNetTrainerKD_MultiTeacher__nnUNetPlans_evidence_w0p25_k3_s1__<cfg>' -> ('multi_teacher', 0.25, 1, None, 3)
    (subset teachers), 'nnUNetTrainerKD_Logit__nnUNetPlans_evidence_w0p5_folds5_s0__<cfg>' -> ('logit_all_folds',
    0.5, 0, None, None) (the teacher's folds), '<KD trainer>__nnUNetPlans_evidence_w0p25_f0p5_vseg1_s0__<cfg>' ->
    ('<method>:seg1', 0.25, 0, 0.5, None) (a recipe variant); None for anything else."""
    parts = name.split("__")
    if len(parts) != 3 or parts[2] != configuration or not parts[1].startswith("nnUNetPlans_evidence_w"):
        return None
    from nnunet_kd.pipeline import LEGACY_TRAINERS

    methods = {v: k for k, v in TRAINERS.items() if k != "logit_all_folds"}  # its trainer is logit's
    methods.update({old: methods[new] for new, olds in LEGACY_TRAINERS.items() if new in methods for old in olds})
    if parts[0] not in methods:
        return None
    method = methods[parts[0]]
    width, _, seed = parts[1][len("nnUNetPlans_evidence_w"):].partition("_s")
    width, has_variant, variant = width.partition("_v")
    if has_variant and not VARIANT_NAME.match(variant):
        return None
    width, _, folds = width.partition("_folds")
    if folds:  # plans of the teacher's folds: only the peer at its defaults trains from them
        if method != "logit" or not folds.isdigit():
            return None
        method = "logit_all_folds"
    width, _, teachers = width.partition("_k")
    width, _, fraction = width.partition("_f")
    fraction = fraction[:-1] if fraction.endswith("x") else fraction  # extra unlabelled images: collect() checks plans
    if (method == "multi_teacher") != bool(teachers):
        return None  # a multi-teacher student trains only from its own plans, and only it does
    if has_variant and method in NO_VARIANTS:
        return None
    if has_variant:
        method = f"{method}{VARIANT_SEPARATOR}{variant}"
    try:
        return (method, float(width.replace("p", ".")), int(seed),
                float(fraction.replace("p", ".")) if fraction else None, int(teachers) if teachers else None)
    except ValueError:  # another plans name that happens to share the prefix
        return None


def crossval_folds(ws: "Workspace") -> int:
    """The split's number of cross-validation folds of the training cases (5, as nnU-Net's)."""
    return len(ws.split["crossval"])


def fold_teachers_sha256(ws: "Workspace") -> str | None:
    """One identity for the teacher's folds (their weights' hashes joined in fold order, like _teachers_sha256), or
    None when one of them is not finished in this workspace."""
    folder = ws.folder(TEACHER_TRAINER, TEACHER_PLANS)
    checkpoints = [join(folder, f"fold_{f}", "checkpoint_final.pth") for f in range(crossval_folds(ws))]
    if not all(isfile(c) for c in checkpoints):
        return None
    return "+".join(network_weights_sha256(c) for c in checkpoints)


def _teacher_is_committed(ws: "Workspace") -> bool:
    return basename(ws.folder(TEACHER_TRAINER, TEACHER_PLANS)) in load_records(ws.p.records_dir)


def refuse_a_new_teacher_beside_committed_records(ws: "Workspace") -> None:
    """Before a teacher is trained: the committed records (Protocol.records_dir) learned from a teacher that neither
    the workspace nor the archive holds (the archive lives outside the repository and is lost with its machine). A
    teacher trained now has other weights (a CPU run repeats on one machine, not across machines), so the report would
    refuse its students' records after hours of training; stop before it instead. An archive is checked when it is
    restored (restore_teacher)."""
    teacher_folder = ws.folder(TEACHER_TRAINER, TEACHER_PLANS)
    if (isfile(join(teacher_folder, f"fold_{ws.p.fold}", "checkpoint_final.pth")) or not _teacher_is_committed(ws)
            or ws.p.teacher_archive and isfile(join(ws.p.teacher_archive, TEACHER_MANIFEST))):
        return
    record = join(ws.p.records_dir, basename(teacher_folder) + ".json")
    archive = ws.p.teacher_archive or "(no archive: --no-teacher-archive)"
    raise EvidenceError(
        f"The committed records in {ws.p.records_dir} learned from the teacher of {record}, which neither this "
        f"workspace nor the teacher archive {archive} holds. A teacher trained now would have other weights, and its "
        f"students' records could not join those. Restore that archive (the folder the session that trained the "
        f"teacher wrote), or give a new teacher records and results of their own with --tag (e.g. --tag teacher2), "
        f"or pass --no-records. Nothing was trained.")


def _subset_teacher_names(configuration: str, k: int) -> list[str]:
    return [model_folder_name(TEACHER_TRAINER, f"{SUBSET_TEACHER_PLANS}{i}of{k}", configuration)
            for i in range(1, k + 1)]


def collect(ws: "Workspace") -> dict:
    """Every finished, evaluated model trained on this protocol's student budget: the workspace's, and the committed
    records (Protocol.records_dir) of models the workspace does not hold, when they learned from the same teacher
    checkpoint. A record's ``folder`` is None when the model is not in this workspace. With a labelled fraction, the
    plain students of the same budget trained on all labels come as method ALL_LABELS_PLAIN. ``fold_teachers_sha256``:
    the identity of the teacher's folds in this workspace (fold_teachers_sha256; None: not all finished here)."""
    p = ws.p
    committed = load_records(p.records_dir)
    teacher_folder = ws.folder(TEACHER_TRAINER, TEACHER_PLANS)
    teacher = _model_record(ws, teacher_folder) or committed.get(basename(teacher_folder))
    teacher_sha = teacher["network_weights_sha256"] if teacher else None
    local = {name: join(ws.results, name) for name in os.listdir(ws.results)} if isdir(ws.results) else {}
    students, skipped = {}, []
    subset, subset_sha = _collect_subset_teachers(ws, local, committed, skipped)
    folds_sha = fold_teachers_sha256(ws)
    folds_committed = set()  # the fold ensembles of committed records used (one only, so that seeds pair)
    for name in sorted(set(local) | set(committed)):
        parsed = _parse_student_folder(name, p.configuration)
        if parsed is None:
            continue
        method, width, seed, fraction, n_teachers = parsed
        if n_teachers is not None and n_teachers != p.subset_teachers:
            continue  # a student of another number of subset teachers
        if fraction != p.labelled_fraction:
            if p.labelled_fraction is None or fraction is not None or method != "plain":
                continue  # a model of a protocol with another labelled fraction: reported in that one's results file
            method = ALL_LABELS_PLAIN
        if n_teachers is not None and subset_sha is None:
            skipped.append(f"{name}: its {n_teachers} subset teachers are not all finished and evaluated at this "
                           f"protocol's teacher budget")
            continue
        record = _model_record(ws, local[name]) if name in local else None
        if record is None and name in committed:
            record = committed[name]
            recorded = record.get("teacher_network_weights_sha256")
            if method == "logit_all_folds":
                # the folds here, or (a workspace without them) the committed students' one ensemble whose fold of
                # this protocol is the protocol's teacher
                members = str(recorded).split("+")
                if folds_sha is not None and recorded != folds_sha or folds_sha is None and (
                        len(members) <= p.fold or members[p.fold] != teacher_sha or folds_committed - {recorded}):
                    skipped.append(f"{name}: committed record of a student of other fold teachers (other network "
                                   f"weights)")
                    continue
                folds_committed.add(recorded)
            elif recorded != (subset_sha if n_teachers else teacher_sha):
                skipped.append(f"{name}: committed record of a student of another teacher (other network weights)")
                continue
        if record is None:
            continue
        training = _training_section(record["plans"], p.configuration)
        budget = _training_budget(training)
        if budget != (p.student_epochs, p.iterations_per_epoch, p.student_val_iterations):
            skipped.append(f"{name}: trained for {_budget_text(budget)}, not this protocol's budget")
            continue
        labels = (training.get("labelled_fraction"), training.get("labelled_fraction_seed", 0),
                  (training.get("unlabelled_images") or {}).get("source"))
        wanted = (None, 0, None) if method == ALL_LABELS_PLAIN else \
            (p.labelled_fraction, p.labelled_fraction_seed if p.labelled_fraction is not None else 0,
             p.unlabelled_images)
        if labels != wanted:
            skipped.append(f"{name}: trained with (labelled fraction, its seed, unlabelled images) {labels}, not this "
                           f"protocol's {wanted}")
            continue
        if method_and_variant(method)[1] is not None:
            try:
                differences = variant_differences(record["plans"], p.configuration, method,
                                                  variant_overrides(p.sweeps_dir, method))
            except EvidenceError as e:
                skipped.append(f"{name}: {e}")
                continue
            if differences:
                skipped.append(f"{name}: its plans differ from the variant as defined now (the presets with the "
                               f"overrides of {sweep_file_of(p.sweeps_dir, method)}) in "
                               f"{', '.join(differences)}: the variant or the preset changed after it was trained; "
                               f"delete the model folder (and its record) to train the variant as defined now")
                continue
        else:
            differences = preset_differences(record["plans"], p.configuration, method)
            if differences:
                skipped.append(f"{name}: its plans differ from the shipped preset (plans/{method}.json) in "
                               f"{', '.join(differences)}: the preset changed after it was trained, so it is another "
                               f"recipe; a sweep variant that spells out its settings trains it again under a name of "
                               f"its own (e.g. --runs {method}:default@{width:g}, where the sweep file's 'base' holds "
                               f"the preset of its time)")
                continue
        students.setdefault((method, width), {})[seed] = record
    return {"teacher": teacher, "students": students, "skipped": skipped, "fold_teachers_sha256": folds_sha, **subset}


def _teachers_sha256(records: list[dict]) -> str:
    """One identity for a set of teachers (a multi-teacher student's record names the set it learned from)."""
    return "+".join(r["network_weights_sha256"] for r in records)


def _collect_subset_teachers(ws: "Workspace", local: dict, committed: dict, skipped: list) -> tuple[dict, str | None]:
    """({"subset_teachers": [record per teacher], "subset_ensemble": record or None} when all k subset teachers are
    finished and evaluated (from the workspace or the records) and trained at the teacher's budget, else {}; and
    their joint identity (_teachers_sha256)."""
    p = ws.p
    records, names = [], _subset_teacher_names(p.configuration, p.subset_teachers)
    # all k from one source: teachers retrained here are never mixed with committed records of earlier ones
    here = any(name in local for name in names)
    for name in names:
        record = (_model_record(ws, local[name]) if name in local else None) if here else committed.get(name)
        if record is None:
            return {}, None
        budget = _training_budget(_training_section(record["plans"], p.configuration))
        wanted = (p.subset_teacher_budget, p.iterations_per_epoch, p.val_iterations_per_epoch)
        if budget != wanted:
            skipped.append(f"{name}: trained for {_budget_text(budget)}, not this protocol's subset-teacher budget "
                           f"({wanted[0]} x {wanted[1]}, {wanted[2]})")
            return {}, None
        records.append(record)
    sha = _teachers_sha256(records)
    name = _subset_ensemble_name(p.configuration, p.subset_teachers)
    ensemble = join(ws.results, name, f"fold_{p.fold}", "test_predictions", "summary.json")
    if isfile(ensemble):
        ensemble_record = {"model": name, "folder": None, "in_workspace": True, "test": per_case_metrics(ensemble),
                           "validation_mean_dice": None, "curves": {}}
    else:  # the ensemble of another session's subset teachers: its committed per-case record, when of these teachers
        ensemble_record = committed.get(name)
        if ensemble_record is not None and ensemble_record.get("teacher_network_weights_sha256") != sha:
            skipped.append(f"{name}: committed record of an ensemble of other subset teachers (other network weights)")
            ensemble_record = None
    return {"subset_teachers": records, "subset_ensemble": ensemble_record}, sha


def _subset_ensemble_name(configuration: str, k: int) -> str:
    return f"{SUBSET_ENSEMBLE}_k{k}__{configuration}"


def save_ensemble_record(records_dir: str, ensemble: dict, members_sha256: str) -> str:
    """Commit-ready record of the subset teachers' ensemble (it has no checkpoint of its own: its identity is that
    of its members), so that a later session's report, without the workspace, still has its row and comparison."""
    document = {"model": ensemble["model"], "network_weights_sha256": None,
                "teacher_network_weights_sha256": members_sha256,
                **{k: v for k, v in ensemble.items() if k not in ("model", "folder", "in_workspace")}}
    return _write_record(records_dir, document)


def save_workspace_records(ws: "Workspace", found: dict) -> list[str]:
    """A record (Protocol.records_dir) of every model of ``found`` that is in this workspace; returns the files."""
    if not ws.p.records_dir or found["teacher"] is None:
        return []
    teacher_sha = found["teacher"]["network_weights_sha256"]
    records = load_records(ws.p.records_dir)
    _refuse_replacing_another_budget(ws, found, records)
    committed = records.get(basename(ws.folder(TEACHER_TRAINER, TEACHER_PLANS)))
    if committed is not None and committed["network_weights_sha256"] != teacher_sha:
        raise EvidenceError(
            f"This workspace's teacher is not the one of the committed records in {ws.p.records_dir} (other network "
            f"weights): its students' records would be mixed with those of another teacher. Restore the archived "
            f"teacher (run without --no-teacher-archive in a new --workdir), give this teacher records and results of "
            f"their own with --tag (e.g. --tag teacher2), or pass --no-records.")
    written = [save_record(ws.p.records_dir, found["teacher"], None)] if found["teacher"]["folder"] else []
    subset = found.get("subset_teachers") or []
    for r in subset:
        earlier = records.get(basename(r["folder"])) if r["folder"] else None
        if earlier is not None and earlier["network_weights_sha256"] != r["network_weights_sha256"]:
            raise EvidenceError(
                f"This workspace's subset teacher {basename(r['folder'])} is not the one of the committed records in "
                f"{ws.p.records_dir} (other network weights): the multi-teacher students' records would be mixed "
                f"with those of other teachers. Use the workspace that trained them, or pass --no-records.")
    written += [save_record(ws.p.records_dir, r, None) for r in subset if r["folder"]]
    ensemble = found.get("subset_ensemble")
    if ensemble is not None and ensemble.get("in_workspace"):
        written.append(save_ensemble_record(ws.p.records_dir, ensemble, _teachers_sha256(subset)))
    folds_sha = found.get("fold_teachers_sha256")
    for (method, _), by_seed in found["students"].items():
        method = method_and_variant(method)[0]
        if method == "logit_all_folds" and folds_sha is None:
            continue  # its fold teachers are not all here (a workspace that only reports committed records)
        sha = _teachers_sha256(subset) if method == "multi_teacher" else folds_sha if method == "logit_all_folds" \
            else teacher_sha
        written += [save_record(ws.p.records_dir, r, sha) for r in by_seed.values() if r["folder"]]
    return written


def _training_section(plans: dict, configuration: str) -> dict:
    """A model's budget plans' ``kd.<configuration>.training`` (empty when absent: a record is read, not validated)."""
    return plans.get("kd", {}).get(configuration, {}).get("training", {})


def _training_budget(training: dict) -> tuple:
    """(epochs, iterations per epoch, validation iterations per epoch) of a training section."""
    return (training.get("num_epochs"), training.get("num_iterations_per_epoch"),
            training.get("num_val_iterations_per_epoch"))


def _budget_text(budget: tuple) -> str:
    return f"{budget[0]} x {budget[1]} iterations ({budget[2]} validation iterations per epoch)"


def _refuse_replacing_another_budget(ws: "Workspace", found: dict, records: dict) -> None:
    """A record is named after its model folder, which does not name the budget: a protocol at another student budget
    (same plans names) would replace the committed records (``records``) of the first one. Checked before anything
    is written."""
    for by_seed in found["students"].values():
        for r in by_seed.values():
            name = basename(r["folder"].rstrip("/")) if r["folder"] else None
            if name not in records:
                continue
            before = _training_budget(_training_section(records[name]["plans"], ws.p.configuration))
            now = _training_budget(_training_section(r["plans"], ws.p.configuration))
            if before != now:
                tag = f"{now[0] * now[1]}it" + (f"_val{now[2]}" if before[2] != now[2] else "")
                raise EvidenceError(
                    f"{join(ws.p.records_dir, name + '.json')} records a model trained for {_budget_text(before)}; "
                    f"this workspace's {name} trained for {now[0]} x {now[1]} ({now[2]}): writing its record would replace the other budget's. Give this "
                    f"budget records and results of their own with --tag (e.g. --tag {tag}), or pass --no-records. "
                    f"Nothing was written.")


def _trained_on_of(found: dict) -> dict:
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
    teacher_dice = _dice_matrix([teacher], cases)
    comparisons = []
    for (method, width), by_seed in sorted(students.items(), key=lambda kv: _row_order(kv[0])):
        if method == ALL_LABELS_PLAIN:
            continue  # a reference row
        for baseline in dict.fromkeys(baselines_of(method, labelled_fraction, variants_compared)):
            other = students.get((baseline, width), {})
            seeds = sorted(set(by_seed) & set(other))
            if seeds:
                diffs = _dice_matrix([by_seed[s] for s in seeds], cases) - _dice_matrix([other[s] for s in seeds], cases)
                comparisons.append({"method": method, "baseline": baseline, "width": width, "seeds": seeds,
                                    **paired_bootstrap(diffs)})
        seeds = sorted(by_seed)
        dice = _dice_matrix([by_seed[s] for s in seeds], cases)
        comparisons.append({"method": method, "baseline": "teacher", "width": width, "seeds": seeds,
                            **paired_bootstrap(dice - teacher_dice)})
        if method_and_variant(method)[0] == "multi_teacher" and subset_ensemble is not None:
            comparisons.append({"method": method, "baseline": "subset_teachers_ensemble", "width": width,
                                "seeds": seeds, **paired_bootstrap(dice - _dice_matrix([subset_ensemble], cases))})
    return comparisons


def compare_record_sets(a: list[dict], b: list[dict], configuration: str, names_a: list[str] | None = None,
                        names_b: list[str] | None = None) -> dict:
    """Models of two record sets paired seed by seed (a[i] with b[i]) over the held-out test cases: e.g. one recipe at
    two budgets, or two protocols' students, which no single results file pairs. Both sides must hold the same test
    cases (the same split). Returns each side's mean Dice (overall, per seed), validation Dice and budget, and the
    paired differences a - b with ``paired_bootstrap``'s interval (cases and seeds resampled)."""
    if not a or len(a) != len(b):
        raise EvidenceError(f"compare {len(a)} model(s) with {len(b)}: give one model per seed on each side.")
    names_a = names_a or [record_name(r) for r in a]
    names_b = names_b or [record_name(r) for r in b]
    cases = sorted(a[0]["test"])
    for records, names in ((a, names_a), (b, names_b)):
        for record, name in zip(records, names):
            if sorted(record["test"]) != cases:
                raise EvidenceError(f"{name} was evaluated on other test cases than {names_a[0]} "
                                    f"({len(record['test'])} against {len(cases)}): records of different splits do "
                                    f"not pair. Compare records of the same split file.")
    dice_a, dice_b = _dice_matrix(a, cases), _dice_matrix(b, cases)

    def side(records, dice):
        budgets = sorted({_training_budget(_training_section(r["plans"], configuration)) for r in records},
                         key=str)
        validation = [r.get("validation_mean_dice") for r in records]
        return {"models": [record_name(r) for r in records], "test_mean_dice": float(dice.mean()),
                "test_mean_dice_per_seed": [float(v) for v in dice.mean(axis=1)],
                "validation_mean_dice": None if None in validation else float(np.mean(validation)),
                "budgets": [_budget_text(budget) for budget in budgets],
                "teacher_network_weights_sha256": sorted({str(r.get("teacher_network_weights_sha256"))
                                                          for r in records})}

    return {"a": side(a, dice_a), "b": side(b, dice_b), "n_cases": len(cases),
            **paired_bootstrap(dice_a - dice_b)}


def _summarise(records: list[dict], cases: list[str], voxel_ml: dict, labels: list[str]) -> dict:
    dice = _dice_matrix(records, cases)
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


def budget_result(check: dict | None) -> str:
    """What a comparison at this budget measures, by the budget check of the plain student of its width."""
    if not check or not check.get("seeds"):
        return "unchecked"  # no records at a longer budget: the last-fifth test alone cannot tell
    return {True: "final quality", False: "learning speed", None: "undecided"}[check["stopped_improving"]]


def _shown_path(path: str) -> str:
    """A path as results files show it: relative to the working directory (the repository) when absolute."""
    return os.path.relpath(path) if os.path.isabs(path) else path


def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's name of a model's results folder (and of its record here): <trainer>__<plans>__<configuration>."""
    # imported here: nnunetv2.paths reads (and warns about) the nnUNet_* variables on import, and a report from
    # committed records needs none of them
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
    return convert_trainer_plans_config_to_identifier(trainer, plans, configuration)


def check_teacher_from_records(p: "Protocol", split: dict | None = None) -> dict:
    """Before any training: Protocol.teacher_from_records is a records folder holding this protocol's teacher (same
    dataset, configuration and held-out test cases) and every run is a plain student. Returns that teacher's record."""
    option = f"--teacher-from-records {p.teacher_from_records}"
    others = sorted({m for m, _ in p.runs if method_and_variant(m)[0] != "plain"})
    if others:
        raise EvidenceError(f"{option}: only plain students can do without the teacher's weights, but --runs names "
                            f"{', '.join(others)}. Run those where the teacher is (its archive, or a retrained teacher "
                            f"with its own --tag).")
    name = model_folder_name(TEACHER_TRAINER, TEACHER_PLANS, p.configuration)
    path = join(p.teacher_from_records, name + ".json")
    if not isfile(path):
        raise EvidenceError(f"{option}: no teacher record {path}. It is a records folder written by this runner, "
                            f"e.g. benchmarks/records/<dataset>-<configuration>-<tag>.")
    record = load_records(p.teacher_from_records)[name]
    if split is None:
        if not isfile(p.split_file):
            raise EvidenceError(f"{option}: no split file {p.split_file}. The teacher of {path} was evaluated on the "
                                f"held-out cases of its series' split file (benchmarks/splits/<dataset>.json): pass "
                                f"that file with --split-file.")
        split = load_json(p.split_file)
    if sorted(record["test"]) != sorted(split["test"]):
        raise EvidenceError(f"{option}: the teacher of {path} was evaluated on other test cases than the split "
                            f"{p.split_file} holds out: it belongs to another dataset or split.")
    return record


def check_budget_check_records(p: "Protocol") -> None:
    """Before any training (run_evidence.py) and when reporting: the budget check's records folder exists."""
    if p.budget_check_records and not isdir(p.budget_check_records):
        raise EvidenceError(f"--budget-check-records {p.budget_check_records}: no such folder. It is the records "
                            f"folder of this protocol run with more --student-epochs and its own --tag, e.g. "
                            f"benchmarks/records/<dataset>-<configuration>-<tag>.")


def budget_checks_of(students: dict, p: "Protocol") -> dict:
    """budget_doubling_check of every plain student width that has records at the longer budget
    (Protocol.budget_check_records); width -> check, and a width without them -> its reason."""
    if not p.budget_check_records:
        return {}
    check_budget_check_records(p)
    longer_all = load_records(p.budget_check_records)
    where = _shown_path(p.budget_check_records)
    checks = {}
    for (method, width), by_seed in students.items():
        if method != "plain":
            continue
        longer = {s: longer_all[record_name(r)] for s, r in by_seed.items() if record_name(r) in longer_all}
        checks[str(width)] = budget_doubling_check(by_seed, longer, p.configuration, where) if longer else \
            {"seeds": [], "longer_records": where, "stopped_improving": None,
             "reason": "no record of this width's plain students there"}
    if checks and not any(c["seeds"] for c in checks.values()):
        plain = [record_name(r) for (method, _), by_seed in students.items() if method == "plain"
                 for r in by_seed.values()]
        raise EvidenceError(f"--budget-check-records {where}: none of this protocol's plain students "
                            f"({', '.join(plain)}) has a record there. Give the records folder of the same protocol "
                            f"at a longer budget.")
    return checks


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
    voxel_ml = {c: _voxel_volume_ml(join(ws.test_labels, c + ending)) for c in cases}
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
    for (method, width), by_seed in sorted(found["students"].items(), key=lambda kv: _row_order(kv[0])):
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
        "split_file": _shown_path(p.split_file),
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
                    **({"budget_check_records": _shown_path(p.budget_check_records)}
                       if p.budget_check_records else {}),
                    "batch_size": teacher_cfg["batch_size"], "patch_size": teacher_cfg["patch_size"]},
        **({"teacher_from_records": f"the teacher row and the students' plans come from the teacher record in "
                                    f"{_shown_path(p.teacher_from_records)} (no teacher was trained or restored here: "
                                    f"the plain students learn nothing from its weights)"}
           if p.teacher_from_records else {}),
        "device": p.device, "device_name": device_label(p.device), "torch": torch.__version__,
        "host": platform.node(), "command": command,
        **({"all_labels_command": all_labels_command} if all_labels_command else {}),
        **({"last_invocation": last_invocation} if last_invocation and last_invocation != command else {}),
        # the models of one file may come from several sessions and machines (committed records); latency is measured
        # on the reporting machine only
        "trained_on": _trained_on_of(found),
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


def _fmt_ci(mean: float, ci: list) -> str:
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
                  _fmt_ci(r["test_mean_dice"], r["test_mean_dice_ci95"])]
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
