"""The one place where distillation meets nnU-Net: teacher loading, feature taps, deep supervision, logging
and checkpointing. Trainer classes in ``trainers/`` subclass ``nnUNetTrainerKD`` and only name their method.

Per training step:  L = w_seg * nnU-Net's deep-supervised loss + sum_term w_term * term,
with the terms of the recipe's method (weights from the student plans, see nnunet_kd.recipe):
  kl       T^2 KL(teacher || student) per deep-supervision output, weighted like nnU-Net's outputs
           (per-region binary KL for region-based datasets), averaged over voxels or, with
           kl_reduction=class_balanced, per ground-truth class at that output's resolution
  lovasz   Lovasz-softmax (Lovasz-sigmoid per region) on the full-resolution output
  feature  sum over recipe stages of MSE(1x1 adapter(student feature), teacher feature)
  ffd      MSKD Feature Filtering Distillation, summed over the recipe's mskd_stages
  rgd      MSKD Region Graph Distillation (nodes, edges, voxel-to-prototype), summed over mskd_stages
The ignore label is masked out of every term. The teacher runs once per step (logits and features from the
same pass), frozen and without gradients, under the same autocast as the student.
"""
from __future__ import annotations

import os
import random
from os.path import dirname, isfile, join

import numpy as np
import torch
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunet_kd.cost import count_parameters
from nnunet_kd.features import FeatureTaps
from nnunet_kd.losses.feature import FeatureAdapter, FeatureDistillationLoss
from nnunet_kd.losses.kl import LogitKLLoss, label_teacher_logits
from nnunet_kd.losses.lovasz import LovaszSoftmaxLoss
from nnunet_kd.losses.mskd import FeatureFilteringDistillation, RegionGraphDistillation
from nnunet_kd.progress import KDLocalLogger, term_key
from nnunet_kd.recipe import parse_recipe, plans_file_path
from nnunet_kd.provenance import record_training_cases
from nnunet_kd.teacher import (CorruptCheckpointError, TeacherError, atomic_torch_save, build_frozen_teacher,
                               check_teacher_compatible, load_nnunet_checkpoint, locate_teacher, strip_wrapper_prefixes,
                               teacher_training_cases)

# Checkpoint keys of our own, next to nnU-Net's. nnU-Net's predictor reads only 'network_weights', so the
# student checkpoint stays loadable by plain nnU-Net; nnUNetv2_kd_export removes these keys altogether.
ADAPTERS_KEY = "kd_adapters"
RECIPE_KEY = "kd_recipe"
# The checkpoints nnU-Net's --c chooses from (run_training: final, else latest, else best), in that order.
RESUMABLE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite: training stops instead of training a NaN student to the end."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class nnUNetTrainerKD(nnUNetTrainer):
    """Base class of every distillation trainer. ``kd_method`` names the recipe section it trains with."""

    kd_method = "none"
    # Terms a method may use, in logging order; the recipe's weights switch them on (weight > 0).
    kd_supported_terms = ("kl", "lovasz", "feature", "ffd", "rgd")
    # Where the soft targets come from: "network" (the frozen teacher) or "labels" (the one-hot ground truth, the
    # label-teacher control: the same terms with no teacher knowledge, isolating what class re-weighting alone does).
    kd_teacher_source = "network"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Read the recipe before nnU-Net creates the results folder, so a plans file without a valid recipe
        # leaves nothing behind on disk.
        preprocessed_base = join(nnUNet_preprocessed, plans["dataset_name"]) if nnUNet_preprocessed.is_set() else None
        self.kd_plans_file = plans_file_path(preprocessed_base, plans["plans_name"])
        self.kd_recipe = parse_recipe(plans, configuration, self.kd_method, self.kd_plans_file)
        if self.kd_recipe.seed is not None:
            seed_everything(self.kd_recipe.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)

        self.num_epochs = self.kd_recipe.num_epochs
        self.num_iterations_per_epoch = self.kd_recipe.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.kd_recipe.num_val_iterations_per_epoch
        self.kd_terms = ["segmentation"] + [t for t in self.kd_supported_terms if self.kd_recipe.weight(t) > 0]
        self.kd_weights = {t: (self.kd_recipe.weight(t) if self.kd_method != "none" else 1.0) for t in self.kd_terms}
        self.logger.local_logger = KDLocalLogger(self.kd_terms)

        self.teacher = None
        self.kd_adapters = nn.ModuleDict()  # trained with the student, never part of self.network
        self.student_taps = self.teacher_taps = None
        self.kd_losses = {}

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        super().initialize()
        if self.kd_method != "none":
            self._setup_distillation()

    def on_train_start(self):
        super().on_train_start()
        record_training_cases(self)  # what this fold trained on, for the leakage guard of a later student

    def _setup_distillation(self):
        recipe = self.kd_recipe
        if len(self.kd_terms) == 1:  # segmentation only (a re-weighted plain student): nothing to distil from
            self.print_to_log_file(f"Method '{self.kd_method}': no distillation term, loss weights {self.kd_weights}.")
            return
        if self.kd_teacher_source == "labels":
            self._setup_label_teacher()
            return
        teacher_fold = recipe.teacher.fold_for_student(self.fold)
        teacher, checkpoint = locate_teacher(recipe.teacher.model_folder, teacher_fold, recipe.teacher.checkpoint)
        check_teacher_compatible(teacher, self.plans_manager, self.configuration_manager, self.dataset_json,
                                 self.kd_plans_file, join(self.preprocessed_dataset_folder_base, "dataset.json"))
        self._check_teacher_did_not_train_on_validation(teacher)
        self.teacher = build_frozen_teacher(teacher, checkpoint, self.device)
        del checkpoint

        temperature = self._setup_logit_losses()

        if {"ffd", "rgd"} & set(self.kd_terms):
            self._setup_structured_distillation()
        stages = self.kd_feature_stages()
        if stages:
            self.student_taps = FeatureTaps(self.network, stages)
            self.teacher_taps = FeatureTaps(self.teacher.network, stages)
        shapes = self._probe_shapes()
        if "feature" in self.kd_terms:
            dim = len(self.configuration_manager.patch_size)
            self.kd_adapters = nn.ModuleDict({
                name.replace(".", "_"): FeatureAdapter(shapes["student"][name][1], shapes["teacher"][name][1], dim)
                for name in self._canonical(self._stages_of("feature"))}).to(self.device)
            self.kd_losses["feature"] = FeatureDistillationLoss(self.kd_adapters)
            self.optimizer.add_param_group({"params": list(self.kd_adapters.parameters())})

        self.print_to_log_file(
            f"Distillation method '{self.kd_method}' from teacher {teacher.checkpoint_file} "
            f"(configuration {teacher.configuration}, trainer {teacher.trainer_name}): teacher "
            f"{count_parameters(self.teacher):,} parameters, student {count_parameters(self.network):,}, adapters "
            f"{count_parameters(self.kd_adapters):,} (not exported). Loss weights {self.kd_weights}, "
            f"temperature {temperature}, feature stages {stages}.")

    def _setup_label_teacher(self):
        if {"feature", "ffd", "rgd"} & set(self.kd_terms):
            raise TeacherError(f"Method '{self.kd_method}' takes its soft targets from the labels, which have no "
                               f"features: set the feature, ffd and rgd weights to 0 in {self.kd_plans_file}.")
        temperature = self._setup_logit_losses()
        self.print_to_log_file(f"Method '{self.kd_method}': soft targets are the one-hot ground truth (no teacher). "
                               f"Loss weights {self.kd_weights}, temperature {temperature}.")

    def _setup_logit_losses(self) -> float:
        """The logit KL and the Lovasz term of the recipe (whatever gives the soft targets); returns T."""
        settings, region_based = self.kd_recipe.settings, self.label_manager.has_regions
        temperature = float(settings.get("temperature", 1.0))
        self.kd_losses["kl"] = LogitKLLoss(temperature=temperature, region_based=region_based,
                                           reduction=settings.get("kl_reduction", "voxel"))
        self.kd_losses["lovasz"] = LovaszSoftmaxLoss(region_based=region_based)
        return temperature

    def _label_teacher_logits(self, target) -> list:
        """The ground truth as logits, per deep-supervision level (nnunet_kd.losses.kl.label_teacher_logits)."""
        temperature = float(self.kd_recipe.settings["temperature"])
        outputs = []
        for level in (target if isinstance(target, (list, tuple)) else [target]):
            labels, valid = self._split_target(level)
            outputs.append(label_teacher_logits(labels, self.label_manager.num_segmentation_heads, temperature,
                                                valid, region_based=self.label_manager.has_regions))
        return outputs

    def _setup_structured_distillation(self):
        if self.label_manager.has_regions:
            raise TeacherError(f"MSKD's region prototypes need one label per voxel, but this dataset is region-based "
                               f"(overlapping sigmoid outputs). Use nnUNetTrainerKD_Adaptive for it, or set the ffd and "
                               f"rgd weights to 0 in {self.kd_plans_file}.")
        settings, num_classes = self.kd_recipe.settings, self.label_manager.num_segmentation_heads
        self.kd_losses["ffd"] = FeatureFilteringDistillation(
            num_classes, boundary_width=int(settings["ffd_boundary_width"]),
            include_background=settings["ffd_include_background"])
        self.kd_losses["rgd"] = RegionGraphDistillation(
            num_classes, include_background=settings["rgd_include_background"],
            node_weight=settings["rgd_node_weight"], edge_weight=settings["rgd_edge_weight"],
            voxel_weight=settings["rgd_voxel_weight"])

    def _stages_of(self, term: str) -> list[str]:
        key = "feature_stages" if term == "feature" else "mskd_stages"
        return list(self.kd_recipe.settings.get(key, [])) if term in self.kd_terms else []

    def kd_feature_stages(self) -> list[str]:
        """Stages whose features the method's terms need (the same names on teacher and student)."""
        stages = []
        for term in ("feature", "ffd", "rgd"):
            stages += [s for s in self._stages_of(term) if s not in stages]
        return stages

    def _check_teacher_did_not_train_on_validation(self, teacher):
        """A teacher that saw the student's validation cases leaks them into the student: refuse by default."""
        _, val_keys = self.do_split()
        trained_on = teacher_training_cases(teacher, student_dataset_folder=self.preprocessed_dataset_folder_base,
                                            log=self.print_to_log_file,
                                            allow_other_dataset=self.kd_recipe.teacher.allow_validation_overlap)
        allow = self.kd_recipe.teacher.allow_validation_overlap
        flag = (f"set \"allow_validation_overlap\": true under {self.plans_manager.plans_name}'s "
                f"kd.{self.configuration_name}.teacher in {self.kd_plans_file} (nnUNetv2_kd_plan_student "
                f"--allow-validation-overlap) to accept this")
        if trained_on is None:
            message = (f"Cannot tell which cases teacher fold {teacher.fold} was trained on: no usable "
                       f"splits_final.json for dataset {teacher.plans.get('dataset_name')} under nnUNet_preprocessed.")
            overlap = None
        else:
            overlap = sorted(set(val_keys) & trained_on)
            message = (f"Teacher fold {teacher.fold} ({teacher.checkpoint_file}) was trained on {len(overlap)} of the "
                       f"student's {len(val_keys)} fold-{self.fold} validation cases (e.g. {overlap[:5]}): the student's "
                       f"validation Dice would be inflated by the teacher's memory of them.")
        if overlap == []:
            return
        if not allow:
            raise TeacherError(f"{message} Use the teacher fold that matches the student's fold (the default, "
                               f"teacher fold \"same\"), or {flag}.")
        self.print_to_log_file(f"WARNING: {message} Accepted because allow_validation_overlap is set.")

    def _canonical(self, stages: list[str]) -> list[str]:
        from nnunet_kd.features import canonical_stage_name
        return [canonical_stage_name(s, self.network) for s in stages]

    def _probe_shapes(self) -> dict:
        """One no-grad pass of both networks on a zero patch: checks they agree and gives adapter channel counts."""
        was_training = self.network.training
        self.network.eval()  # BatchNorm statistics must not see the probe
        x = torch.zeros((1, self.num_input_channels, *self.configuration_manager.patch_size), device=self.device)
        with torch.no_grad():
            student_out = self.network(x)
            teacher_out = self.teacher(x)
        self.network.train(was_training)
        shapes = {"student": {}, "teacher": {}}
        if self.student_taps is not None:
            shapes["student"] = {k: tuple(v.shape) for k, v in self.student_taps.pop().items()}
            shapes["teacher"] = {k: tuple(v.shape) for k, v in self.teacher_taps.pop().items()}
            for name in self.student_taps.stage_names:
                if shapes["student"][name][2:] != shapes["teacher"][name][2:]:
                    raise TeacherError(
                        f"Feature stage '{name}' has spatial shape {shapes['student'][name][2:]} in the student but "
                        f"{shapes['teacher'][name][2:]} in the teacher: the two networks downsample differently. "
                        f"Choose stages at the same resolution in {self.kd_plans_file}.")
        student_out = student_out if isinstance(student_out, (list, tuple)) else [student_out]
        if self.kd_recipe.settings.get("kl_deep_supervision") and self.enable_deep_supervision:
            if [o.shape for o in student_out] != [o.shape for o in teacher_out[:len(student_out)]] or \
                    len(teacher_out) != len(student_out):
                raise TeacherError(
                    f"The teacher's deep-supervision outputs {[tuple(o.shape) for o in teacher_out]} do not match "
                    f"the student's {[tuple(o.shape) for o in student_out]}. Set kl_deep_supervision to false in "
                    f"{self.kd_plans_file} to distil the full-resolution output only.")
        return shapes

    # ------------------------------------------------------------------ training step
    def _autocast(self):
        # nnU-Net's rule: autocast on CUDA only (on CPU it is slow; on MPS unsupported).
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _trainable_parameters(self):
        return list(self.network.parameters()) + list(self.kd_adapters.parameters())

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            student_out = self.network(data)
            terms = {"segmentation": self.loss(student_out, target)}
            if self.teacher is not None or (self.kd_teacher_source == "labels" and len(self.kd_terms) > 1):
                student_features = self.student_taps.pop() if self.student_taps else {}
                if self.teacher is not None:
                    teacher_out = self.teacher(data)  # one pass gives logits and (through the taps) features
                else:
                    teacher_out = self._label_teacher_logits(target)
                teacher_features = self.teacher_taps.pop() if self.teacher_taps else {}
                terms.update(self.distillation_terms(student_out, teacher_out, student_features, teacher_features,
                                                     target))
            total = sum(self.kd_weights[name] * terms[name] for name in self.kd_terms)

        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._trainable_parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(self._trainable_parameters(), 12)
            self.optimizer.step()
        # Stay on the device: one host transfer per epoch (on_train_epoch_end), not one per step.
        return {"loss": total.detach(), "terms": torch.stack([terms[n].detach().float() for n in self.kd_terms])}

    def _split_target(self, target: torch.Tensor):
        """(target without the ignore channel, valid-voxel mask or None) for one deep-supervision level."""
        lm = self.label_manager
        if not lm.has_ignore_label:
            return target, None
        if lm.has_regions:  # nnU-Net appends the ignore mask as the last region channel
            return target[:, :-1], ~target[:, -1:].bool()
        return target, target != lm.ignore_label

    def distillation_terms(self, student_out, teacher_out, student_features, teacher_features, target) -> dict:
        """Unweighted distillation terms of this step, keyed by term name. Subclasses add their own."""
        student_out = list(student_out) if isinstance(student_out, (list, tuple)) else [student_out]
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        split = [self._split_target(t) for t in targets]
        masks = [m for _, m in split]
        terms = {}
        if "kl" in self.kd_terms:
            terms["kl"] = self._kl_term(student_out, teacher_out, masks, [t for t, _ in split])
        if "lovasz" in self.kd_terms:
            terms["lovasz"] = self.kd_losses["lovasz"](student_out[0], split[0][0], masks[0])
        if "feature" in self.kd_terms:
            stages = self._canonical(self._stages_of("feature"))
            per_stage = self.kd_losses["feature"](
                {k.replace(".", "_"): student_features[k] for k in stages},
                {k.replace(".", "_"): teacher_features[k] for k in stages}, masks[0])
            terms["feature"] = sum(per_stage.values())
        if "ffd" in self.kd_terms or "rgd" in self.kd_terms:
            labels, valid = split[0][0], masks[0]
            confident = None
            if "ffd" in self.kd_terms and self.kd_recipe.settings.get("ffd_teacher_confidence"):
                # Keep only voxels the teacher segments correctly: its mistakes are not worth imitating.
                confident = teacher_out[0].argmax(1, keepdim=True) == labels.long()
            for term in ("ffd", "rgd"):
                if term not in self.kd_terms:
                    continue
                values = []
                for stage in self._canonical(self._stages_of(term)):
                    if term == "ffd":
                        values.append(self.kd_losses["ffd"](student_features[stage], teacher_features[stage], labels,
                                                            valid, confident))
                    else:
                        values.append(self.kd_losses["rgd"](student_features[stage], teacher_features[stage], labels,
                                                            valid)["total"])
                terms[term] = sum(values)
        return terms

    def _kl_term(self, student_out, teacher_out, masks, labels):
        settings = self.kd_recipe.settings
        kl = self.kd_losses["kl"]
        if settings.get("kl_deep_supervision") and self.enable_deep_supervision and len(student_out) > 1:
            # The same per-output weights as nnU-Net's segmentation loss (highest resolution first).
            value = DeepSupervisionWrapper(kl, self.loss.weight_factors)(student_out, list(teacher_out), masks, labels)
        else:
            value = kl(student_out[0], teacher_out[0], masks[0], labels[0])
        if settings.get("kl_mean_over_classes"):
            value = value / student_out[0].shape[1]
        return value

    # ------------------------------------------------------------------ logging
    def on_train_epoch_end(self, train_outputs: list[dict]):
        losses = torch.stack([o["loss"] for o in train_outputs]).float().mean()
        terms = torch.stack([o["terms"] for o in train_outputs]).mean(0)
        if self.is_ddp:
            stacked = torch.cat([losses[None], terms])
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
            losses, terms = stacked[0], stacked[1:]
        self.logger.log("train_losses", float(losses.cpu()), self.current_epoch)
        for name, value in zip(self.kd_terms, terms.cpu().tolist()):
            self.logger.log(term_key(name), value, self.current_epoch)
        self._stop_on_nonfinite_loss(float(losses.cpu()), dict(zip(self.kd_terms, terms.cpu().tolist())))

    def _stop_on_nonfinite_loss(self, total: float, term_means: dict) -> None:
        """Once per epoch, on the logged means: a NaN/Inf in any step makes its term's mean non-finite. Raised before
        nnU-Net's on_epoch_end, so no checkpoint of this epoch (with possibly NaN weights) is written."""
        bad = {name: value for name, value in term_means.items() if not np.isfinite(value)}
        if not bad and np.isfinite(total):
            return
        fixes = []
        if "segmentation" in bad:
            fixes.append("for 'segmentation' (nnU-Net's Dice+CE): check the preprocessed data for NaN/Inf voxels and "
                         "lower the learning rate")
        kd_bad = [name for name in bad if name != "segmentation"]
        if kd_bad:
            teacher = self.kd_recipe.teacher.model_folder if self.kd_recipe.teacher is not None else "-"
            fixes.append(f"for {kd_bad}: lower their weights (0 switches a term off) under kd.{self.configuration_name}"
                         f".methods.{self.kd_method}.weights in {self.kd_plans_file} (nnUNetv2_kd_plan_student --set "
                         f"methods.{self.kd_method}.weights.<term>=...) and check the teacher ({teacher})")
        message = (f"Training stopped in epoch {self.current_epoch}: the loss term(s) "
                   f"{sorted(bad) or ['total']} became non-finite (per-term epoch means: "
                   f"{ {k: float(v) for k, v in term_means.items()} }, total {total}). Continuing would train a NaN "
                   f"student to the end. No checkpoint of this epoch was written; the last one in {self.output_folder} "
                   f"is from before. Fix: {'; '.join(fixes) or 'lower the learning rate'}; then resume with --c or "
                   f"start again.")
        self.print_to_log_file(f"ERROR: {message}")
        raise NonFiniteLossError(message)

    def on_epoch_end(self):
        self.print_to_log_file("train loss terms (unweighted):", ", ".join(
            f"{name} {self.logger.get_value(term_key(name), step=-1):.4f}" for name in self.kd_terms))
        super().on_epoch_end()

    # ------------------------------------------------------------------ checkpoints
    def _student_module(self) -> nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net's checkpoint layout, plus the adapters and the recipe under keys of their own. The teacher is
        # never saved: it is reloaded from its own folder.
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        atomic_torch_save({
            "network_weights": self._student_module().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            ADAPTERS_KEY: self.kd_adapters.state_dict(),
            RECIPE_KEY: self.plans_manager.plans.get("kd", {}).get(self.configuration_name),
        }, filename)

    def _load_intact_checkpoint(self, filename: str) -> tuple[str, dict]:
        """Load ``filename``; if it is truncated or corrupt (a kill or a full disk while an older version of this
        code, or another tool, wrote it), fall back to the newest intact sibling nnU-Net's --c would also accept
        (checkpoint_final/latest/best, highest epoch first), with a warning in the training log."""
        try:
            return filename, load_nnunet_checkpoint(filename, map_location=self.device)
        except CorruptCheckpointError as error:
            corrupt_error = error
        intact = []
        for rank, name in enumerate(RESUMABLE_CHECKPOINTS):
            candidate = join(dirname(os.path.abspath(filename)), name)
            if not isfile(candidate) or os.path.abspath(candidate) == os.path.abspath(filename):
                continue
            try:
                checkpoint = load_nnunet_checkpoint(candidate, map_location=self.device)
            except TeacherError:
                continue
            if checkpoint.get("trainer_name") == self.__class__.__name__:
                intact.append((-int(checkpoint.get("current_epoch", 0)), rank, candidate, checkpoint))
        if not intact:
            raise CorruptCheckpointError(
                f"Cannot resume: {filename} is truncated or corrupt and no intact "
                f"{'/'.join(RESUMABLE_CHECKPOINTS)} is beside it ({corrupt_error}). Delete {filename} and start this "
                f"fold again without --c, or restore the file from a backup.") from corrupt_error
        _, _, chosen, checkpoint = min(intact, key=lambda item: item[:2])
        self.print_to_log_file(
            f"WARNING: {filename} is truncated or corrupt ({str(corrupt_error).splitlines()[0]}); resuming from the "
            f"newest intact checkpoint {chosen} (epoch {checkpoint.get('current_epoch')}) instead. Delete {filename} "
            f"to silence this warning.")
        return chosen, checkpoint

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            where, checkpoint = self._load_intact_checkpoint(filename_or_checkpoint)
        else:
            where, checkpoint = "the checkpoint", filename_or_checkpoint
        if checkpoint.get("trainer_name") != self.__class__.__name__:
            raise RuntimeError(f"{where} was written by trainer {checkpoint.get('trainer_name')}, not "
                               f"{self.__class__.__name__}. Resume with -tr {checkpoint.get('trainer_name')}.")
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self._student_module().load_state_dict(strip_wrapper_prefixes(checkpoint["network_weights"]))
        self.kd_adapters.load_state_dict(checkpoint.get(ADAPTERS_KEY, {}))
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        except ValueError as e:
            raise RuntimeError(f"{where}: the optimizer state does not match this run's parameters ({e}). The recipe's "
                               f"feature stages changed since the checkpoint was written; restore the plans that "
                               f"wrote it, or start a new run.") from e
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
