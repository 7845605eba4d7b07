"""Where the shipped `trainers/` and `plans/` folders are, installed or in a source checkout.

`pip install .` copies the repository's top-level `trainers/` and `plans/` into the package as
`nnunet_kd/trainers` and `nnunet_kd/plans` (see setup.py's package_dir). In a source checkout or an
editable install they stay beside the package, at the repository root.
"""
import argparse
import os
import sys
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


EXPORT_LINE = 'export nnUNet_extTrainer="$(nnUNetv2_kd_trainers_dir)"'


def print_trainers_dir(argv=None) -> None:
    """Console entry point `nnUNetv2_kd_trainers_dir`: export nnUNet_extTrainer="$(nnUNetv2_kd_trainers_dir)"."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_kd_trainers_dir", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the folder that holds nnunet-kd's trainer classes (nnUNetTrainerKD_Adaptive, "
                    "nnUNetTrainerKD_Logit,\nnnUNetTrainerBudget, nnUNetTrainerMSKD, ...). nnU-Net finds a -tr "
                    "trainer outside its own package only\nin the folders listed in nnUNet_extTrainer, so run, "
                    "before nnUNetv2_train / nnUNetv2_predict with a KD trainer:\n\n"
                    f"    {EXPORT_LINE}")
    parser.parse_args(sys.argv[1:] if argv is None else argv)  # --help: usage, exit 0; anything else: exit 2
    print(trainers_dir())


def _same_folder(a: str, b: Path) -> bool:
    try:
        return Path(a.strip()).expanduser().resolve() == b.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def ext_trainer_problem(environ=None) -> str | None:
    """Why nnUNetv2_train / nnUNetv2_predict would not find this installation's KD trainers; None if they would.

    nnU-Net 2.8.1 has no registration mechanism for external trainers: it searches its own package folder on disk,
    then each folder in nnUNet_extTrainer (os.pathsep-separated), so the variable must name our trainers folder.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("nnUNet_extTrainer", "")
    ours = trainers_dir()
    if not value.strip():
        return ("nnUNet_extTrainer is not set, so nnUNetv2_train and nnUNetv2_predict cannot find the KD trainers "
                "(-tr nnUNetTrainerKD_Adaptive, nnUNetTrainerKD_Logit, nnUNetTrainerBudget, nnUNetTrainerMSKD, ...).")
    if any(_same_folder(p, ours) for p in value.split(os.pathsep) if p.strip()):
        return None
    return (f"nnUNet_extTrainer={value} does not include this installation's trainers folder {ours}: "
            f"nnUNetv2_train and nnUNetv2_predict would not find the KD trainers, or would use other copies of them "
            f"(to keep your other trainer folders: {EXPORT_LINE[:-1]}{os.pathsep}$nnUNet_extTrainer\").")


def warn_ext_trainer(prog: str, note: str = "", environ=None, file=None) -> bool:
    """Print a warning naming the export line when nnUNet_extTrainer misses our trainers; True if it warned."""
    problem = ext_trainer_problem(environ)
    if problem is None:
        return False
    print(f"\n{prog}: warning: {problem}{(' ' + note) if note else ''}\n"
          f"Run this before nnUNetv2_train / nnUNetv2_predict with a KD trainer (-tr nnUNetTrainerKD_...):\n"
          f"    {EXPORT_LINE}", file=sys.stderr if file is None else file, flush=True)
    return True
