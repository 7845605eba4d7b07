import copy
import json
import os

import pytest
import torch
from torch import nn

from nnunet_kd.cost import _flops_on  # noqa: F401  (private, used to check the meta path itself)
from nnunet_kd.cost import (build_network_from_plans, count_flops, count_parameters, format_count,
                            make_predictor, median_inference_seconds, network_cost,
                            seconds_with_range)

PATCH = [8, 16, 16]
DATASET_JSON = {
    "channel_names": {"0": "T2"},
    "labels": {"background": 0, "peripheral_zone": 1, "transition_zone": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}


def small_plans():
    """A hand-written minimal nnU-Net v2 plans dict with one tiny 3d_fullres PlainConvUNet configuration."""
    return {
        "dataset_name": "Dataset991_SynthTest",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 0.8, 0.8],
        "original_median_shape_after_transp": [24, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "label_manager": "LabelManager",
        "experiment_planner_used": "ExperimentPlanner",
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH),
                "median_image_size_in_voxels": [24, 64, 64],
                "spacing": [3.0, 0.8, 0.8],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": 3,
                        "features_per_stage": [4, 8, 16],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1, 1],
                        "n_conv_per_stage_decoder": [1, 1],
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0, "percentile_00_5": 0.0,
                  "percentile_99_5": 1.0, "std": 0.2}},
    }


def test_count_parameters_hand_count():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv3d(2, 1, 1))
    assert count_parameters(net) == (1 * 2 * 27 + 2) + (2 * 1 * 1 + 1)


def test_count_flops_single_conv():
    net = nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=False)
    assert count_flops(net, (1, 1, 4, 4)) == 2 * 9 * 16
    assert count_flops(net, (1, 1, 4, 4), device="cpu") == 288
    assert count_flops(net, (3, 1, 4, 4)) == 3 * 288  # batch included


def test_count_flops_leaves_network_untouched():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5))
    net.train()
    before = copy.deepcopy(net.state_dict())
    count_flops(net, (1, 1, 8, 8))
    assert net.training
    assert all(p.device.type == "cpu" for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_count_flops_falls_back_to_cpu_when_meta_fails():
    class NeedsRealData(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)

        def forward(self, x):
            if x.device.type == "meta":
                raise NotImplementedError("no meta kernel")
            return self.conv(x)

    assert count_flops(NeedsRealData(), (1, 1, 4, 4)) == 288


def test_unet_from_plans_parameters_and_flops():
    plans = small_plans()
    net = build_network_from_plans(plans, DATASET_JSON, "3d_fullres")
    assert type(net).__name__ == "PlainConvUNet"
    n_params = count_parameters(net)
    n_state = sum(v.numel() for v in net.state_dict().values())
    # nnU-Net's state dict holds decoder.encoder.* duplicates; counting parameters must not
    assert any(k.startswith("decoder.encoder.") for k in net.state_dict())
    assert 0 < n_params < n_state
    # meta device count == real CPU count
    shape = (1, 1, *PATCH)
    f_meta = count_flops(net, shape, device="meta")
    f_cpu = count_flops(net, shape, device="cpu")
    assert f_meta == f_cpu > 0
    # ... and the meta path really works for nnU-Net's U-Net (no silent fallback to the CPU)
    assert _flops_on(net, shape, "meta") == f_meta
    # the plans dict is not modified
    assert plans == small_plans()

    cost = network_cost(plans, DATASET_JSON, "3d_fullres")
    assert cost["parameters"] == n_params
    assert cost["flops_per_patch"] == f_meta
    assert cost["patch_size"] == PATCH
    # deep supervision changes the heads, not the parameter count of the shared body
    net_ds = build_network_from_plans(plans, DATASET_JSON, "3d_fullres", deep_supervision=True)
    assert isinstance(net_ds(torch.zeros(shape)), (list, tuple))


def test_predictor_and_timing(tmp_path):
    plans = small_plans()
    net = build_network_from_plans(plans, DATASET_JSON, "3d_fullres")
    model_folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model_folder / "fold_0").mkdir(parents=True)
    with open(model_folder / "plans.json", "w") as f:
        json.dump(plans, f)
    with open(model_folder / "dataset.json", "w") as f:
        json.dump(DATASET_JSON, f)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               os.path.join(model_folder, "fold_0", "checkpoint_final.pth"))

    predictor = make_predictor(str(model_folder), 0)
    assert predictor.device.type == "cpu" and not predictor.use_mirroring
    assert list(predictor.configuration_manager.patch_size) == PATCH
    data = torch.randn(1, 10, 20, 18)
    logits = predictor.predict_sliding_window_return_logits(data)
    assert tuple(logits.shape) == (3, 10, 20, 18)
    res = median_inference_seconds(predictor, data, repeats=3, warmup=1)
    assert len(res["all_s"]) == 3 and all(t > 0 for t in res["all_s"])
    assert min(res["all_s"]) <= res["median_s"] <= max(res["all_s"])
    with pytest.raises(ValueError):
        median_inference_seconds(predictor, data, repeats=0)


@pytest.mark.parametrize("n,expected", [(0, "0"), (512, "512"), (1234, "1.23 k"), (1_234_567, "1.23 M"),
                                        (4.56e9, "4.56 G"), (999_999, "1.00 M"), (2.5e12, "2.50 T")])
def test_format_count(n, expected):
    assert format_count(n) == expected


def test_every_timing_table_writes_a_median_and_its_range_one_way():
    assert seconds_with_range(0.7704, 0.7163, 0.8881) == "0.770 [0.716-0.888]"
    assert seconds_with_range(0.0512, 0.05, 0.0601, digits=2) == "0.05 [0.05-0.06]"
    assert seconds_with_range(0.7704) == "0.770"  # one timed run: no range to show


class _Payload:
    """Pickled into a 'poisoned' checkpoint: unpickling it without weights_only runs os.makedirs(marker)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _model_folder_with_checkpoint(tmp_path, checkpoint: dict | bytes):
    plans = small_plans()
    model_folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model_folder / "fold_0").mkdir(parents=True)
    (model_folder / "plans.json").write_text(json.dumps(plans))
    (model_folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    path = model_folder / "fold_0" / "checkpoint_final.pth"
    if isinstance(checkpoint, bytes):
        path.write_bytes(checkpoint)
    else:
        torch.save(checkpoint, path)
    return str(model_folder), str(path)


def test_predictor_never_unpickles_a_poisoned_checkpoint(tmp_path):
    from nnunet_kd.compare import inference_seconds
    from nnunet_kd.teacher import UnsafeCheckpointError

    net = build_network_from_plans(small_plans(), DATASET_JSON, "3d_fullres")
    marker = str(tmp_path / "payload_ran")
    folder, path = _model_folder_with_checkpoint(tmp_path, {
        "network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
        "init_args": {"configuration": "3d_fullres"}, "payload": _Payload(marker)})
    # make_predictor (the benchmark's --student and the comparison's inference timing) and the comparison itself
    for build in (lambda: make_predictor(folder, 0),
                  lambda: inference_seconds(folder, 0, torch.zeros(1, 8, 16, 16), "cpu", repeats=1)):
        with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_final\.pth holds Python objects") as error:
            build()
        assert path in str(error.value) and "re-save the checkpoint" in str(error.value)
        assert not os.path.exists(marker)
    # The file really is poisoned: nnU-Net's own loader (weights_only=False) runs the payload.
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    nnUNetPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(folder, (0,))
    assert os.path.exists(marker)


def test_predictor_reports_random_bytes_as_a_corrupt_checkpoint(tmp_path):
    from nnunet_kd.teacher import CorruptCheckpointError

    folder, path = _model_folder_with_checkpoint(tmp_path, bytes(range(256)) * 20)
    with pytest.raises(CorruptCheckpointError, match=r"is not a readable PyTorch checkpoint.*corrupt or truncated"):
        make_predictor(folder, 0)
