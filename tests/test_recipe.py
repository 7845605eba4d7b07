"""The recipe in the student plans: every shipped method parses from the presets, and a malformed value is refused
with the file named, before any trainer exists."""
from __future__ import annotations

import json

import pytest

from nnunet_kd.planning import apply_override
from nnunet_kd.recipe import RecipeError, available_methods, default_recipe, parse_recipe

PLANS_FILE = "/data/nnUNet_preprocessed/Dataset004_X/nnUNetPlans_kdstudent.json"


def student_plans(**method_changes) -> dict:
    recipe = default_recipe("/results/Dataset004_X/nnUNetTrainer__nnUNetPlans__3d_fullres")
    for method, changes in method_changes.items():
        recipe["methods"][method].update(changes)
    return {"kd": {"3d_fullres": recipe}}


def test_every_shipped_method_parses_from_its_preset():
    assert {"adaptive", "logit", "mskd", "mskd_ffd", "mskd_rgd"} <= set(available_methods())
    for method in available_methods():
        recipe = parse_recipe(student_plans(), "3d_fullres", method, PLANS_FILE)
        assert recipe.teacher.fold == "same" and recipe.teacher.checkpoint == "checkpoint_final.pth"
        assert recipe.num_epochs == 1000 and recipe.seed is None
    adaptive = parse_recipe(student_plans(), "3d_fullres", "adaptive", PLANS_FILE)
    assert adaptive.settings["kl_reduction"] == "class_balanced" and adaptive.weight("kl") > 0
    # the peer's recipe stays the peer's: Fast-nnUNet averages the KL over all voxels
    assert parse_recipe(student_plans(), "3d_fullres", "logit", PLANS_FILE).settings["kl_reduction"] == "voxel"


@pytest.mark.parametrize("change, message", [
    ({"kl_reduction": "per_class"}, r"kl_reduction must be one of \['voxel', 'class_balanced', 'symmetric_balanced'\], got 'per_class'"),
    ({"temperature": -1}, r"temperature must be a finite number > 0, got -1"),
    ({"kl_deep_supervision": "yes"}, r"kl_deep_supervision must be true or false"),
    ({"lovasz_weight": 1.0}, r"unknown key 'lovasz_weight'"),
])
def test_malformed_method_settings_are_refused_naming_the_plans_file(change, message):
    with pytest.raises(RecipeError, match=message) as error:
        parse_recipe(student_plans(adaptive=change), "3d_fullres", "adaptive", PLANS_FILE)
    assert PLANS_FILE in str(error.value)


@pytest.mark.parametrize("method, change, message", [
    # temperature: > 0 and finite (a zero temperature divides the logits by 0)
    ("adaptive", {"temperature": float("nan")}, r"methods\.adaptive\.temperature must be a finite number > 0, got nan"),
    ("adaptive", {"temperature": float("inf")}, r"methods\.adaptive\.temperature must be a finite number > 0, got inf"),
    ("adaptive", {"temperature": 0}, r"methods\.adaptive\.temperature must be a finite number > 0, got 0"),
    # weights: >= 0 (0 = term off) and finite
    ("adaptive", {"weights": {"kl": float("nan")}}, r"methods\.adaptive\.weights\.kl must be a finite number >= 0"),
    ("adaptive", {"weights": {"lovasz": float("-inf")}}, r"weights\.lovasz must be a finite number >= 0, got -inf"),
    ("mskd", {"rgd_edge_weight": float("inf")}, r"methods\.mskd\.rgd_edge_weight must be a finite number >= 0"),
    # stage lists: a non-empty list of names, not a string, a number or []
    ("adaptive", {"feature_stages": "encoder.-1"}, r"feature_stages must be a non-empty list of stage names .*"
                                                   r"got 'encoder\.-1'"),
    ("adaptive", {"feature_stages": 3}, r"feature_stages must be a non-empty list of stage names .*got 3"),
    ("adaptive", {"feature_stages": []}, r"feature_stages must be a non-empty list of stage names .*got \[\].*weight to 0"),
    ("mskd", {"mskd_stages": ["decoder.-1", 2]}, r"mskd_stages must be a non-empty list of stage names"),
    # integer settings
    ("mskd", {"ffd_boundary_width": 1.5}, r"methods\.mskd\.ffd_boundary_width must be an integer >= 0, got 1\.5"),
])
def test_non_finite_zero_and_wrongly_typed_settings_are_refused_naming_file_and_key(method, change, message):
    with pytest.raises(RecipeError, match=message) as error:
        parse_recipe(student_plans(**{method: change}), "3d_fullres", method, PLANS_FILE)
    assert PLANS_FILE in str(error.value) and "nnUNetv2_kd_plan_student" in str(error.value)


@pytest.mark.parametrize("method", ["multi_teacher", "adaptive"])
def test_routing_without_a_teacher_mixture_is_refused_not_silently_ignored(method):
    # terms_mean computes every term per teacher on every case: routing would be written in the plans and not done
    with pytest.raises(RecipeError, match=r"teacher_routing applies to the teachers' per-voxel mixture") as error:
        parse_recipe(student_plans(**{method: {"teacher_aggregation": "terms_mean", "teacher_routing": True}}),
                     "3d_fullres", method, PLANS_FILE)
    assert PLANS_FILE in str(error.value)
    for aggregation in ("adaptive", "uniform", "logit_mean"):
        recipe = parse_recipe(student_plans(**{method: {"teacher_aggregation": aggregation, "teacher_routing": True}}),
                              "3d_fullres", method, PLANS_FILE)
        assert recipe.teacher_routing and recipe.teacher_aggregation == aggregation


def test_zero_weight_switches_a_term_off():
    recipe = parse_recipe(student_plans(adaptive={"weights": {"lovasz": 0, "feature": 0.0}}), "3d_fullres", "adaptive",
                          PLANS_FILE)
    assert recipe.weight("lovasz") == 0 and recipe.weight("feature") == 0 and recipe.weight("kl") > 0


def test_json_nan_and_infinity_in_the_plans_file_are_refused(tmp_path):
    # Python's json reads the non-standard NaN / Infinity literals a hand-edited plans file may hold.
    text = json.dumps(student_plans()).replace('"temperature": 3.0', '"temperature": NaN', 1)
    plans_file = tmp_path / "nnUNetPlans_nan.json"
    plans_file.write_text(text)
    with pytest.raises(RecipeError, match=r"nnUNetPlans_nan\.json: kd\.3d_fullres\.methods\.\w+\.temperature must be"):
        for method in available_methods():
            parse_recipe(json.loads(plans_file.read_text()), "3d_fullres", method, str(plans_file))
    plans_file.write_text(json.dumps(student_plans()).replace('"kl": 0.5', '"kl": Infinity', 1))
    with pytest.raises(RecipeError, match=r"nnUNetPlans_nan\.json: .*weights\.kl must be a finite number >= 0, got inf"):
        for method in available_methods():
            parse_recipe(json.loads(plans_file.read_text()), "3d_fullres", method, str(plans_file))


@pytest.mark.parametrize("assignment, message", [
    ("methods.adaptive.temperature=NaN", r"methods\.adaptive\.temperature must be a finite number > 0, got nan"),
    ("methods.adaptive.temperature=Infinity", r"methods\.adaptive\.temperature must be a finite number > 0, got inf"),
    ("methods.adaptive.temperature=0", r"methods\.adaptive\.temperature must be a finite number > 0, got 0"),
    ("methods.adaptive.weights.kl=NaN", r"methods\.adaptive\.weights\.kl must be a finite number >= 0, got nan"),
    ("methods.adaptive.feature_stages=encoder.-1", r"feature_stages must be a non-empty list of stage names"),
    ("methods.adaptive.feature_stages=[]", r"feature_stages must be a non-empty list of stage names"),
    ("methods.mskd.ffd_boundary_width=0.5", r"ffd_boundary_width must be an integer >= 0, got 0\.5"),
])
def test_set_overrides_go_through_the_same_checks(assignment, message):
    plans = student_plans()
    apply_override(plans["kd"]["3d_fullres"], assignment)
    method = assignment.split(".")[1]
    with pytest.raises(RecipeError, match=message) as error:
        parse_recipe(plans, "3d_fullres", method, PLANS_FILE)
    assert PLANS_FILE in str(error.value)


def test_a_dotted_path_reads_a_null_setting_as_none_and_an_absent_one_as_missing():
    from nnunet_kd.planning import MISSING, setting_at

    recipe = {"methods": {"adaptive": {"weights": {"kl": 0.5}, "unlabelled_batch_share": None}}}
    assert setting_at(recipe, "methods.adaptive.weights.kl") == 0.5
    assert setting_at(recipe, "methods.adaptive.unlabelled_batch_share") is None
    assert setting_at(recipe, "methods.adaptive.weights") == {"kl": 0.5}
    for absent in ("methods.adaptive.weights.kl.x", "methods.mskd", "methods.adaptive.weights.KL", "nothing"):
        assert setting_at(recipe, absent) is MISSING
