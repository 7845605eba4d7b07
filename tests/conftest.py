"""Shared fixture: a real nnU-Net workspace (generated dataset, nnU-Net planning and preprocessing, a briefly
trained teacher and student plans), built once per test session in a temporary folder."""
from __future__ import annotations

from os.path import join

import pytest

from nnunet_kd.pipeline import console_script, model_folder, nnunet_env, run, write_budget_plans
from nnunet_kd.synthetic import make_synthetic_prostate_dataset

DATASET_ID = 991
DATASET_NAME = "Dataset991_KDTest"
CONFIGURATION = "3d_fullres"
TEACHER_PLANS = "nnUNetPlans_testteacher"
STUDENT_PLANS = "nnUNetPlans_teststudent"
# nnU-Net's own network and loss at the plans' budget: the teacher folder is a plain nnU-Net model.
TEACHER_TRAINER = "nnUNetTrainerBudget"


class Workspace:
    def __init__(self, root: str):
        self.root = root
        self.env = nnunet_env(root)
        self.preprocessed = join(self.env["nnUNet_preprocessed"], DATASET_NAME)
        self.results = self.env["nnUNet_results"]
        self.raw = join(self.env["nnUNet_raw"], DATASET_NAME)
        self.teacher_folder = model_folder(self.results, DATASET_NAME, TEACHER_TRAINER, TEACHER_PLANS, CONFIGURATION)

    def run(self, *command: str, env: dict | None = None) -> None:
        run(console_script(command[0]) + list(command[1:]), env or self.env, join(self.root, "commands.log"))

    def student_folder(self, trainer: str, plans: str = STUDENT_PLANS) -> str:
        return model_folder(self.results, DATASET_NAME, trainer, plans, CONFIGURATION)

    def set_env(self, monkeypatch) -> None:
        """The same nnU-Net folders for code running inside the test process."""
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
            monkeypatch.setenv(key, self.env[key])


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    ws = Workspace(str(tmp_path_factory.mktemp("nnunet_kd_workspace")))
    make_synthetic_prostate_dataset(ws.env["nnUNet_raw"], dataset_id=DATASET_ID, dataset_name="KDTest",
                                    num_training=10, num_test=2, shape=(16, 48, 48), seed=1)
    plan_env = {k: v for k, v in ws.env.items() if k != "nnUNet_n_proc_DA"}  # nnU-Net's planner rejects 0 here
    ws.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "1", env=plan_env)
    write_budget_plans(ws.preprocessed, "nnUNetPlans", TEACHER_PLANS, CONFIGURATION, num_epochs=1,
                       iterations_per_epoch=3, val_iterations_per_epoch=1)
    ws.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", TEACHER_TRAINER, "-p", TEACHER_PLANS,
           "-device", "cpu")
    ws.run("nnUNetv2_kd_plan_student", "-d", str(DATASET_ID), "-c", CONFIGURATION, "--teacher", ws.teacher_folder,
           "--width", "0.25", "-o", STUDENT_PLANS, "--epochs", "1", "--iterations-per-epoch", "3",
           "--val-iterations-per-epoch", "1")
    return ws


def pytest_collection_modifyitems(config, items):
    # The session fixture trains a teacher (about a minute on a 2-core CPU): run the fast tensor tests first.
    items.sort(key=lambda item: "workspace" in getattr(item, "fixturenames", ()))
