"""``nnUNetTrainerBudget``: nnU-Net's own trainer with the training length and seed taken from the plans.

Teachers and plain-student baselines are trained with it, so that what it writes is a plain nnU-Net model:
nnU-Net's network, loss and inference, and ``'trainer_name': 'nnUNetTrainer'`` in every checkpoint, which is the
class nnU-Net's predictor builds. ``nnUNetv2_predict -tr nnUNetTrainerBudget ...`` (the ``-tr`` only names the results
folder), ``nnUNetv2_export_model_to_zip`` and this project's teacher loader therefore work without this plugin and
without ``nnUNet_extTrainer``. Training with it (``nnUNetv2_train -tr nnUNetTrainerBudget``) needs the plugin's
trainers folder on ``nnUNet_extTrainer``, like every trainer that is not nnU-Net's.

The budget lives where the student plans keep it, ``plans["kd"][<configuration>]["training"]``
(``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``, ``seed``):
``python -m nnunet_kd.budget`` (``nnunet_kd.pipeline.write_budget_plans``) writes it into a copy of nnU-Net's plans
for a teacher, and ``nnUNetv2_kd_plan_student`` into the student plans, so the plain student of a student plans file
is trained at the budget and seed of its KD students, and starts from the same weights. It does not import the distillation trainer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from os.path import join

import numpy as np
import torch

from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.checkpoints import load_intact_checkpoint, restore_nnunet_checkpoint, save_nnunet_checkpoint
from nnunet_kd.provenance import record_training_cases
from nnunet_kd.recipe import PLANS_KEY, RecipeError, parse_recipe, plans_file_path

# The class nnU-Net's predictor builds for a budget-trained model (the network and inference are nnU-Net's own).
NNUNET_TRAINER_NAME = "nnUNetTrainer"
# Checkpoint key naming the class that trained the model (nnU-Net ignores keys it does not know).
TRAINED_WITH_KEY = "trained_with"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainingBudget:
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    seed: int | None
    training_cases: tuple | None = None
    labelled_fraction: float | None = None
    labelled_fraction_seed: int = 0


def labelled_subset(train: list, fraction: float, seed: int) -> list:
    """A seeded fraction (at least one case) of the fold's training cases, independent of their order."""
    count = max(1, round(fraction * len(train)))
    return sorted(random.Random(seed).sample(sorted(train), count))


def restrict_to_training_cases(train: list, val: list, cases, plans_file: str, fold, fraction: float | None = None,
                               fraction_seed: int = 0) -> tuple[list, list]:
    """nnU-Net's (train, val) split of the fold, with training limited to ``cases``, or to a seeded ``fraction`` of
    the fold's training cases (None: unchanged). Every case must be a training case of the fold: a subset never
    takes a validation case."""
    if fraction is not None:
        return labelled_subset(train, fraction, fraction_seed), val
    if cases is None:
        return train, val
    outside = sorted(set(cases) - set(train))
    if outside:
        in_val = sorted(set(outside) & set(val))
        raise RecipeError(
            f"{plans_file}: training_cases names {len(outside)} case(s) that are not training cases of fold {fold} "
            f"(e.g. {outside[:5]}" + (f"; {len(in_val)} of them are its validation cases" if in_val else "") +
            f"). A subset is drawn from the fold's training cases only: write the plans again with "
            f"nnUNetv2_kd_plan_subset_teachers -f {fold}, or train the fold they were planned for.")
    return sorted(cases), val


def read_training_budget(plans: dict, configuration: str, plans_file: str) -> TrainingBudget:
    """``plans["kd"][configuration]["training"]``, validated as the distillation trainers validate it. Raises
    RecipeError naming the plans file and the fix."""
    if not isinstance(plans.get(PLANS_KEY), dict) or configuration not in plans[PLANS_KEY]:
        raise RecipeError(
            f"{plans_file} has no training budget for configuration '{configuration}' (expected "
            f"plans['{PLANS_KEY}']['{configuration}']['training'] with num_epochs, num_iterations_per_epoch, "
            f"num_val_iterations_per_epoch and seed). Train nnU-Net's own plans with -tr nnUNetTrainer (nnU-Net's "
            f"default budget), write budget plans with python -m nnunet_kd.budget -d <dataset> -c {configuration} -o "
            f"<name> --epochs N, or train a plain student from student plans written by nnUNetv2_kd_plan_student "
            f"(-p <student plans>).")
    recipe = parse_recipe(plans, configuration, "none", plans_file)
    return TrainingBudget(recipe.num_epochs, recipe.num_iterations_per_epoch, recipe.num_val_iterations_per_epoch,
                          recipe.seed, recipe.training_cases, recipe.labelled_fraction, recipe.labelled_fraction_seed)


def apply_training_budget(trainer, budget) -> None:
    """Set nnU-Net's three training-length attributes from ``budget`` (a TrainingBudget, or anything with the same
    fields, such as the distillation recipe), after nnU-Net's __init__ set its defaults."""
    trainer.num_epochs = budget.num_epochs
    trainer.num_iterations_per_epoch = budget.num_iterations_per_epoch
    trainer.num_val_iterations_per_epoch = budget.num_val_iterations_per_epoch
    trainer.save_every = checkpoint_interval(budget.num_epochs)


def checkpoint_interval(num_epochs: int, nnunet_default: int = 50) -> int:
    """Epochs between two ``checkpoint_latest.pth`` writes: a tenth of the budget, at most nnU-Net's 50. nnU-Net's
    fixed 50 means a short budget run that is stopped (a session ends, a machine is taken back) resumes with ``--c``
    from its start or from ``checkpoint_best``; this way it loses at most a tenth of its epochs."""
    return max(1, min(nnunet_default, num_epochs // 10))


def trainer_plans_file(plans: dict) -> str:
    """The plans file a trainer was started with (nnUNetv2_train -p names it after plans_name)."""
    base = join(nnUNet_preprocessed, plans["dataset_name"]) if nnUNet_preprocessed.is_set() else None
    return plans_file_path(base, plans["plans_name"])


class nnUNetTrainerBudget(nnUNetTrainer):
    """nnU-Net's trainer at the budget and seed of ``plans["kd"][<configuration>]["training"]``; writes plain
    nnU-Net checkpoints (atomically) and the fold's training cases (``training_cases.json``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Read the budget before nnU-Net creates the results folder: bad plans leave nothing on disk.
        self.plans_file = trainer_plans_file(plans)
        self.budget = read_training_budget(plans, configuration, self.plans_file)
        # Seeded before nnU-Net builds anything, at the same point as the distillation trainers: a plain and a KD
        # student of the same plans then start from the same weights.
        if self.budget.seed is not None:
            seed_everything(self.budget.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_training_budget(self, self.budget)

    def do_split(self):
        train, val = super().do_split()
        return restrict_to_training_cases(train, val, self.budget.training_cases, self.plans_file, self.fold,
                                          self.budget.labelled_fraction, self.budget.labelled_fraction_seed)

    def on_train_start(self):
        super().on_train_start()
        record_training_cases(self)
        subset = "" if self.budget.training_cases is None else \
            f", on {len(self.budget.training_cases)} of the fold's training cases (training_cases)"
        if self.budget.labelled_fraction is not None:
            subset = (f", on a fraction {self.budget.labelled_fraction:g} of the fold's training cases (seed "
                      f"{self.budget.labelled_fraction_seed})")
        self.print_to_log_file(f"Training budget from {self.plans_file}: {self.num_epochs} epochs x "
                               f"{self.num_iterations_per_epoch} iterations ({self.num_val_iterations_per_epoch} "
                               f"validation iterations per epoch), seed {self.budget.seed}{subset}.")

    def predictor_trainer_name(self) -> str:
        """'nnUNetTrainer' unless a subclass builds its own network (nnU-Net's predictor must build that one)."""
        own = type(self).build_network_architecture is not nnUNetTrainer.build_network_architecture
        return type(self).__name__ if own else NNUNET_TRAINER_NAME

    def save_checkpoint(self, filename: str) -> None:
        save_nnunet_checkpoint(self, filename, self.predictor_trainer_name(),
                               {TRAINED_WITH_KEY: type(self).__name__})

    def _accepts(self, checkpoint: dict) -> bool:
        return checkpoint.get("trainer_name") in (self.predictor_trainer_name(), type(self).__name__)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # nnU-Net's load_checkpoint unpickles fully: read the file with the weights-only loader instead (falling back
        # to the newest intact sibling when it is truncated).
        if isinstance(filename_or_checkpoint, str):
            where, checkpoint = load_intact_checkpoint(filename_or_checkpoint, self.device, self._accepts,
                                                       self.print_to_log_file)
        else:
            where, checkpoint = "the checkpoint", filename_or_checkpoint
        if not self._accepts(checkpoint):
            raise RuntimeError(f"{where} was written by trainer {checkpoint.get('trainer_name')}, not by "
                               f"{type(self).__name__}. Resume with -tr {checkpoint.get('trainer_name')}.")
        restore_nnunet_checkpoint(self, checkpoint, where)


def _is_budget_plans(plans: dict, plans_name: str, dataset_name: str) -> bool:
    """Plans this command wrote for this dataset: its own plans_name, and a 'kd' key holding training budgets only
    (student plans also hold a teacher and methods; nnU-Net's plans have no 'kd' key)."""
    sections = plans.get(PLANS_KEY) if isinstance(plans, dict) else None
    return (plans.get("plans_name") == plans_name and plans.get("dataset_name") == dataset_name
            and isinstance(sections, dict) and bool(sections)
            and all(isinstance(s, dict) and set(s) == {"training"} for s in sections.values()))


def write_budget_plans_checked(dataset: str, configuration: str, output_plans_name: str, num_epochs: int,
                               iterations_per_epoch: int, val_iterations_per_epoch: int, seed: int | None = None,
                               max_batch_size: int | None = None, source_plans: str = "nnUNetPlans",
                               overwrite: bool = False, reconstruction_weight: float | None = None) -> str:
    """write_budget_plans for a user: every input checked (naming the file and the fix) before anything is written;
    existing budget plans of this command are replaced only with ``overwrite``, any other plans file never. Returns
    the file written."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_kd.pipeline import write_budget_plans

    if not nnUNet_preprocessed.is_set():
        raise RecipeError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train.")
    name_ok = output_plans_name and not any(c in output_plans_name for c in "/\\") \
        and not output_plans_name.lower().endswith(".json") and output_plans_name not in (".", "..")
    if not name_ok:
        raise RecipeError(f"-o {output_plans_name!r} is not a plans name: pass a bare name without folder or .json "
                          f"suffix (e.g. -o nnUNetPlans_budget); the plans go to $nnUNet_preprocessed/<dataset>/.")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise RecipeError(f"{e} Check -d and nnUNet_preprocessed.") from e
    base = join(nnUNet_preprocessed.get(), dataset_name)
    source_file, output_file = join(base, source_plans + ".json"), join(base, output_plans_name + ".json")
    if not isfile(source_file):
        raise RecipeError(f"{source_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} "
                          f"first, or name existing plans with -p.")
    if configuration not in load_json(source_file).get("configurations", {}):
        raise RecipeError(f"{source_file} has no configuration '{configuration}' (has "
                          f"{sorted(load_json(source_file).get('configurations', {}))}).")
    if output_plans_name == source_plans or (
            isfile(output_file) and not _is_budget_plans(load_json(output_file), output_plans_name, dataset_name)):
        raise RecipeError(f"{output_file} exists and is not budget plans this command wrote for {dataset_name} (it "
                          f"may be nnU-Net's plans, student plans or another tool's): it is not replaced, not even "
                          f"with --overwrite. Choose another -o.")
    if isfile(output_file) and not overwrite:
        raise RecipeError(f"{output_file} exists (budget plans written earlier; models trained with them keep a copy "
                          f"in their results folder). Pass --overwrite to replace it, or choose another -o.")
    if max_batch_size is not None and max_batch_size < 1:
        raise RecipeError(f"--max-batch-size must be >= 1, got {max_batch_size}.")
    budget = {"num_epochs": num_epochs, "num_iterations_per_epoch": iterations_per_epoch,
              "num_val_iterations_per_epoch": val_iterations_per_epoch, "seed": seed}
    if reconstruction_weight is not None:  # the multi-task teacher's (nnunet_kd.multitask)
        budget["reconstruction_weight"] = reconstruction_weight
    read_training_budget({PLANS_KEY: {configuration: {"training": budget}}}, configuration, output_file)
    written = write_budget_plans(base, source_plans, output_plans_name, configuration, num_epochs,
                                 iterations_per_epoch, val_iterations_per_epoch, seed=seed,
                                 max_batch_size=max_batch_size)
    if reconstruction_weight is not None:
        plans = load_json(written)
        plans[PLANS_KEY][configuration]["training"]["reconstruction_weight"] = reconstruction_weight
        from batchgenerators.utilities.file_and_folder_operations import save_json
        save_json(plans, written, sort_keys=False)
    return written


def add_budget_arguments(parser, seed_flag: str = "--seed", seed_help: str | None = None) -> None:
    """The training-budget options of every command that writes budget plans (this one, the subset-teacher planner):
    --epochs, --iterations-per-epoch, --val-iterations-per-epoch, the training seed (``seed_flag``), --max-batch-size.
    """
    parser.add_argument("--epochs", type=int, required=True, help="num_epochs")
    parser.add_argument("--iterations-per-epoch", type=int, default=250, help="(default: 250, nnU-Net's)")
    parser.add_argument("--val-iterations-per-epoch", type=int, default=50, help="(default: 50, nnU-Net's)")
    parser.add_argument(seed_flag, dest="training_seed", type=int, default=None,
                        help=seed_help or "Seed python, numpy and torch before the network is built (default: "
                                          "unseeded, as nnU-Net); runs are bit-identical only with nnUNet_n_proc_DA=0")
    parser.add_argument("--max-batch-size", type=int, default=None, help="Cap the configuration's batch size")


def main(argv=None) -> None:
    """python -m nnunet_kd.budget: write budget plans for nnUNetTrainerBudget (a teacher on a chosen budget)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nnunet_kd.budget",
        description="Write $nnUNet_preprocessed/<dataset>/<-o>.json: a copy of nnU-Net's plans (-p) whose only change "
                    "is a training budget (and optionally a batch-size cap), for nnUNetv2_train -tr "
                    "nnUNetTrainerBudget -p <-o>. The network and preprocessing are the source plans' own.")
    parser.add_argument("-d", required=True, help="Dataset name or ID")
    parser.add_argument("-c", required=True, help="Configuration, e.g. 3d_fullres")
    parser.add_argument("-o", required=True, help="Name of the budget plans (e.g. nnUNetPlans_budget)")
    parser.add_argument("-p", default="nnUNetPlans", help="Source plans name (default: nnUNetPlans)")
    add_budget_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="Replace budget plans this command wrote before")
    parser.add_argument("--reconstruction-weight", type=float, default=None,
                        help="Weight of the reconstruction loss of a multi-task teacher (-tr nnUNetTrainerMultiTask)")
    args = parser.parse_args(argv)
    try:
        written = write_budget_plans_checked(args.d, args.c, args.o, args.epochs, args.iterations_per_epoch,
                                             args.val_iterations_per_epoch, args.training_seed, args.max_batch_size,
                                             args.p, args.overwrite, args.reconstruction_weight)
    except RecipeError as e:
        parser.exit(2, f"error: {e}\n")
    trainer = "nnUNetTrainerMultiTask" if args.reconstruction_weight is not None else "nnUNetTrainerBudget"
    print(f"Wrote {written}. Train: nnUNetv2_train {args.d} {args.c} FOLD -tr {trainer} -p {args.o} "
          f"(with nnUNet_extTrainer=\"$(nnUNetv2_kd_trainers_dir)\")")


if __name__ == "__main__":
    main()
