"""Correct at scale: the terms' trainable modules (adapters) stay identical on every DDP rank (nnU-Net wraps only the
student in DistributedDataParallel), and the feature taps work on a torch.compile'd network (nnU-Net compiles by
default on CUDA)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_kd.distill.sync import average_gradients, broadcast_parameters
from nnunet_kd.features import FeatureTaps
from nnunet_kd.losses.feature import FeatureAdapter, feature_mse


def _rank_data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batch, as under DDP
    return torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 6, 6, 6, generator=g)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial adapters on purpose
        adapter = FeatureAdapter(4, 6, dim=2)
        parameters = list(adapter.parameters())
        broadcast_parameters(parameters)
        optimizer = torch.optim.SGD(parameters, lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            student, teacher = _rank_data(rank)
            feature_mse(adapter(student), teacher).backward()
            average_gradients(parameters)
            optimizer.step()
        torch.save({k: v.detach().clone() for k, v in adapter.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # both ranks have written their weights and need the connection no more
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: its teardown (destroy_process_group, then the C++ destructors at interpreter
    # exit) aborted rank 0 with "terminate called without an active exception" in two full-suite runs (2026-12-06
    # here, and CI of stop 37) even after this barrier, while everything this test checks was already on disk.
    # The teardown is torch's, not this project's; nnU-Net's DDP training calls it itself.
    os._exit(0)


def test_adapters_stay_identical_across_two_gloo_ranks_and_follow_the_mean_gradient(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

    # The same two steps in one process on the mean of the two ranks' losses, from rank 0's initial weights.
    torch.manual_seed(0)
    adapter = FeatureAdapter(4, 6, dim=2)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        loss = sum(feature_mse(adapter(s), t) for s, t in (_rank_data(r) for r in range(world))) / world
        loss.backward()
        optimizer.step()
    for k, v in adapter.state_dict().items():
        assert torch.allclose(states[0][k], v, atol=1e-6), k


def _tiny_unet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv2d,
                         kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1, num_classes=2,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=True)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler, and none is installed")
def test_feature_taps_capture_the_stages_of_a_compiled_network_with_gradients():
    torch.manual_seed(0)
    network = _tiny_unet()
    stages = ["encoder.-1", "decoder.-1"]
    x = torch.randn(2, 1, 16, 16)
    eager_taps = FeatureTaps(network, stages)
    eager_out = network(x)
    eager = eager_taps.pop()
    eager_taps.remove()

    taps = FeatureTaps(network, stages)  # registered on the module, before compiling, as the trainer does
    compiled = torch.compile(network)
    out = compiled(x)
    features = taps.pop()
    assert sorted(features) == ["decoder.1", "encoder.2"]
    for name in features:
        assert torch.allclose(features[name], eager[name], atol=1e-4), name
    assert torch.allclose(out[0], eager_out[0], atol=1e-4)
    # the tapped features carry the graph: a feature term trains the compiled student
    features["decoder.1"].pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.decoder.stages[1].parameters())
