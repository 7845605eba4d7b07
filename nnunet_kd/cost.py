"""Cost of a network: what users choose a student on (parameters, FLOPs per patch, sliding-window inference time).

* :func:`count_parameters` counts ``module.parameters()``, not the state dict: nnU-Net's U-Nets keep a reference to
  the encoder inside the decoder, so the state dict holds every encoder tensor twice (``encoder.*`` and
  ``decoder.encoder.*``).
* :func:`count_flops` uses torch's own :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as
  2 FLOPs), on the ``meta`` device when possible so that it costs no compute.
"""
from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from typing import Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "count_parameters",
    "count_flops",
    "build_network_from_plans",
    "network_cost",
    "make_predictor",
    "median_inference_seconds",
    "format_count",
]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (each shared tensor counted once)."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


def _flops_on(network: nn.Module, input_shape: Tuple[int, ...], device: Union[str, torch.device]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(device)
    net = copy.deepcopy(network).to(device)
    net.eval()
    with torch.no_grad():
        if device.type == "meta":
            x = torch.empty(input_shape, dtype=torch.float32, device=device)
        else:
            x = torch.zeros(input_shape, dtype=torch.float32, device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            net(x)
    return int(counter.get_total_flops())


def count_flops(network: nn.Module, input_shape: Sequence[int], device: Union[str, torch.device] = "meta") -> int:
    """FLOPs of one forward pass (eval mode) of ``network`` on an input of shape ``input_shape`` (batch included).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as 2 FLOPs and only
    counts the ops it knows (convolutions, transposed convolutions, matmuls, attention); norms and nonlinearities
    are not counted. The network is deep-copied, never modified. With ``device='meta'`` (default) nothing is
    computed; if some op has no meta implementation this falls back to a real forward pass on the CPU.
    """
    input_shape = tuple(int(i) for i in input_shape)
    if torch.device(device).type == "meta":
        try:
            return _flops_on(network, input_shape, "meta")
        except Exception:  # some op without a meta kernel / data-dependent control flow: do it for real on the CPU
            return _flops_on(network, input_shape, "cpu")
    return _flops_on(network, input_shape, device)


def build_network_from_plans(plans: dict, dataset_json: dict, configuration: str,
                             deep_supervision: bool = False) -> nn.Module:
    """Build the network that nnU-Net builds for ``configuration`` of ``plans`` (freshly initialised)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(copy.deepcopy(plans))
    configuration_manager = plans_manager.get_configuration(configuration)
    num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_output_channels = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=deep_supervision,
    )


def network_cost(plans: dict, dataset_json: dict, configuration: str) -> dict:
    """Parameters and FLOPs of one forward pass on one patch (batch size 1) of ``configuration``.

    Returns ``{'parameters': int, 'flops_per_patch': int, 'patch_size': [..], 'input_channels': int,
    'output_channels': int}``.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    network = build_network_from_plans(plans, dataset_json, configuration, deep_supervision=False)
    plans_manager = PlansManager(copy.deepcopy(plans))
    configuration_manager = plans_manager.get_configuration(configuration)
    patch_size = [int(i) for i in configuration_manager.patch_size]
    in_ch = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    return {
        "parameters": count_parameters(network),
        "flops_per_patch": count_flops(network, (1, in_ch, *patch_size)),
        "patch_size": patch_size,
        "input_channels": int(in_ch),
        "output_channels": int(plans_manager.get_label_manager(dataset_json).num_segmentation_heads),
    }


def make_predictor(model_folder: str, fold: Union[int, str], checkpoint_name: str = "checkpoint_final.pth",
                   device: Union[str, torch.device] = torch.device("cpu"), use_mirroring: bool = False,
                   tile_step_size: float = 0.5):
    """An initialised :class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor` for one fold of a
    trained model folder (the folder holding ``plans.json``, ``dataset.json`` and ``fold_X/``).

    nnU-Net's ``initialize_from_trained_model_folder`` unpickles the checkpoint with ``weights_only=False``, i.e.
    runs whatever code a poisoned file carries. This loads the checkpoint with ``weights_only=True``
    (:func:`nnunet_kd.teacher.load_nnunet_checkpoint`, which raises TeacherError naming the file) and builds the
    network as nnU-Net does, then hands it to the predictor (``manual_initialization``): nnU-Net never unpickles it.
    """
    from os.path import join

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.teacher import (TeacherError, build_trained_network, load_nnunet_checkpoint, segmentation_part,
                                   strip_wrapper_prefixes)

    device = torch.device(device)
    checkpoint_file = join(model_folder, f"fold_{fold}", checkpoint_name)
    checkpoint = load_nnunet_checkpoint(checkpoint_file)
    plans_file, dataset_json_file = join(model_folder, "plans.json"), join(model_folder, "dataset.json")
    plans_manager = PlansManager(load_json(plans_file))
    dataset_json = load_json(dataset_json_file)
    configuration = checkpoint.get("init_args", {}).get("configuration")
    trainer_name = checkpoint.get("trainer_name", "nnUNetTrainer")
    if configuration not in plans_manager.available_configurations:
        raise TeacherError(f"{checkpoint_file} was trained with configuration {configuration!r}, which {plans_file} "
                           f"does not define. The model folder is inconsistent: copy the whole folder nnUNetv2_train "
                           f"wrote.")
    configuration_manager = plans_manager.get_configuration(configuration)
    # a multi-task teacher predicts (and is costed) through its segmentation network, without its auxiliary head
    trainer_name, weights = segmentation_part(trainer_name, strip_wrapper_prefixes(checkpoint["network_weights"]))
    network = build_trained_network(trainer_name, plans_manager, configuration_manager, dataset_json, weights,
                                    checkpoint_file, plans_file, deep_supervision=False)

    # nnUNetPredictor prints a misleading 'Setting this to False' note for every non-cuda device; keep it quiet
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
    predictor.manual_initialization(network, plans_manager, configuration_manager, [weights], dataset_json,
                                    trainer_name, checkpoint.get("inference_allowed_mirroring_axes"))
    return predictor


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def seconds_with_range(median_s: float, min_s: float | None = None, max_s: float | None = None,
                       digits: int = 3) -> str:
    """'0.770 [0.716-0.888]': a median time and the range of the timed runs it came from; the median alone when there
    is no range (one run). The one wording of a timing in every table this project writes."""
    if min_s is None or max_s is None:
        return f"{median_s:.{digits}f}"
    return f"{median_s:.{digits}f} [{min_s:.{digits}f}-{max_s:.{digits}f}]"


def median_inference_seconds(predictor, data: torch.Tensor, repeats: int = 3, warmup: int = 1) -> dict:
    """Time ``predictor.predict_sliding_window_return_logits(data)`` (data: preprocessed, shape (c, x, y, z)).

    Runs ``warmup`` untimed calls, then ``repeats`` timed ones (wall clock, device synchronised). Returns
    ``{'median_s': float, 'all_s': [float, ...]}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not isinstance(data, torch.Tensor):
        data = torch.as_tensor(data)
    device = torch.device(getattr(predictor, "device", "cpu"))
    for _ in range(warmup):
        predictor.predict_sliding_window_return_logits(data)
        _synchronize(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        t0 = time.perf_counter()
        predictor.predict_sliding_window_return_logits(data)
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": float(statistics.median(times)), "all_s": [float(t) for t in times]}


def format_count(n: Union[int, float], precision: int = 2) -> str:
    """Human-readable count for tables: ``1234567 -> '1.23 M'``, ``4.56e9 -> '4.56 G'``, ``512 -> '512'``."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    suffixes = ("", "k", "M", "G", "T", "P")
    i = 0
    while i + 1 < len(suffixes) and n >= 1000 ** (i + 1):
        i += 1
    # 999999 -> '1.00 M', not '1000.00 k'
    if i > 0 and i + 1 < len(suffixes) and round(n / 1000 ** i, precision) >= 1000:
        i += 1
    if i == 0:
        return f"{sign}{int(n)}" if n == int(n) else f"{sign}{n:.{precision}f}"
    return f"{sign}{n / 1000 ** i:.{precision}f} {suffixes[i]}"
