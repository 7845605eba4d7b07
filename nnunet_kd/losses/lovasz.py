"""Lovasz-softmax loss: a convex surrogate of the Jaccard (IoU) loss, optimised directly.

Berman, Rannen Triki, Blaschko, "The Lovasz-Softmax loss: a tractable surrogate for the optimization of the
intersection-over-union measure in neural networks", CVPR 2018. For a class c, the per-voxel errors
e_i = |[y_i = c] - p_i,c| are sorted in decreasing order and dotted with the gradient of the Lovasz extension
of the Jaccard loss (lovasz_grad). At binary predictions the loss equals 1 - IoU exactly. As in the paper's
reference code (per_image=False) the voxels of the whole batch form one set.

Region-based datasets (one sigmoid per region) use the same extension per region on
e_i = |y_i,r - sigmoid(x_i,r)| ("Lovasz-sigmoid").

Shapes: logits (B, C, *spatial) 2D or 3D; target (B, 1, *spatial) label map (or (B, R, *spatial) binary
regions for lovasz_sigmoid); mask (B, 1, *spatial) bool or None, False voxels are dropped from the set.
Classes: 'present' averages over the classes that occur in the valid target voxels (the paper's default),
'all' over every class. Computed in float32 with autocast disabled.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from nnunet_kd.losses._common import check_mask, float32_region


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted in decreasing order.
    gt_sorted: {0,1} float ground truth in the order of the sorted errors along the last axis, (N,) or (C, N)
    (one row per class)."""
    gts = gt_sorted.sum(-1, keepdim=True)
    hits = gt_sorted.cumsum(-1)
    # With k = position + 1: intersection = gts - hits and union = gts + k - hits (cumsum(1 - gt) is k - hits), so
    # the Jaccard loss 1 - intersection / union is k / union: two element-wise passes fewer
    positions = torch.arange(1, gt_sorted.shape[-1] + 1, device=gt_sorted.device, dtype=gt_sorted.dtype)
    union = (positions - hits).add_(gts)  # >= 1 everywhere: each position adds to one of the two sums
    jaccard = positions / union
    return torch.diff(jaccard, dim=-1, prepend=jaccard.new_zeros(jaccard.shape[:-1] + (1,)))


class _LovaszExtension(torch.autograd.Function):
    """Mean over the selected classes of the Lovasz extension of the errors |foreground - probabilities|, (C, N)
    rows. Its gradient is known once the errors are sorted (each voxel gets lovasz_grad at its sorted position, times
    the sign of its error's derivative), so the forward computes it and the backward only scales it: no autograd
    graph through the sort's gathers, clamps and absolute values."""

    @staticmethod
    def forward(ctx, probabilities, foreground, valid, selected):
        # probabilities, foreground (C, N) float; valid (1, N) bool or None; selected (C,) float 0/1
        # foreground is 0 at invalid voxels already (_lovasz_flat)
        difference = probabilities - foreground
        errors = difference.abs()
        if valid is not None:
            errors = torch.where(valid, errors, torch.full_like(errors, -1.0))
        order = _descending_order(errors)
        grad_sorted = lovasz_grad(torch.gather(foreground, -1, order))
        per_class = (torch.gather(errors, -1, order).clamp_(min=0) * grad_sorted).sum(-1)
        weights = selected / selected.sum().clamp(min=1.0)
        value = (per_class * weights).sum()
        if ctx.needs_input_grad[0]:
            # d value / d error_i = weight_c * lovasz_grad at i's position (0 for invalid voxels, whose clamped
            # error is constant); d error / d p = sign(p - foreground) (0 where they are equal, as abs's gradient)
            grad_errors = torch.empty_like(errors).scatter_(-1, order, grad_sorted.mul_(weights[:, None]))
            if valid is not None:
                grad_errors = grad_errors * valid
            ctx.save_for_backward(grad_errors.mul_(difference.sign_()))
        return value

    @staticmethod
    def backward(ctx, grad_value):
        (grad_probabilities,) = ctx.saved_tensors
        return grad_probabilities * grad_value, None, None, None


def _lovasz_flat(probabilities: torch.Tensor, foreground: torch.Tensor, valid: Optional[torch.Tensor],
                 classes) -> torch.Tensor:
    """probabilities and foreground (C, N) float, valid (1, N) bool or None: mean over the selected classes of
    the Lovasz extension. All classes are sorted at once, each along its own contiguous row (the fastest layout
    for sort, gather and cumsum), and nothing is read back to the host (no sync on GPU): invalid voxels get
    error -1, so they sort after every valid voxel, where they change no valid voxel's gradient and contribute 0
    (errors are clamped at 0 for the dot product)."""
    if valid is not None:
        foreground = foreground * valid
    if classes == "present":
        selected = (foreground.sum(-1) > 0).to(probabilities.dtype)
    elif classes == "all":
        selected = torch.ones(foreground.shape[0], device=probabilities.device, dtype=probabilities.dtype)
    else:
        selected = torch.zeros(foreground.shape[0], device=probabilities.device, dtype=probabilities.dtype)
        selected[list(classes)] = 1.0
    return _LovaszExtension.apply(probabilities, foreground, valid, selected)


def _descending_order(errors: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row of errors (C, N) in decreasing order, negative values (invalid voxels) last.
    The sort is the Lovasz loss's only costly step. Non-negative float32 numbers order exactly like their bit
    patterns read as integers, so each row is sorted by an int32 key (minus the error's bits; invalid voxels 1):
    integer keys take the radix sort, and 32-bit keys need half the passes of the 64-bit keys that sorting all rows
    as one flat array would. The order is the float sort's up to ties, which do not change the loss value; the sort
    is stable, so ties keep the voxel order."""
    with torch.no_grad():
        errors = errors.detach().float()
        bits = errors.clamp(min=0).view(torch.int32)
        key = torch.where(errors < 0, torch.ones_like(bits), -bits)
        # one 1-D sort per row: torch sorts a 1-D integer tensor with its radix sort, a 2-D one by comparisons
        return torch.stack([torch.sort(row, stable=True).indices for row in key.unbind(0)])


def _flatten(values: torch.Tensor) -> torch.Tensor:
    """(B, C, *sp) -> (C, N), each class's voxels contiguous."""
    return values.movedim(1, 0).reshape(values.shape[1], -1)


def lovasz_softmax(probabilities: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   classes: Union[str, Sequence[int]] = "present") -> torch.Tensor:
    """Lovasz-softmax on class probabilities (B, C, *sp) against an integer label map (B, 1, *sp)."""
    labels = labels if labels.dim() == probabilities.dim() else labels.unsqueeze(1)
    mask = check_mask(mask, probabilities)
    if labels.shape[1] != 1 or labels.shape[2:] != probabilities.shape[2:]:
        raise ValueError(f"labels must be (B, 1, *spatial) matching probabilities {tuple(probabilities.shape)}, "
                         f"got {tuple(labels.shape)}")
    num_classes = probabilities.shape[1]
    if mask is None and not labels.is_cuda and (labels.min() < 0 or labels.max() >= num_classes):  # no GPU sync
        raise ValueError(f"labels must lie in [0, {num_classes}) outside the mask, got [{int(labels.min())}, "
                         f"{int(labels.max())}]; pass a mask that excludes the ignore label")
    # one-hot straight in the (C, N) layout (labels have one channel, so their flat order is every class row's);
    # voxels outside the mask may hold any value (nnU-Net's ignore label): _lovasz_flat zeroes them
    classes_column = torch.arange(num_classes, device=labels.device)[:, None]
    foreground = (labels.reshape(1, -1) == classes_column).to(probabilities.dtype)
    valid = None if mask is None else _flatten(mask)
    return _lovasz_flat(_flatten(probabilities), foreground, valid, classes)


def lovasz_sigmoid(probabilities: torch.Tensor, regions: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   classes: Union[str, Sequence[int]] = "present") -> torch.Tensor:
    """Lovasz extension per region on sigmoid probabilities (B, R, *sp) against binary regions (B, R, *sp)."""
    mask = check_mask(mask, probabilities)
    if regions.shape != probabilities.shape:
        raise ValueError(f"regions {tuple(regions.shape)} must match probabilities {tuple(probabilities.shape)}")
    valid = None if mask is None else _flatten(mask)
    return _lovasz_flat(_flatten(probabilities), _flatten(regions.float()), valid, classes)


class LovaszSoftmaxLoss(nn.Module):
    """Lovasz-softmax on logits (softmax inside), or Lovasz-sigmoid per region when region_based."""

    def __init__(self, region_based: bool = False, classes: Union[str, Sequence[int]] = "present"):
        super().__init__()
        self.region_based = region_based
        self.classes = classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        with float32_region(logits.device):
            if self.region_based:
                return lovasz_sigmoid(torch.sigmoid(logits.float()), target, mask, self.classes)
            return lovasz_softmax(torch.softmax(logits.float(), 1), target, mask, self.classes)
