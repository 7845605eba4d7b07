from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_MultiScaleContrastive(nnUNetTrainerKD):
    """Multi-task multi-scale contrastive KD (arXiv 2406.03173) for a student with part of the labels: Dice+CE on the
    labelled samples + feature hints at encoder, bottleneck and decoder scales + dense supervised contrastive
    distillation with trained projection heads; the unlabelled cases learn from the teacher terms only.
    Recipe: the 'multiscale_contrastive' section of the student plans (preset plans/multiscale_contrastive.json)."""
    kd_method = "multiscale_contrastive"
