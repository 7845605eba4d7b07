"""Where the shipped `trainers/` and `plans/` folders are, installed or in a source checkout.

`pip install .` copies the repository's top-level `trainers/` and `plans/` into the package as
`nnunet_kd/trainers` and `nnunet_kd/plans` (see setup.py's package_dir). In a source checkout or an
editable install they stay beside the package, at the repository root.
"""
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped_folder(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"nnunet_kd's '{name}' folder is missing (looked in {_PACKAGE_DIR / name} and {_PACKAGE_DIR.parent / name}). "
        f"Reinstall the plugin: pip install --force-reinstall <nnunet-kd checkout>")


def trainers_dir() -> Path:
    """The folder to put in nnUNet_extTrainer: nnU-Net imports our thin trainer classes from here."""
    return _shipped_folder("trainers")


def recipes_dir() -> Path:
    """The folder of student-plan recipe presets (one JSON per distillation method)."""
    return _shipped_folder("plans")


def print_trainers_dir() -> None:
    """Console entry point `nnUNetv2_kd_trainers_dir`: export nnUNet_extTrainer="$(nnUNetv2_kd_trainers_dir)"."""
    print(trainers_dir())
