"""Adaptive-KD losses (logit KL, Lovasz, feature hints) on tiny tensors: hand-computed values, zero when the
student equals the teacher, gradients reach the student only, 2D and 3D, the ignore label masked out."""
import math

import pytest
import torch

from nnunet_kd.losses.feature import FeatureAdapter, FeatureDistillationLoss, feature_mse
from nnunet_kd.losses.kl import (LogitKLLoss, class_balanced_mean, region_balanced_mean, sigmoid_kl, softmax_kl,
                                 softmax_kl_map)
from nnunet_kd.losses.lovasz import LovaszSoftmaxLoss, lovasz_grad, lovasz_sigmoid, lovasz_softmax

# KL(Bernoulli-like [0.75, 0.25] || [0.5, 0.5]) = 0.75 ln 1.5 + 0.25 ln 0.5
KL_75_25_VS_HALF = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812...


def one_voxel(values, dims=2):
    return torch.tensor(values, dtype=torch.float32).view(1, len(values), *([1] * dims))


def random_logits(dims, seed=0, c=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, *([5] * dims), generator=g)


# ---------------------------------------------------------------- KL
@pytest.mark.parametrize("dims", [2, 3])
def test_softmax_kl_hand_value(dims):
    student = one_voxel([0.0, 0.0], dims)  # p_s = [0.5, 0.5]
    teacher = one_voxel([math.log(3.0), 0.0], dims)  # p_t = [0.75, 0.25]
    assert softmax_kl(student, teacher).item() == pytest.approx(KL_75_25_VS_HALF, abs=1e-6)


def test_softmax_kl_temperature_softens_and_scales_by_t_squared():
    # teacher logits 2 ln 3 at T=2 give the same p_t = [0.75, 0.25]; the value is multiplied by T^2 = 4
    student, teacher = one_voxel([0.0, 0.0]), one_voxel([2 * math.log(3.0), 0.0])
    assert LogitKLLoss(temperature=2.0)(student, teacher).item() == pytest.approx(4 * KL_75_25_VS_HALF, abs=1e-6)


def test_sigmoid_kl_is_binary_kl_per_region_summed_over_regions():
    student = one_voxel([0.0, 0.0])  # q_s = 0.5 for both regions
    teacher = one_voxel([math.log(3.0), math.log(3.0)])  # q_t = 0.75 for both regions
    assert sigmoid_kl(student, teacher).item() == pytest.approx(2 * KL_75_25_VS_HALF, abs=1e-6)
    assert LogitKLLoss(1.0, region_based=True)(student, teacher).item() == pytest.approx(2 * KL_75_25_VS_HALF, abs=1e-6)


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_kl_is_zero_when_student_equals_teacher(dims, region_based):
    logits = random_logits(dims)
    assert LogitKLLoss(3.0, region_based)(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("region_based", [False, True])
def test_kl_gradient_reaches_student_only(region_based):
    student = random_logits(3, seed=1).requires_grad_()
    teacher = random_logits(3, seed=2).requires_grad_()
    LogitKLLoss(3.0, region_based)(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_kl_ignores_masked_voxels():
    # voxel 0 agrees, voxel 1 is the hand case, voxel 2 disagrees wildly but is the ignore label
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [9.0, -9.0]]).T.reshape(1, 2, 3, 1)
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [-9.0, 9.0]]).T.reshape(1, 2, 3, 1)
    mask = torch.tensor([True, True, False]).view(1, 1, 3, 1)
    assert softmax_kl(student, teacher, 1.0, mask).item() == pytest.approx(KL_75_25_VS_HALF / 2, abs=1e-6)
    empty = torch.zeros_like(mask)
    assert softmax_kl(student.requires_grad_(), teacher, 1.0, empty).item() == 0.0


def test_kl_of_half_precision_logits_is_float32_and_finite():
    student, teacher = random_logits(3, 3).half(), (random_logits(3, 4) * 30).half()
    value = LogitKLLoss(3.0)(student, teacher)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(LogitKLLoss(3.0)(student.float(), teacher.float()).item(), rel=1e-5)


def test_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        softmax_kl(random_logits(2, c=3), random_logits(2, c=4))


def test_class_balanced_mean_weighs_each_present_class_equally():
    # three background voxels of value 1 and one foreground voxel of value 5: the voxel mean is 2, the
    # class-balanced mean (1 + 5) / 2 = 3; class 2 is absent from the batch and does not count
    per_voxel = torch.tensor([1.0, 1.0, 1.0, 5.0]).view(1, 1, 4, 1)
    labels = torch.tensor([0, 0, 0, 1]).view(1, 1, 4, 1)
    assert class_balanced_mean(per_voxel, labels, 3).item() == pytest.approx(3.0)
    # the ignore label: the masked voxel (label 7, value 100) is neither a class member nor counted
    per_voxel = torch.tensor([1.0, 1.0, 100.0, 5.0]).view(1, 1, 4, 1)
    labels = torch.tensor([0, 0, 7, 1]).view(1, 1, 4, 1)
    assert class_balanced_mean(per_voxel, labels, 3, labels != 7).item() == pytest.approx(3.0)
    assert class_balanced_mean(per_voxel, labels, 3, torch.zeros_like(labels, dtype=torch.bool)).item() == 0.0


def test_region_balanced_mean_averages_inside_and_outside_of_each_region():
    # region 0 holds voxel 0 only: inside 4, outside mean (2 + 2 + 2) / 3 = 2 -> 3; region 1 holds every voxel:
    # inside mean 1, no outside -> 1; summed over regions: 4
    per_region = torch.tensor([[4.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]]).view(1, 2, 4, 1)
    regions = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]]).view(1, 2, 4, 1)
    assert region_balanced_mean(per_region, regions).item() == pytest.approx(4.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_class_balanced_kl_is_the_hand_value_per_class(dims):
    # voxel 0 (background) agrees with the teacher, voxel 1 (class 1) is the hand case: voxel mean KL/2,
    # class-balanced (0 + KL) / 2 as well; with a second, agreeing background voxel the voxel mean drops to
    # KL/3 while the class-balanced value stays KL/2
    student = torch.zeros(1, 2, 3, *([1] * (dims - 1)))
    teacher = torch.zeros(1, 2, 3, *([1] * (dims - 1)))
    teacher[:, 0, 1] = math.log(3.0)  # p_t = [0.75, 0.25] at voxel 1
    labels = torch.tensor([0, 1, 0]).view(1, 1, 3, *([1] * (dims - 1)))
    balanced = LogitKLLoss(1.0, reduction="class_balanced")
    assert balanced(student, teacher, None, labels).item() == pytest.approx(KL_75_25_VS_HALF / 2, abs=1e-6)
    assert LogitKLLoss(1.0)(student, teacher).item() == pytest.approx(KL_75_25_VS_HALF / 3, abs=1e-6)
    assert softmax_kl_map(student, teacher).shape == (1, 1, 3, *([1] * (dims - 1)))


@pytest.mark.parametrize("region_based", [False, True])
def test_class_balanced_kl_is_zero_for_equal_logits_and_reaches_the_student_only(region_based):
    g = torch.Generator().manual_seed(3)
    student = random_logits(3, seed=1).requires_grad_()
    teacher = random_logits(3, seed=2).requires_grad_()
    target = (torch.rand(2, 3, 5, 5, 5, generator=g) > 0.5).float() if region_based else \
        torch.randint(0, 3, (2, 1, 5, 5, 5), generator=g)
    loss = LogitKLLoss(3.0, region_based, reduction="class_balanced")
    assert loss(student.detach(), student.detach(), None, target).item() == pytest.approx(0.0, abs=1e-6)
    loss(student, teacher, None, target).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    with pytest.raises(ValueError, match="needs the target"):
        loss(student, teacher)
    with pytest.raises(ValueError, match="reduction must be one of"):
        LogitKLLoss(3.0, reduction="per_class")


# ---------------------------------------------------------------- Lovasz
def test_lovasz_grad_hand_value():
    # errors sorted with ground truth [1, 0, 1, 0]: Jaccard losses of the growing prefixes are
    # 1 - 1/2, 1 - 1/3, 1 - 0/3, 1 - 0/4 -> increments 1/2, 1/6, 1/3, 0
    grad = lovasz_grad(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert grad.tolist() == pytest.approx([0.5, 1 / 6, 1 / 3, 0.0])


@pytest.mark.parametrize("dims", [2, 3])
def test_lovasz_softmax_hand_value(dims):
    # four voxels, labels [1, 1, 0, 0]; P(class 1) = [0.9, 0.4, 0.3, 0.0].
    # class 1: errors sorted 0.6(fg) 0.3(bg) 0.1(fg) 0(bg), grad [1/2, 1/6, 1/3, 0] -> 0.38333
    # class 0: errors sorted 0.6(bg) 0.3(fg) 0.1(bg) 0(fg), grad [1/3, 1/3, 1/12, 1/4] -> 0.30833
    p1 = torch.tensor([0.9, 0.4, 0.3, 0.0])
    probs = torch.stack([1 - p1, p1]).view(1, 2, 4, *([1] * (dims - 1)))
    labels = torch.tensor([1, 1, 0, 0]).view(1, 1, 4, *([1] * (dims - 1)))
    assert lovasz_softmax(probs, labels).item() == pytest.approx((0.383333 + 0.308333) / 2, abs=1e-5)


def test_lovasz_softmax_equals_one_minus_iou_at_binary_predictions():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 6, 6, 4), generator=g)
    prediction = torch.randint(0, 3, (2, 1, 6, 6, 4), generator=g)
    probs = torch.zeros(2, 3, 6, 6, 4).scatter_(1, prediction, 1.0)
    ious = [((labels == c) & (prediction == c)).sum() / ((labels == c) | (prediction == c)).sum() for c in range(3)]
    expected = sum(1 - float(i) for i in ious) / 3
    assert lovasz_softmax(probs, labels).item() == pytest.approx(expected, abs=1e-6)


def test_lovasz_is_zero_for_a_perfect_prediction_and_present_classes_only():
    labels = torch.tensor([0, 0, 2, 2]).view(1, 1, 4, 1)
    probs = torch.zeros(1, 3, 4, 1).scatter_(1, labels, 1.0)
    assert lovasz_softmax(probs, labels).item() == 0.0
    # a wrong prediction of absent class 1 counts through classes 0 and 2 only ('present'), class 1 with 'all'
    probs = torch.zeros(1, 3, 4, 1).scatter_(1, torch.tensor([1, 0, 2, 2]).view(1, 1, 4, 1), 1.0)
    assert lovasz_softmax(probs, labels).item() == pytest.approx((0.5 + 0.0) / 2)
    assert lovasz_softmax(probs, labels, classes="all").item() == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_lovasz_ignore_label_voxels_are_dropped():
    # the third voxel holds the ignore label (value 3, outside the classes) and a wrong prediction
    labels = torch.tensor([1, 0, 3]).view(1, 1, 3, 1)
    probs = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).view(1, 2, 3, 1)
    mask = labels != 3
    assert lovasz_softmax(probs, labels, mask).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        lovasz_softmax(probs, labels)


def test_lovasz_of_masked_batch_equals_the_reference_on_the_valid_voxels_alone():
    # Berman's reference: per class, sort the errors of the kept voxels and dot with lovasz_grad.
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 3, 4, 5, 3, generator=g), 1)
    labels = torch.randint(0, 3, (2, 1, 4, 5, 3), generator=g)
    mask = torch.rand(2, 1, 4, 5, 3, generator=g) > 0.3
    keep = mask.movedim(1, -1).reshape(-1)
    p = probs.movedim(1, -1).reshape(-1, 3)[keep]
    y = labels.reshape(-1)[keep]
    reference = []
    for c in range(3):
        fg = (y == c).float()
        errors, order = torch.sort((fg - p[:, c]).abs(), descending=True)
        reference.append(torch.dot(errors, lovasz_grad(fg[order])))
    assert lovasz_softmax(probs, labels, mask).item() == pytest.approx(torch.stack(reference).mean().item(), abs=1e-6)


def test_lovasz_sigmoid_per_region():
    # region 0 predicted perfectly, region 1 half wrong at binary predictions: 1 - IoU = 1 - 1/2
    regions = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32).view(1, 2, 4, 1)
    probs = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32).view(1, 2, 4, 1)
    assert lovasz_sigmoid(probs, regions).item() == pytest.approx(0.25)


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_lovasz_loss_module_gradients(dims, region_based):
    logits = random_logits(dims, c=3).requires_grad_()
    if region_based:
        target = (torch.rand(2, 3, *([5] * dims)) > 0.5).float()
    else:
        target = torch.randint(0, 3, (2, 1, *([5] * dims)))
    value = LovaszSoftmaxLoss(region_based)(logits, target)
    value.backward()
    assert 0 < value.item() <= 1 and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- features
def test_feature_mse_hand_value_and_mask():
    student = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    teacher = torch.tensor([1.0, 0.0, 3.0, 0.0]).view(1, 1, 2, 2)
    assert feature_mse(student, teacher).item() == pytest.approx((4 + 16) / 4)
    mask = torch.tensor([True, True, True, False]).view(1, 1, 2, 2)
    assert feature_mse(student, teacher, mask).item() == pytest.approx(4 / 3)


def test_feature_mask_is_resampled_to_the_stage_resolution():
    # a mask at image resolution 4x4 whose right half is ignored; the 2x2 feature keeps its left column only
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2:] = False
    student, teacher = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    teacher[..., 1] = 5.0  # differences only in the ignored column
    assert feature_mse(student, teacher, mask).item() == 0.0


@pytest.mark.parametrize("dims", [2, 3])
def test_feature_distillation_zero_when_adapted_student_equals_teacher(dims):
    adapter = FeatureAdapter(4, 4, dims)
    with torch.no_grad():  # identity adapter
        adapter.proj.weight.zero_()
        adapter.proj.bias.zero_()
        for i in range(4):
            adapter.proj.weight[(i, i) + (0,) * dims] = 1.0
    features = torch.randn(2, 4, *([3] * dims))
    losses = FeatureDistillationLoss(torch.nn.ModuleDict({"decoder_0": adapter}))(
        {"decoder_0": features}, {"decoder_0": features.clone()})
    assert losses["decoder_0"].item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
def test_feature_distillation_trains_adapter_and_student_not_teacher(dims):
    adapters = torch.nn.ModuleDict({"encoder_4": FeatureAdapter(2, 8, dims)})
    student = torch.randn(2, 2, *([3] * dims), requires_grad=True)
    teacher = torch.randn(2, 8, *([3] * dims), requires_grad=True)
    loss = FeatureDistillationLoss(adapters)({"encoder_4": student}, {"encoder_4": teacher})["encoder_4"]
    loss.backward()
    assert student.grad.abs().sum() > 0 and adapters["encoder_4"].proj.weight.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("dims", [2, 3])
def test_feature_adapter_is_the_1x1_convolution_of_its_weights(dims):
    adapter = FeatureAdapter(3, 5, dims)
    features = torch.randn(2, 3, *([4] * dims))
    conv = torch.nn.functional.conv3d if dims == 3 else torch.nn.functional.conv2d
    expected = conv(features, adapter.proj.weight, adapter.proj.bias)
    torch.testing.assert_close(adapter(features), expected, rtol=1e-5, atol=1e-6)
    assert set(adapter.state_dict()) == {"proj.weight", "proj.bias"}  # checkpoints keep nn.Conv's layout


def test_feature_distillation_names_missing_stage():
    adapters = torch.nn.ModuleDict({"decoder_0": FeatureAdapter(2, 2, 2)})
    with pytest.raises(KeyError, match="decoder_0"):
        FeatureDistillationLoss(adapters)({}, {})


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("masked,weighted", [(False, False), (True, False), (False, True), (True, True)])
def test_adapted_feature_mse_is_the_mse_of_the_adapted_student_in_value_and_gradient(dims, masked, weighted):
    from nnunet_kd.losses.feature import adapted_feature_mse

    torch.manual_seed(dims)
    adapter = FeatureAdapter(3, 5, dims)
    student = torch.randn(2, 3, *([4] * dims), requires_grad=True)
    teacher = torch.randn(2, 5, *([4] * dims))
    mask = (torch.rand(2, 1, *([8] * dims)) > 0.3) if masked else None  # at image resolution: resampled
    weight = torch.rand(2, 1, *([4] * dims)) if weighted else None
    reference = feature_mse(adapter(student), teacher, mask, weight)
    grads = torch.autograd.grad(reference, [student, adapter.proj.weight, adapter.proj.bias])
    with torch.inference_mode():  # as the teacher's pass leaves it: no copy needed
        teacher_inference = teacher.clone()
    value = adapted_feature_mse(adapter, student, teacher_inference, mask, weight)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, expected in zip(torch.autograd.grad(value, [student, adapter.proj.weight, adapter.proj.bias]), grads):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_adapted_feature_mse_hand_value_and_shape_errors():
    from nnunet_kd.losses.feature import adapted_feature_mse

    adapter = FeatureAdapter(1, 1, 2)
    with torch.no_grad():
        adapter.proj.weight.fill_(2.0)
        adapter.proj.bias.fill_(1.0)
    student = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)      # adapted: 3, 5, 7, 9
    teacher = torch.tensor([3.0, 3.0, 3.0, 3.0]).view(1, 1, 2, 2)      # errors 0, 2, 4, 6
    assert adapted_feature_mse(adapter, student, teacher).item() == pytest.approx((0 + 4 + 16 + 36) / 4)
    mask = torch.tensor([True, True, False, False]).view(1, 1, 2, 2)
    assert adapted_feature_mse(adapter, student, teacher, mask).item() == pytest.approx(4 / 2)
    with pytest.raises(ValueError, match="do not fit the adapter"):
        adapted_feature_mse(adapter, student, torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize("masked", [False, True])
def test_lovasz_gradient_computed_in_its_forward_matches_finite_differences(masked):
    # on the probabilities, in float64 (LovaszSoftmaxLoss itself computes in float32, too coarse for differences)
    torch.manual_seed(3)
    probabilities = torch.softmax(torch.randn(2, 3, 4, 5, dtype=torch.float64), 1).requires_grad_(True)
    labels = torch.randint(0, 3, (2, 1, 4, 5))
    mask = (torch.rand(2, 1, 4, 5) > 0.3) if masked else None
    assert torch.autograd.gradcheck(lambda p: lovasz_softmax(p, labels, mask), (probabilities,), eps=1e-7, atol=1e-6)
