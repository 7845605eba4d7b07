"""MSKD inside nnU-Net: the structured terms train in the real nnUNetv2_train, the ablations switch terms off, and
the deployed student has exactly the plain student's parameters (MSKD adds none)."""
from __future__ import annotations

from os.path import join

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import CONFIGURATION, DATASET_ID, STUDENT_PLANS
from nnunet_kd.cost import build_network_from_plans, count_parameters
from test_teacher_and_bad_inputs import make_trainer


def test_mskd_trains_in_nnunet_and_exports_exactly_the_plain_student(workspace):
    ws = workspace
    ws.run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", "nnUNetTrainerMSKD", "-p", STUDENT_PLANS,
           "-device", "cpu")
    student = ws.student_folder("nnUNetTrainerMSKD")
    checkpoint = torch.load(join(student, "fold_0", "checkpoint_final.pth"), weights_only=False)
    for term in ("kd_segmentation", "kd_ffd", "kd_rgd"):
        assert len(checkpoint["logging"][term]) == 1 and np.isfinite(checkpoint["logging"][term][0])
    assert checkpoint["logging"]["kd_ffd"][0] > 0 and checkpoint["logging"]["kd_rgd"][0] > 0
    assert "kd_kl" not in checkpoint["logging"]  # logit KL is optional and off in the preset
    assert checkpoint["kd_modules"] == {} and len(checkpoint["optimizer_state"]["param_groups"]) == 1

    ws.run("nnUNetv2_kd_export", "-i", student, "-o", join(ws.root, "mskd_exported"))
    exported = torch.load(join(ws.root, "mskd_exported", "fold_0", "checkpoint_final.pth"), weights_only=False)
    plans = load_json(join(ws.preprocessed, STUDENT_PLANS + ".json"))
    plain = build_network_from_plans(plans, load_json(join(ws.preprocessed, "dataset.json")), CONFIGURATION)
    plain.load_state_dict(exported["network_weights"])  # strict: the same tensors, no more, no fewer
    assert {k: v.shape for k, v in exported["network_weights"].items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    assert sum(v.numel() for v in exported["network_weights"].values()) == \
        sum(v.numel() for v in plain.state_dict().values())
    assert count_parameters(plain) == sum(p.numel() for n, p in plain.named_parameters())


@pytest.mark.parametrize("trainer, terms", [
    ("nnUNetTrainerMSKD", ["segmentation", "ffd", "rgd"]),
    ("nnUNetTrainerMSKD_FFD", ["segmentation", "ffd"]),
    ("nnUNetTrainerMSKD_RGD", ["segmentation", "rgd"]),
])
def test_mskd_ablations_select_their_terms_and_add_no_parameters(workspace, monkeypatch, trainer, terms):
    kd = make_trainer(workspace, monkeypatch, trainer=trainer)
    kd.initialize()
    assert kd.loss_terms == terms
    assert count_parameters(kd.distillation) == 0
    plain = make_trainer(workspace, monkeypatch, trainer="nnUNetTrainerKD_NoKD")
    plain.initialize()
    assert count_parameters(kd.network) == count_parameters(plain.network)
    patch = kd.configuration_manager.patch_size
    labels = torch.randint(0, 3, (2, 1, *patch)).float()
    target = [torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest")
              for s in kd._get_deep_supervision_scales()]
    out = kd.train_step({"data": torch.randn(2, 1, *patch), "target": target})
    assert all(torch.isfinite(out["terms"][t]) and out["terms"][t] > 0 for t in terms)
    if "rgd" in terms:  # its parts are logged too
        assert {"rgd_node", "rgd_edge", "rgd_voxel"} <= set(out["terms"])
