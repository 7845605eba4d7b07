from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_Adaptive(nnUNetTrainerKD):
    """The former name of nnUNetTrainerKD_BalancedHints (the same recipe, the 'adaptive' section of the student
    plans), kept so that existing runs resume and reproduce (-tr nnUNetTrainerKD_Adaptive, checkpoints naming it)."""
    kd_method = "adaptive"
