"""nnU-Net's own trainer at the budget and seed of the plans (teachers, plain-student baselines): nnunet_kd.budget."""
from nnunet_kd.budget import nnUNetTrainerBudget

__all__ = ["nnUNetTrainerBudget"]
