"""ONNX export of a plain nnU-Net network, its parity check against PyTorch and optional int8 quantisation.

``nnUNetv2_kd_export --onnx`` calls :func:`export_fold_onnx` for every exported fold: ``fold_X/model.onnx`` (and with
``--int8`` ``fold_X/model.int8.onnx``) plus ``fold_X/onnx_model.json``, which holds what the light predictor
(:mod:`nnunet_kd.onnx_predict`) needs besides plans.json and dataset.json: the configuration, the mirroring axes the
student was trained with, and the parity measured at export.
"""
from __future__ import annotations

import os
import warnings
from os.path import join

import numpy as np
import torch

from nnunet_kd.atomic_files import write_json_atomically
from nnunet_kd.onnx_predict import ONNX_RECORD_FILE

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAME = "data"
OUTPUT_NAME = "logits"
# Opset 17 is the newest one torch's TorchScript exporter writes without warnings and every onnxruntime >= 1.14 runs.
OPSET = 17
# ONNX Runtime and PyTorch sum convolutions in different orders: float32 logits differ by ~1e-6 of their scale on
# networks of this size. An export whose difference exceeds this fraction of the largest logit is refused.
PARITY_RELATIVE_TOLERANCE = 1e-4


class OnnxExportError(RuntimeError):
    pass


def export_network_onnx(network: torch.nn.Module, example: torch.Tensor, path: str, opset: int = OPSET) -> None:
    """Write ``network`` (inference mode, no deep supervision) to ``path``; batch and spatial axes are dynamic.

    Uses torch's TorchScript-based exporter (``dynamo=False``): it traces nnU-Net's U-Nets in seconds and declares the
    dynamic axes by name, so any patch size divisible by the network's strides runs (nnU-Net's sliding window always
    feeds the plans' patch size; a user who changes it in the plans needs no re-export). The dynamo exporter writes an
    equivalent graph but takes minutes per network on a 2-core CPU.
    """
    network = network.eval()
    spatial = {0: "batch", **{2 + i: f"spatial{i}" for i in range(example.ndim - 2)}}
    tmp = path + ".partial"
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream in favour of dynamo; instance norm warns that it is exported
        # in inference mode, which is what we want.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(network, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: spatial, OUTPUT_NAME: spatial})
    os.replace(tmp, path)


def onnx_session(path: str, threads: int | None = None, providers=None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=providers or ["CPUExecutionProvider"])


def max_logit_difference(network: torch.nn.Module, session, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """(max |ONNX - PyTorch| over ``inputs``, max |PyTorch logit|)."""
    worst, scale = 0.0, 0.0
    network = network.eval()
    for x in inputs:
        with torch.no_grad():
            reference = network(x).float().numpy()
        onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0]
        if onnx_out.shape != reference.shape:
            raise OnnxExportError(f"ONNX output shape {onnx_out.shape} != PyTorch {reference.shape} for input "
                                  f"{tuple(x.shape)}")
        worst = max(worst, float(np.abs(onnx_out - reference).max()))
        scale = max(scale, float(np.abs(reference).max()))
    return worst, scale


def calibration_patches(preprocessed_folder: str, patch_size, cases: int = 8, seed: int = 0) -> list[np.ndarray]:
    """One seeded patch-size crop (zero-padded where the case is smaller) from each of the first ``cases``
    preprocessed cases of ``preprocessed_folder`` (nnU-Net's ``<dataset>/<data_identifier>`` folder); a 2d
    configuration crops one random slice. Shape (1, channels, *patch_size) each, float32."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    dataset_class = infer_dataset_class(preprocessed_folder)
    identifiers = sorted(dataset_class.get_identifiers(preprocessed_folder))[:cases]
    rng = np.random.default_rng(seed)
    patches = []
    for case in identifiers:
        volume = np.asarray(dataset_class(preprocessed_folder, [case]).load_case(case)[0][:], dtype=np.float32)
        if len(patch_size) == 2:
            volume = volume[:, int(rng.integers(volume.shape[1]))]
        volume = np.pad(volume, [(0, 0)] + [(0, max(0, p - s)) for s, p in zip(volume.shape[1:], patch_size)])
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(volume.shape[1:], patch_size)]
        crop = volume[(slice(None), *(slice(a, a + p) for a, p in zip(start, patch_size)))]
        patches.append(np.ascontiguousarray(crop[None], dtype=np.float32))
    return patches


def quantize_int8(fp32_path: str, int8_path: str, patches: list[np.ndarray]) -> str:
    """Static int8 quantisation through ONNX Runtime's tools: QDQ format, per-channel int8 weights, uint8
    activations whose ranges are calibrated on ``patches`` (real preprocessed patches of the dataset).

    Static rather than dynamic: on a 2-core AVX2 CPU ONNX Runtime's dynamic quantisation (ConvInteger) made a 3d
    student several times slower than float32 (benchmarks/deploy_latency.py), static QDQ did not."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Patches(CalibrationDataReader):
        def __init__(self):
            self.items = iter(patches)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {INPUT_NAME: x}

    tmp = int8_path + ".partial.onnx"
    quantize_static(fp32_path, tmp, Patches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    os.replace(tmp, int8_path)
    return (f"onnxruntime.quantization.quantize_static: QDQ, per-channel QInt8 weights, QUInt8 activations "
            f"calibrated on {len(patches)} preprocessed patches")


def export_fold_onnx(network: torch.nn.Module, patch_size, num_input_channels: int, fold_folder: str, *,
                     configuration: str, checkpoint_name: str, mirroring_axes,
                     int8_calibration: list[np.ndarray] | None = None, seed: int = 0) -> dict:
    """Export, check parity on random patches of the plans' patch size (batch 1 and 2), record; with
    ``int8_calibration`` (patches, see :func:`calibration_patches`) also write the static int8 model.

    Raises OnnxExportError (and removes what it wrote) when the parity check fails.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (1, num_input_channels, *patch_size)
    example = torch.randn(shape, generator=generator)
    fp32_path = join(fold_folder, ONNX_FILE)
    export_network_onnx(network, example, fp32_path)
    checks = [example, torch.randn((2, *shape[1:]), generator=generator)]
    diff, scale = max_logit_difference(network, onnx_session(fp32_path), checks)
    tolerance = PARITY_RELATIVE_TOLERANCE * max(scale, 1.0)
    if not diff <= tolerance:
        os.remove(fp32_path)
        raise OnnxExportError(f"{fp32_path}: ONNX Runtime's logits differ from PyTorch's by {diff:.3g} (tolerance "
                              f"{tolerance:.3g}); the ONNX file was removed.")
    record = {
        "description": "ONNX export of this fold's network by nnUNetv2_kd_export --onnx; read by "
                       "nnUNetv2_kd_predict_onnx together with ../plans.json and ../dataset.json.",
        "configuration": configuration,
        "checkpoint": checkpoint_name,
        "onnx_file": ONNX_FILE,
        "opset": OPSET,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "num_input_channels": num_input_channels,
        "patch_size": [int(p) for p in patch_size],
        "inference_allowed_mirroring_axes": list(mirroring_axes) if mirroring_axes is not None else None,
        "parity": {"max_abs_logit_difference": diff, "max_abs_logit": scale, "tolerance": tolerance,
                   "inputs": [list(x.shape) for x in checks]},
    }
    if int8_calibration:
        int8_path = join(fold_folder, INT8_FILE)
        how = quantize_int8(fp32_path, int8_path, int8_calibration)
        int8_diff, _ = max_logit_difference(network, onnx_session(int8_path), [torch.from_numpy(p) for p in
                                                                               int8_calibration[:2]])
        record["int8_file"] = INT8_FILE
        record["int8"] = {"quantisation": how, "max_abs_logit_difference_on_calibration_patches": int8_diff}
    write_json_atomically(record, join(fold_folder, ONNX_RECORD_FILE), indent=2)
    return record
