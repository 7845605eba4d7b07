"""The recipe in the student plans: every shipped method parses from the presets, and a malformed value is refused
with the file named, before any trainer exists."""
from __future__ import annotations

import pytest

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
    ({"kl_reduction": "per_class"}, r"kl_reduction must be one of \['voxel', 'class_balanced'\], got 'per_class'"),
    ({"temperature": -1}, r"temperature must be a non-negative number"),
    ({"kl_deep_supervision": "yes"}, r"kl_deep_supervision must be true or false"),
    ({"lovasz_weight": 1.0}, r"unknown key 'lovasz_weight'"),
])
def test_malformed_method_settings_are_refused_naming_the_plans_file(change, message):
    with pytest.raises(RecipeError, match=message) as error:
        parse_recipe(student_plans(adaptive=change), "3d_fullres", "adaptive", PLANS_FILE)
    assert PLANS_FILE in str(error.value)
