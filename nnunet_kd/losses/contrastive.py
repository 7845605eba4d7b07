"""Dense supervised contrastive distillation (InfoNCE between student and teacher voxel embeddings), the contrastive
part of multi-task multi-scale contrastive KD (arXiv 2406.03173), built as its paper describes.

At one stage, student and teacher features are projected (by trained heads, outside this module) and L2-normalised
per voxel. Voxels are sampled per image, balanced over the classes of the label map at that resolution, at most
``max_per_class`` per class and image (nnU-Net's 3D batches hold two images, so the negatives must come from voxels,
not images). Each sampled **student** embedding is an anchor; its positives are the **teacher** embedding at the same
voxel and the teacher embeddings of the same class (in the batch and in a memory queue of earlier teacher embeddings);
its negatives are the teacher embeddings of the other classes (batch and queue). The loss of an anchor a with
positives P and negatives N is the supervised-contrastive (SupCon) form

    -1/|P| sum_{p in P} log( exp(a.p / tau) / sum_{k in P u N} exp(a.k / tau) ),

averaged over anchors. Gradients: the teacher's *features* are frozen (callers pass them without a graph), but the
in-batch teacher keys keep their graph, so a trained teacher-side projection head receives a gradient through them
(it learns to place the teacher's voxels where the student's anchors can find them). Queue entries are stored
detached: they were computed with earlier head weights and are constants. Pure torch, 2D and 3D.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_kd.losses._common import float32_region


def sample_voxels(labels: torch.Tensor, valid: Optional[torch.Tensor], max_per_class: int,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flat voxel indices (into B x prod(spatial)) balanced per (image, class): up to ``max_per_class`` of each class
    present in each image, drawn without replacement."""
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    ok = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.reshape(b, -1).bool()
    n = flat.shape[1]
    chosen = []
    for i in range(b):
        for c in torch.unique(flat[i][ok[i]]).tolist():
            where = torch.nonzero((flat[i] == c) & ok[i], as_tuple=False).flatten()
            if where.numel() > max_per_class:
                pick = torch.randperm(where.numel(), generator=generator, device="cpu")[:max_per_class]
                where = where[pick.to(where.device)]
            chosen.append(where + i * n)
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    return torch.cat(chosen)


def gather_voxels(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, C, *sp) features at flat voxel indices (into B x prod(sp)) -> (N, C), without copying the whole map."""
    flat = features.flatten(2)  # a view for contiguous features
    return flat[index // flat.shape[2], :, index % flat.shape[2]]


class _LogSumExpOfSimilarities(torch.autograd.Function):
    """logsumexp over keys of anchors @ keys^T, per anchor, for (A, D) anchors against (K, D) keys whose first
    ``n_trained`` rows need a gradient (the in-batch teacher keys) and the rest none (the queue's constants).
    The A x K matrix is this term's whole cost (6,144 anchors x 10,240 keys at the preset: 250 MB per pass), so it
    is allocated once and exponentiated in place, and the backward scales it in place into the gradient of the
    logits (the softmax's normalisation and the incoming gradient in one pass): five passes over it instead of
    autograd's nine, no further A x K allocations, and no key gradient for the queue's rows."""

    @staticmethod
    def forward(ctx, anchors, keys, n_trained):
        shifted_exp = anchors @ keys.t()
        top = shifted_exp.amax(1, keepdim=True)
        total = shifted_exp.sub_(top).exp_().sum(1, keepdim=True)
        ctx.save_for_backward(anchors, keys, shifted_exp, total)
        ctx.n_trained = n_trained
        ctx.used = False
        return (top + total.log()).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse):
        if ctx.used:  # the saved exponentials were scaled in place by the first backward
            raise RuntimeError("the contrastive term's backward runs once per forward (no retain_graph)")
        ctx.used = True
        anchors, keys, shifted_exp, total = ctx.saved_tensors
        grad_logits = shifted_exp.mul_(grad_lse[:, None] / total)  # softmax x incoming gradient
        grad_anchors = grad_logits @ keys if ctx.needs_input_grad[0] else None
        grad_keys = None
        if ctx.needs_input_grad[1]:
            grad_keys = torch.zeros_like(keys)
            grad_keys[:ctx.n_trained] = grad_logits[:, :ctx.n_trained].t() @ anchors
        return grad_anchors, grad_keys, None


def supervised_infonce(anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor,
                       key_labels: torch.Tensor, same_voxel: Optional[torch.Tensor] = None,
                       temperature: float = 0.1, constant_keys: Optional[torch.Tensor] = None,
                       constant_key_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean SupCon loss of ``anchors`` (A, D) against ``keys`` (K, D) and ``constant_keys`` (Q, D: keys that get no
    gradient, e.g. a memory queue), all L2-normalised; a key is a positive of an anchor when their labels agree
    (``same_voxel`` (A,) index of each anchor's own key in ``keys``, always a positive). Anchors without any negative
    or positive are skipped (an exact 0 when none remains, e.g. no anchor at all)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if constant_keys is not None and (constant_key_labels is None
                                      or constant_key_labels.shape[0] != constant_keys.shape[0]):
        raise ValueError(f"constant_keys ({tuple(constant_keys.shape)}) need one label each, got "
                         f"{None if constant_key_labels is None else tuple(constant_key_labels.shape)}")
    anchors, keys = anchors.float(), keys.float()
    n_trained = keys.shape[0]
    if constant_keys is not None and constant_keys.shape[0]:
        keys = torch.cat([keys, constant_keys.detach().to(keys.device, torch.float32)])
        key_labels = torch.cat([key_labels, constant_key_labels.to(key_labels.device)])
    if anchors.shape[0] == 0 or keys.shape[0] == 0:  # nothing sampled (a fully masked batch) and an empty queue
        return anchors.sum() * 0.0
    # the temperature scales the (A, D) anchors rather than the (A, K) logits; keys keep their graph (module doc)
    scaled = anchors / temperature
    with float32_region(anchors.device):  # under autocast the product and the in-place softmax would run in fp16
        lse = _LogSumExpOfSimilarities.apply(scaled, keys, n_trained)
    # log p(positive) summed over positives = (sum of positive logits) - |P| logsumexp: the positive logits of an
    # anchor of class c sum to a . (sum of the keys of class c) / tau, so no (A, K) mask or log-probability tensor is
    # built.
    classes, key_class = torch.unique(key_labels, return_inverse=True)
    key_sums = torch.zeros((classes.numel(), keys.shape[1]), device=keys.device).index_add(0, key_class, keys)
    key_counts = torch.bincount(key_class, minlength=classes.numel()).to(lse.dtype)
    match = anchor_labels.view(-1, 1) == classes.view(1, -1)  # (A, C): an anchor's class among the keys', if any
    has_class = match.any(1)
    anchor_class = match.to(torch.long).argmax(1)
    positive_sum = (scaled * key_sums[anchor_class]).sum(1) * has_class
    n_positive = key_counts[anchor_class] * has_class
    if same_voxel is not None:  # the anchor's own key is a positive even where its label differs
        own_other = (key_labels[same_voxel] != anchor_labels).to(lse.dtype)
        positive_sum = positive_sum + (scaled * keys[same_voxel]).sum(1) * own_other
        n_positive = n_positive + own_other
    has_both = (n_positive > 0) & (n_positive < keys.shape[0])
    per_anchor = lse - positive_sum / n_positive.clamp(min=1)
    weight = has_both.to(per_anchor.dtype)
    return (per_anchor * weight).sum() / weight.sum().clamp(min=1.0)


class TeacherEmbeddingQueue:
    """FIFO memory of (detached) teacher embeddings and their labels, ``size`` entries at most."""

    def __init__(self, size: int, dim: int, device=None):
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.embeddings = torch.zeros((0, dim), device=device)
        self.labels = torch.zeros((0,), dtype=torch.long, device=device)

    def push(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if self.size == 0:
            return
        self.embeddings = torch.cat([embeddings.detach().float(), self.embeddings.to(embeddings.device)])[:self.size]
        self.labels = torch.cat([labels.long(), self.labels.to(labels.device)])[:self.size]


def dense_contrastive_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, labels: torch.Tensor,
                           valid: Optional[torch.Tensor] = None, max_per_class: int = 64, temperature: float = 0.1,
                           queue: Optional[TeacherEmbeddingQueue] = None,
                           generator: Optional[torch.Generator] = None,
                           student_head: Optional[Callable] = None,
                           teacher_head: Optional[Callable] = None) -> torch.Tensor:
    """The dense supervised InfoNCE above at one stage. ``student_embeddings`` / ``teacher_embeddings`` (B, C, *sp):
    the features (or embeddings) of student and teacher at the same resolution; labels (B, 1, *sp) there. Voxels are
    sampled first; ``student_head`` / ``teacher_head`` (callables (N, C) -> (N, D), the trained projection heads) are
    applied to the sampled voxels only, then every embedding is L2-normalised. Without heads both inputs must have the
    same shape. ``queue`` supplies extra teacher keys and receives this step's (detached)."""
    same_shape = student_embeddings.shape == teacher_embeddings.shape
    heads = student_head is not None or teacher_head is not None
    if not same_shape and (not heads or student_embeddings.shape[0] != teacher_embeddings.shape[0]
                           or student_embeddings.shape[2:] != teacher_embeddings.shape[2:]):
        raise ValueError(f"student {tuple(student_embeddings.shape)} and teacher {tuple(teacher_embeddings.shape)} "
                         f"embeddings must have the same shape (or the same batch and spatial shape, with heads)")
    if tuple(labels.shape[2:]) != tuple(student_embeddings.shape[2:]) or labels.shape[1] != 1:
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, 1, *spatial) at the embeddings' resolution "
                         f"{tuple(student_embeddings.shape[2:])}")
    index = sample_voxels(labels, valid, max_per_class, generator)
    student = gather_voxels(student_embeddings, index)
    teacher = gather_voxels(teacher_embeddings, index)
    if student_head is not None:
        student = student_head(student)
    if teacher_head is not None:
        teacher = teacher_head(teacher)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"student embeddings have {student.shape[1]} channels, teacher embeddings "
                         f"{teacher.shape[1]}: project both to the same dimension")
    student = F.normalize(student.float(), dim=1)
    teacher = F.normalize(teacher.float(), dim=1)
    sampled_labels = labels.reshape(-1).long()[index]
    queued = queue is not None and queue.embeddings.shape[0] > 0
    own = torch.arange(index.numel(), device=student.device)
    loss = supervised_infonce(student, sampled_labels, teacher, sampled_labels, own, temperature,
                              queue.embeddings if queued else None, queue.labels if queued else None)
    if queue is not None:
        queue.push(teacher, sampled_labels)
    return loss


class ProjectionHead(nn.Module):
    """The trained projection of one side (student or teacher) at one stage: Linear - ReLU - Linear on voxel
    vectors (N, C) -> (N, D) (a two-layer 1x1 convolution, applied to the sampled voxels only, so 2D and 3D alike).
    Trained with the student, checkpointed, never exported."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: Optional[int] = None):
        super().__init__()
        hidden = hidden_channels or max(in_channels, out_channels)
        self.layers = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, out_channels))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.layers(vectors)
