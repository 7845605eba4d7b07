"""One registry of distillation terms: every preset, every trainer and every method alias of the comparison, the
evidence protocol and the benchmark names something that exists, so adding a term or a method cannot leave one of
them behind."""
from __future__ import annotations

import importlib.util
import inspect

import pytest

from nnunet_kd.distill import registered_terms, term_class
from nnunet_kd.recipe import available_methods, load_preset
from nnunet_kd.resources import trainers_dir


def trainer_classes() -> dict:
    """Every trainer class defined or re-exported by a file of trainers/, by name."""
    classes = {}
    for path in sorted(trainers_dir().glob("*.py")):
        if path.name == "__init__.py":
            continue
        spec = importlib.util.spec_from_file_location(f"_trainers_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert hasattr(module, path.stem), f"{path} must define the trainer class its file is named after"
        classes[path.stem] = getattr(module, path.stem)
    return classes


def test_every_preset_switches_on_registered_terms_only_with_all_their_settings():
    used = set()
    for method in available_methods():
        preset = load_preset(method)
        weights = preset.get("weights", {})
        assert "segmentation" in weights, method
        for term, weight in weights.items():
            if term == "segmentation":
                continue
            assert term in registered_terms(), f"plans/{method}.json weights an unregistered term '{term}'"
            missing = [k for k in term_class(term).setting_keys if k not in preset]
            assert not missing, f"plans/{method}.json lacks {missing}, the settings of its term '{term}'"
            if weight > 0:
                used.add(term)
                term_class(term).parse_settings(preset)  # typed settings from the preset alone
    assert used == set(registered_terms()), "a registered term that no preset uses is dead code"


def test_every_kd_trainer_names_a_preset_method():
    from nnunet_kd.trainer import nnUNetTrainerKD
    classes = trainer_classes()
    kd = {name: cls for name, cls in classes.items() if issubclass(cls, nnUNetTrainerKD)}
    assert {"nnUNetTrainerKD_BalancedHints", "nnUNetTrainerKD_Adaptive", "nnUNetTrainerKD_Logit",
            "nnUNetTrainerMSKD"} <= set(kd)
    for name, cls in kd.items():
        assert cls.kd_method == "none" or cls.kd_method in available_methods(), name
        assert cls.kd_teacher_source in ("network", "labels"), name
    methods = {cls.kd_method for cls in kd.values()}
    assert set(available_methods()) <= methods, "a preset no trainer trains with"
    # the old name is an alias of the new one: the same recipe section
    assert kd["nnUNetTrainerKD_Adaptive"].kd_method == kd["nnUNetTrainerKD_BalancedHints"].kd_method


@pytest.mark.parametrize("module_name, table", [
    ("nnunet_kd.compare", "STUDENT_TRAINERS"), ("nnunet_kd.evidence.protocol", "TRAINERS")])
def test_every_comparison_and_evidence_alias_names_a_trainer_of_this_plugin(module_name, table):
    module = importlib.import_module(module_name)
    classes = trainer_classes()
    for alias, trainer in getattr(module, table).items():
        assert trainer in classes, f"{module_name}.{table}['{alias}'] = {trainer}: no such trainer in trainers/"
    if hasattr(module, "METHOD_ALIASES"):
        assert set(module.METHOD_ALIASES.values()) <= set(module.STUDENT_TRAINERS)
    for name in ("TEACHER_TRAINER",):
        if hasattr(module, name):
            assert getattr(module, name) in classes


def test_the_benchmark_default_trainer_is_a_kd_trainer():
    from nnunet_kd.benchmark import DEFAULT_TRAINER
    from nnunet_kd.trainer import nnUNetTrainerKD
    cls = trainer_classes()[DEFAULT_TRAINER]
    assert issubclass(cls, nnUNetTrainerKD) and cls.kd_method in available_methods()


def test_every_term_declares_what_it_reads_and_returns():
    for name in registered_terms():
        cls = term_class(name)
        assert cls.name == name and inspect.getsourcefile(cls).endswith(".py")
        assert cls.log_names(("teacher0",))[0] == name
        several = cls.log_names(("a", "b"))
        assert (f"{name}_a" in several) == cls.uses_teacher
