from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerMSKD(nnUNetTrainerKD):
    """FFD + RGD (+ optional logit KL): the full MSKD recipe. No adapter: the deployed student has exactly the plain student's parameters.
    Recipe: the 'mskd' section of the student plans (preset plans/mskd.json)."""
    kd_method = "mskd"
