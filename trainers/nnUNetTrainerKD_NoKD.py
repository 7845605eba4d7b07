from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_NoKD(nnUNetTrainerKD):
    """The plain student baseline: nnU-Net's own loss, no teacher, with the training length of the student plans,
    so it is compared with the distilled students at the same budget."""
    kd_method = "none"
