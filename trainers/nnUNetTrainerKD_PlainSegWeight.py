from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_PlainSegWeight(nnUNetTrainerKD):
    """Control: the plain student with the segmentation loss scaled by 0.7 (Fast-nnUNet's 1 - alpha), no teacher.
    Recipe: the 'plain_seg_weight' section of the student plans (preset plans/plain_seg_weight.json)."""
    kd_method = "plain_seg_weight"
