"""Distillation terms: one small class per term, found through one registry.

A term (``base.DistillationTerm``) owns its typed settings (parsed and validated once, when the recipe is read), the
feature stages it taps, the trainable modules it needs (adapters: trained with the student, checkpointed, never
exported) and ``forward(step) -> {name: loss}``. The trainer only sums the named losses with the recipe's weights and
logs every one of them. Adding a term: one file here that calls ``register_term``, and its entry in the presets
(``plans/*.json``) of the methods that use it.
"""
from nnunet_kd.distill.base import (TERMS, DistillationTerm, TermContext, register_term, registered_terms,  # noqa: F401
                                    term_class)
from nnunet_kd.distill.step import DistillationStep, TeacherOutputs  # noqa: F401

# Importing the term files registers them, in logging order.
from nnunet_kd.distill import kl, lovasz, feature_hint, ffd, rgd  # noqa: E402,F401
from nnunet_kd.distill import multiscale_feature, contrastive  # noqa: E402,F401
