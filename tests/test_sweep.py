"""The recipe sweep: its files name valid recipes that differ from the shipped preset, its models never enter the
held-out report, and a malformed sweep file is refused naming the file."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from nnunet_kd.evidence.collect import parse_student_folder
from nnunet_kd.evidence.protocol import variant_recipe
from nnunet_kd.planning import apply_override, _check_plans_name
from nnunet_kd.recipe import default_recipe, parse_recipe
from nnunet_kd.methods import SweepError, load_sweep
from nnunet_kd.sweep import sweep_plans_name

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps").glob("*.json"))


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_every_variant_of_a_shipped_sweep_is_a_valid_recipe_that_changes_the_preset(sweep_file):
    sweep = load_sweep(str(sweep_file))
    parsed = {}
    for name, variant in sweep.variants.items():
        recipe = default_recipe("/teacher/folder")
        recipe["student"] = {}
        for assignment in sweep.overrides(name):
            apply_override(recipe, assignment)
        parsed[name] = parse_recipe({"kd": {"2d": recipe}}, "2d", sweep.method, f"{name}.json")
        # ...and sets only settings the presets have (the held-out protocol refuses a misspelt one)
        variant_recipe(f"{sweep.method}:{name}", sweep.overrides(name))
    baseline = parsed[sweep.baseline]
    for name, recipe in parsed.items():
        if name != sweep.baseline:
            assert (recipe.settings, recipe.kd_anneal_start, recipe.teacher_mirroring) != \
                (baseline.settings, baseline.kd_anneal_start, baseline.teacher_mirroring), name


def test_sweep_models_have_their_own_plans_names_that_the_held_out_report_ignores():
    names = {sweep_plans_name("adaptive", v, 0.25, s, e, f) for v in ("default", "noKL") for s in (0, 1)
             for e in (30, 60) for f in (None, 0.5)}
    assert len(names) == 16  # students on half the labels have their own plans
    for name in names:
        _check_plans_name(name)
        assert parse_student_folder(f"nnUNetTrainerKD_BalancedHints__{name}__2d", "2d") is None


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(method="plain"), r"'method' must be one of the KD methods"),
    (lambda s: s.update(baseline="nope"), r"'baseline' must name one of the variants"),
    (lambda s: s["variants"].update({"bad-name": {"why": "x", "set": []}}), r"letters and digits only"),
    (lambda s: s["variants"].update({"noeq": {"why": "x", "set": ["methods.adaptive.weights.kl"]}}),
     r"variant 'noeq' must be"),
    (lambda s: s["variants"]["default"].update(compare_with=["nope"]), r"'compare_with' must list other variants"),
    (lambda s: s["variants"]["default"].update(compare_with=["default"]), r"'compare_with' must list other variants"),
])
def test_a_malformed_sweep_file_is_refused_naming_it(tmp_path, edit, message):
    sweep = {"method": "adaptive", "baseline": "default",
             "variants": {"default": {"why": "preset", "set": []}}}
    edit(sweep)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(copy.deepcopy(sweep)))
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(str(path))
    assert str(path) in str(info.value)


def test_a_multi_teacher_sweep_plans_every_variant_and_its_plain_student_from_the_subset_teachers():
    from types import SimpleNamespace

    from nnunet_kd.sweep import run_sweep

    planned, trained = [], []

    class RecordingWorkspace:
        p = SimpleNamespace(student_epochs=30, labelled_fraction=None, subset_teachers=3)
        commands_run = 0

        def preprocess(self):
            pass

        def teacher(self):
            raise AssertionError("a multi-teacher sweep must not learn from the one teacher on all cases")

        def subset_teachers(self, evaluate=True):
            assert not evaluate, "a sweep must not predict the test cases"
            return ["/subset1", "/subset2", "/subset3"]

        def plan_student(self, teachers, width, seed, plans_name, overrides):
            planned.append((teachers, plans_name, tuple(overrides)))

        def train(self, trainer, plans):
            trained.append(trainer)

    sweep = load_sweep(str(next(p for p in SWEEPS if p.name == "multi_teacher.json")))
    run_sweep(RecordingWorkspace(), sweep, 0.25, [0], list(sweep.variants))
    assert [t for t, _, _ in planned] == [["/subset1", "/subset2", "/subset3"]] * (1 + len(sweep.variants))
    assert trained == ["nnUNetTrainerBudget"] + ["nnUNetTrainerKD_MultiTeacher"] * len(sweep.variants)
    assert ("methods.multi_teacher.teacher_routing=false",) in [o for _, _, o in planned]
    # the students of another number of subset teachers have plans (and model folders) of their own
    assert all("_k3_s0_" in name for _, name, _ in planned)
    assert sweep_plans_name("multi_teacher", "default", 0.25, 0, 30, None, 4) != \
        sweep_plans_name("multi_teacher", "default", 0.25, 0, 30, None, 3)
    assert sweep_plans_name("adaptive", "default", 0.25, 0, 30, None, 3) == \
        sweep_plans_name("adaptive", "default", 0.25, 0, 30)


def test_a_variant_that_changes_two_things_is_also_compared_with_the_one_that_changes_one():
    import numpy as np

    from nnunet_kd.sweep import sweep_comparisons

    sweep = load_sweep(str(Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps" / "multi_teacher.json"))
    assert sweep.variants["termsMean"]["compare_with"] == ["noRouting"]
    dice = {"plain": 0.80, "default": 0.83, "noRouting": 0.82, "uniform": 0.83, "termsMean": 0.81}
    models = {k: {0: np.full(5, v), 1: np.full(5, v)} for k, v in dice.items()}
    matrix = lambda by_seed, seeds: np.stack([by_seed[s] for s in seeds])  # noqa: E731
    got = {(c["variant"], c["baseline"]): c["mean_diff"]
           for c in sweep_comparisons(sweep, list(sweep.variants), models, matrix)}
    expected = {(v, b) for v in ("noRouting", "uniform", "termsMean") for b in ("plain", "default")}
    assert set(got) == expected | {("default", "plain"), ("termsMean", "noRouting")}
    assert got[("termsMean", "noRouting")] == pytest.approx(-0.01)
    # a variant without a finished model is left out, not compared with nothing
    del models["noRouting"]
    assert ("termsMean", "noRouting") not in {(c["variant"], c["baseline"])
                                             for c in sweep_comparisons(sweep, list(sweep.variants), models, matrix)}


def test_the_sweep_report_leaves_out_a_model_trained_before_its_variant_was_redefined(tmp_path):
    """Validation scores belong to the recipe that earned them: a variant model whose plans differ from the variant
    as the sweep file defines it now is listed as left out, not scored under the variant's name."""
    from types import SimpleNamespace

    import numpy as np
    import SimpleITK as sitk
    import torch

    from nnunet_kd.evidence.protocol import Protocol
    from nnunet_kd.methods import TRAINERS
    from nnunet_kd.sweep import build_sweep_report

    method, cases = "multiscale_contrastive", ["v0", "v1"]
    seg05 = [f"methods.{method}.weights.segmentation=0.5"]
    sweep_file = tmp_path / f"{method}.json"
    sweep_file.write_text(json.dumps({"method": method, "baseline": "default", "variants": {
        "default": {"why": "the preset", "set": []}, "seg05": {"why": "a test", "set": seg05}}}))
    sweep = load_sweep(str(sweep_file))
    raw = tmp_path / "raw"
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for case in cases:
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.uint8)), str(raw / "labelsTr" / f"{case}.nii.gz"))
    protocol = Protocol(raw_dataset=str(raw), split_file=str(sweep_file), n_test=0, workdir=str(tmp_path),
                        configuration="2d", runs=[], seeds=[0], teacher_epochs=1, student_epochs=2,
                        iterations_per_epoch=1)
    results = tmp_path / "results"
    ws = SimpleNamespace(p=protocol, dataset_json=lambda: {"labels": {"background": 0, "a": 1}},
                         split={"crossval": [{"train": [], "val": cases}]},
                         folder=lambda trainer, plans: str(results / f"{trainer}__{plans}__2d"))

    def model(trainer: str, variant: str, overrides: list[str], dice: float) -> None:
        folder = results / f"{trainer}__{sweep_plans_name(method, variant, 0.25, 0, 2)}__2d"
        (folder / "fold_0" / "validation").mkdir(parents=True)
        recipe = variant_recipe(f"{method}:{variant}", overrides)
        (folder / "plans.json").write_text(json.dumps({"kd": {"2d": {"methods": recipe["methods"]}}}))
        torch.save({"network_weights": {"w": torch.zeros(1)}, "logging": {
            "ema_fg_dice": [dice, dice], "dice_per_class_or_region": [[dice], [dice]]}},
            str(folder / "fold_0" / "checkpoint_final.pth"))
        (folder / "fold_0" / "validation" / "summary.json").write_text(json.dumps({
            "mean": {"1": {"Dice": dice}}, "foreground_mean": {"Dice": dice},
            "metric_per_case": [{"reference_file": f"/x/{c}.nii.gz", "prediction_file": f"/y/{c}.nii.gz",
                                 "metrics": {"1": {"Dice": dice, "FP": 0, "FN": 0, "TP": 1, "n_ref": 1, "n_pred": 1}}}
                                for c in cases]}))

    model(TRAINERS["plain"], "default", [], 0.70)
    model(TRAINERS[method], "default", [], 0.75)
    model(TRAINERS[method], "seg05", seg05, 0.80)
    report = build_sweep_report(ws, sweep, 0.25, [0], ["default", "seg05"], "(test)")
    assert [r["variant"] for r in report["models"]] == ["plain", "default", "seg05"] and report["skipped"] == []

    # seg05 redefined after it ran: its model is another recipe
    sweep_file.write_text(json.dumps({"method": method, "baseline": "default", "variants": {
        "default": {"why": "the preset", "set": []},
        "seg05": {"why": "a test", "set": [f"methods.{method}.weights.segmentation=0.6"]}}}))
    report = build_sweep_report(ws, load_sweep(str(sweep_file)), 0.25, [0], ["default", "seg05"], "(test)")
    assert [r["variant"] for r in report["models"]] == ["plain", "default"]
    assert len(report["skipped"]) == 1 and "seg05" in report["skipped"][0]
    assert f"methods.{method}.weights" in report["skipped"][0] and "Left out" in report["table"]
