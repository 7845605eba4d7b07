"""Multi-scale contrastive distillation for a student with part of the labels (issue 10): the scale terms' settings,
unlabelled samples (segmentation loss masked, teacher terms active, their classes the teacher's prediction), the
labelled subset and the unlabelled rest in a real trainer, the checks on an unlabelled images folder, a teacher with
finer labels (anterior/posterior -> whole structure), and the whole workflow with a multi-task teacher through
nnU-Net's commands."""
from __future__ import annotations

import glob
import os
import shutil
from os.path import join

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from conftest import CONFIGURATION, DATASET_ID, DATASET_NAME
from nnunet_kd.distill.step import TeacherOutputs
from nnunet_kd.recipe import RecipeError, default_recipe, parse_recipe
from nnunet_kd.unlabelled import (UnlabelledImagesError, check_unlabelled_images, draws_per_case, labelled_samples,
                                  pseudo_labels_for_unlabelled, segmentation_loss_on_labelled)

METHOD = "multiscale_contrastive"
TRAINER = "nnUNetTrainerKD_MultiScaleContrastive"
KD_TERMS = ("feature_encoder", "feature_bottleneck", "feature_decoder", "contrastive")


def _recipe(**changes) -> dict:
    recipe = default_recipe("/teacher")
    recipe["methods"][METHOD].update(changes)
    return {"kd": {CONFIGURATION: recipe}}


# ------------------------------------------------------------------ recipe
def test_the_preset_weighs_each_scale_and_the_scales_take_their_own_stages():
    recipe = parse_recipe(_recipe(), CONFIGURATION, METHOD, "student.json")
    # chosen on validation: full segmentation weight, the prediction-map term (KL) on, the thesis's scale weights
    assert set(recipe.terms) == {"kl", *KD_TERMS} and recipe.train_on_unlabelled
    assert [recipe.weight(t) for t in ("segmentation", "kl") + KD_TERMS] == [1.0, 0.5, 0.1, 0.2, 0.1, 0.2]
    assert recipe.terms["feature_bottleneck"].stages == ("encoder.-1",)
    with pytest.raises(RecipeError, match=r"student\.json.*decoder\.1.*not encoder stages"):
        parse_recipe(_recipe(encoder_feature_stages=["encoder.1", "decoder.1"]), CONFIGURATION, METHOD,
                     "student.json")
    with pytest.raises(RecipeError, match=r"student\.json.*bottleneck 'encoder\.-1'"):
        parse_recipe(_recipe(encoder_feature_stages=["encoder.-1"]), CONFIGURATION, METHOD, "student.json")
    with pytest.raises(RecipeError, match=r"student\.json.*contrastive_max_voxels_per_class must be an integer >= 1"):
        parse_recipe(_recipe(contrastive_max_voxels_per_class=0), CONFIGURATION, METHOD, "student.json")
    for queue in (10.5, -1, True):  # refused when the recipe is read, not when the trainer builds its queues
        with pytest.raises(RecipeError, match=r"student\.json.*contrastive_queue_size must be an integer"):
            parse_recipe(_recipe(contrastive_queue_size=queue), CONFIGURATION, METHOD, "student.json")


def test_unlabelled_samples_cannot_feed_a_term_that_reads_only_labels():
    plans = _recipe()
    plans["kd"][CONFIGURATION]["methods"][METHOD]["weights"]["lovasz"] = 0.5
    with pytest.raises(RecipeError, match=r"student\.json.*label-only term\(s\) \['lovasz'\]"):
        parse_recipe(plans, CONFIGURATION, METHOD, "student.json")


def test_the_unlabelled_share_of_a_batch_is_a_recipe_setting_checked_with_the_plans_file_named():
    assert parse_recipe(_recipe(), CONFIGURATION, METHOD, "student.json").unlabelled_batch_share == 0.25  # preset
    assert parse_recipe(_recipe(unlabelled_batch_share=None), CONFIGURATION, METHOD,
                        "student.json").unlabelled_batch_share is None  # nnU-Net's draw in proportion to the cases
    assert parse_recipe(_recipe(unlabelled_batch_share=0.4), CONFIGURATION, METHOD,
                        "student.json").unlabelled_batch_share == 0.4
    for bad in (0, 1, -0.1, 1.5, "half", True):
        # the preset's type check (a finite number >= 0) or the share's own (strictly between 0 and 1)
        with pytest.raises(RecipeError, match=r"student\.json.*unlabelled_batch_share must be a (number between 0 "
                                              r"and 1|finite number >= 0)"):
            parse_recipe(_recipe(unlabelled_batch_share=bad), CONFIGURATION, METHOD, "student.json")
    with pytest.raises(RecipeError, match=r"student\.json.*train_on_unlabelled, which is false"):
        parse_recipe(_recipe(train_on_unlabelled=False), CONFIGURATION, METHOD, "student.json")  # the preset's 0.25


def test_draws_per_case_give_the_unlabelled_share_of_a_uniform_draw():
    # half the fold unlabelled: a quarter of each batch unlabelled means listing every labelled case three times
    assert draws_per_case(60, 60, 0.25) == (3, 1)
    assert draws_per_case(60, 60, 0.5) == (1, 1)  # the smallest pair
    assert draws_per_case(13, 43, 0.5) == (43, 13)  # 13 labelled + 14 unlabelled fold cases + 29 extra images
    a, b = draws_per_case(27, 29, 0.3)
    assert b * 29 / (a * 27 + b * 29) == pytest.approx(0.3, abs=1e-3)
    for bad in ((0, 5, 0.5), (5, 0, 0.5), (5, 5, 0.0), (5, 5, 1.0)):
        with pytest.raises(ValueError):
            draws_per_case(*bad)


# ------------------------------------------------------------------ unlabelled samples, on tensors
def test_only_unlabelled_keys_are_masked():
    assert labelled_samples(["a", "b"], frozenset(), "cpu") is None
    assert labelled_samples(["a", "b"], frozenset({"c"}), "cpu") is None
    assert labelled_samples(np.array(["a", "c"]), frozenset({"c"}), "cpu").tolist() == [True, False]


def test_the_segmentation_loss_ignores_unlabelled_samples_and_is_zero_without_labelled_ones():
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (3, 1, 4, 5)).float()

    def loss(output, tgt):
        return F.cross_entropy(output, tgt[:, 0].long())
    labelled = torch.tensor([True, False, True])
    value = segmentation_loss_on_labelled(loss, logits, target, labelled)
    assert value.item() == pytest.approx(loss(logits[[0, 2]], target[[0, 2]]).item())
    other = target.clone()
    other[1] = (other[1] + 1) % 3  # another label for the unlabelled sample changes nothing
    assert segmentation_loss_on_labelled(loss, logits, other, labelled).item() == pytest.approx(value.item())
    none = segmentation_loss_on_labelled(loss, logits, target, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and logits.grad.abs().sum() == 0
    # deep supervision: lists of outputs and targets
    ds = segmentation_loss_on_labelled(lambda o, t: sum(loss(a, b) for a, b in zip(o, t)), [logits, logits[..., ::2]],
                                       [target, target[..., ::2]], labelled)
    assert ds.item() == pytest.approx(value.item() + loss(logits[[0, 2]][..., ::2], target[[0, 2]][..., ::2]).item())


def test_unlabelled_training_under_ddp_with_batch_dice_is_refused_before_training_naming_the_plans_file():
    # nnU-Net's batch Dice gathers every rank's statistics in one collective; a rank whose batch holds no labelled
    # sample would leave it (a hang), so the combination stops at set-up, with the ways out named
    from types import SimpleNamespace

    from nnunet_kd.teacher import TeacherError
    from nnunet_kd.trainer import nnUNetTrainerKD

    class PastTheGuard(Exception):
        pass

    def trainer(is_ddp, batch_dice):
        def do_split():
            raise PastTheGuard
        return SimpleNamespace(kd_recipe=SimpleNamespace(train_on_unlabelled=True), is_ddp=is_ddp,
                               configuration_manager=SimpleNamespace(batch_dice=batch_dice),
                               configuration_name="2d", kd_plans_file="/pp/Dataset004_X/nnUNetPlans_kdhalf.json",
                               do_split=do_split)

    with pytest.raises(TeacherError, match=r"nnUNetPlans_kdhalf\.json: train_on_unlabelled cannot run under DDP") as e:
        nnUNetTrainerKD._setup_unlabelled(trainer(True, True))
    assert "one GPU" in str(e.value) and "batch_dice to false" in str(e.value)
    for is_ddp, batch_dice in ((True, False), (False, True)):  # no gather across ranks: goes on to the split
        with pytest.raises(PastTheGuard):
            nnUNetTrainerKD._setup_unlabelled(trainer(is_ddp, batch_dice))


@pytest.mark.parametrize("spatial", [(4, 6), (2, 4, 6)])
def test_unlabelled_samples_take_the_teachers_prediction_as_their_classes(spatial):
    torch.manual_seed(0)
    teacher_logits = torch.randn(2, 3, *spatial)
    low = teacher_logits[(slice(None), slice(None)) + tuple(slice(None, None, 2) for _ in spatial)]
    teacher = TeacherOutputs("teacher0", [teacher_logits, low])
    labels = [torch.zeros(2, 1, *spatial), torch.zeros(2, 1, *low.shape[2:])]
    valid = [torch.zeros(2, 1, *spatial, dtype=torch.bool), torch.zeros(2, 1, *low.shape[2:], dtype=torch.bool)]
    new_labels, new_valid = pseudo_labels_for_unlabelled(labels, valid, {"teacher0": teacher},
                                                         torch.tensor([True, False]), region_based=False)
    for level, out in enumerate(teacher.outputs):
        assert torch.equal(new_labels[level][0], labels[level][0])            # labelled: its own labels
        assert torch.equal(new_labels[level][1, 0], out[1].argmax(0).float())  # unlabelled: the teacher's argmax
        assert not new_valid[level][0].any() and new_valid[level][1].all()


# ------------------------------------------------------------------ a teacher with finer labels
def test_an_anterior_posterior_teacher_teaches_a_whole_hippocampus_student():
    from nnunet_kd.distill.teachers import label_map_channels
    from nnunet_kd.losses.label_map import merge_teacher_logits
    teacher = {"labels": {"background": 0, "Anterior": 1, "Posterior": 2}}
    student = {"labels": {"background": 0, "hippocampus": 1}}
    channels = label_map_channels({"Anterior": "hippocampus", "Posterior": "hippocampus"}, teacher, student, False,
                                  "plans.json")
    assert channels == [-1, 1, 1]  # background is unmapped: it goes to the student's background
    logits = torch.randn(2, 3, 3, 4, 5) * 2
    merged = merge_teacher_logits(logits, channels, num_student=2, temperature=3.0)
    p = torch.softmax(logits / 3.0, 1)
    assert torch.allclose(torch.softmax(merged / 3.0, 1)[:, 1], p[:, 1] + p[:, 2], atol=1e-6)


# ------------------------------------------------------------------ an unlabelled images folder
def _dataset_json():
    return {"channel_names": {"0": "T2", "1": "ADC"}, "file_ending": ".nii.gz", "labels": {"background": 0}}


def test_an_unlabelled_images_folder_is_checked_file_by_file(tmp_path):
    folder = tmp_path / "images"
    with pytest.raises(UnlabelledImagesError, match="is not a folder"):
        check_unlabelled_images(str(folder), _dataset_json(), "dataset.json", [])
    folder.mkdir()
    with pytest.raises(UnlabelledImagesError, match="holds no image"):
        check_unlabelled_images(str(folder), _dataset_json(), "dataset.json", [])
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"):
        (folder / name).write_bytes(b"")
    assert check_unlabelled_images(str(folder), _dataset_json(), "dataset.json", ["c"]) == {
        "a": [str(folder / "a_0000.nii.gz"), str(folder / "a_0001.nii.gz")],
        "b": [str(folder / "b_0000.nii.gz"), str(folder / "b_0001.nii.gz")]}
    with pytest.raises(UnlabelledImagesError, match=r"have the identifier of a case of the dataset .*\['b'\]"):
        check_unlabelled_images(str(folder), _dataset_json(), "dataset.json", ["b"])
    (folder / "b_0001.nii.gz").unlink()
    with pytest.raises(UnlabelledImagesError, match=r"Case b .* lacks \['b_0001.nii.gz'\]"):
        check_unlabelled_images(str(folder), _dataset_json(), "dataset.json", [])
    (folder / "b_0001.nii.gz").write_bytes(b"")
    (folder / "b_0002.nii.gz").write_bytes(b"")
    with pytest.raises(UnlabelledImagesError, match=r"b_0002.nii.gz is channel 2, but the dataset has 2"):
        check_unlabelled_images(str(folder), _dataset_json(), "dataset.json", [])
    (folder / "b_0002.nii.gz").unlink()
    (folder / "c_0000.mha").write_bytes(b"")
    with pytest.raises(UnlabelledImagesError, match=r"c_0000.mha is not named <case>_<XXXX>.nii.gz"):
        check_unlabelled_images(str(folder), _dataset_json(), "dataset.json", [])


# ------------------------------------------------------------------ in a real trainer
HALF_PLANS = "nnUNetPlans_halfcontrastive"


def _half_plans(ws, monkeypatch) -> str:
    from nnunet_kd.planning import plan_student
    ws.set_env(monkeypatch)
    if not os.path.isfile(join(ws.preprocessed, HALF_PLANS + ".json")):
        plan_student(str(DATASET_ID), CONFIGURATION, ws.teacher_folder, HALF_PLANS, width=0.25, verbose=False,
                     labelled_fraction=0.5, labelled_fraction_seed=1, unlabelled_images=join(ws.raw, "imagesTs"),
                     num_epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1)
    return HALF_PLANS


def _batch(trainer, keys):
    patch = trainer.configuration_manager.patch_size
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (len(keys), 1, *patch)).float()
    target = [F.interpolate(labels, scale_factor=tuple(s), mode="nearest-exact")
              for s in trainer._get_deep_supervision_scales()]
    return {"data": torch.randn(len(keys), 1, *patch), "target": target, "keys": list(keys)}


def test_the_labelled_subset_and_the_unlabelled_rest_reach_the_data_loader_and_the_baseline_ignores_the_rest(
        workspace, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunet_kd.budget import labelled_subset
    from test_teacher_and_bad_inputs import make_trainer
    ws = workspace
    plans = _half_plans(ws, monkeypatch)
    splits = load_json(join(ws.preprocessed, "splits_final.json"))
    fold_train, fold_val = splits[0]["train"], splits[0]["val"]
    extra = ["prostate_010", "prostate_011"]  # the generated dataset's imagesTs
    assert sorted(os.listdir(join(ws.preprocessed, f"{plans}_{CONFIGURATION}_unlabelled"))) == sorted(
        f"{c}{e}" for c in extra for e in (".b2nd", "_seg.b2nd", ".pkl"))

    trainer = make_trainer(ws, monkeypatch, plans, trainer=TRAINER)
    trainer.initialize()
    labelled, val = trainer.do_split()
    assert labelled == labelled_subset(fold_train, 0.5, 1) and val == fold_val  # seeded, the fold's validation
    assert labelled != labelled_subset(fold_train, 0.5, 2)
    assert trainer.unlabelled_keys == frozenset(set(fold_train) - set(labelled)) | set(extra)
    assert not (set(labelled) | trainer.unlabelled_keys) & set(fold_val)
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    # unlabelled_batch_share null: nnU-Net's own uniform draw over every training case, labelled or not
    import dataclasses
    from collections import Counter
    recipe = trainer.kd_recipe
    assert recipe.unlabelled_batch_share == 0.25  # the preset's
    trainer.kd_recipe = dataclasses.replace(recipe, unlabelled_batch_share=None)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    trainer.kd_recipe = recipe
    assert dataset_tr.identifiers == sorted(set(labelled) | trainer.unlabelled_keys)
    assert dataset_val.identifiers == sorted(fold_val)
    # unlabelled_batch_share: nnU-Net's uniform draw over the identifiers gives the unlabelled cases that share
    weighted = Counter(trainer.get_tr_and_val_datasets()[0].identifiers)
    a, b = draws_per_case(len(labelled), len(trainer.unlabelled_keys), 0.25)
    assert weighted == {**{k: a for k in labelled}, **{k: b for k in trainer.unlabelled_keys}}
    assert sum(weighted[k] for k in trainer.unlabelled_keys) / sum(weighted.values()) == pytest.approx(0.25, abs=0.02)
    data, seg, _, properties = dataset_tr.load_case(extra[0])  # an extra image: nnU-Net's format, no label
    assert data.shape[0] == 1 and set(np.unique(seg[:])) <= {-1, 0}
    assert all(len(v) == 0 for v in properties["class_locations"].values())
    # a fold case trained on without its labels: its labels do not steer the foreground oversampling either
    rest = sorted(trainer.unlabelled_keys - set(extra))[0]
    assert any(len(v) for v in trainer.dataset_class(trainer.preprocessed_dataset_folder, [rest])
               .load_case(rest)[-1]["class_locations"].values())  # nnU-Net's own record has its foreground
    assert all(len(v) == 0 for v in dataset_tr.load_case(rest)[-1]["class_locations"].values())
    assert any(len(v) for v in dataset_tr.load_case(labelled[0])[-1]["class_locations"].values())

    # The fold's record says what it saw without labels; the leakage guard of a later student counts those cases.
    from types import SimpleNamespace
    from nnunet_kd.provenance import read_training_cases, record_training_cases
    from nnunet_kd.teacher import teacher_training_cases
    record = read_training_cases(os.path.dirname(record_training_cases(trainer)))
    assert record["training_cases"] == sorted(labelled)
    assert record["unlabelled_training_cases"] == sorted(trainer.unlabelled_keys - set(extra))
    assert record["unlabelled_images"] == {"source": join(ws.raw, "imagesTs"), "cases": extra}
    as_teacher = SimpleNamespace(model_folder=trainer.output_folder_base, fold=0, plans={"dataset_name": DATASET_NAME})
    assert teacher_training_cases(as_teacher, student_dataset_folder=ws.preprocessed) == set(fold_train)

    baseline = make_trainer(ws, monkeypatch, plans, trainer="nnUNetTrainerBudget")
    baseline.dataset_class = trainer.dataset_class
    assert baseline.get_tr_and_val_datasets()[0].identifiers == sorted(labelled)
    adaptive = make_trainer(ws, monkeypatch, plans, trainer="nnUNetTrainerKD_BalancedHints")
    adaptive.initialize()  # a method without train_on_unlabelled ignores the unlabelled cases too
    assert adaptive.unlabelled_keys == frozenset()


def test_unlabelled_samples_contribute_zero_segmentation_loss_and_nonzero_distillation_loss(workspace, monkeypatch):
    from test_teacher_and_bad_inputs import make_trainer
    ws = workspace
    plans = _half_plans(ws, monkeypatch)
    trainer = make_trainer(ws, monkeypatch, plans, trainer=TRAINER)
    trainer.initialize()
    labelled_key = trainer.do_split()[0][0]
    unlabelled_key = sorted(trainer.unlabelled_keys)[0]

    batch = _batch(trainer, [labelled_key, unlabelled_key])
    with torch.no_grad():  # nnU-Net's loss on the labelled sample alone, with the weights before the step
        expected = trainer.loss(trainer.network(batch["data"][:1]), [t[:1] for t in batch["target"]])
    mixed = trainer.train_step(batch)["terms"]
    assert mixed["segmentation"].item() == pytest.approx(expected.item(), rel=1e-4)

    only_unlabelled = trainer.train_step(_batch(trainer, [unlabelled_key, "prostate_010"]))["terms"]
    assert only_unlabelled["segmentation"].item() == 0.0
    for term in KD_TERMS:
        assert only_unlabelled[term].item() > 0 and torch.isfinite(only_unlabelled[term])
    # the heads and adapters are in the optimiser and under kd_modules
    names = set(trainer.distillation.state_dict())
    assert {n.split(".")[0] for n in names} == set(KD_TERMS)
    assert any(n.startswith("contrastive.teacher_heads.teacher0.") for n in names)
    assert any(n.startswith("contrastive.student_heads.teacher0.") for n in names)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in trainer.distillation.parameters())


def test_planning_with_bad_unlabelled_images_writes_nothing(workspace, monkeypatch, tmp_path):
    from nnunet_kd.planning import PlanningError, plan_student
    ws = workspace
    ws.set_env(monkeypatch)
    before = sorted(os.listdir(ws.preprocessed))
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(glob.glob(join(ws.raw, "imagesTs", "*_0000.nii.gz"))[0], images / "extra_0001.nii.gz")
    with pytest.raises(PlanningError, match=r"extra_0001.nii.gz is channel 1, but the dataset has 1"):
        plan_student(str(DATASET_ID), CONFIGURATION, ws.teacher_folder, "nnUNetPlans_badunlabelled", verbose=False,
                     unlabelled_images=str(images))
    with pytest.raises(PlanningError, match="is not a folder"):
        plan_student(str(DATASET_ID), CONFIGURATION, ws.teacher_folder, "nnUNetPlans_badunlabelled", verbose=False,
                     unlabelled_images=str(tmp_path / "missing"))
    assert sorted(os.listdir(ws.preprocessed)) == before


def test_leaving_the_unlabelled_cases_out_also_needs_the_preset_share_of_a_batch_switched_off(workspace, monkeypatch):
    """The preset draws a quarter of each batch from the unlabelled cases; without them that share has nothing to
    draw from, so the planner refuses before writing anything and says which --set to add."""
    from nnunet_kd.planning import PlanningError, plan_student
    ws = workspace
    ws.set_env(monkeypatch)
    before = sorted(os.listdir(ws.preprocessed))
    off = (f"methods.{METHOD}.train_on_unlabelled=false",)
    with pytest.raises(PlanningError, match=r"nnUNetPlans_nounlabelled\.json: .*unlabelled_batch_share 0\.25 .*set it "
                                            r"to null.*Nothing was written: change the setting with --set KEY=VALUE"):
        plan_student(str(DATASET_ID), CONFIGURATION, ws.teacher_folder, "nnUNetPlans_nounlabelled", verbose=False,
                     labelled_fraction=0.5, overrides=off)
    assert sorted(os.listdir(ws.preprocessed)) == before
    plan_student(str(DATASET_ID), CONFIGURATION, ws.teacher_folder, "nnUNetPlans_nounlabelled", verbose=False,
                 labelled_fraction=0.5, overrides=off + (f"methods.{METHOD}.unlabelled_batch_share=null",))
    written = load_json(join(ws.preprocessed, "nnUNetPlans_nounlabelled.json"))["kd"][CONFIGURATION]["methods"][METHOD]
    assert written["train_on_unlabelled"] is False and written["unlabelled_batch_share"] is None
    os.remove(join(ws.preprocessed, "nnUNetPlans_nounlabelled.json"))


# ------------------------------------------------------------------ the user's commands, end to end
def test_multitask_teacher_to_partial_label_student_to_export_with_nnunet_commands(workspace):
    from nnunet_kd.cost import build_network_from_plans
    from nnunet_kd.pipeline import model_folder, write_budget_plans
    ws = workspace
    teacher_plans, student_plans = "nnUNetPlans_multitaskteacher", "nnUNetPlans_kdstudent_half"
    written = write_budget_plans(ws.preprocessed, "nnUNetPlans", teacher_plans, CONFIGURATION, num_epochs=1,
                                 iterations_per_epoch=2, val_iterations_per_epoch=1)
    plans = load_json(written)
    plans["kd"][CONFIGURATION]["training"]["reconstruction_weight"] = 1.0
    save_json(plans, written, sort_keys=False)
    ws.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", "nnUNetTrainerMultiTask", "-p",
           teacher_plans, "-device", "cpu")
    teacher = model_folder(ws.results, DATASET_NAME, "nnUNetTrainerMultiTask", teacher_plans, CONFIGURATION)
    teacher_checkpoint = torch.load(join(teacher, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert any(k.startswith("reconstruction_head.") for k in teacher_checkpoint["network_weights"])
    teacher_log = open(sorted(glob.glob(join(teacher, "fold_0", "training_log_*.txt")))[-1]).read()
    assert "reconstruction MSE (unweighted, training mean)" in teacher_log
    # the benchmark's and the evidence runner's predictor deploy (and cost) its segmentation network, without the head
    from nnunet_kd.cost import make_predictor
    predictor = make_predictor(teacher, 0, device=torch.device("cpu"))
    assert set(predictor.network.state_dict()) == {k for k in teacher_checkpoint["network_weights"]
                                                   if not k.startswith("reconstruction_head.")}

    ws.run("nnUNetv2_kd_plan_student", "-d", str(DATASET_ID), "-c", CONFIGURATION, "--teacher", teacher,
           "--width", "0.25", "--labelled-fraction", "0.5", "--unlabelled-images", join(ws.raw, "imagesTs"),
           "-o", student_plans, "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1")
    ws.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", TRAINER, "-p", student_plans,
           "-device", "cpu")
    student = ws.student_folder(TRAINER, student_plans)
    checkpoint = torch.load(join(student, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert {k.split(".")[0] for k in checkpoint["kd_modules"]} == set(KD_TERMS)
    assert not any("reconstruction" in k for k in list(checkpoint["kd_modules"]) + list(checkpoint["network_weights"]))
    assert len(checkpoint["optimizer_state"]["param_groups"]) == 2
    for term in ("segmentation",) + KD_TERMS:
        assert len(checkpoint["logging"][f"kd_{term}"]) == 1 and np.isfinite(checkpoint["logging"][f"kd_{term}"][0])
    log = open(sorted(glob.glob(join(student, "fold_0", "training_log_*.txt")))[-1]).read()
    assert "unlabelled (" in log and "2 extra images" in log

    ws.run("nnUNetv2_kd_export", "-i", student)
    exported = model_folder(ws.results, DATASET_NAME, "nnUNetTrainer", student_plans, CONFIGURATION)
    vanilla = torch.load(join(exported, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert not [k for k in vanilla if k.startswith("kd_")]
    assert not any("reconstruction" in k for k in vanilla["network_weights"])
    plain = build_network_from_plans(load_json(join(exported, "plans.json")), load_json(join(exported, "dataset.json")),
                                     CONFIGURATION, deep_supervision=False)
    plain.load_state_dict(vanilla["network_weights"])  # strict: exactly the plain student's parameters
