"""A set of teachers on tensors: a teacher with other labels teaches through its label map (probabilities summed
after softening, unmapped classes to background; regions: OR), several teachers are averaged and each one's share
is logged, and the step hands every term nnU-Net's own labels at the resolution it needs."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from nnunet_kd.distill import DistillationStep, TeacherOutputs, TermContext, term_class
from nnunet_kd.losses.label_map import mapping_matrix, merge_teacher_logits
from nnunet_kd.recipe import RecipeError, default_recipe, parse_recipe

PLANS_FILE = "/data/nnUNet_preprocessed/Dataset004_X/nnUNetPlans_kdstudent.json"


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)])
def test_a_label_map_sums_softened_probabilities_and_sends_unmapped_classes_to_background(spatial):
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, *spatial) * 3  # classes: background, a, b, c
    mapping = [0, 1, 1, -1]                    # a and b are the student's class 1; c is not a student label
    merged = merge_teacher_logits(teacher, mapping, num_student=2, temperature=2.0)
    p = torch.softmax(teacher / 2.0, 1)
    expected = torch.stack([p[:, 0] + p[:, 3], p[:, 1] + p[:, 2]], 1)
    assert torch.allclose(torch.softmax(merged / 2.0, 1), expected, atol=1e-6)
    # the identity map gives back the teacher's own softened distribution
    same = merge_teacher_logits(teacher, [0, 1, 2, 3], num_student=4, temperature=2.0)
    assert torch.allclose(torch.softmax(same / 2.0, 1), p, atol=1e-6)


def test_a_student_class_no_teacher_class_maps_to_gets_a_finite_near_zero_probability():
    teacher = torch.randn(1, 2, 3, 3)
    merged = merge_teacher_logits(teacher, [0, 1], num_student=3, temperature=1.0)
    assert torch.isfinite(merged).all() and (torch.softmax(merged, 1)[:, 2] < 1e-6).all()


def test_region_based_label_maps_take_the_union_of_the_mapped_regions():
    teacher = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)  # three teacher regions
    merged = merge_teacher_logits(teacher, [0, 0, -1], num_student=1, temperature=1.0, region_based=True)
    q = torch.sigmoid(teacher[0, :, 0, 0])
    assert torch.sigmoid(merged).item() == pytest.approx(float(1 - (1 - q[0]) * (1 - q[1])), abs=1e-6)
    # an unmapped region is dropped, not sent to a background channel (regions have none)
    assert mapping_matrix([0, 0, -1], 1, region_based=True)[2].sum() == 0
    assert mapping_matrix([0, -1], 2, region_based=False)[1].tolist() == [1.0, 0.0]


def test_a_label_map_onto_a_channel_the_student_lacks_is_refused():
    with pytest.raises(ValueError, match="outside"):
        mapping_matrix([0, 2], 2, region_based=False)


def _step(student_logits, teachers, labels):
    levels = [labels, F.interpolate(labels.float(), scale_factor=0.5, mode="nearest-exact").long()]
    outs = [student_logits, F.avg_pool2d(student_logits, 2)]
    return DistillationStep(outs, {}, teachers, levels, [None, None])


def test_several_teachers_are_averaged_and_each_share_is_logged():
    torch.manual_seed(1)
    student = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    teachers = {name: TeacherOutputs(name, [t, F.avg_pool2d(t, 2)]) for name, t in
                (("a", torch.randn(2, 3, 8, 8)), ("b", torch.randn(2, 3, 8, 8)))}
    settings = term_class("kl").parse_settings({"temperature": 3.0, "kl_deep_supervision": True,
                                                "kl_mean_over_classes": False, "kl_reduction": "class_balanced"})
    context = TermContext(num_classes=3, region_based=False, dim=2, teachers=("a", "b"),
                          deep_supervision_weights=(0.75, 0.25), plans_file=PLANS_FILE)
    both = term_class("kl")(settings, context)(_step(student, teachers, labels))
    alone = {}
    for name in ("a", "b"):
        one = TermContext(3, False, 2, (name,), (0.75, 0.25), PLANS_FILE)
        alone[name] = term_class("kl")(settings, one)(_step(student, {name: teachers[name]}, labels))["kl"]
    assert set(both) == set(term_class("kl").log_names(("a", "b"))) == {"kl", "kl_a", "kl_b"}
    assert both["kl_a"] == pytest.approx(alone["a"].item()) and both["kl_b"] == pytest.approx(alone["b"].item())
    assert both["kl"] == pytest.approx((alone["a"] + alone["b"]).item() / 2)
    # deep supervision: nnU-Net's weights over the two levels
    level = [term_class("kl")(settings, TermContext(3, False, 2, ("a",), None, PLANS_FILE))(
        DistillationStep([o], {}, {"a": TeacherOutputs("a", [t])}, [lab], [None]))["kl"]
        for o, t, lab in zip(_step(student, teachers, labels).student_outputs, teachers["a"].outputs,
                             _step(student, teachers, labels).labels)]
    assert alone["a"].item() == pytest.approx(0.75 * level[0].item() + 0.25 * level[1].item(), rel=1e-6)


def test_the_step_gives_nnunets_own_labels_at_a_resolution_and_resamples_only_without_one():
    labels = torch.randint(0, 3, (1, 1, 8, 8))
    coarse = torch.zeros(1, 1, 4, 4, dtype=torch.long)  # deliberately not a resampling of the fine labels
    step = DistillationStep([], {}, {}, [labels, coarse], [None, None])
    assert step.labels_at((4, 4))[0] is coarse
    resampled, _ = step.labels_at((2, 2))
    assert torch.equal(resampled, F.interpolate(labels.float(), size=(2, 2), mode="nearest-exact").long())


def _plans(recipe: dict) -> dict:
    return {"kd": {"3d_fullres": recipe}}


def test_old_one_teacher_plans_and_the_teachers_list_parse_to_the_same_teacher():
    old = default_recipe("/results/Dataset004_X/nnUNetTrainer__nnUNetPlans__3d_fullres")
    one = parse_recipe(_plans(old), "3d_fullres", "adaptive", PLANS_FILE)
    listed = dict(old)
    listed["teachers"] = [dict(listed.pop("teacher"), name="big")] + [
        {"model_folder": "/results/Dataset005_Y/nnUNetTrainer__nnUNetPlans__3d_fullres", "name": "fine",
         "label_map": {"zone_a": "prostate", "zone_b": "prostate"}}]
    several = parse_recipe(_plans(listed), "3d_fullres", "adaptive", PLANS_FILE)
    assert one.teacher.model_folder == several.teachers[0].model_folder and one.teacher.name == "teacher0"
    assert [t.name for t in several.teachers] == ["big", "fine"]
    assert several.teachers[1].label_map == {"zone_a": "prostate", "zone_b": "prostate"}
    assert several.terms["kl"].temperature == 3.0  # the preset is the only source of the default


@pytest.mark.parametrize("change, message", [
    (lambda r: (r.pop("teacher"), r.update(teachers=[])), r"teachers must be a non-empty list"),
    (lambda r: r.update(teachers=[r["teacher"]]), r"has both 'teacher' and 'teachers'"),
    (lambda r: r.update(teachers=[r.pop("teacher"), {"model_folder": "/x", "name": "teacher0"}]),
     r"two teachers share a name"),
    (lambda r: r.update(teachers=[dict(r.pop("teacher"), label_map={"a": 1})]), r"label_map must map teacher label"),
    (lambda r: r.update(teachers=[dict(r.pop("teacher"), name="a b")]), r"name must be a name of letters"),
    (lambda r: r["methods"]["adaptive"]["weights"].update(klx=1.0), r"unknown key 'klx'"),
])
def test_malformed_teacher_sets_are_refused_naming_the_plans_file(change, message):
    recipe = default_recipe("/results/Dataset004_X/nnUNetTrainer__nnUNetPlans__3d_fullres")
    change(recipe)
    with pytest.raises(RecipeError, match=message) as error:
        parse_recipe(_plans(recipe), "3d_fullres", "adaptive", PLANS_FILE)
    assert PLANS_FILE in str(error.value)


def test_a_label_map_by_label_names_gives_each_teacher_channel_its_student_channel():
    from nnunet_kd.distill.teachers import label_map_channels
    from nnunet_kd.teacher import TeacherError
    teacher = {"labels": {"background": 0, "pz_left": 1, "pz_right": 2, "tz": 3, "urethra": 4}}
    student = {"labels": {"background": 0, "peripheral_zone": 1, "transition_zone": 2}}
    label_map = {"pz_left": "peripheral_zone", "pz_right": "peripheral_zone", "tz": "transition_zone"}
    assert label_map_channels(label_map, teacher, student, False, "plans.json") == [-1, 1, 1, 2, -1]
    # region-based: channels are the regions, without background
    assert label_map_channels(label_map, teacher, student, True, "plans.json") == [0, 0, 1, -1]
    with pytest.raises(TeacherError, match=r"plans.json: the label map names teacher labels \['cz'\]"):
        label_map_channels({"cz": "peripheral_zone"}, teacher, student, False, "plans.json")
    with pytest.raises(TeacherError, match=r"student labels \['prostate'\]"):
        label_map_channels({"tz": "prostate"}, teacher, student, False, "plans.json")


def test_a_teacher_with_finer_labels_teaches_a_real_trainer_through_its_label_map(workspace, monkeypatch, tmp_path):
    """The trained teacher, re-labelled with the peripheral zone split in two halves (its PZ output channel doubled,
    each copy's bias lowered by T log 2 at every deep-supervision output): merged back through the label map at the
    recipe's temperature, its soft targets are the original teacher's, exactly."""
    import math
    from os.path import join

    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    from test_multi_teacher import _batch
    from test_teacher_and_bad_inputs import make_trainer, student_plans_with, teacher_copy

    temperature = parse_recipe(load_json(join(workspace.preprocessed, "nnUNetPlans_teststudent.json")), "3d_fullres",
                               "adaptive", "plans").terms["kl"].temperature

    def split_peripheral_zone(folder):
        dataset_json = load_json(join(folder, "dataset.json"))
        names = list(dataset_json["labels"])  # background, then the two zones
        dataset_json["labels"] = {names[0]: 0, "pz_left": 1, "pz_right": 2, names[2]: 3}
        save_json(dataset_json, join(folder, "dataset.json"), sort_keys=False)
        checkpoint_file = join(folder, "fold_0", "checkpoint_final.pth")
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        weights = checkpoint["network_weights"]
        for key in [k for k in weights if "seg_layers" in k]:
            w = weights[key]
            pz = w[1:2] - temperature * math.log(2) if key.endswith("bias") else w[1:2]
            weights[key] = torch.cat([w[:1], pz, pz, w[2:]])
        checkpoint["init_args"]["dataset_json"] = dataset_json
        torch.save(checkpoint, checkpoint_file)
        return names

    labels = {}
    folder = teacher_copy(workspace, tmp_path, edit=lambda f: labels.update(names=split_peripheral_zone(f)))
    pz, tz = labels["names"][1], labels["names"][2]
    name = student_plans_with(workspace, "nnUNetPlans_finerteacher", teacher_folder=folder,
                              label_map={"pz_left": pz, "pz_right": pz, tz: tz})
    finer = make_trainer(workspace, monkeypatch, name, trainer="nnUNetTrainerKD_BalancedHints")
    finer.initialize()
    assert finer.teacher_label_maps["teacher0"] == [-1, 1, 1, 2]
    original = make_trainer(workspace, monkeypatch, trainer="nnUNetTrainerKD_BalancedHints")
    original.initialize()
    batch = _batch(finer)
    with torch.no_grad():
        step = finer.distillation_step(batch["data"], finer.network(batch["data"]), batch["target"])
        reference = original.teacher(batch["data"])
    mapped = step.teachers["teacher0"]
    assert mapped.outputs[0].shape[1] == 4  # the teacher really predicts four classes
    for level, out in enumerate(reference):
        assert torch.allclose(torch.softmax(mapped.logits(level, temperature) / temperature, 1),
                              torch.softmax(out / temperature, 1), atol=1e-5)
    # and the KD step trains on them
    out = finer.train_step(batch)
    assert torch.isfinite(out["terms"]["kl"]) and out["terms"]["kl"] > 0


def test_the_student_planner_takes_a_label_map_for_a_teacher_with_finer_labels(workspace, monkeypatch, tmp_path,
                                                                              capsys):
    """nnUNetv2_kd_plan_student --label-map: a teacher whose dataset.json splits a student label in two is refused
    without a map (the message names --label-map), planned with one (written to the recipe's teacher entry, which the
    trainer reads), and refused, with nothing written, when the map names a label that either side lacks or is
    malformed."""
    import os
    from os.path import join

    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    from conftest import CONFIGURATION, DATASET_ID
    from nnunet_kd.planning import main, plan_student
    from nnunet_kd.teacher import TeacherError
    from test_teacher_and_bad_inputs import teacher_copy

    def split_peripheral_zone(folder):
        dataset_json = load_json(join(folder, "dataset.json"))
        names = list(dataset_json["labels"])
        dataset_json["labels"] = {names[0]: 0, "pz_left": 1, "pz_right": 2, names[2]: 3}
        save_json(dataset_json, join(folder, "dataset.json"), sort_keys=False)

    folder = teacher_copy(workspace, tmp_path, edit=split_peripheral_zone)
    student_labels = list(load_json(join(workspace.preprocessed, "dataset.json"))["labels"])
    pz, tz = student_labels[1], student_labels[2]
    workspace.set_env(monkeypatch)

    with pytest.raises(TeacherError, match=r"Label mismatch.*--label-map TEACHER_LABEL=STUDENT_LABEL"):
        plan_student(str(DATASET_ID), CONFIGURATION, folder, "nnUNetPlans_finer_unmapped", verbose=False)
    assert not os.path.exists(join(workspace.preprocessed, "nnUNetPlans_finer_unmapped.json"))

    main(["-d", str(DATASET_ID), "-c", CONFIGURATION, "--teacher", folder, "-o", "nnUNetPlans_finer_mapped",
          "--label-map", f"pz_left={pz}", f"pz_right={pz}", f"{tz}={tz}"])
    written = load_json(join(workspace.preprocessed, "nnUNetPlans_finer_mapped.json"))
    assert written["kd"][CONFIGURATION]["teacher"]["label_map"] == {"pz_left": pz, "pz_right": pz, tz: tz}
    recipe = parse_recipe(written, CONFIGURATION, "adaptive", "plans")
    assert recipe.teachers[0].label_map == {"pz_left": pz, "pz_right": pz, tz: tz}

    for bad, message in ((["pz_left=nowhere"], r"student labels \['nowhere'\]"),
                         (["pz_centre=" + pz], r"teacher labels \['pz_centre'\]"),
                         (["pz_left"], r"expects TEACHER_LABEL=STUDENT_LABEL"),
                         ([f"pz_left={pz}", f"pz_left={tz}"], r"maps teacher label 'pz_left' twice")):
        with pytest.raises(SystemExit) as stop:
            main(["-d", str(DATASET_ID), "-c", CONFIGURATION, "--teacher", folder, "-o", "nnUNetPlans_finer_bad",
                  "--label-map", *bad])
        assert stop.value.code == 2
        assert re.search(message, capsys.readouterr().err)
        assert not os.path.exists(join(workspace.preprocessed, "nnUNetPlans_finer_bad.json"))


def test_teacher_features_are_copied_once_on_read_and_kept_as_inference_tensors_for_the_adapted_hint():
    from nnunet_kd.distill.step import TeacherOutputs

    with torch.inference_mode():
        feature = torch.randn(2, 4, 3, 3)
    teacher = TeacherOutputs("t", [], {"decoder.-1": feature})
    assert teacher.features.inference("decoder.-1") is feature and feature.is_inference()
    copy = teacher.features["decoder.-1"]
    assert not copy.is_inference() and torch.equal(copy, feature)
    assert teacher.features["decoder.-1"] is copy  # one copy per step, however many terms read it
    assert list(teacher.features) == ["decoder.-1"] and len(teacher.features) == 1
    # a term that saves the teacher's feature for backward works on the copy, and fails on the inference tensor
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    torch.nn.functional.mse_loss(student, copy).backward()
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        torch.nn.functional.mse_loss(student, feature).backward()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_a_confident_region_teacher_merges_to_finite_logits_and_a_finite_kl(temperature):
    # 1 - 1e-8 rounds to 1 in float32: logit(clamp(q, 1e-8, 1 - 1e-8)) was +inf past t / T of about 17
    from nnunet_kd.losses.kl import LogitKLLoss

    teacher = torch.tensor([18.0, 5.0, -3.0]).view(1, 3, 1, 1) * temperature
    merged = merge_teacher_logits(teacher, [0, 1, 1], num_student=2, temperature=temperature, region_based=True)
    assert torch.isfinite(merged).all()
    assert merged[0, 0].item() == pytest.approx(18.0 * temperature, rel=1e-5)  # one region: its own logit
    q = 1 - (1 - torch.sigmoid(torch.tensor(5.0))) * (1 - torch.sigmoid(torch.tensor(-3.0)))
    assert torch.sigmoid(merged[0, 1] / temperature).item() == pytest.approx(q.item(), rel=1e-6)
    student = torch.zeros(1, 2, 1, 1, requires_grad=True)
    kl = LogitKLLoss(temperature, region_based=True)(student, merged)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(student.grad).all()
    # far beyond the floor: capped at T * log((1 - 1e-8) / 1e-8), not infinite
    far = merge_teacher_logits(teacher * 10, [0, 1, 1], 2, temperature, region_based=True)
    assert far[0, 0].item() == pytest.approx(temperature * math.log((1 - 1e-8) / 1e-8), rel=1e-5)
