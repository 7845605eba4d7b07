"""A teacher with other (more, or finer) labels than the student: its predictions merged onto the student's labels.

``mapping[j]`` is the student output channel that teacher output channel ``j`` teaches (-1: none). Softmax
outputs: the teacher's class probabilities, softened by the temperature, are summed per student class; classes
mapped nowhere count as background (student channel 0). Region-based outputs (one sigmoid per region): a student
region is the union (OR) of the teacher regions mapped onto it, with probability 1 - prod(1 - q); regions mapped
nowhere are dropped (background is the absence of every region).

The result is returned as logits at the same temperature (``T * log p`` for softmax, ``T * logit q`` for
sigmoids), so every logit term uses it unchanged: softmax(T log p / T) = p. Probabilities are floored at 1e-8 so
that a student class no teacher class maps to gets a finite logit; a region's q and 1 - q both are (in log space), so
its logit lies within T * [log 1e-8, -log 1e-8]. Pure torch, 2D and 3D, float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOOR = 1e-8
LOG_FLOOR = math.log(FLOOR)


def floored_region_logits(log_inside: torch.Tensor, log_outside: torch.Tensor, temperature: float) -> torch.Tensor:
    """T * logit q from log q and log(1 - q), each floored at log FLOOR: finite where q or 1 - q rounds to 0."""
    return temperature * (log_inside.clamp_min(LOG_FLOOR) - log_outside.clamp_min(LOG_FLOOR))


def mapping_matrix(mapping: Sequence[int], num_student: int, region_based: bool,
                   device=None) -> torch.Tensor:
    """(num_teacher, num_student) 0/1 matrix; unmapped softmax classes go to background (column 0)."""
    matrix = torch.zeros((len(mapping), num_student), device=device)
    for j, target in enumerate(mapping):
        if not -1 <= int(target) < num_student:
            raise ValueError(f"teacher channel {j} maps to student channel {target}, outside [0, {num_student})")
        if target >= 0:
            matrix[j, int(target)] = 1.0
        elif not region_based:
            matrix[j, 0] = 1.0
    return matrix


def merge_teacher_logits(teacher_logits: torch.Tensor, mapping: Sequence[int], num_student: int,
                         temperature: float, region_based: bool = False) -> torch.Tensor:
    """Teacher logits (B, Ct, *sp) -> logits (B, Cs, *sp) on the student's labels, at ``temperature``."""
    if len(mapping) != teacher_logits.shape[1]:
        raise ValueError(f"the label map has {len(mapping)} entries for {teacher_logits.shape[1]} teacher channels")
    matrix = mapping_matrix(mapping, num_student, region_based, teacher_logits.device)
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        t = teacher_logits.detach().float() / temperature
        if region_based:
            # log(1 - q_union) = sum over mapped regions of log(1 - q) = sum logsigmoid(-t), and log q_union =
            # log(-expm1(log(1 - q_union))): logit q = log q - log(1 - q) in log space, both floored at log FLOOR.
            # Not logit(clamp(q, FLOOR, 1 - FLOOR)): 1 - 1e-8 rounds to 1 in float32, so a confident teacher
            # (t / T above about 17) gave an infinite logit and a NaN KL.
            log_outside = torch.einsum("bj...,js->bs...", torch.nn.functional.logsigmoid(-t), matrix)
            return floored_region_logits(torch.log(-torch.expm1(log_outside)), log_outside, temperature)
        p = torch.einsum("bj...,js->bs...", torch.softmax(t, 1), matrix)
        return temperature * torch.log(p.clamp_min(FLOOR))
