"""Dense supervised InfoNCE: perfect alignment gives the known minimum, swapped classes raise it, the student side
and the in-batch teacher keys (the teacher head's outputs) get gradients, queue entries none, both projection heads
train, sampling is class-balanced and bounded, and the queue adds earlier teacher keys."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_kd.losses.contrastive import (ProjectionHead, TeacherEmbeddingQueue, dense_contrastive_loss, sample_voxels,
                                          supervised_infonce)


def _one_hot_embeddings(labels: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 1, *sp) labels -> (B, dim, *sp): the embedding of class c is the unit vector e_c."""
    return F.one_hot(labels[:, 0].long(), dim).movedim(-1, 1).float()


def test_perfect_alignment_gives_the_known_minimum_and_swapped_classes_raise_it():
    labels = torch.tensor([0, 0, 1, 1, 2, 2]).view(1, 1, 6, 1)
    teacher = _one_hot_embeddings(labels, 3)
    tau = 0.5
    aligned = dense_contrastive_loss(teacher.clone(), teacher, labels, max_per_class=10, temperature=tau)
    # each anchor: 2 positives at cosine 1, 4 negatives at cosine 0
    expected = -math.log(math.exp(1 / tau) / (2 * math.exp(1 / tau) + 4))
    assert aligned.item() == pytest.approx(expected, rel=1e-6)
    swapped = _one_hot_embeddings(torch.tensor([1, 1, 0, 0, 2, 2]).view(1, 1, 6, 1), 3)
    assert dense_contrastive_loss(swapped, teacher, labels, max_per_class=10, temperature=tau) > aligned + 1.0


def _supcon_written_out(anchors, anchor_labels, keys, key_labels, own, tau):
    """The SupCon loss of the module doc, with the explicit (A, K) positive mask and log-softmax."""
    log_p = F.log_softmax(anchors @ keys.t() / tau, dim=1)
    positive = (anchor_labels[:, None] == key_labels[None, :]).float()
    positive[torch.arange(len(own)), own] = 1.0
    return (-(log_p * positive).sum(1) / positive.sum(1)).mean()


def test_value_and_gradients_match_the_supcon_formula_written_out_with_a_queue_of_constant_keys():
    torch.manual_seed(0)
    anchors = F.normalize(torch.randn(12, 5), dim=1).requires_grad_()
    batch_keys = F.normalize(torch.randn(12, 5), dim=1).requires_grad_()
    queue_keys = F.normalize(torch.randn(7, 5), dim=1)
    labels, queue_labels = torch.randint(0, 3, (12,)), torch.randint(0, 3, (7,))
    labels[:3] = torch.tensor([0, 1, 2])  # every class present among the anchors
    own = torch.arange(12)
    loss = supervised_infonce(anchors, labels, batch_keys, labels, own, 0.2, queue_keys, queue_labels)
    grads = torch.autograd.grad(loss, (anchors, batch_keys))
    expected = _supcon_written_out(anchors, labels, torch.cat([batch_keys, queue_keys]),
                                   torch.cat([labels, queue_labels]), own, 0.2)
    expected_grads = torch.autograd.grad(expected, (anchors, batch_keys))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-7)
    # the exponentials saved for the backward are scaled in place: a second backward through the same graph is refused
    loss = supervised_infonce(anchors, labels, batch_keys, labels, own, 0.2, queue_keys, queue_labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_a_fully_masked_batch_without_a_queue_gives_an_exact_zero_that_backpropagates():
    # e.g. out-of-sample routing on a batch of the teacher's own training cases, on the first step (empty queue)
    labels = torch.randint(0, 3, (2, 1, 6, 5))
    student = torch.randn(2, 4, 6, 5, requires_grad=True)
    nothing = torch.zeros_like(labels, dtype=torch.bool)
    for queue in (None, TeacherEmbeddingQueue(size=8, dim=4)):
        loss = dense_contrastive_loss(student, torch.randn(2, 4, 6, 5), labels, nothing, queue=queue)
        loss.backward()
        assert loss.item() == 0.0 and student.grad is not None and student.grad.abs().sum() == 0


def test_in_batch_teacher_keys_keep_their_gradient_and_queue_entries_are_detached():
    # The teacher-side projection head must train: its outputs (the in-batch teacher keys) carry a gradient; the
    # queue holds constants from earlier steps.
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 5, 4, 3))
    student = torch.randn(2, 8, 5, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 8, 5, 4, 3, requires_grad=True)
    queue = TeacherEmbeddingQueue(size=50, dim=8)
    loss = dense_contrastive_loss(student, teacher, labels, max_per_class=5, queue=queue)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0
    assert queue.embeddings.shape[0] > 0 and not queue.embeddings.requires_grad and queue.embeddings.grad_fn is None


@pytest.mark.parametrize("spatial", [(6, 5), (4, 5, 3)])
def test_both_projection_heads_receive_gradients_and_change_after_an_optimiser_step(spatial):
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, *spatial))
    student = torch.randn(2, 4, *spatial)   # student and teacher features with different channel counts
    with torch.no_grad():
        teacher = torch.randn(2, 16, *spatial)  # frozen teacher features: no graph of their own
    student_head, teacher_head = ProjectionHead(4, 8), ProjectionHead(16, 8)
    before = [p.detach().clone() for p in list(student_head.parameters()) + list(teacher_head.parameters())]
    optimiser = torch.optim.SGD(list(student_head.parameters()) + list(teacher_head.parameters()), lr=0.1)
    queue = TeacherEmbeddingQueue(size=32, dim=8)
    dense_contrastive_loss(student, teacher, labels, max_per_class=4, queue=queue, student_head=student_head,
                           teacher_head=teacher_head)  # fills the queue
    loss = dense_contrastive_loss(student, teacher, labels, max_per_class=4, queue=queue,
                                  student_head=student_head, teacher_head=teacher_head)
    loss.backward()
    for head in (student_head, teacher_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    optimiser.step()
    after = list(student_head.parameters()) + list(teacher_head.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def test_heads_map_both_sides_to_one_dimension_or_are_refused():
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same dimension"):
        dense_contrastive_loss(torch.randn(1, 4, 4, 4), torch.randn(1, 6, 4, 4), labels,
                               student_head=ProjectionHead(4, 8), teacher_head=ProjectionHead(6, 5))


def test_sampling_is_class_balanced_bounded_and_respects_the_mask():
    labels = torch.zeros(2, 1, 10, 10, dtype=torch.long)
    labels[0, 0, :2, :2] = 1  # 4 voxels of class 1 in image 0
    labels[1, 0, :5] = 2      # 50 of class 2 in image 1
    valid = torch.ones_like(labels, dtype=torch.bool)
    valid[0, 0, 0, 0] = False
    g = torch.Generator().manual_seed(0)
    index = sample_voxels(labels, valid, max_per_class=6, generator=g)
    flat = labels.reshape(-1)[index]
    image = index // 100
    assert ((image == 0) & (flat == 1)).sum() == 3  # all valid voxels of the small class
    assert ((image == 0) & (flat == 0)).sum() == 6 and ((image == 1) & (flat == 2)).sum() == 6
    assert 0 not in index.tolist()  # the masked voxel
    assert len(set(index.tolist())) == index.numel()


def test_the_queue_supplies_earlier_teacher_keys_and_keeps_its_size():
    queue = TeacherEmbeddingQueue(size=5, dim=3)
    labels = torch.tensor([0, 1]).view(1, 1, 2, 1)
    teacher = _one_hot_embeddings(labels, 3)
    dense_contrastive_loss(teacher.clone(), teacher, labels, queue=queue, temperature=0.5)
    assert queue.embeddings.shape == (2, 3) and queue.labels.tolist() == [0, 1]
    for _ in range(3):
        dense_contrastive_loss(teacher.clone(), teacher, labels, queue=queue, temperature=0.5)
    assert queue.embeddings.shape == (5, 3)
    # with the queue every anchor has more positives and negatives than the batch alone gives
    anchors = F.normalize(torch.eye(3)[:2], dim=1)
    with_queue = supervised_infonce(anchors, torch.tensor([0, 1]), torch.cat([anchors, queue.embeddings]),
                                    torch.cat([torch.tensor([0, 1]), queue.labels]), torch.tensor([0, 1]), 0.5)
    alone = supervised_infonce(anchors, torch.tensor([0, 1]), anchors, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.5)
    assert with_queue.item() != pytest.approx(alone.item())


def test_bad_inputs_are_refused():
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        dense_contrastive_loss(torch.randn(1, 4, 4, 4), torch.randn(1, 5, 4, 4), labels)
    with pytest.raises(ValueError, match="at the embeddings' resolution"):
        dense_contrastive_loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), labels)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        supervised_infonce(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3), torch.tensor([0, 1]),
                           temperature=0)
