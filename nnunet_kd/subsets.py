"""``nnUNetv2_kd_plan_subset_teachers``: k teachers, each trained on a small subset of the student fold's training
cases (the first method's setting: small datasets, several teachers distilled into one student).

The fold's *training* cases (nnU-Net's ``splits_final.json``) are split into k subsets, seeded; disjoint by default,
optionally overlapping (each subset also takes a fraction of the others' cases), and stratified when a case-to-group
file (site, scanner, ...) is given, so that every subset sees every group in proportion. The fold's validation cases
never enter a subset, so no teacher sees the student's validation cases. Each subset gets its own budget plans,
``<-o><i>of<k>``: a copy of nnU-Net's plans (the teacher's network, the same preprocessed data) whose training
section adds ``training_cases``, which ``nnUNetTrainerBudget`` trains on instead of the fold's whole training split.
Each plans name gives its teacher its own results folder.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from os.path import isfile, join

from nnunet_kd.recipe import PLANS_KEY, RecipeError


class SubsetError(ValueError):
    """Inputs that cannot give k subsets; the message names the file and the fix."""


def split_into_subsets(cases: list[str], k: int, seed: int = 0, overlap: float = 0.0,
                       groups: dict | None = None) -> list[list[str]]:
    """k seeded subsets of ``cases``. Disjoint and covering (sizes differ by at most one) with ``overlap`` 0; with
    ``overlap`` f in (0, 1) each subset also takes round(f x its size) cases drawn from the other subsets. With
    ``groups`` ({case: group}) the cases of each group are dealt out separately, so each subset holds each group's
    share (within one case)."""
    if not isinstance(k, int) or k < 2:
        raise SubsetError(f"-k must be an integer >= 2 (k teachers), got {k!r}.")
    if len(cases) < k:
        raise SubsetError(f"{len(cases)} training cases cannot be split into {k} non-empty subsets: lower -k.")
    if not 0.0 <= overlap < 1.0:
        raise SubsetError(f"--overlap must be a fraction in [0, 1), got {overlap!r}.")
    rng = random.Random(seed)
    ordered = sorted(cases)
    if groups is None:
        strata = [ordered]
    else:
        by_group = defaultdict(list)
        for case in ordered:
            by_group[str(groups[case])].append(case)
        strata = [by_group[g] for g in sorted(by_group)]
    subsets: list[list[str]] = [[] for _ in range(k)]
    start = 0
    for stratum in strata:
        stratum = list(stratum)
        rng.shuffle(stratum)
        # deal round-robin, continuing where the last group stopped, so sizes stay within one case overall
        for j, case in enumerate(stratum):
            subsets[(start + j) % k].append(case)
        start = (start + len(stratum)) % k
    if overlap > 0:
        extended = []
        for i, subset in enumerate(subsets):
            others = sorted(c for j, other in enumerate(subsets) if j != i for c in other)
            extra = rng.sample(others, min(len(others), round(overlap * len(subset))))
            extended.append(subset + extra)
        subsets = extended
    return [sorted(s) for s in subsets]


def subset_plans_name(prefix: str, index: int, k: int) -> str:
    """'nnUNetPlans_subset', 0, 3 -> 'nnUNetPlans_subset1of3'."""
    return f"{prefix}{index + 1}of{k}"


def load_groups(groups_file: str, cases: list[str]) -> dict:
    """A case-to-group JSON file ({"case_id": "site A", ...}); every case to split must have a group."""
    try:
        with open(groups_file) as f:
            groups = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SubsetError(f"--groups {groups_file}: cannot read it as JSON ({e}). It must map case identifiers to "
                          f"groups, e.g. {{\"case_000\": \"site A\"}}.") from None
    if not isinstance(groups, dict):
        raise SubsetError(f"--groups {groups_file} must be a JSON object mapping case identifiers to groups.")
    missing = sorted(set(cases) - set(groups))
    if missing:
        raise SubsetError(f"--groups {groups_file} has no group for {len(missing)} training case(s) (e.g. "
                          f"{missing[:5]}): give every case of the fold's training split a group.")
    return groups


def plan_subset_teachers(dataset: str, configuration: str, fold: int, k: int, output_prefix: str, num_epochs: int,
                         iterations_per_epoch: int = 250, val_iterations_per_epoch: int = 50, seed: int = 0,
                         overlap: float = 0.0, groups_file: str | None = None, source_plans: str = "nnUNetPlans",
                         max_batch_size: int | None = None, training_seed: int | None = None,
                         overwrite: bool = False) -> list[dict]:
    """Write the k subset plans; returns [{"plans_name", "plans_file", "training_cases"}]. Every input is checked
    before the first file is written."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_kd.budget import _is_budget_plans, write_budget_plans_checked

    if not nnUNet_preprocessed.is_set():
        raise SubsetError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train.")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise SubsetError(f"{e} Check -d and nnUNet_preprocessed.") from None
    base = join(nnUNet_preprocessed.get(), dataset_name)
    splits_file = join(base, "splits_final.json")
    if not isfile(splits_file):
        raise SubsetError(f"{splits_file} not found: the subsets are drawn from a fold's training cases, which "
                          f"nnU-Net writes there on the first training run (or write it yourself, nnU-Net's "
                          f"format: a list of {{\"train\": [...], \"val\": [...]}}).")
    splits = load_json(splits_file)
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise SubsetError(f"-f {fold}: {splits_file} has folds 0..{len(splits) - 1}.")
    train = sorted(splits[fold]["train"])
    groups = load_groups(groups_file, train) if groups_file else None
    subsets = split_into_subsets(train, k, seed=seed, overlap=overlap, groups=groups)
    if set().union(*subsets) & set(splits[fold]["val"]):  # cannot happen: subsets are drawn from train only
        raise AssertionError("a subset holds a validation case")

    for i in range(k):  # nothing is written unless every file may be
        name = subset_plans_name(output_prefix, i, k)
        path = join(base, name + ".json")
        if isfile(path) and not (overwrite and _is_budget_plans(load_json(path), name, dataset_name)):
            raise SubsetError(f"{path} exists" + (" and is not budget plans this project wrote: it is never replaced"
                                                  if overwrite else ": pass --overwrite to replace subset plans "
                                                                    "written earlier") + ", or choose another -o.")
    written = []
    for i, cases in enumerate(subsets):
        name = subset_plans_name(output_prefix, i, k)
        try:
            path = write_budget_plans_checked(dataset, configuration, name, num_epochs, iterations_per_epoch,
                                              val_iterations_per_epoch, seed=training_seed,
                                              max_batch_size=max_batch_size, source_plans=source_plans,
                                              overwrite=overwrite)
        except RecipeError as e:
            raise SubsetError(str(e)) from None
        plans = load_json(path)
        plans[PLANS_KEY][configuration]["training"]["training_cases"] = cases
        save_json(plans, path, sort_keys=False)
        written.append({"plans_name": name, "plans_file": path, "training_cases": cases})
    return written


def main(argv=None) -> None:
    import argparse

    from nnunet_kd.budget import add_budget_arguments

    parser = argparse.ArgumentParser(
        prog="nnUNetv2_kd_plan_subset_teachers",
        description="Split a fold's training cases into k subsets and write one budget plans file per subset "
                    "(<-o>1of<k>, ...), for k teachers trained with nnUNetv2_train -tr nnUNetTrainerBudget -p "
                    "<-o><i>of<k>. The fold's validation cases are never in a subset.")
    parser.add_argument("-d", required=True, help="Dataset name or ID")
    parser.add_argument("-c", required=True, help="Configuration, e.g. 3d_fullres")
    parser.add_argument("-f", type=int, required=True, help="The student's fold (its training cases are split)")
    parser.add_argument("-k", type=int, required=True, help="Number of subsets (teachers)")
    parser.add_argument("-o", required=True, help="Plans name prefix, e.g. nnUNetPlans_subset")
    parser.add_argument("-p", default="nnUNetPlans", help="Source plans (default: nnUNetPlans)")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split (default: 0)")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="Each subset also takes this fraction of its size from the others (default: 0, disjoint)")
    parser.add_argument("--groups", default=None,
                        help="JSON file mapping case identifiers to groups (site, scanner): stratified subsets")
    add_budget_arguments(parser, "--training-seed", "Seed of each teacher's training (default: unseeded)")
    parser.add_argument("--overwrite", action="store_true", help="Replace subset plans this command wrote before")
    args = parser.parse_args(argv)
    try:
        written = plan_subset_teachers(args.d, args.c, args.f, args.k, args.o, args.epochs, args.iterations_per_epoch,
                                       args.val_iterations_per_epoch, args.seed, args.overlap, args.groups, args.p,
                                       args.max_batch_size, args.training_seed, args.overwrite)
    except SubsetError as e:
        parser.exit(2, f"error: {e}\n")
    for w in written:
        print(f"Wrote {w['plans_file']} ({len(w['training_cases'])} training cases). Train: nnUNetv2_train {args.d} "
              f"{args.c} {args.f} -tr nnUNetTrainerBudget -p {w['plans_name']}")


if __name__ == "__main__":
    main()
