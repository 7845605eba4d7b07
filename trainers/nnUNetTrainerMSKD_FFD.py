from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerMSKD_FFD(nnUNetTrainerKD):
    """MSKD ablation: Feature Filtering Distillation only. No adapter: the deployed student has exactly the plain student's parameters.
    Recipe: the 'mskd_ffd' section of the student plans (preset plans/mskd_ffd.json)."""
    kd_method = "mskd_ffd"
