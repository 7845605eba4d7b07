"""``nnUNetv2_kd_predict_onnx``: nnU-Net's prediction pipeline with the network run by ONNX Runtime.

Everything except the network is nnU-Net's own code (``nnUNetPredictor``): its preprocessor and resampling, the
sliding window with its Gaussian weighting and step size, test-time mirroring over the axes the model was trained
with, and ``export_prediction_from_logits``, so the files written are the ones ``nnUNetv2_predict`` writes. The
network is an ONNX file written by ``nnUNetv2_kd_export --onnx``; no checkpoint is unpickled and no trainer class
is looked up, so the model folder needs neither this plugin's trainers nor ``nnUNet_extTrainer``.

This module imports only nnunetv2, torch, numpy and onnxruntime (nothing else of nnunet_kd), so it runs from a copy
of this one file beside an nnU-Net installation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from os.path import isdir, isfile, join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

ONNX_RECORD_FILE = "onnx_model.json"


class OnnxPredictionError(RuntimeError):
    pass


class OnnxNetwork(torch.nn.Module):
    """Stands in for the PyTorch network inside nnUNetPredictor: one ONNX Runtime session per fold.

    nnUNetPredictor ensembles folds by calling ``network.load_state_dict(parameters)`` before each fold's sliding
    window; here the "parameters" name the fold whose session runs next.
    """

    def __init__(self, sessions: dict, input_name: str, output_name: str):
        super().__init__()
        self.sessions = sessions
        self.input_name, self.output_name = input_name, output_name
        self.current = next(iter(sessions))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.current = state_dict["onnx_fold"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        logits = self.sessions[self.current].run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(logits).to(x.device)


def read_onnx_record(fold_folder: str) -> dict:
    path = join(fold_folder, ONNX_RECORD_FILE)
    if not isfile(path):
        raise OnnxPredictionError(f"{path} not found: this is not an ONNX export. Write one with "
                                  f"nnUNetv2_kd_export -i <student model folder> -o <folder> --onnx.")
    with open(path) as f:
        return json.load(f)


def _sessions_options(threads: int | None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise OnnxPredictionError(f"-device {device.type}: this onnxruntime has no CUDAExecutionProvider (it has "
                                  f"{ort.get_available_providers()}); install onnxruntime-gpu or use -device cpu.")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxPredictor(nnUNetPredictor):
    def initialize_from_onnx_folder(self, model_folder: str, use_folds=None, int8: bool = False,
                                    threads: int | None = None) -> None:
        import onnxruntime as ort
        for name in ("plans.json", "dataset.json"):
            if not isfile(join(model_folder, name)):
                raise OnnxPredictionError(f"{join(model_folder, name)} not found: -m must be a folder written by "
                                          f"nnUNetv2_kd_export --onnx.")
        if use_folds is None:
            use_folds = sorted(d[len("fold_"):] for d in os.listdir(model_folder)
                               if d.startswith("fold_") and isfile(join(model_folder, d, ONNX_RECORD_FILE)))
            if not use_folds:
                raise OnnxPredictionError(f"{model_folder} has no fold_X/{ONNX_RECORD_FILE}: export the student with "
                                          f"nnUNetv2_kd_export -i <student model folder> -o {model_folder} --onnx.")
        records = {f"fold_{f}": read_onnx_record(join(model_folder, f"fold_{f}")) for f in use_folds}
        first = next(iter(records.values()))
        for fold, record in records.items():
            for key in ("configuration", "inference_allowed_mirroring_axes", "input_name", "output_name"):
                if record[key] != first[key]:
                    raise OnnxPredictionError(f"{model_folder}: {fold} has {key}={record[key]!r} but the first fold has "
                                              f"{first[key]!r}; predict with folds of one model (-f).")
        options, providers = _sessions_options(threads), _providers(self.device)
        sessions = {}
        for fold, record in records.items():
            key = "int8_file" if int8 else "onnx_file"
            if key not in record:
                raise OnnxPredictionError(f"{join(model_folder, fold)} has no int8 model: export it with "
                                          f"nnUNetv2_kd_export ... --onnx --int8, or predict without --int8.")
            sessions[fold] = ort.InferenceSession(join(model_folder, fold, record[key]), sess_options=options,
                                                  providers=providers)
        plans_manager = PlansManager(load_json(join(model_folder, "plans.json")))
        network = OnnxNetwork(sessions, first["input_name"], first["output_name"])
        mirroring = first["inference_allowed_mirroring_axes"]
        self.manual_initialization(network, plans_manager, plans_manager.get_configuration(first["configuration"]),
                                   [{"onnx_fold": fold} for fold in sessions],
                                   load_json(join(model_folder, "dataset.json")), "onnx",
                                   tuple(mirroring) if mirroring is not None else None)
        self.network = network  # never torch.compile an ONNX Runtime call (nnUNet_compile may be set)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_kd_predict_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, help="Input folder of images named like nnU-Net's imagesTs "
                                                  "(CASE_0000.nii.gz, ...)")
    parser.add_argument("-o", required=True, help="Output folder (created)")
    parser.add_argument("-m", required=True, help="Model folder written by nnUNetv2_kd_export --onnx")
    parser.add_argument("-f", nargs="+", default=None, help="Folds to ensemble (default: every exported fold)")
    parser.add_argument("-step_size", type=float, default=0.5, help="Sliding-window step as a fraction of the patch "
                                                                    "size (nnU-Net's default 0.5)")
    parser.add_argument("--disable_tta", action="store_true", help="No test-time mirroring (faster, as in "
                                                                   "nnUNetv2_predict)")
    parser.add_argument("--int8", action="store_true", help="Run fold_X/model.int8.onnx (written by "
                                                            "nnUNetv2_kd_export --onnx --int8)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch threads (default: ONNX "
                                                                  "Runtime's choice, all physical cores)")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--save_probabilities", action="store_true")
    parser.add_argument("--continue_prediction", action="store_true", help="Skip cases already predicted")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not isdir(args.i):
        parser.error(f"-i {args.i} is not a folder of images.")
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = OnnxPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                              perform_everything_on_device=args.device == "cuda", device=torch.device(args.device),
                              verbose=args.verbose, allow_tqdm=False)
    try:
        predictor.initialize_from_onnx_folder(args.m, args.f, int8=args.int8, threads=args.threads)
    except (OnnxPredictionError, ImportError) as e:
        print(f"nnUNetv2_kd_predict_onnx: error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.o, exist_ok=True)
    predictor.predict_from_files_sequential(args.i, args.o, save_probabilities=args.save_probabilities,
                                            overwrite=not args.continue_prediction)


if __name__ == "__main__":
    main()
