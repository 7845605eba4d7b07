from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_BalancedHints(nnUNetTrainerKD):
    """Class-balanced KD with feature hints (single or several teachers): Dice+CE + T^2 KL averaged per ground-truth
    class on every deep-supervision output + Lovasz + 1x1-adapter feature hints. Recipe: the 'adaptive' section of the
    student plans (preset plans/adaptive.json; the section keeps its first name so existing student plans still
    train). Formerly nnUNetTrainerKD_Adaptive, which stays as an alias: the recipe adapts nothing per case."""
    kd_method = "adaptive"
