from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_Adaptive(nnUNetTrainerKD):
    """Adaptive KD (single teacher): Dice+CE + T^2 KL on every deep-supervision output + Lovasz + feature hints.
    Weights, temperature and feature stages: the 'adaptive' section of the student plans (preset plans/adaptive.json)."""
    kd_method = "adaptive"
