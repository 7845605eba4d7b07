"""``nnUNetTrainerMultiTask``: a multi-task teacher, nnU-Net's network with a reconstruction head.

The teacher of multi-task multi-scale contrastive KD (arXiv 2406.03173) learns segmentation and image reconstruction
with shared features: a 1x1 convolution on the last decoder stage (the features nnU-Net's segmentation layer reads)
predicts the input image, and the training loss is nnU-Net's deep-supervised Dice+CE + ``reconstruction_weight`` x
MSE(reconstruction, input). The weight sits in the plans, ``plans["kd"][<configuration>]["training"]
["reconstruction_weight"]`` (``python -m nnunet_kd.budget ... --reconstruction-weight 1``), with the budget and seed
of ``nnUNetTrainerBudget``, whose checkpoints, resume and training-case record it shares. It does not import the
distillation trainer.

The network's forward is nnU-Net's own (segmentation outputs only); the head is a submodule
(``reconstruction_head``) read from a forward hook on the last decoder stage, so nnU-Net's validation and
``nnUNetv2_predict -tr nnUNetTrainerMultiTask`` (which builds this class's network, so it needs nnUNet_extTrainer)
work unchanged. As a teacher (nnunet_kd.teacher) it is rebuilt as nnU-Net's plain network without the head: the
student distils the segmentation output and the shared encoder/decoder features, and never sees the head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_kd.budget import nnUNetTrainerBudget
from nnunet_kd.recipe import RecipeError, parse_recipe
from nnunet_kd.teacher import RECONSTRUCTION_HEAD


def add_reconstruction_head(network: nn.Module, num_input_channels: int) -> nn.Module:
    """Give nnU-Net's U-Net a 1x1 convolution from its last decoder stage's channels to the input's channels."""
    seg_layer = network.decoder.seg_layers[-1]  # reads the last decoder stage: its in_channels are that stage's
    conv = nn.Conv3d if isinstance(seg_layer, nn.Conv3d) else nn.Conv2d
    setattr(network, RECONSTRUCTION_HEAD, conv(seg_layer.in_channels, num_input_channels, kernel_size=1, bias=True))
    return network


def _unwrapped(network: nn.Module) -> nn.Module:
    for attr in ("_orig_mod", "module"):
        while hasattr(network, attr) and isinstance(getattr(network, attr), nn.Module):
            network = getattr(network, attr)
    return network


class ReconstructionLoss(nn.Module):
    """nnU-Net's segmentation loss, plus ``weight`` x MSE(head(last decoder features), input) while training.

    The trainer hands over the input of each training step (``target_image``) and a hook stores the last decoder
    stage's output; in validation (no input handed over) this is nnU-Net's loss alone."""

    def __init__(self, segmentation_loss: nn.Module, network: nn.Module, weight: float):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.weight = weight
        self.head = getattr(network, RECONSTRUCTION_HEAD)
        self.target_image = None
        self.features = None
        self.last_reconstruction_loss = None
        network.decoder.stages[-1].register_forward_hook(self._store)

    def _store(self, module, inputs, output):
        self.features = output

    def forward(self, output, target):
        loss = self.segmentation_loss(output, target)
        if self.target_image is None or self.features is None:
            return loss
        reconstruction = self.head(self.features)
        mse = F.mse_loss(reconstruction.float(), self.target_image.to(reconstruction.device).float())
        self.last_reconstruction_loss = mse.detach()
        self.features = None
        return loss + self.weight * mse


class nnUNetTrainerMultiTask(nnUNetTrainerBudget):
    """nnUNetTrainerBudget with a reconstruction head and its loss (weight ``reconstruction_weight`` in the plans)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        weight = parse_recipe(plans, configuration, "none", self.plans_file).reconstruction_weight
        if weight is None:
            raise RecipeError(f"{self.plans_file} has no reconstruction_weight under kd.{configuration}.training: the "
                              f"multi-task teacher needs the weight of its reconstruction loss. Write the plans with "
                              f"python -m nnunet_kd.budget -d <dataset> -c {configuration} -o <name> --epochs N "
                              f"--reconstruction-weight 1 (or add the key to that file).")
        self.reconstruction_weight = float(weight)
        self.reconstruction_losses = []

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        network = nnUNetTrainerBudget.build_network_architecture(plans_manager, configuration_manager,
                                                                 num_input_channels, num_output_channels,
                                                                 enable_deep_supervision)
        return add_reconstruction_head(network, num_input_channels)

    def initialize(self):
        super().initialize()
        self.loss = ReconstructionLoss(self.loss, _unwrapped(self.network), self.reconstruction_weight)

    def train_step(self, batch: dict) -> dict:
        self.loss.target_image = batch["data"]
        try:
            out = super().train_step(batch)
        finally:
            self.loss.target_image = None
        if self.loss.last_reconstruction_loss is not None:
            self.reconstruction_losses.append(float(self.loss.last_reconstruction_loss.cpu()))
        return out

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.reconstruction_losses:
            mean = sum(self.reconstruction_losses) / len(self.reconstruction_losses)
            self.print_to_log_file(f"reconstruction MSE (unweighted, training mean) {mean:.4f}, weight "
                                   f"{self.reconstruction_weight:g}")
        self.reconstruction_losses = []
