"""Several teachers into one soft target: a confident, correct teacher dominates where it is right, equal teachers
give their mean, a teacher never teaches the cases it trained on, and the mixture is a proper distribution."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_kd.losses.teacher_mixture import mix_teacher_logits, teacher_cross_entropy, teacher_weights, weights_at


def _logits(probabilities):
    """(B, C, X, Y) logits whose softmax is ``probabilities``."""
    return torch.log(torch.tensor(probabilities, dtype=torch.float32))


def test_teacher_cross_entropy_is_minus_log_of_the_probability_of_the_true_label():
    p = [[[[0.7, 0.2]], [[0.3, 0.8]]]]  # (1, 2 classes, 1, 2 voxels)
    labels = torch.tensor([[[[0, 1]]]])
    ce = teacher_cross_entropy([_logits(p)], labels)
    assert ce.shape == (1, 1, 1, 2)
    assert ce[0, 0, 0].tolist() == pytest.approx([-math.log(0.7), -math.log(0.8)], rel=1e-6)


def test_a_confident_correct_teacher_dominates_and_equal_teachers_get_equal_weights():
    labels = torch.tensor([[[[1, 1]]]])
    right = _logits([[[[0.01, 0.5]], [[0.99, 0.5]]]])   # voxel 0: sure of class 1 (right); voxel 1: unsure
    wrong = _logits([[[[0.9, 0.5]], [[0.1, 0.5]]]])    # voxel 0: class 0 (wrong); voxel 1: equally unsure
    w, covered = teacher_weights([right, wrong], labels, "adaptive", tau=1.0)
    assert covered.all()
    # voxel 0: softmax(-CE) = p_right(y) / (p_right(y) + p_wrong(y)) = 0.99 / 1.09 at tau = 1
    assert w[0, :, 0, 0].tolist() == pytest.approx([0.99 / 1.09, 0.10 / 1.09], rel=1e-5)
    assert w[0, :, 0, 1].tolist() == pytest.approx([0.5, 0.5])
    assert torch.allclose(w.sum(1), torch.ones(1, 1, 2))
    # a large tau tends to the uniform mean; uniform is that mean
    w_flat, _ = teacher_weights([right, wrong], labels, "adaptive", tau=1e6)
    assert torch.allclose(w_flat, torch.full_like(w_flat, 0.5), atol=1e-5)
    w_uniform, _ = teacher_weights([right, wrong], labels, "uniform")
    assert torch.equal(w_uniform, torch.full_like(w_uniform, 0.5))


def test_equal_teachers_mix_to_themselves_and_the_mixture_is_the_weighted_mean_of_softened_probabilities():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 1, 4, 5))
    w, _ = teacher_weights([t, t.clone()], labels)
    assert torch.allclose(w, torch.full_like(w, 0.5))
    mixed = mix_teacher_logits([t, t.clone()], w, temperature=3.0)
    assert torch.allclose(torch.softmax(mixed / 3.0, 1), torch.softmax(t / 3.0, 1), atol=1e-6)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    w = torch.rand(2, 2, 4, 5)
    w = w / w.sum(1, keepdim=True)
    expected = w[:, :1] * torch.softmax(a / 2, 1) + w[:, 1:] * torch.softmax(b / 2, 1)
    got = torch.softmax(mix_teacher_logits([a, b], w, 2.0) / 2.0, 1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_logit_mean_distils_the_softened_mean_of_the_teachers_logits_as_fast_nnunet_averages_its_folds():
    # hand case, one voxel, two classes, T = 1: teacher a logits (2, 0), teacher b logits (0, 0)
    a = torch.tensor([[[[2.0]], [[0.0]]]])
    b = torch.tensor([[[[0.0]], [[0.0]]]])
    labels = torch.tensor([[[[0]]]])
    w, covered = teacher_weights([a, b], labels, "logit_mean")
    assert covered.all() and torch.equal(w, torch.full_like(w, 0.5))  # equal weights, whatever their cross-entropy
    mixed = mix_teacher_logits([a, b], w, temperature=1.0, average_logits=True)
    assert mixed[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0])  # the mean logit, not a log-probability
    p_logit_mean = torch.softmax(mixed, 1)[0, 0, 0, 0].item()
    p_uniform = torch.softmax(mix_teacher_logits([a, b], w, 1.0), 1)[0, 0, 0, 0].item()
    assert p_logit_mean == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)                # sigmoid(1) = 0.7311
    assert p_uniform == pytest.approx((1 / (1 + math.exp(-2.0)) + 0.5) / 2, rel=1e-6)       # (0.8808 + 0.5) / 2
    assert p_logit_mean != pytest.approx(p_uniform, abs=1e-3)  # not the same soft target as the probability mean
    # at any temperature the KL term softens the mixture like one teacher's logits: softmax(mean_k t_k / T)
    torch.manual_seed(2)
    t = [torch.randn(2, 3, 4, 4, 3) for _ in range(5)]  # 3D, five fold teachers
    w, _ = teacher_weights(t, torch.randint(0, 3, (2, 1, 4, 4, 3)), "logit_mean")
    mixed = mix_teacher_logits(t, w, temperature=3.0, average_logits=True)
    assert torch.allclose(torch.softmax(mixed / 3.0, 1), torch.softmax(torch.stack(t).mean(0) / 3.0, 1), atol=1e-6)


def test_logit_mean_with_routing_averages_only_the_teachers_allowed_on_each_case():
    a, b, c = (torch.full((2, 2, 3, 3), v) for v in (1.0, 2.0, 6.0))
    allowed = torch.tensor([[True, True, False], [False, True, True]])
    w, covered = teacher_weights([a, b, c], torch.zeros(2, 1, 3, 3, dtype=torch.long), "logit_mean", allowed=allowed)
    mixed = mix_teacher_logits([a, b, c], w, temperature=3.0, average_logits=True)
    assert covered.all()
    assert torch.allclose(mixed[0], torch.full((2, 3, 3), 1.5)) and torch.allclose(mixed[1], torch.full((2, 3, 3), 4.0))


def test_routing_excludes_a_teacher_on_the_cases_it_trained_on():
    torch.manual_seed(1)
    teachers = [torch.randn(3, 2, 6, 6, 2) for _ in range(3)]  # 3D, 3 batch items
    labels = torch.randint(0, 2, (3, 1, 6, 6, 2))
    # item 0: teacher 0 trained on it; item 1: teachers 0 and 1; item 2: every teacher (nobody may teach it)
    allowed = torch.tensor([[False, True, True], [False, False, True], [False, False, False]])
    w, covered = teacher_weights(teachers, labels, "adaptive", tau=0.5, allowed=allowed)
    assert (w[0, 0] == 0).all() and torch.allclose(w[0, 1:].sum(0), torch.ones(6, 6, 2))
    assert (w[1, :2] == 0).all() and torch.allclose(w[1, 2], torch.ones(6, 6, 2))
    assert (w[2] == 0).all() and not covered[2].any() and covered[:2].all()
    assert torch.isfinite(w).all()


def test_region_based_weights_use_the_binary_cross_entropy_and_the_mixture_of_sigmoids():
    regions = torch.tensor([[[[1.0, 0.0]]]])  # (1, 1 region, 1, 2)
    sure = torch.tensor([[[[4.0, -4.0]]]])
    unsure = torch.tensor([[[[0.0, 0.0]]]])
    w, _ = teacher_weights([sure, unsure], regions, region_based=True)
    assert (w[0, 0] > w[0, 1]).all()
    q = torch.sigmoid(mix_teacher_logits([sure, unsure], w, 1.0, region_based=True))
    expected = w[:, 0] * torch.sigmoid(sure[:, 0]) + w[:, 1] * 0.5
    assert torch.allclose(q[:, 0], expected, atol=1e-6)


def test_weights_at_a_coarser_stage_still_sum_to_one():
    w = torch.softmax(torch.randn(2, 3, 8, 6), 1)
    coarse = weights_at(w, (4, 3))
    assert coarse.shape == (2, 3, 4, 3) and torch.allclose(coarse.sum(1), torch.ones(2, 4, 3), atol=1e-6)
    assert weights_at(w, (8, 6)) is w


def test_bad_inputs_are_refused():
    t = torch.randn(1, 2, 3, 3)
    labels = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="weighting must be one of"):
        teacher_weights([t], labels, "learned")
    with pytest.raises(ValueError, match="tau must be > 0"):
        teacher_weights([t], labels, tau=0.0)
    with pytest.raises(ValueError, match="allowed must be"):
        teacher_weights([t, t], labels, allowed=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one shape"):
        teacher_weights([t, torch.randn(1, 3, 3, 3)], labels)


def test_the_logit_term_distils_the_mixture_and_the_hints_are_weighted_per_voxel_like_it():
    from nnunet_kd.distill import DistillationStep, TeacherOutputs, TermContext, term_class
    from nnunet_kd.distill.feature_hint import FeatureHint
    from nnunet_kd.losses.kl import LogitKLLoss

    torch.manual_seed(2)
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    features = {"decoder.2": torch.randn(2, 4, 8, 8)}
    teachers = {"a": TeacherOutputs("a", [a], {"decoder.2": features["decoder.2"]}),
                "b": TeacherOutputs("b", [b], {"decoder.2": features["decoder.2"] + 1})}
    allowed = torch.tensor([[True, True], [False, True]])  # item 1: teacher a trained on it
    w, covered = teacher_weights([a, b], labels, "adaptive", 1.0, allowed)
    mixture = TeacherOutputs("mixture", [mix_teacher_logits([a, b], w, 3.0)])
    step = DistillationStep([student], {"decoder.2": torch.randn(2, 2, 8, 8)}, teachers, [labels], [None],
                            mixture=mixture, teacher_weights={"a": [w[:, :1]], "b": [w[:, 1:]]}, covered=[covered])
    settings = term_class("kl").parse_settings({"temperature": 3.0, "kl_deep_supervision": False,
                                                "kl_mean_over_classes": False, "kl_reduction": "voxel"})
    context = TermContext(3, False, 2, ("a", "b"), None, "plans.json")
    out = term_class("kl")(settings, context)(step)
    assert set(out) == set(term_class("kl").log_names(("a", "b"), mixture=True)) == {"kl"}
    expected = LogitKLLoss(3.0)(student, mixture.outputs[0], covered)
    assert out["kl"].item() == pytest.approx(expected.item(), rel=1e-6)

    hint = FeatureHint(FeatureHint.parse_settings({"feature_stages": ["decoder.2"]}), context)
    hint.resolved_stages = ["decoder.2"]
    hint.build_modules({"decoder.2": (2, 2, 8, 8)}, {"a": {"decoder.2": (2, 4, 8, 8)}, "b": {"decoder.2": (2, 4, 8, 8)}})
    out = hint(step)
    assert set(out) == set(FeatureHint.log_names(("a", "b"), mixture=True)) == {"feature", "feature_a", "feature_b"}
    for name in ("a", "b"):
        adapted = hint.adapters[name]["decoder_2"](step.student_features["decoder.2"])
        weight = w[:, :1] if name == "a" else w[:, 1:]
        per_voxel = (adapted - teachers[name].features["decoder.2"]).pow(2).mean(1, keepdim=True) * weight
        assert out[f"feature_{name}"].item() == pytest.approx(per_voxel.mean().item(), rel=1e-5)
    assert out["feature"].item() == pytest.approx((out["feature_a"] + out["feature_b"]).item(), rel=1e-6)
    out["feature"].backward()
    assert hint.adapters["a"]["decoder_2"].proj.weight.grad is not None


def _values_as_teacher_a_changes(seed: int, make_term, term_name: str) -> tuple[float, float, float]:
    """A term's value on a two-teacher step whose routing keeps teacher a off item 1 (it trained on that case): with
    a's features as drawn, changed on item 1 only, and changed on item 0 only."""
    from nnunet_kd.distill import DistillationStep, TeacherOutputs

    torch.manual_seed(seed)
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    allowed = torch.tensor([[True, True], [False, True]])  # item 1: teacher a trained on it
    w, covered = teacher_weights([a, b], labels, "adaptive", 1.0, allowed)
    student_features = {"decoder.2": torch.randn(2, 2, 8, 8)}
    term = make_term()

    def value(features_of_a):
        teachers = {"a": TeacherOutputs("a", [a], {"decoder.2": features_of_a}),
                    "b": TeacherOutputs("b", [b], {"decoder.2": torch.ones(2, 4, 8, 8)})}
        step = DistillationStep([torch.randn(2, 3, 8, 8)], student_features, teachers, [labels], [None],
                                mixture=TeacherOutputs("mixture", [mix_teacher_logits([a, b], w, 1.0)]),
                                teacher_weights={"a": [w[:, :1]], "b": [w[:, 1:]]}, covered=[covered],
                                routing={"a": allowed[:, 0], "b": allowed[:, 1]})
        assert step.teacher_kd_mask("a", 0)[:, 0].flatten(1).all(1).tolist() == [True, False]
        assert step.teacher_kd_mask("b", 0).all()
        torch.manual_seed(0)  # the same voxels sampled in every call (the contrastive term samples them)
        return term(step)[term_name].item()

    features = torch.randn(2, 4, 8, 8)
    changed_on_its_own_case, changed_elsewhere = features.clone(), features.clone()
    changed_on_its_own_case[1] = torch.randn(4, 8, 8)
    changed_elsewhere[0] = torch.randn(4, 8, 8)
    return value(features), value(changed_on_its_own_case), value(changed_elsewhere)


def test_a_term_computed_per_teacher_never_sees_a_teacher_on_the_cases_it_trained_on():
    from nnunet_kd.distill import TermContext, term_class

    def make_term():
        term_cls = term_class("contrastive")
        settings = term_cls.parse_settings({"contrastive_stages": ["decoder.2"], "contrastive_temperature": 0.1,
                                            "contrastive_queue_size": 0, "contrastive_max_voxels_per_class": 16,
                                            "contrastive_embedding_dim": 4})
        term = term_cls(settings, TermContext(3, False, 2, ("a", "b"), None, "plans.json"))
        term.resolved_stages = ["decoder.2"]
        term.build_modules({"decoder.2": (2, 2, 8, 8)},
                           {"a": {"decoder.2": (2, 4, 8, 8)}, "b": {"decoder.2": (2, 4, 8, 8)}})
        return term

    drawn, changed_on_its_own_case, changed_elsewhere = _values_as_teacher_a_changes(3, make_term, "contrastive")
    assert changed_on_its_own_case == pytest.approx(drawn, rel=1e-6)
    assert abs(changed_elsewhere - drawn) > 1e-3


def test_at_an_ignore_label_no_teacher_is_preferred_so_coarser_stages_average_only_real_evidence():
    sure = torch.tensor([[[[6.0, 6.0]], [[-6.0, -6.0]]]])  # (1, 2 classes, 1, 2): class 0 at both voxels
    unsure = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[[0, 2]]]])  # voxel 1 carries the ignore label (2 = num_classes)
    w, _ = teacher_weights([sure, unsure], labels, "adaptive", 1.0)
    assert w[0, 0, 0, 0] > 0.6  # where the label is known, the teacher that explains it dominates
    assert torch.allclose(w[0, :, 0, 1], torch.tensor([0.5, 0.5]))  # where it is not, neither does


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_confident_region_teachers_mix_to_finite_logits_floored_like_their_probabilities(temperature):
    # 1 - 1e-8 rounds to 1 in float32: logit(clamp(q, 1e-8, 1 - 1e-8)) was +inf past t / T of about 17, and the
    # KL on it NaN. q and 1 - q are floored at 1e-8 in log space instead: the logit lies within T * +-log(1e8 - 1).
    from nnunet_kd.losses.kl import LogitKLLoss

    cap = temperature * math.log((1 - 1e-8) / 1e-8)
    t = torch.tensor([-200.0, -60.0, -12.0, 0.0, 3.0, 12.0, 60.0, 200.0]).view(1, 1, 1, 8) * temperature / 3
    w, _ = teacher_weights([t, t.clone()], torch.ones(1, 1, 1, 8), "uniform", region_based=True)
    mixed = mix_teacher_logits([t, t.clone()], w, temperature, region_based=True)
    assert torch.isfinite(mixed).all()
    # two equal teachers mix to themselves, up to the floor
    assert torch.allclose(mixed, t.clamp(-cap, cap), atol=1e-4 * temperature)
    student = torch.zeros(1, 1, 1, 8, requires_grad=True)
    kl = LogitKLLoss(temperature, region_based=True)(student, mixed)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(student.grad).all()
    # an item no teacher may teach (every weight 0) still gets a finite logit; the terms leave it out
    w0, covered = teacher_weights([t, t.clone()], torch.ones(1, 1, 1, 8), "uniform",
                                  allowed=torch.tensor([[False, False]]), region_based=True)
    assert not covered.any() and torch.isfinite(mix_teacher_logits([t, t], w0, temperature, region_based=True)).all()


def test_region_teachers_are_not_preferred_where_the_mask_says_there_is_no_ground_truth():
    # regions have no ignore value: an ignored voxel is an all-zero region vector, which a teacher predicting
    # "nothing" there would explain; only the valid mask can tell
    nothing = torch.tensor([[[[-6.0, -6.0]]]])  # (1, 1 region, 1, 2): predicts no region at both voxels
    unsure = torch.zeros(1, 1, 1, 2)
    regions = torch.zeros(1, 1, 1, 2)            # voxel 0: really background; voxel 1: ignored
    valid = torch.tensor([[[[True, False]]]])
    w, _ = teacher_weights([nothing, unsure], regions, "adaptive", 1.0, region_based=True, valid=valid)
    assert w[0, 0, 0, 0] > 0.6
    assert torch.allclose(w[0, :, 0, 1], torch.tensor([0.5, 0.5]))
    w_unmasked, _ = teacher_weights([nothing, unsure], regions, "adaptive", 1.0, region_based=True)
    assert w_unmasked[0, 0, 0, 1] > 0.6  # what the mask prevents


@pytest.mark.parametrize("term_name", ["ffd", "rgd"])
def test_mskd_terms_never_compare_a_teacher_on_the_cases_it_trained_on(term_name):
    from nnunet_kd.distill import TermContext, term_class

    def make_term():
        term_cls = term_class(term_name)
        settings = term_cls.parse_settings({"mskd_stages": ["decoder.2"], "ffd_boundary_width": 1,
                                            "ffd_include_background": False, "ffd_teacher_confidence": False,
                                            "rgd_include_background": True, "rgd_node_weight": 1.0,
                                            "rgd_edge_weight": 1.0, "rgd_voxel_weight": 1.0})
        term = term_cls(settings, TermContext(3, False, 2, ("a", "b"), None, "plans.json"))
        term.resolved_stages = ["decoder.2"]
        return term

    drawn, changed_on_its_own_case, changed_elsewhere = _values_as_teacher_a_changes(4, make_term, term_name)
    assert changed_on_its_own_case == pytest.approx(drawn, rel=1e-6)
    assert abs(changed_elsewhere - drawn) > 1e-4
