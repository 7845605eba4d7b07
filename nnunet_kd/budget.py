"""``nnUNetTrainerBudget``: nnU-Net's own trainer with the training length and seed taken from the plans.

Teachers and plain-student baselines are trained with it, so that what it writes is a plain nnU-Net model:
nnU-Net's network, loss and inference, and ``'trainer_name': 'nnUNetTrainer'`` in every checkpoint, which is the
class nnU-Net's predictor builds. ``nnUNetv2_predict -tr nnUNetTrainerBudget ...`` (the ``-tr`` only names the results
folder), ``nnUNetv2_export_model_to_zip`` and this project's teacher loader therefore work without this plugin and
without ``nnUNet_extTrainer``. Training with it (``nnUNetv2_train -tr nnUNetTrainerBudget``) needs the plugin's
trainers folder on ``nnUNet_extTrainer``, like every trainer that is not nnU-Net's.

The budget lives where the student plans keep it, ``plans["kd"][<configuration>]["training"]``
(``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``, ``seed``):
``nnunet_kd.pipeline.write_budget_plans`` writes it into a copy of nnU-Net's plans for a teacher, and
``nnUNetv2_kd_plan_student`` into the student plans, so the plain student of a student plans file is trained at the
budget and seed of its KD students, and starts from the same weights. It does not import the distillation trainer.
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


def read_training_budget(plans: dict, configuration: str, plans_file: str) -> TrainingBudget:
    """``plans["kd"][configuration]["training"]``, validated as the distillation trainers validate it. Raises
    RecipeError naming the plans file and the fix."""
    if not isinstance(plans.get(PLANS_KEY), dict) or configuration not in plans[PLANS_KEY]:
        raise RecipeError(
            f"{plans_file} has no training budget for configuration '{configuration}' (expected "
            f"plans['{PLANS_KEY}']['{configuration}']['training'] with num_epochs, num_iterations_per_epoch, "
            f"num_val_iterations_per_epoch and seed). Train nnU-Net's own plans with -tr nnUNetTrainer (nnU-Net's "
            f"default budget), write budget plans with nnunet_kd.pipeline.write_budget_plans, or train a plain "
            f"student from student plans written by nnUNetv2_kd_plan_student (-p <student plans>).")
    recipe = parse_recipe(plans, configuration, "none", plans_file)
    return TrainingBudget(recipe.num_epochs, recipe.num_iterations_per_epoch, recipe.num_val_iterations_per_epoch,
                          recipe.seed)


def apply_training_budget(trainer, budget) -> None:
    """Set nnU-Net's three training-length attributes from ``budget`` (a TrainingBudget, or anything with the same
    fields, such as the distillation recipe), after nnU-Net's __init__ set its defaults."""
    trainer.num_epochs = budget.num_epochs
    trainer.num_iterations_per_epoch = budget.num_iterations_per_epoch
    trainer.num_val_iterations_per_epoch = budget.num_val_iterations_per_epoch


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

    def on_train_start(self):
        super().on_train_start()
        record_training_cases(self)
        self.print_to_log_file(f"Training budget from {self.plans_file}: {self.num_epochs} epochs x "
                               f"{self.num_iterations_per_epoch} iterations ({self.num_val_iterations_per_epoch} "
                               f"validation iterations per epoch), seed {self.budget.seed}.")

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
