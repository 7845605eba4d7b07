"""A multi-task teacher: nnU-Net's network with a reconstruction head at the budget and seed of the plans
(nnunet_kd.multitask). Like nnUNetTrainerBudget, it does not import the distillation trainer."""
from nnunet_kd.multitask import nnUNetTrainerMultiTask

__all__ = ["nnUNetTrainerMultiTask"]
