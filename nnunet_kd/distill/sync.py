"""The terms' trainable modules (adapters) under nnU-Net's DDP: nnU-Net wraps only the student network in
DistributedDataParallel, so without this every rank would train its own adapters. All ranks start from rank 0's
weights and average their gradients after every backward pass, which is what DDP does for the student."""
from __future__ import annotations

import torch
from torch import distributed as dist


def broadcast_parameters(parameters: list) -> None:
    """Every rank takes rank 0's values (call once, before training)."""
    with torch.no_grad():
        for p in parameters:
            dist.broadcast(p.data, src=0)


def average_gradients(parameters: list) -> None:
    """Replace each gradient by its mean over the ranks, in one all-reduce (a missing gradient counts as zero)."""
    if not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
