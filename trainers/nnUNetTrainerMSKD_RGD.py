from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerMSKD_RGD(nnUNetTrainerKD):
    """MSKD ablation: Region Graph Distillation only. No adapter: the deployed student has exactly the plain student's parameters.
    Recipe: the 'mskd_rgd' section of the student plans (preset plans/mskd_rgd.json)."""
    kd_method = "mskd_rgd"
