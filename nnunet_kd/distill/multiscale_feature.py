"""Multi-scale feature distillation (multi-task multi-scale contrastive KD, arXiv 2406.03173): feature hints at chosen
encoder stages, at the bottleneck and at chosen decoder stages, one term per scale so that each scale has its own
weight in the recipe (``weights.feature_encoder`` / ``feature_bottleneck`` / ``feature_decoder``), its own logged
loss, and can be ablated alone (weight 0).

Each is the feature hint of nnunet_kd.distill.feature_hint (per stage MSE(1x1 adapter(student), teacher), one
trained adapter per (teacher, stage), checkpointed, never exported), reading its stages from its own recipe key.
"""
from __future__ import annotations

from nnunet_kd.distill.base import TermSettingsError, register_term
from nnunet_kd.distill.feature_hint import FeatureHint, FeatureHintSettings


class _ScaleFeatureHint(FeatureHint):
    """A feature hint whose stages come from ``stages_key`` and must belong to ``part`` (encoder or decoder)."""
    stages_key: str
    part: str

    @classmethod
    def parse_settings(cls, section: dict) -> FeatureHintSettings:
        stages = tuple(section[cls.stages_key])
        wrong = [s for s in stages if not s.startswith(cls.part + ".")]
        if wrong:
            raise TermSettingsError(f"{cls.stages_key} names {wrong}, which are not {cls.part} stages "
                                    f"('{cls.part}.<i>', negative i counting from the end).")
        if cls.part == "encoder" and "encoder.-1" in stages:
            raise TermSettingsError(f"{cls.stages_key} names the bottleneck 'encoder.-1', which has its own term "
                                    f"(weights.feature_bottleneck): list the higher-resolution encoder stages only.")
        return FeatureHintSettings(stages=stages)


@register_term
class EncoderFeatureHint(_ScaleFeatureHint):
    name = "feature_encoder"
    setting_keys = ("encoder_feature_stages",)
    stages_key, part = "encoder_feature_stages", "encoder"


@register_term
class BottleneckFeatureHint(_ScaleFeatureHint):
    """The lowest-resolution encoder stage, ``encoder.-1``: the recipe cannot point it anywhere else."""
    name = "feature_bottleneck"
    setting_keys = ()
    stages_key, part = "", "encoder"

    @classmethod
    def parse_settings(cls, section: dict) -> FeatureHintSettings:
        return FeatureHintSettings(stages=("encoder.-1",))


@register_term
class DecoderFeatureHint(_ScaleFeatureHint):
    name = "feature_decoder"
    setting_keys = ("decoder_feature_stages",)
    stages_key, part = "decoder_feature_stages", "decoder"
