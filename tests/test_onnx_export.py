"""ONNX export: ONNX Runtime computes the network's logits (2D and 3D, plain and residual-encoder U-Nets, random and
real patches, any patch size the strides allow), and nnUNetv2_kd_predict_onnx writes what nnU-Net's own predictor
writes from a folder that holds no checkpoint, without the plugin's trainers or any other nnunet_kd module."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from os.path import basename, isdir, join

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from conftest import CONFIGURATION
from nnunet_kd.onnx_export import (INT8_FILE, ONNX_FILE, PARITY_RELATIVE_TOLERANCE, export_network_onnx,
                                   max_logit_difference, onnx_session)
from nnunet_kd.onnx_predict import ONNX_RECORD_FILE

pytest.importorskip("onnxruntime")
HIPPOCAMPUS = join(os.path.dirname(__file__), "..", "..", "shared", "data", "Dataset004_Hippocampus")


def small_unet(kind: str, dim: int) -> torch.nn.Module:
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    common = dict(input_channels=1, n_stages=3, features_per_stage=(4, 8, 16), conv_op=conv, kernel_sizes=3,
                  strides=(1, 2, 2), num_classes=3, n_conv_per_stage_decoder=(1, 1), conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=False)
    torch.manual_seed(0)
    if kind == "plain":
        network = PlainConvUNet(n_conv_per_stage=(2, 2, 2), **common)
    else:
        network = ResidualEncoderUNet(n_blocks_per_stage=(1, 2, 2), **common)
    for p in network.parameters():  # away from the initialisation's symmetric values, so a wrong op shows
        p.data.add_(0.05 * torch.randn_like(p))
    return network.eval()


def hippocampus_patch(dim: int, patch) -> torch.Tensor:
    image = sitk.GetArrayFromImage(sitk.ReadImage(join(HIPPOCAMPUS, "imagesTr", "hippocampus_001_0000.nii.gz")))
    image = (image - image.mean()) / image.std()  # nnU-Net's z-score normalisation for MRI
    volume = np.zeros((max(image.shape[0], patch[-3] if dim == 3 else 1), *(max(s, p) for s, p in
                                                                            zip(image.shape[1:], patch[-2:]))))
    volume[:image.shape[0], :image.shape[1], :image.shape[2]] = image
    if dim == 2:
        middle = image.shape[0] // 2
        crop = volume[middle, :patch[0], :patch[1]]
    else:
        crop = volume[:patch[0], :patch[1], :patch[2]]
    return torch.from_numpy(crop[None, None].astype(np.float32))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["plain", "residual_encoder"])
def test_onnx_runtime_logits_equal_pytorch_for_batch_and_patch_sizes_other_than_the_exported_one(tmp_path, kind, dim):
    network = small_unet(kind, dim)
    patch = (16, 24) if dim == 2 else (8, 16, 12)
    path = str(tmp_path / "model.onnx")
    export_network_onnx(network, torch.randn(1, 1, *patch), path)
    session = onnx_session(path)
    inputs = [torch.randn(1, 1, *patch), torch.randn(3, 1, *patch),
              torch.randn(2, 1, *(2 * p for p in patch))]  # dynamic batch and spatial axes
    difference, scale = max_logit_difference(network, session, inputs)
    assert scale > 0.1
    assert difference <= PARITY_RELATIVE_TOLERANCE * scale


@pytest.mark.skipif(not isdir(HIPPOCAMPUS), reason="real Hippocampus scans (../shared/data) absent")
@pytest.mark.parametrize("dim", [2, 3])
def test_onnx_runtime_logits_equal_pytorch_on_a_real_scan(tmp_path, dim):
    network = small_unet("residual_encoder", dim)
    patch = (56, 40) if dim == 2 else (32, 48, 40)
    x = hippocampus_patch(dim, patch)
    path = str(tmp_path / "model.onnx")
    export_network_onnx(network, torch.randn_like(x), path)
    difference, scale = max_logit_difference(network, onnx_session(path), [x])
    assert difference <= PARITY_RELATIVE_TOLERANCE * scale


def test_a_wrong_graph_fails_the_parity_check(tmp_path):
    network = small_unet("plain", 2)
    path = str(tmp_path / "model.onnx")
    export_network_onnx(network, torch.randn(1, 1, 16, 24), path)
    with torch.no_grad():
        network.decoder.seg_layers[-1].bias.add_(1.0)  # the ONNX file no longer matches the network
    difference, scale = max_logit_difference(network, onnx_session(path), [torch.randn(1, 1, 16, 24)])
    assert difference > PARITY_RELATIVE_TOLERANCE * scale


def _read(folder: str, suffix: str) -> dict:
    return {basename(f): f for f in sorted(glob.glob(join(folder, "*" + suffix)))}


FLOAT16_UNIT_ROUNDOFF = 2.0 ** -11  # relative rounding of a normal float16
FLOAT16_SUBNORMAL_ROUNDING = 2.0 ** -25  # absolute rounding below float16's smallest normal (half its 2^-24 step)


def logit_bound_of_nnunets_float16_window_sum(model_folder: str, onnx_folder: str, images: str) -> dict:
    """Per test case, per voxel: how far apart the logits of nnU-Net's predictor and of the ONNX predictor can be.

    Both run nnU-Net's sliding window, which sums each voxel's Gaussian-weighted window predictions in float16 and
    divides by the float16 sum of the weights N. Each of a voxel's k additions rounds by at most
    FLOAT16_UNIT_ROUNDOFF * N * L (L: the largest |logit|) or, where the Gaussian underflows towards a patch's border,
    by FLOAT16_SUBNORMAL_ROUNDING; the division rounds once more. So each side is within
    k * (u * L + s / N) + u * L + s of its network's mean prediction, and the two networks' predictions differ by
    delta, measured here on every window of the real test images (in float32, mirroring included). Returns
    case -> (bound array on the preprocessed grid, delta, L)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from nnunet_kd.onnx_predict import OnnxPredictor
    torch_predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    torch_predictor.initialize_from_trained_model_folder(model_folder, (0,), "checkpoint_final.pth")
    onnx_predictor = OnnxPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    onnx_predictor.initialize_from_onnx_folder(onnx_folder)
    configuration = torch_predictor.configuration_manager
    preprocessor = configuration.preprocessor_class(verbose=False)
    # the predictor's own float16 weights (values that underflow are raised to the smallest one, as there)
    gaussian = compute_gaussian(tuple(configuration.patch_size), sigma_scale=1. / 8, value_scaling_factor=10,
                                device=torch.device("cpu"))
    bounds = {}
    for case in sorted({basename(f)[:-len("_0000.nii.gz")] for f in glob.glob(join(images, "*_0000.nii.gz"))}):
        data, _, _ = preprocessor.run_case(sorted(glob.glob(join(images, case + "_[0-9][0-9][0-9][0-9].nii.gz"))),
                                           None, torch_predictor.plans_manager, configuration,
                                           torch_predictor.dataset_json)
        padded, revert = pad_nd_image(torch.from_numpy(data), configuration.patch_size, "constant", {"value": 0},
                                      True, None)
        weight_sum = torch.zeros(padded.shape[1:], dtype=torch.half)  # N, summed as the predictor sums it
        exact_sum = torch.zeros(padded.shape[1:], dtype=torch.float64)
        windows = torch.zeros(padded.shape[1:], dtype=torch.float64)
        delta = largest = 0.0
        with torch.no_grad():
            for slicer in torch_predictor._internal_get_sliding_window_slicers(padded.shape[1:]):
                patch = padded[slicer][None]
                a = torch_predictor._internal_maybe_mirror_and_predict(patch)
                b = onnx_predictor._internal_maybe_mirror_and_predict(patch)
                delta = max(delta, float((a - b).abs().max()))
                largest = max(largest, float(a.abs().max()))
                weight_sum[slicer[1:]] += gaussian
                exact_sum[slicer[1:]] += gaussian.double()
                windows[slicer[1:]] += 1
        n = weight_sum.double()
        u, s = FLOAT16_UNIT_ROUNDOFF, FLOAT16_SUBNORMAL_ROUNDING
        per_side = windows * (u * largest + s / n) + u * largest + s
        bound = delta * exact_sum / n + 2 * per_side
        bounds[case] = (bound[revert[1:]].numpy(), delta, largest)
    return bounds


def test_export_onnx_and_the_light_predictor_write_what_nnunet_predicts(workspace, tmp_path):
    ws = workspace
    exported = str(tmp_path / "exported")
    ws.run("nnUNetv2_kd_export", "-i", ws.teacher_folder, "-o", exported, "--onnx", "--int8")
    record = load_json(join(exported, "fold_0", ONNX_RECORD_FILE))
    assert record["configuration"] == CONFIGURATION and record["checkpoint"] == "checkpoint_final.pth"
    assert record["parity"]["max_abs_logit_difference"] <= record["parity"]["tolerance"]
    assert os.path.getsize(join(exported, "fold_0", ONNX_FILE)) > 0
    assert os.path.getsize(join(exported, "fold_0", INT8_FILE)) > 0
    ckpt = torch.load(join(exported, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert record["inference_allowed_mirroring_axes"] == list(ckpt["inference_allowed_mirroring_axes"])

    images = join(ws.raw, "imagesTs")
    no_plugin = {k: v for k, v in ws.env.items() if k != "nnUNet_extTrainer"}
    torch_pred = str(tmp_path / "torch")
    ws.run("nnUNetv2_predict_from_modelfolder", "-i", images, "-o", torch_pred, "-m", exported, "-f", "0",
           "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities", env=no_plugin)

    # The ONNX folder alone: no checkpoint, no nnUNet_extTrainer, and a copy of the predictor module that cannot
    # import any other part of nnunet_kd.
    onnx_only = str(tmp_path / "onnx_only")
    shutil.copytree(exported, onnx_only, ignore=shutil.ignore_patterns("*.pth"))
    assert not glob.glob(join(onnx_only, "**", "*.pth"), recursive=True)
    standalone = tmp_path / "standalone"
    standalone.mkdir()
    shutil.copy(join(os.path.dirname(__file__), "..", "nnunet_kd", "onnx_predict.py"), standalone / "onnx_predict.py")
    block_plugin = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nnunet_kd' or name.startswith('nnunet_kd.'):\n"
        "            raise ImportError('nnunet_kd is not installed here: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = ['onnx_predict'] + sys.argv[1:]\n"
        f"runpy.run_path({str(standalone / 'onnx_predict.py')!r}, run_name='__main__')\n")
    onnx_pred, int8_pred = str(tmp_path / "onnx"), str(tmp_path / "int8")
    for out, extra in ((onnx_pred, []), (int8_pred, ["--int8"])):
        subprocess.run([sys.executable, "-c", block_plugin, "-i", images, "-o", out, "-m", onnx_only,
                        "-device", "cpu", "--save_probabilities", *extra], env={**os.environ, **no_plugin}, check=True)

    torch_segs, onnx_segs = _read(torch_pred, ".nii.gz"), _read(onnx_pred, ".nii.gz")
    assert len(torch_segs) == 2 and torch_segs.keys() == onnx_segs.keys() == _read(int8_pred, ".nii.gz").keys()
    # The light predictor runs nnU-Net's pipeline with ONNX Runtime in place of PyTorch: on every window of the test
    # images the two networks agree within the export's parity tolerance, and the files differ by no more than
    # nnU-Net's float16 window sum can move a logit there (a softmax probability moves by at most half the largest
    # logit change). Where the window weights are large (most voxels) that bound is small, so a wrong input, mirroring
    # or output would show; near patch borders the Gaussian underflows and nnU-Net itself resolves logits coarsely.
    bounds = logit_bound_of_nnunets_float16_window_sum(exported, onnx_only, images)
    for name in torch_segs:
        a, b = (sitk.ReadImage(d[name]) for d in (torch_segs, onnx_segs))
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
        p_torch = np.load(join(torch_pred, name.replace(".nii.gz", ".npz")))["probabilities"]
        p_onnx = np.load(join(onnx_pred, name.replace(".nii.gz", ".npz")))["probabilities"]
        assert p_torch.shape == p_onnx.shape and p_torch.shape[1:] == sitk.GetArrayFromImage(a).shape
        logit_bound, delta, largest = bounds[name[:-len(".nii.gz")]]
        assert delta <= record["parity"]["tolerance"], (delta, record["parity"])
        # the test images need no resampling or cropping: the preprocessed grid is the files' grid
        assert logit_bound.shape == p_torch.shape[1:]
        assert np.median(logit_bound) < 0.02, np.median(logit_bound)  # a bound with teeth where the weights are large
        worst = np.abs(p_torch - p_onnx).max(axis=0)
        # float32 softmax of float16 logits on each side adds at most a few float32 steps
        assert (worst <= 0.5 * logit_bound + 1e-6).all(), (float(worst.max()), float(logit_bound.min()), delta, largest)


def test_onnx_predictor_names_the_missing_export_and_int8_needs_onnx(workspace, tmp_path):
    from nnunet_kd.export import ExportError, export_student
    with pytest.raises(ExportError, match="--int8 quantises the ONNX export: pass --onnx"):
        export_student(workspace.teacher_folder, str(tmp_path / "x"), int8=True)
    with pytest.raises(ExportError, match="calibrates activation ranges on the preprocessed training data"):
        export_student(workspace.teacher_folder, str(tmp_path / "x"), onnx=True, int8=True,
                       int8_calibration_folder=str(tmp_path / "no_such_folder"))
    assert not os.path.exists(tmp_path / "x")
    plain = str(tmp_path / "plain")
    export_student(workspace.teacher_folder, plain)  # a plain export, no ONNX file
    result = subprocess.run([sys.executable, "-m", "nnunet_kd.onnx_predict", "-i", join(workspace.raw, "imagesTs"),
                             "-o", str(tmp_path / "pred"), "-m", plain], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{plain}/fold_0/{ONNX_RECORD_FILE}" in result.stderr or "has no fold_X/" in result.stderr
    assert "nnUNetv2_kd_export" in result.stderr and "--onnx" in result.stderr
    assert not os.path.exists(tmp_path / "pred")
