from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_Logit(nnUNetTrainerKD):
    """Logit-only KD as in Fast-nnUNet (full-resolution KL, alpha=0.3, T=3): the peer baseline we must beat.
    Recipe: the 'logit' section of the student plans (preset plans/logit.json)."""
    kd_method = "logit"
