"""The one place where distillation meets nnU-Net: the set of teachers, feature taps, deep supervision, logging and
checkpointing. Trainer classes in ``trainers/`` subclass ``nnUNetTrainerKD`` and only name their method.

Per training step:  L = w_seg * nnU-Net's deep-supervised loss + sum over the method's terms of w_term * term,
weights from the student plans (nnunet_kd.recipe). The terms are classes behind one registry (nnunet_kd.distill:
kl, lovasz, feature, ffd, rgd); each returns named losses from one ``DistillationStep`` (student outputs and
features, every teacher's outputs and features, nnU-Net's labels at every resolution). The ignore label is masked
out of every term. Each teacher runs once per step (logits and features from the same pass), frozen and without
gradients, under the same autocast as the student.
"""
from __future__ import annotations

import os
from os.path import join

import numpy as np
import torch
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunet_kd.checkpoints import (load_intact_checkpoint, restore_nnunet_checkpoint, save_nnunet_checkpoint,
                                   unwrapped_network)
from nnunet_kd.budget import apply_training_budget, restrict_to_training_cases, seed_everything
from nnunet_kd.cost import count_parameters
from nnunet_kd.distill import DistillationStep, TeacherOutputs, TermContext, term_class
from nnunet_kd.distill.base import TermSettingsError
from nnunet_kd.distill.sync import broadcast_parameters, average_gradients
from nnunet_kd.distill.teachers import load_teachers
from nnunet_kd.features import FeatureTaps, canonical_stage_name
from nnunet_kd.losses._common import masked_voxel_mean
from nnunet_kd.losses.kl import label_teacher_logits
from nnunet_kd.losses.teacher_mixture import mix_teacher_logits, teacher_weights
from nnunet_kd.progress import KDLocalLogger, term_key
from nnunet_kd.provenance import record_training_cases
from nnunet_kd.recipe import parse_recipe, plans_file_path
from nnunet_kd.teacher import TeacherError
from nnunet_kd.unlabelled import (CombinedDataset, WithoutClassLocations, draws_per_case, empty_class_locations,
                                  labelled_samples, pseudo_labels_for_unlabelled, segmentation_loss_on_labelled)

# Checkpoint keys of our own, next to nnU-Net's. nnU-Net's predictor reads only 'network_weights', so the
# student checkpoint stays loadable by plain nnU-Net; nnUNetv2_kd_export removes these keys altogether.
MODULES_KEY = "kd_modules"    # the terms' trainable modules (adapters), keyed term.adapters.<teacher>.<stage>
ADAPTERS_KEY = "kd_adapters"  # the feature adapters of checkpoints written before the term registry (one teacher)
RECIPE_KEY = "kd_recipe"
TRAINING_ONLY_KEYS = (MODULES_KEY, ADAPTERS_KEY, RECIPE_KEY)
# Where the soft targets of the label-teacher control come from, in the step's teachers.
LABEL_TEACHER = "labels"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite: training stops instead of training a NaN student to the end."""


class nnUNetTrainerKD(nnUNetTrainer):
    """Base class of every distillation trainer. ``kd_method`` names the recipe section it trains with."""

    kd_method = "none"
    # Where the soft targets come from: "network" (the frozen teachers) or "labels" (the one-hot ground truth, the
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

        apply_training_budget(self, self.kd_recipe)
        # loss_terms: what the training loss sums (nnU-Net's segmentation loss and the method's terms), with weights
        self.loss_terms = ["segmentation"] + list(self.kd_recipe.terms)
        self.base_loss_weights = {t: (self.kd_recipe.weight(t) if self.kd_method != "none" else 1.0)
                                  for t in self.loss_terms}
        self.loss_weights = dict(self.base_loss_weights)  # this epoch's (the recipe may anneal the KD weights)
        self.teacher_names = ((LABEL_TEACHER,) if self.kd_teacher_source == "labels"
                              else tuple(t.name for t in self.kd_recipe.teachers))
        # logged_terms: the loss terms and their logged parts (RGD's node/edge/voxel, each teacher's share)
        # Several teachers mixed per voxel (teacher_aggregation other than terms_mean): the logit terms distil the
        # mixture, and each teacher's mean weight is logged per epoch.
        self.teacher_mixture = (self.kd_method != "none" and self.kd_teacher_source == "network"
                                and self.kd_recipe.teacher_aggregation != "terms_mean")
        self.logged_terms = ["segmentation"] + [name for term in self.kd_recipe.terms
                                                for name in term_class(term).log_names(self.teacher_names,
                                                                                       self.teacher_mixture)]
        if self.teacher_mixture and self.kd_recipe.terms:
            self.logged_terms += [f"teacher_weight_{t}" for t in self.teacher_names]
        self.logger.local_logger = KDLocalLogger(self.logged_terms, required=self.loss_terms)

        self.teachers = {}            # name -> FrozenTeacher, outside self.network, never saved
        self.teacher_label_maps = {}  # name -> student channel of each teacher channel (-1 none), or None
        self.teacher_trained_on = {}  # name -> the cases its fold trained on (None: unknown), for routing
        self.distillation = nn.ModuleDict()  # the terms; their trainable modules train with the student
        self.student_taps = None
        self.teacher_taps = {}
        self.distillation_enabled = True  # the benchmark switches it off to time the plain student step
        # Cases trained on without labels (recipe train_on_unlabelled): segmentation loss masked, teacher terms only
        self.unlabelled_keys = frozenset()

    @property
    def teacher(self):
        """The first teacher (the only one of a one-teacher recipe); None without a teacher network."""
        return next(iter(self.teachers.values()), None)

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        super().initialize()
        if self.kd_method != "none":
            self._setup_unlabelled()
            self._setup_distillation()

    def do_split(self):
        train, val = super().do_split()
        recipe = self.kd_recipe
        return restrict_to_training_cases(train, val, recipe.training_cases, self.kd_plans_file, self.fold,
                                          recipe.labelled_fraction, recipe.labelled_fraction_seed)

    def _setup_unlabelled(self):
        """train_on_unlabelled: the fold's training cases outside the labelled fraction, and the plans' unlabelled
        images (their preprocessed folder must exist), are trained on without labels."""
        recipe = self.kd_recipe
        if not recipe.train_on_unlabelled:
            return
        if self.is_ddp and self.configuration_manager.batch_dice:
            # nnU-Net's batch Dice gathers every rank's (batch, class) statistics in one collective; the segmentation
            # loss here runs on each rank's labelled samples only, so a rank whose batch holds none (or fewer than
            # another's) would leave that collective or feed it other shapes: a hang or a wrong Dice
            raise TeacherError(f"{self.kd_plans_file}: train_on_unlabelled cannot run under DDP with nnU-Net's batch "
                               f"Dice (configuration '{self.configuration_name}' has batch_dice true). Train on one "
                               f"GPU, or set batch_dice to false for that configuration in {self.kd_plans_file}, or "
                               f"set train_on_unlabelled to false there.")
        labelled, _ = self.do_split()
        rest = sorted(set(nnUNetTrainer.do_split(self)[0]) - set(labelled))
        extra = list(recipe.unlabelled_images["cases"]) if recipe.unlabelled_images else []
        if extra:
            folder = join(self.preprocessed_dataset_folder_base, recipe.unlabelled_images["folder"])
            missing = [c for c in extra if not any(os.path.isfile(join(folder, c + e)) for e in (".b2nd", ".npz"))]
            if missing:
                raise TeacherError(f"{self.kd_plans_file} lists {len(missing)} unlabelled image(s) (e.g. {missing[:3]}) "
                                   f"that are not preprocessed in {folder}. Write the plans again with "
                                   f"nnUNetv2_kd_plan_student ... --unlabelled-images "
                                   f"{recipe.unlabelled_images['source']} --overwrite.")
        self.unlabelled_keys = frozenset(rest + extra)
        self.print_to_log_file(f"Training on {len(labelled)} labelled case(s) and {len(self.unlabelled_keys)} "
                               f"unlabelled ({len(rest)} of the fold's training cases, {len(extra)} extra images): "
                               f"segmentation loss on the labelled samples only.")

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if not self.unlabelled_keys:
            return dataset_tr, dataset_val
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        extra = set(self.kd_recipe.unlabelled_images["cases"]) if self.kd_recipe.unlabelled_images else set()
        rest = sorted(self.unlabelled_keys - extra)
        datasets = [dataset_tr]
        if rest:  # their labels stay unread: no foreground oversampling from them either
            datasets.append(WithoutClassLocations(self.dataset_class(self.preprocessed_dataset_folder, rest),
                                                  empty_class_locations(self.label_manager)))
        if extra:
            folder = join(self.preprocessed_dataset_folder_base, self.kd_recipe.unlabelled_images["folder"])
            datasets.append(infer_dataset_class(folder)(folder, sorted(extra)))
        share = self.kd_recipe.unlabelled_batch_share
        if share is None:
            return CombinedDataset(datasets), dataset_val
        labelled_draws, unlabelled_draws = draws_per_case(len(dataset_tr.identifiers), len(self.unlabelled_keys), share)
        combined = CombinedDataset(datasets, draws={**{k: labelled_draws for k in dataset_tr.identifiers},
                                                    **{k: unlabelled_draws for k in self.unlabelled_keys}})
        achieved = unlabelled_draws * len(self.unlabelled_keys) / len(combined.identifiers)
        self.print_to_log_file(f"unlabelled_batch_share {share}: each labelled case drawn with weight {labelled_draws}, "
                               f"each unlabelled one with weight {unlabelled_draws} (unlabelled share of a batch "
                               f"{achieved:.3f} in expectation).")
        return combined, dataset_val

    def on_train_start(self):
        super().on_train_start()
        record_training_cases(self)  # what this fold trained on, for the leakage guard of a later student

    def _setup_distillation(self):
        recipe = self.kd_recipe
        if not recipe.terms:  # segmentation only (a re-weighted plain student): nothing to distil from
            self.print_to_log_file(f"Method '{self.kd_method}': no distillation term, loss weights "
                                   f"{self.loss_weights}.")
            return
        context = TermContext(num_classes=self.label_manager.num_segmentation_heads,
                              region_based=self.label_manager.has_regions,
                              dim=len(self.configuration_manager.patch_size), teachers=self.teacher_names,
                              deep_supervision_weights=(tuple(self.loss.weight_factors)
                                                        if self.enable_deep_supervision else None),
                              plans_file=self.kd_plans_file)
        try:
            self.distillation = nn.ModuleDict({name: term_class(name)(settings, context)
                                               for name, settings in recipe.terms.items()})
        except TermSettingsError as e:
            raise TeacherError(str(e)) from e
        if self.kd_teacher_source == "labels":
            featured = [n for n, t in self.distillation.items() if t.uses_features]
            if featured:
                raise TeacherError(f"Method '{self.kd_method}' takes its soft targets from the labels, which have no "
                                   f"features: set the {', '.join(featured)} weights to 0 in {self.kd_plans_file}.")
            self.print_to_log_file(f"Method '{self.kd_method}': soft targets are the one-hot ground truth (no "
                                   f"teacher). Loss weights {self.loss_weights}, temperature {self._temperature()}.")
            return
        loaded = load_teachers(self)
        self.teachers = {name: t.network for name, t in loaded.items()}
        self.teacher_label_maps = {name: t.label_map for name, t in loaded.items()}
        self.teacher_trained_on = {name: t.trained_on for name, t in loaded.items()}
        if self.kd_recipe.teacher_routing:
            training_keys, _ = self.do_split()
            for name, cases in self.teacher_trained_on.items():
                if cases is None:
                    self.print_to_log_file(f"WARNING: routing cannot tell which cases teacher {name} trained on: "
                                           f"it teaches every case.")
                elif set(training_keys) <= cases:
                    self.print_to_log_file(f"WARNING: teacher {name} trained on every training case of this fold: "
                                           f"out-of-sample routing leaves it nothing to teach.")

        # Stage names are resolved once, here; the step reads features by canonical name.
        stages = []
        for term in self.distillation.values():
            term.resolved_stages = [canonical_stage_name(s, self.network) for s in term.stages()]
            stages += [s for s in term.resolved_stages if s not in stages]
        if stages:
            self.student_taps = FeatureTaps(self.network, stages)
            self.teacher_taps = {name: FeatureTaps(t.network, stages) for name, t in self.teachers.items()}
        student_shapes, teacher_shapes = self._probe_shapes()
        for term in self.distillation.values():
            term.build_modules(student_shapes, teacher_shapes)
        self.distillation.to(self.device)
        parameters = list(self.distillation.parameters())
        if parameters:
            if self.is_ddp:  # every rank starts from rank 0's modules and averages their gradients (train_step)
                broadcast_parameters(parameters)
            self.optimizer.add_param_group({"params": parameters})

        described = "; ".join(f"{name}: {t.model.checkpoint_file} (configuration {t.model.configuration}, trainer "
                              f"{t.model.trainer_name}, {count_parameters(t.network):,} parameters"
                              f"{', label map ' + str(t.label_map) if t.label_map else ''})"
                              for name, t in loaded.items())
        self.print_to_log_file(
            f"Distillation method '{self.kd_method}' from {len(loaded)} teacher(s) [{described}]: student "
            f"{count_parameters(self.network):,} parameters, distillation modules "
            f"{count_parameters(self.distillation):,} (not exported). Loss weights {self.loss_weights}, "
            f"temperature {self._temperature()}, feature stages {stages}.")

    def _temperature(self):
        kl = self.kd_recipe.terms.get("kl")
        return kl.temperature if kl is not None else None

    def _probe_shapes(self) -> tuple[dict, dict]:
        """One no-grad pass of every network on a zero patch: checks they agree and gives adapter channel counts."""
        was_training = self.network.training
        self.network.eval()  # BatchNorm statistics must not see the probe
        x = torch.zeros((1, self.num_input_channels, *self.configuration_manager.patch_size), device=self.device)
        with torch.no_grad():
            student_out = self.network(x)
            teacher_outs = {name: teacher(x) for name, teacher in self.teachers.items()}
        self.network.train(was_training)
        student_out = student_out if isinstance(student_out, (list, tuple)) else [student_out]
        student_shapes = {k: tuple(v.shape) for k, v in self.student_taps.pop().items()} if self.student_taps else {}
        teacher_shapes = {}
        kl = self.kd_recipe.terms.get("kl")
        for name, teacher_out in teacher_outs.items():
            taps = self.teacher_taps.get(name)
            shapes = teacher_shapes[name] = {k: tuple(v.shape) for k, v in taps.pop().items()} if taps else {}
            for stage, shape in student_shapes.items():
                if shape[2:] != shapes[stage][2:]:
                    raise TeacherError(
                        f"Feature stage '{stage}' has spatial shape {shape[2:]} in the student but {shapes[stage][2:]} "
                        f"in teacher {name}: the two networks downsample differently. Choose stages at the same "
                        f"resolution in {self.kd_plans_file}.")
            if kl is not None and kl.deep_supervision and self.enable_deep_supervision:
                if len(teacher_out) != len(student_out) or [o.shape[2:] for o in student_out] != \
                        [o.shape[2:] for o in teacher_out] or (self.teacher_label_maps[name] is None and
                                                               student_out[0].shape[1] != teacher_out[0].shape[1]):
                    raise TeacherError(
                        f"The deep-supervision outputs {[tuple(o.shape) for o in teacher_out]} of teacher {name} do "
                        f"not match the student's {[tuple(o.shape) for o in student_out]}. Set kl_deep_supervision "
                        f"to false in {self.kd_plans_file} to distil the full-resolution output only.")
        return student_shapes, teacher_shapes

    # ------------------------------------------------------------------ training step
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        factor = self.kd_recipe.kd_weight_factor(self.current_epoch) if self.kd_method != "none" else 1.0
        self.loss_weights = {t: w if t == "segmentation" else w * factor for t, w in self.base_loss_weights.items()}
        if factor < 1.0:
            self.print_to_log_file(f"distillation weights x{factor:.3f} (annealing from "
                                   f"{self.kd_recipe.kd_anneal_start:g} of training): {self.loss_weights}")

    def _autocast(self):
        # nnU-Net's rule: autocast on CUDA only (on CPU it is slow; on MPS unsupported).
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _trainable_parameters(self):
        return list(self.network.parameters()) + list(self.distillation.parameters())

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            student_out = self.network(data)
            labelled = labelled_samples(batch.get("keys"), self.unlabelled_keys, self.device)
            losses = {"segmentation": self.loss(student_out, target) if labelled is None
                      else segmentation_loss_on_labelled(self.loss, student_out, target, labelled)}
            if self.distillation_enabled and len(self.distillation):
                step = self.distillation_step(data, student_out, target, batch.get("keys"))
                losses.update(step.logged)
                for term in self.distillation.values():
                    losses.update(term(step))
            total = sum(self.loss_weights[name] * losses[name] for name in self.loss_terms)

        modules = list(self.distillation.parameters())
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            if self.is_ddp:
                average_gradients(modules)
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._trainable_parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            if self.is_ddp:  # DDP averages the student's gradients; the terms' modules are not inside it
                average_gradients(modules)
            torch.nn.utils.clip_grad_norm_(self._trainable_parameters(), 12)
            self.optimizer.step()
        # Stay on the device: one host transfer per epoch (on_train_epoch_end), not one per step.
        return {"loss": total.detach(), "terms": {name: value.detach().float() for name, value in losses.items()}}

    def _split_target(self, target: torch.Tensor):
        """(target without the ignore channel, valid-voxel mask or None) for one deep-supervision level."""
        lm = self.label_manager
        if not lm.has_ignore_label:
            return target, None
        if lm.has_regions:  # nnU-Net appends the ignore mask as the last region channel
            return target[:, :-1], ~target[:, -1:].bool()
        return target, target != lm.ignore_label

    def distillation_step(self, data, student_out, target, keys=None) -> DistillationStep:
        """Everything the terms read in this step; every teacher runs here, once."""
        outputs = list(student_out) if isinstance(student_out, (list, tuple)) else [student_out]
        split = [self._split_target(t) for t in (target if isinstance(target, (list, tuple)) else [target])]
        labels, valid = [t for t, _ in split], [m for _, m in split]
        student_features = self.student_taps.pop() if self.student_taps else {}
        num_heads, regions = self.label_manager.num_segmentation_heads, self.label_manager.has_regions
        teachers = {}
        if self.kd_teacher_source == "labels":
            temperature = self._temperature()
            teachers[LABEL_TEACHER] = TeacherOutputs(LABEL_TEACHER, [
                label_teacher_logits(lab, num_heads, temperature, mask, region_based=regions)
                for lab, mask in zip(labels, valid)])
        for name, teacher in self.teachers.items():
            taps = self.teacher_taps.get(name)
            with torch.inference_mode():  # eval mode and frozen already; no autograd bookkeeping at all
                teacher_out = teacher(data)  # one pass gives logits and (through the taps) features
                features = taps.pop() if taps else {}
                if self.kd_recipe.teacher_mirroring:
                    teacher_out = self._mirror_averaged(teacher, data, teacher_out, taps)
            # Inference tensors cannot be saved for the student's backward pass: TeacherFeatures copies a feature
            # for the terms that would save it, on first read. The logits only enter through new tensors (softened,
            # divided by T), which are ordinary ones.
            teachers[name] = TeacherOutputs(name, list(teacher_out), features,
                                            self.teacher_label_maps.get(name), num_heads, regions)
        labelled = labelled_samples(keys, self.unlabelled_keys, outputs[0].device)
        if labelled is not None:  # the unlabelled samples' classes are the teachers' prediction
            labels, valid = pseudo_labels_for_unlabelled(labels, valid, teachers, labelled, regions)
        step = DistillationStep(outputs, student_features, teachers, labels, valid)
        if self.teacher_mixture and self.teachers:
            self._mix_teachers(step, keys)
        return step

    def _mix_teachers(self, step: DistillationStep, keys) -> None:
        """The teachers' per-voxel mixture at every deep-supervision level (nnunet_kd.losses.teacher_mixture), with
        out-of-sample routing when the recipe asks for it: a teacher does not teach the cases it trained on."""
        recipe, names = self.kd_recipe, list(step.teachers)
        regions = self.label_manager.has_regions
        temperature = self._temperature() or 1.0
        allowed = None
        if recipe.teacher_routing:
            if keys is None:
                raise TeacherError("teacher_routing needs the case keys of every batch, which this data loader does "
                                   f"not give: set teacher_routing to false in {self.kd_plans_file}.")
            allowed = torch.tensor([[self.teacher_trained_on.get(n) is None or str(k) not in self.teacher_trained_on[n]
                                     for n in names] for k in keys], dtype=torch.bool, device=step.labels[0].device)
        levels = min(len(step.labels), *(len(t.outputs) for t in step.teachers.values()))
        mixed, covered, weights = [], [], {n: [] for n in names}
        for level in range(levels):
            w, cov = teacher_weights([step.teachers[n].logits(level, 1.0) for n in names], step.labels[level],
                                     recipe.teacher_aggregation, recipe.teacher_aggregation_tau, allowed, regions,
                                     step.valid[level])
            mixed.append(mix_teacher_logits([step.teachers[n].logits(level, temperature) for n in names], w,
                                            temperature, regions, recipe.teacher_aggregation == "logit_mean"))
            covered.append(cov)
            for i, n in enumerate(names):
                weights[n].append(w[:, i:i + 1])
        step.mixture = TeacherOutputs("mixture", mixed)
        step.teacher_weights, step.covered = weights, covered
        if allowed is not None:
            step.routing = {n: allowed[:, i] for i, n in enumerate(names)}
        mask = step.kd_mask(0)
        step.logged = {f"teacher_weight_{n}": masked_voxel_mean(weights[n][0], mask) for n in names}

    def _mirror_averaged(self, teacher, data, first_out, taps):
        """The teacher's logits averaged over the unmirrored pass and every mirroring of nnU-Net's inference (all
        combinations of the allowed axes, as its predictor's test-time augmentation does). The features stay those
        of the unmirrored pass: the extra passes' taps are discarded."""
        import itertools

        outputs = [o.clone() for o in (first_out if isinstance(first_out, (list, tuple)) else [first_out])]
        if self.inference_allowed_mirroring_axes is None:  # set by nnU-Net when it builds its data loaders
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        axes = [a + 2 for a in (self.inference_allowed_mirroring_axes or ())]
        combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for dims in combinations:
            mirrored = teacher(torch.flip(data, dims))
            if taps:
                taps.pop()
            for total, out in zip(outputs, mirrored if isinstance(mirrored, (list, tuple)) else [mirrored]):
                total += torch.flip(out, dims)
        return [o / (len(combinations) + 1) for o in outputs]

    # ------------------------------------------------------------------ logging
    def on_train_epoch_end(self, train_outputs: list[dict]):
        losses = torch.stack([o["loss"] for o in train_outputs]).float().mean()
        terms = torch.stack([torch.stack([o["terms"][n] for n in self.logged_terms]) for o in train_outputs]).mean(0)
        if self.is_ddp:
            stacked = torch.cat([losses[None], terms])
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
            losses, terms = stacked[0], stacked[1:]
        self.logger.log("train_losses", float(losses.cpu()), self.current_epoch)
        means = dict(zip(self.logged_terms, terms.cpu().tolist()))
        for name, value in means.items():
            self.logger.log(term_key(name), value, self.current_epoch)
        self._stop_on_nonfinite_loss(float(losses.cpu()), means)

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
            teachers = [t.model_folder for t in self.kd_recipe.teachers] or "-"
            fixes.append(f"for {kd_bad}: lower their weights (0 switches a term off) under kd.{self.configuration_name}"
                         f".methods.{self.kd_method}.weights in {self.kd_plans_file} (nnUNetv2_kd_plan_student --set "
                         f"methods.{self.kd_method}.weights.<term>=...) and check the teacher ({', '.join(teachers)})")
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
            f"{name} {self.logger.get_value(term_key(name), step=-1):.4f}" for name in self.logged_terms))
        super().on_epoch_end()

    # ------------------------------------------------------------------ checkpoints
    def _student_module(self) -> nn.Module:
        return unwrapped_network(self)

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net's checkpoint layout, plus the terms' modules and the recipe under keys of their own. The teachers
        # are never saved: they are reloaded from their own folders.
        save_nnunet_checkpoint(self, filename, self.__class__.__name__, {
            MODULES_KEY: self.distillation.state_dict(),
            RECIPE_KEY: self.plans_manager.plans.get("kd", {}).get(self.configuration_name)})

    def _module_state(self, checkpoint: dict) -> dict:
        """The terms' modules of a checkpoint; one written before the term registry kept the feature adapters of
        its single teacher under 'kd_adapters', keyed by stage only."""
        if MODULES_KEY in checkpoint:
            return checkpoint[MODULES_KEY]
        legacy = checkpoint.get(ADAPTERS_KEY) or {}
        if legacy and self.teacher_names:
            return {f"feature.adapters.{self.teacher_names[0]}.{key}": value for key, value in legacy.items()}
        return {}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            where, checkpoint = load_intact_checkpoint(
                filename_or_checkpoint, self.device, lambda c: c.get("trainer_name") == self.__class__.__name__,
                self.print_to_log_file)
        else:
            where, checkpoint = "the checkpoint", filename_or_checkpoint
        if checkpoint.get("trainer_name") != self.__class__.__name__:
            raise RuntimeError(f"{where} was written by trainer {checkpoint.get('trainer_name')}, not "
                               f"{self.__class__.__name__}. Resume with -tr {checkpoint.get('trainer_name')}.")
        try:
            self.distillation.load_state_dict(self._module_state(checkpoint))
        except RuntimeError as e:
            raise RuntimeError(f"{where}: its distillation modules do not fit this run's "
                               f"({str(e).splitlines()[0]}). The recipe's terms, stages or teachers changed since the "
                               f"checkpoint was written; restore the plans that wrote it, or start a new run.") from e
        try:
            restore_nnunet_checkpoint(self, checkpoint, where)
        except ValueError as e:
            raise RuntimeError(f"{where}: the optimizer state does not match this run's parameters ({e}). The recipe's "
                               f"feature stages changed since the checkpoint was written; restore the plans that "
                               f"wrote it, or start a new run.") from e
