"""Feature distillation ("hints", Romero et al., FitNets, ICLR 2015): the student's intermediate features,
mapped to the teacher's channel count by a trained 1x1 convolution (FeatureAdapter), regress onto the
teacher's features at the same stage with a mean squared error.

Shapes: features (B, C, *spatial), 2D or 3D; student and teacher share batch and spatial shape at a stage.
mask (B, 1, *spatial_of_the_image) bool or None; it is resampled to each stage's resolution with
'nearest-exact' (False = ignore label: those voxels do not enter the mean). The adapters live outside the
student network: they are trained with it and thrown away at export, so the deployed student gains no
parameters. The teacher is detached; the error is computed in float32.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_kd.losses._common import float32_region, masked_voxel_mean, resize_mask


def feature_mse(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                mask: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over channels and valid voxels of (student - teacher)^2. Both (B, C, *sp); mask at any resolution.
    ``weight`` (B, 1, *sp) at the features' resolution multiplies each voxel's error (the mean still divides by the
    number of valid voxels: a teacher's share of a mixture)."""
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"student feature {tuple(student_feature.shape)} and teacher feature "
                         f"{tuple(teacher_feature.shape)} must have the same shape (adapt the student first)")
    mask = resize_mask(mask, student_feature.shape[2:])
    with float32_region(student_feature.device):
        student, teacher = student_feature.float(), teacher_feature.detach().float()
        if mask is None and weight is None:  # one fused kernel forward and backward
            return F.mse_loss(student, teacher)
        per_voxel = (student - teacher).pow(2).mean(1, keepdim=True)
        if weight is not None:
            per_voxel = per_voxel * weight.detach().float()
        return masked_voxel_mean(per_voxel, mask)


class _AdaptedSquaredError(torch.autograd.Function):
    """sum over channels and voxels of scale * (W s + b - t)^2, with W s the adapter's 1x1 convolution as a batched
    matrix product. Forward and backward in one place: the residual r = W s + b - t is formed by one batched product
    that also reads t (the bias rides on a channel of ones appended to s), the loss is its weighted square sum, and
    only scale * r is kept, never t, so the teacher's feature is not saved for the backward pass (it may be an
    inference tensor). The backward is two batched products; the gradient with respect to r (2 scale r) is never
    formed, its factor 2 is applied to the products' smaller results. Direct form: no difference of large sums."""

    @staticmethod
    def forward(ctx, student, weight, bias, teacher, scale):
        # student (B, Ci, P), weight (Co, Ci), bias (Co,), teacher (B, Co, P), scale: a float or a (B, 1, P) tensor
        augmented = torch.cat([student, torch.ones_like(student[:, :1])], 1)
        weight_and_bias = torch.cat([weight, bias[:, None]], 1)
        residual = torch.baddbmm(teacher, weight_and_bias.expand(student.shape[0], *weight_and_bias.shape),
                                 augmented, beta=-1)
        if isinstance(scale, torch.Tensor):
            scaled = residual * scale
            value = torch.dot(scaled.reshape(-1), residual.reshape(-1))
        else:
            value = torch.dot(residual.reshape(-1), residual.reshape(-1)) * scale
            scaled = residual.mul_(scale)
        ctx.save_for_backward(augmented, weight, scaled)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        augmented, weight, scaled = ctx.saved_tensors
        factor = 2.0 * grad_value
        grad_student = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # bmm over an expanded weight, not matmul: with grad mode off (as here) matmul folds the batch into
            # one product by transposing scaled into a contiguous copy, which took over half of this backward
            # (Hippocampus 2d, 8 -> 32 channels at 56x40); same values
            weight_t = weight.t()
            grad_student = torch.bmm(weight_t.expand(scaled.shape[0], *weight_t.shape), scaled).mul_(factor)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight_and_bias = torch.bmm(scaled, augmented.transpose(1, 2)).sum(0).mul_(factor)
            grad_weight, grad_bias = grad_weight_and_bias[:, :-1], grad_weight_and_bias[:, -1]
        return grad_student, grad_weight, grad_bias, None, None


def adapted_feature_mse(adapter: "FeatureAdapter", student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                        mask: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """feature_mse(adapter(student_feature), teacher_feature, mask, weight), in one autograd node
    (_AdaptedSquaredError): about half the time of the two-step form on the CPU at a full-resolution stage, and the
    teacher's feature may be an inference tensor (it is not saved for the backward pass, so it needs no copy)."""
    b, c = student_feature.shape[:2]
    expected = (b, adapter.teacher_channels, *student_feature.shape[2:])
    if c != adapter.student_channels or tuple(teacher_feature.shape) != expected:
        raise ValueError(f"student feature {tuple(student_feature.shape)} and teacher feature "
                         f"{tuple(teacher_feature.shape)} do not fit the adapter ({adapter.student_channels} -> "
                         f"{adapter.teacher_channels} channels; the teacher feature must be {expected})")
    mask = resize_mask(mask, student_feature.shape[2:])
    with float32_region(student_feature.device):
        student = student_feature.float().reshape(b, c, -1)
        teacher = teacher_feature.detach().float().reshape(b, adapter.teacher_channels, -1)
        if mask is None and weight is None:
            scale = 1.0 / teacher.numel()
        else:
            voxels = torch.ones_like(student[:, :1]) if mask is None else mask.reshape(b, 1, -1).to(student.dtype)
            count = torch.tensor(float(voxels.numel()), device=student.device) if mask is None \
                else voxels.sum().clamp(min=1.0)
            if weight is not None:
                voxels = voxels * weight.detach().float().reshape(b, 1, -1)
            scale = voxels / (count * adapter.teacher_channels)
        return _AdaptedSquaredError.apply(student, adapter.proj.weight.flatten(1).float(), adapter.proj.bias.float(),
                                          teacher, scale)


class FeatureAdapter(nn.Module):
    """1x1 convolution from the student's channel count to the teacher's at one stage (2D or 3D)."""

    def __init__(self, student_channels: int, teacher_channels: int, dim: int):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.proj = conv(student_channels, teacher_channels, kernel_size=1, bias=True)

    def forward(self, student_feature: torch.Tensor) -> torch.Tensor:
        # A 1x1 convolution is a matrix product over channels; as one, it runs forward and backward in a third of
        # the time of the convolution kernel on the CPU (measured at full resolution, 8 -> 32 channels), with the
        # same weights (the state dict keeps nn.Conv's layout).
        weight = self.proj.weight.flatten(1).to(student_feature.dtype)
        bias = self.proj.bias.to(student_feature.dtype).view(1, -1, *([1] * (student_feature.dim() - 2)))
        return torch.einsum("oc,bc...->bo...", weight, student_feature) + bias


class FeatureDistillationLoss(nn.Module):
    """Per-stage MSE(adapter(student feature), teacher feature). ``adapters`` maps a stage key to its adapter;
    forward takes dicts keyed the same way and returns a dict of per-stage losses (the caller sums them)."""

    def __init__(self, adapters: nn.ModuleDict):
        super().__init__()
        self.adapters = adapters

    def forward(self, student_features: Dict[str, torch.Tensor], teacher_features: Dict[str, torch.Tensor],
                mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        missing = [k for k in self.adapters if k not in student_features or k not in teacher_features]
        if missing:
            raise KeyError(f"no student or teacher feature for stage(s) {missing}")
        return {k: adapted_feature_mse(self.adapters[k], student_features[k], teacher_features[k], mask)
                for k in self.adapters}
