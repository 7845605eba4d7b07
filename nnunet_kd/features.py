"""Capturing intermediate feature maps of nnU-Net's U-Nets with forward hooks.

Stage names are ``encoder.<i>`` (output of ``network.encoder.stages[i]``: the skip at resolution level i;
``encoder.-1`` is the bottleneck) and ``decoder.<i>`` (output of ``network.decoder.stages[i]``; decoder stage 0
is the lowest resolution, ``decoder.-1`` the full-resolution one right before the segmentation layer). This
holds for PlainConvUNet and ResidualEncoderUNet (dynamic_network_architectures), whatever their width or
depth per stage, so a teacher and a student of different classes can be tapped at the same levels.

Hooks keep a reference to the module output (no copy); the dict is overwritten on every forward pass.
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureStageError(ValueError):
    pass


def _unwrap(network: nn.Module) -> nn.Module:
    # torch.compile (OptimizedModule) and DDP wrap the network; the stages live on the original module.
    for attr in ("_orig_mod", "module"):
        while hasattr(network, attr) and isinstance(getattr(network, attr), nn.Module):
            network = getattr(network, attr)
    return network


def stage_modules(network: nn.Module) -> dict[str, nn.Module]:
    """All tappable stages of a U-Net, keyed by canonical (non-negative) stage name."""
    net = _unwrap(network)
    encoder_stages = getattr(getattr(net, "encoder", None), "stages", None)
    decoder_stages = getattr(getattr(net, "decoder", None), "stages", None)
    if encoder_stages is None or decoder_stages is None:
        raise FeatureStageError(
            f"{type(net).__name__} has no encoder.stages / decoder.stages, so its features cannot be tapped. "
            f"Feature-based distillation supports nnU-Net's U-Nets (PlainConvUNet, ResidualEncoderUNet); set the "
            f"feature weights of the recipe to 0 for other architectures.")
    stages = {f"encoder.{i}": m for i, m in enumerate(encoder_stages)}
    stages.update({f"decoder.{i}": m for i, m in enumerate(decoder_stages)})
    return stages


def canonical_stage_name(name: str, network: nn.Module) -> str:
    """'encoder.-1' -> 'encoder.5' for a 6-stage encoder. Raises FeatureStageError for unknown names."""
    try:
        part, index = name.split(".")
        index = int(index)
        if part not in ("encoder", "decoder"):
            raise ValueError
    except ValueError:
        raise FeatureStageError(f"Feature stage '{name}' is not of the form 'encoder.<i>' or 'decoder.<i>'.") from None
    stages = stage_modules(network)
    count = sum(1 for k in stages if k.startswith(part + "."))
    if not -count <= index < count:
        raise FeatureStageError(f"Feature stage '{name}' does not exist: the {part} has {count} stages "
                                f"(valid: {part}.0 .. {part}.{count - 1}, or negative indices).")
    return f"{part}.{index % count}"


class FeatureTaps:
    """Forward hooks that store the outputs of chosen stages in ``self.features`` on every forward pass."""

    def __init__(self, network: nn.Module, stage_names: list[str]):
        modules = stage_modules(network)
        self.stage_names = [canonical_stage_name(n, network) for n in stage_names]
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._store(name)) for name in self.stage_names]

    def _store(self, name: str):
        def hook(module, inputs, output):
            self.features[name] = output
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass; the taps forget them (nothing outlives the step)."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
