import torch

from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_NoKD(nnUNetTrainerKD):
    """Deprecated: use nnUNetTrainerBudget (nnunet_kd.budget), the same budget and seed as a plain nnU-Net trainer
    whose folders need no plugin to predict. Kept, unchanged, so existing workspaces resume (--c) and their folders
    load as teachers: the plain student baseline, nnU-Net's own loss, no teacher, the training length of the plans."""
    kd_method = "none"

    # nnU-Net's signature exactly: nnU-Net records the init arguments by the names of this signature.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.print_to_log_file("WARNING: -tr nnUNetTrainerKD_NoKD is deprecated; train teachers and plain students with "
                               "-tr nnUNetTrainerBudget (same budget and seed; it writes plain nnU-Net models that "
                               "nnUNetv2_predict loads without this plugin).")
