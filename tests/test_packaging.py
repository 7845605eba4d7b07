"""`pip install .` (what CI and users run, not an editable install) must ship every subpackage of nnunet_kd."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_packages() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no packages=[...] list")


def test_setup_py_lists_every_subpackage_of_nnunet_kd():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nnunet_kd").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert on_disk <= _setup_packages(), f"add {sorted(on_disk - _setup_packages())} to setup.py's packages"
    # trainers/ and plans/ are installed inside the package (package_dir), where nnUNet_extTrainer points
    assert {"nnunet_kd.trainers", "nnunet_kd.plans"} <= _setup_packages()
