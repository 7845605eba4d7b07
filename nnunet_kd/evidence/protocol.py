"""What a protocol run trains and how its models, plans and commands are named: the Protocol settings, the
--runs grammar, the recipe variants of a sweep, and the command that reproduces a results file."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from os.path import basename, isfile, join

from nnunet_kd.methods import NO_VARIANTS, TRAINERS, VARIANT_NAME, SweepError, load_sweep, method_and_variant

# The protocol's method names, their trainers and their recipe variants: nnunet_kd.methods.
# Methods whose teachers trained on the student's validation cases (the other folds of an all-fold ensemble): their
# validation Dice is optimistic, so they are never the "best KD by validation"; the held-out test cases stay unseen.
VALIDATION_SEEN_BY_TEACHERS = ("logit_all_folds",)

# A protocol with a labelled fraction (Protocol.labelled_fraction) also reports the plain students of the same widths
# trained on all labels (same teacher and budget, from the workspace or the records): what the missing labels cost and
# whether a method recovers it.
ALL_LABELS_PLAIN = "plain_all_labels"

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
        runs = [f"{method}@{width:g}" for method, width in sorted(rows, key=row_order)]
        seeds = sorted({s for by_seed in rows.values() for s in by_seed})
        return "python benchmarks/run_evidence.py " + " ".join(
            shlex.quote(a) for a in tokens + ["--runs", *runs, "--seeds", *map(str, seeds)])

    own = {k: v for k, v in students.items() if k[0] != ALL_LABELS_PLAIN}
    all_labels = {("plain", w): v for (m, w), v in students.items() if m == ALL_LABELS_PLAIN}
    commands = {"command": command(base, own) if own else None}
    if all_labels:
        commands["all_labels"] = command(_without_options(base, _LABELLED_FRACTION_OPTIONS), all_labels)
    return commands


def row_order(key: tuple) -> tuple:
    """Widest first; within a width the plain student, then the methods, then the controls."""
    method, width = key
    base = method_and_variant(method)[0]
    return -width, (-1 if method == ALL_LABELS_PLAIN else 0 if method == "plain" else 2 if base in CONTROLS else 1), \
        method


def number_tag(value: float) -> str:
    return str(value).replace(".", "p")


def student_plans_name(width: float, seed: int, labelled_fraction: float | None = None,
                       unlabelled_images: bool = False, subset_teachers: int | None = None,
                       fold_teachers: int | None = None, variant: str | None = None) -> str:
    """One student plans file per (width, labelled fraction, extra unlabelled images or not, seed): every one-teacher
    method of those trains from it. 'x' marks plans with extra unlabelled images; '_k3' the plans of a student of 3
    subset teachers (their recipe lists those teachers instead of the protocol's teacher); '_folds5' those of a
    student of the teacher's 5 cross-validation folds; '_v<name>' those of a recipe variant (its overrides are in the
    plans, so it cannot share the method's)."""
    fraction = "" if labelled_fraction is None else f"_f{number_tag(labelled_fraction)}{'x' if unlabelled_images else ''}"
    teachers = "" if subset_teachers is None else f"_k{subset_teachers}"
    folds = "" if fold_teachers is None else f"_folds{fold_teachers}"
    tag = "" if variant is None else f"_v{variant}"
    return f"nnUNetPlans_evidence_w{number_tag(width)}{fraction}{teachers}{folds}{tag}_s{seed}"


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
    # What outlives the session (committed; see nnunet_kd.evidence.records). None: the workspace only.
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


class EvidenceError(RuntimeError):
    """Committed evidence that cannot be used as it is; the message names the file and the fix."""


def subset_teacher_names(configuration: str, k: int) -> list[str]:
    return [model_folder_name(TEACHER_TRAINER, f"{SUBSET_TEACHER_PLANS}{i}of{k}", configuration)
            for i in range(1, k + 1)]


def subset_ensemble_name(configuration: str, k: int) -> str:
    return f"{SUBSET_ENSEMBLE}_k{k}__{configuration}"


def shown_path(path: str) -> str:
    """A path as results files show it: relative to the working directory (the repository) when absolute."""
    return os.path.relpath(path) if os.path.isabs(path) else path


def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's name of a model's results folder (and of its record here): <trainer>__<plans>__<configuration>."""
    # imported here: nnunetv2.paths reads (and warns about) the nnUNet_* variables on import, and a report from
    # committed records needs none of them
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
    return convert_trainer_plans_config_to_identifier(trainer, plans, configuration)
