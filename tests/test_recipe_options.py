"""Recipe options a sweep chooses between: the symmetric class balance of the KL, annealed distillation weights and
mirror-averaged teacher targets."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import CONFIGURATION, DATASET_ID
from nnunet_kd.losses.kl import LogitKLLoss, softmax_kl_map
from nnunet_kd.planning import plan_student
from test_multi_teacher import _batch
from test_teacher_and_bad_inputs import make_trainer


def test_symmetric_balance_also_weighs_voxels_by_the_class_the_student_predicts():
    # 1 x 4 voxels, labels [0, 0, 0, 1]; the student predicts class 1 at voxel 2 (a false positive)
    labels = torch.tensor([0, 0, 0, 1]).view(1, 1, 4, 1)
    student = torch.tensor([[2.0, 2.0, -1.0, -1.0], [-2.0, -2.0, 1.0, 1.0]]).view(1, 2, 4, 1).requires_grad_()
    teacher = torch.tensor([[3.0, 3.0, 3.0, -3.0], [-3.0, -3.0, -3.0, 3.0]]).view(1, 2, 4, 1)
    per_voxel = softmax_kl_map(student, teacher, 1.0)[0, 0, :, 0]
    by_truth = (per_voxel[:3].mean() + per_voxel[3]) / 2        # classes {0: voxels 0-2, 1: voxel 3}
    by_prediction = (per_voxel[:2].mean() + per_voxel[2:].mean()) / 2  # classes {0: voxels 0-1, 1: voxels 2-3}
    value = LogitKLLoss(1.0, reduction="symmetric_balanced")(student, teacher, None, labels)
    assert value.item() == pytest.approx(((by_truth + by_prediction) / 2).item(), rel=1e-6)
    # the false positive weighs more than under the ground-truth balance alone
    balanced = LogitKLLoss(1.0, reduction="class_balanced")(student, teacher, None, labels)
    g_sym = torch.autograd.grad(value, student)[0][0, :, 2].abs().sum()
    g_bal = torch.autograd.grad(balanced, student)[0][0, :, 2].abs().sum()
    assert g_sym > g_bal


def test_symmetric_balance_is_the_class_balance_when_the_student_predicts_the_labels_and_zero_at_the_teacher():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 6, 5, 4))
    student = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 4
    teacher = torch.randn(2, 3, 6, 5, 4)
    sym = LogitKLLoss(2.0, reduction="symmetric_balanced")(student, teacher, None, labels)
    assert sym.item() == pytest.approx(LogitKLLoss(2.0, reduction="class_balanced")(student, teacher, None,
                                                                                    labels).item(), rel=1e-6)
    same = teacher.clone().requires_grad_()
    assert LogitKLLoss(2.0, reduction="symmetric_balanced")(same, teacher, None, labels).item() == \
        pytest.approx(0.0, abs=1e-6)
    # regions: inside/outside by the ground truth and by the student's own sigmoid
    regions = (torch.rand(2, 2, 6, 5) > 0.5).float()
    s = torch.randn(2, 2, 6, 5, requires_grad=True)
    t = torch.randn(2, 2, 6, 5, requires_grad=True)
    value = LogitKLLoss(1.0, region_based=True, reduction="symmetric_balanced")(s, t, None, regions)
    value.backward()
    assert s.grad is not None and t.grad is None and value.item() > 0


def _annealed_mirrored_trainer(ws, monkeypatch):
    """A real trainer of student plans with 11 epochs, annealing from half of training and mirrored targets."""
    ws.set_env(monkeypatch)
    name = "nnUNetPlans_annealmirror"
    plan_student(str(DATASET_ID), CONFIGURATION, ws.teacher_folder, name, width=0.25, verbose=False,
                 num_epochs=11, overwrite=True, overrides=("methods.adaptive.kd_anneal_start=0.5",
                                                           "methods.adaptive.teacher_mirroring=true"))
    return make_trainer(ws, monkeypatch, name, trainer="nnUNetTrainerKD_BalancedHints")


def test_annealed_weights_are_constant_until_the_start_then_reach_zero_at_the_last_epoch(workspace, monkeypatch):
    trainer = _annealed_mirrored_trainer(workspace, monkeypatch)
    recipe = trainer.kd_recipe
    assert recipe.kd_anneal_start == 0.5 and recipe.teacher_mirroring
    assert [round(recipe.kd_weight_factor(e), 6) for e in range(11)] == \
        [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0]
    trainer.initialize()
    trainer.current_epoch = 8
    trainer.print_to_log_file = lambda *a, **k: None
    trainer.lr_scheduler.step = lambda *a, **k: None
    trainer.logger.log = lambda *a, **k: None
    trainer.on_train_epoch_start()
    assert trainer.loss_weights["segmentation"] == trainer.base_loss_weights["segmentation"]
    for term in ("kl", "lovasz", "feature"):
        assert trainer.loss_weights[term] == pytest.approx(0.4 * trainer.base_loss_weights[term])


def test_mirrored_teacher_targets_average_every_mirroring_of_nnunets_inference(workspace, monkeypatch):
    trainer = _annealed_mirrored_trainer(workspace, monkeypatch)
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    axes = [a + 2 for a in trainer.inference_allowed_mirroring_axes]
    assert len(axes) == 3  # 3D: every spatial axis
    batch = _batch(trainer)
    teacher = trainer.teacher
    with torch.no_grad():
        passes = [teacher(batch["data"])] + [
            [torch.flip(o, dims) for o in teacher(torch.flip(batch["data"], dims))]
            for i in range(len(axes)) for dims in itertools.combinations(axes, i + 1)]
        trainer.teacher_taps["teacher0"].pop()
        expected = [sum(p[level] for p in passes) / len(passes) for level in range(len(passes[0]))]
        student_out = trainer.network(batch["data"])
        step = trainer.distillation_step(batch["data"], student_out, batch["target"])
    assert len(passes) == 8
    got = step.teachers["teacher0"].outputs
    for level, e in enumerate(expected):
        assert torch.allclose(got[level], e, atol=1e-5)
    assert not torch.allclose(got[0], passes[0][0], atol=1e-3)  # mirroring changed the targets
    # features come from the unmirrored pass only
    with torch.no_grad():
        teacher(batch["data"])
        unmirrored_features = trainer.teacher_taps["teacher0"].pop()
    for stage, value in unmirrored_features.items():
        assert torch.allclose(step.teachers["teacher0"].features[stage], value)
