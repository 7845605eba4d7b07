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


# Adapter outputs of at least this many elements are not materialised (adapted_feature_mse): beyond it the hint's time
# is memory traffic through the adapter's output and its gradient; below it the direct form's fewer kernel calls win.
EXPANDED_HINT_MIN_ELEMENTS = 1 << 20


def adapted_feature_mse(adapter: "FeatureAdapter", student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                        mask: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``feature_mse(adapter(student_feature), teacher_feature, mask, weight)``, the same value and gradients.

    Without mask and weight, a large adapter output (full resolution: 8 student channels mapped to 32 teacher
    channels) is never built: the error is expanded (``expanded_adapter_mse``) into sums over the student's few
    channels, which is what makes the full-resolution hint cheap (the KD step's speed budget)."""
    out_elements = student_feature.numel() // max(1, student_feature.shape[1]) * adapter.teacher_channels
    if mask is None and weight is None and out_elements >= EXPANDED_HINT_MIN_ELEMENTS \
            and student_feature.shape[2:] == teacher_feature.shape[2:] \
            and teacher_feature.shape[:2] == (student_feature.shape[0], adapter.teacher_channels):
        return expanded_adapter_mse(adapter, student_feature, teacher_feature)
    return feature_mse(adapter(student_feature), teacher_feature, mask, weight)


def expanded_adapter_mse(adapter: "FeatureAdapter", student_feature: torch.Tensor,
                         teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean over voxels v and teacher channels of (W s_v + b - t_v)^2 for the 1x1 adapter (W, b), without building
    W s + b: see _ExpandedAdapterMSE."""
    with float32_region(student_feature.device):
        batch, student_channels = student_feature.shape[:2]
        s = student_feature.float().reshape(batch, student_channels, -1)
        t = teacher_feature.detach().float().reshape(batch, teacher_feature.shape[1], -1)
        return _ExpandedAdapterMSE.apply(s, t, adapter.proj.weight.flatten(1).float(), adapter.proj.bias.float())


class _ExpandedAdapterMSE(torch.autograd.Function):
    """s (B, Cs, N) student, t (B, Ct, N) teacher, W (Ct, Cs), b (Ct,); n = B N voxels. The error expands as

        sum_v |W s_v + b - t_v|^2 = <W^T W, G> + 2 b.W s_sum + n |b|^2 - 2 <W, C> - 2 b.t_sum + sum_v |t_v|^2

    with G = sum_v s_v s_v^T (Cs x Cs) and C = sum_v t_v s_v^T (Ct x Cs), so the forward pass reads s and t, and writes
    nothing of their size. The gradients are written out (autograd through the batched products and their sum over
    images would take several times longer on the CPU): with k = 2 / (n Ct),
        d/ds_v = k (W^T W s_v + W^T b - W^T t_v),  d/dW = k (W G + b s_sum^T - C),  d/db = k (W s_sum + n b - t_sum).
    Sums run in float32, per image (the batched products), then over images."""

    @staticmethod
    def forward(ctx, s, t, weight, bias):
        n, teacher_channels = s.shape[0] * s.shape[2], t.shape[1]
        gram = torch.bmm(s, s.transpose(1, 2)).sum(0)
        cross = torch.bmm(t, s.transpose(1, 2)).sum(0)
        student_sum, teacher_sum = s.sum((0, 2)), t.sum((0, 2))
        rows = t.reshape(-1, 1, t.shape[2])
        teacher_square = torch.bmm(rows, rows.transpose(1, 2)).sum()
        total = ((weight @ gram) * weight).sum() + 2 * bias @ (weight @ student_sum) + n * (bias @ bias) \
            - 2 * ((cross * weight).sum() + bias @ teacher_sum) + teacher_square
        ctx.save_for_backward(s, t, weight, bias, gram, cross, student_sum, teacher_sum)
        return total / (n * teacher_channels)

    @staticmethod
    def backward(ctx, grad_output):
        s, t, weight, bias, gram, cross, student_sum, teacher_sum = ctx.saved_tensors
        n = s.shape[0] * s.shape[2]
        k = grad_output * 2.0 / (n * t.shape[1])
        grad_s = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            wt, batch = weight.t() * k, s.shape[0]
            grad_s = torch.baddbmm((wt @ bias).view(1, -1, 1), (wt @ weight).expand(batch, -1, -1), s)
            grad_s = torch.baddbmm(grad_s, wt.expand(batch, -1, -1), t, alpha=-1.0)
        if ctx.needs_input_grad[2]:
            grad_weight = (weight @ gram + torch.outer(bias, student_sum) - cross) * k
        if ctx.needs_input_grad[3]:
            grad_bias = (weight @ student_sum + n * bias - teacher_sum) * k
        return grad_s, None, grad_weight, grad_bias


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
        return {k: feature_mse(self.adapters[k](student_features[k]), teacher_features[k], mask)
                for k in self.adapters}
