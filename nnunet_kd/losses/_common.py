"""Small helpers shared by the loss files (pure torch)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def float32_region(device: torch.device):
    """Autocast off: distillation terms divide and take logs, which fp16 does badly. Inputs are cast to float32."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


def resize_mask(mask: Optional[torch.Tensor], spatial_shape: Sequence[int]) -> Optional[torch.Tensor]:
    """Bool mask (B, 1, *sp) resampled to spatial_shape with 'nearest-exact', the mode nnU-Net uses for its
    deep-supervision targets, so a downsampled mask lines up with nnU-Net's downsampled labels."""
    if mask is None:
        return None
    if tuple(mask.shape[2:]) == tuple(spatial_shape):
        return mask.bool()
    return F.interpolate(mask.float(), size=tuple(spatial_shape), mode="nearest-exact") > 0.5


def check_mask(mask: Optional[torch.Tensor], like: torch.Tensor, name: str = "mask") -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dim() != like.dim() or mask.shape[1] != 1 or mask.shape[0] != like.shape[0] \
            or tuple(mask.shape[2:]) != tuple(like.shape[2:]):
        raise ValueError(f"{name} must have shape (B, 1, *spatial) = {(like.shape[0], 1, *like.shape[2:])}, "
                         f"got {tuple(mask.shape)}")
    return mask.bool()


def masked_voxel_mean(per_voxel: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of per_voxel (B, 1, *sp) over the voxels where mask is True (all voxels when mask is None).
    With no valid voxel the result is an exact 0 that still belongs to the autograd graph."""
    if mask is None:
        return per_voxel.mean()
    weights = mask.to(per_voxel.dtype)
    # clamp instead of `if count == 0`: reading the count back would synchronise the GPU on every step
    return (per_voxel * weights).sum() / weights.sum().clamp(min=1.0)


