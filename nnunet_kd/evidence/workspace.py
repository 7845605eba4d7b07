"""The protocol's nnU-Net workspace: planning, training, archiving and evaluating every model with nnU-Net's own
commands; run_protocol, which trains what is missing; and the guard against training a new teacher beside the
records of another."""
from __future__ import annotations

import os
import shutil
from os.path import basename, dirname, isdir, isfile, join
from typing import TYPE_CHECKING

from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_kd.atomic_files import write_json_atomically
from nnunet_kd.evidence.protocol import (SUBSET_TEACHER_PLANS, TEACHER_PLANS, TEACHER_TRAINER, EvidenceError,
                                         check_variants, model_folder_name, student_plans_name, subset_ensemble_name,
                                         variant_overrides)
from nnunet_kd.evidence.records import (TEACHER_MANIFEST, archive_teacher, check_teacher_from_records, load_records,
                                        restore_teacher, sha256_of, this_machine)
from nnunet_kd.evidence.split import load_or_make_split, prepare_workspace, write_crossval_split
from nnunet_kd.methods import TRAINERS, method_and_variant

if TYPE_CHECKING:
    from nnunet_kd.evidence.protocol import Protocol


def crossval_folds(ws: "Workspace") -> int:
    """The split's number of cross-validation folds of the training cases (5, as nnU-Net's)."""
    return len(ws.split["crossval"])


def teacher_is_committed(ws: "Workspace") -> bool:
    return basename(ws.folder(TEACHER_TRAINER, TEACHER_PLANS)) in load_records(ws.p.records_dir)


def refuse_a_new_teacher_beside_committed_records(ws: "Workspace") -> None:
    """Before a teacher is trained: the committed records (Protocol.records_dir) learned from a teacher that neither
    the workspace nor the archive holds (the archive lives outside the repository and is lost with its machine). A
    teacher trained now has other weights (a CPU run repeats on one machine, not across machines), so the report would
    refuse its students' records after hours of training; stop before it instead. An archive is checked when it is
    restored (restore_teacher)."""
    teacher_folder = ws.folder(TEACHER_TRAINER, TEACHER_PLANS)
    if (isfile(join(teacher_folder, f"fold_{ws.p.fold}", "checkpoint_final.pth")) or not teacher_is_committed(ws)
            or ws.p.teacher_archive and isfile(join(ws.p.teacher_archive, TEACHER_MANIFEST))):
        return
    record = join(ws.p.records_dir, basename(teacher_folder) + ".json")
    archive = ws.p.teacher_archive or "(no archive: --no-teacher-archive)"
    raise EvidenceError(
        f"The committed records in {ws.p.records_dir} learned from the teacher of {record}, which neither this "
        f"workspace nor the teacher archive {archive} holds. A teacher trained now would have other weights, and its "
        f"students' records could not join those. Restore that archive (the folder the session that trained the "
        f"teacher wrote), or give a new teacher records and results of their own with --tag (e.g. --tag teacher2), "
        f"or pass --no-records. Nothing was trained.")


class Workspace:
    """The nnU-Net folders of one protocol, outside the repository; every method here is idempotent."""

    def __init__(self, protocol: Protocol):
        from nnunet_kd.pipeline import nnunet_env

        self.p = protocol
        self.env = nnunet_env(protocol.workdir, cpu_friendly=protocol.device == "cpu")
        self.log = join(protocol.workdir, "commands.log")
        self.commands_run = 0  # how many nnU-Net commands this workspace object has run (reports only after work)
        self.preprocessed = join(self.env["nnUNet_preprocessed"], protocol.dataset_name)
        self.results = join(self.env["nnUNet_results"], protocol.dataset_name)
        self.split = load_or_make_split(protocol.split_file, protocol.raw_dataset, protocol.n_test)
        self.raw, self.test_images, self.test_labels = prepare_workspace(
            protocol.raw_dataset, self.split, self.env["nnUNet_raw"], join(protocol.workdir, "test"))

    def dataset_json(self) -> dict:
        """The training cases' dataset.json (nnU-Net copies it into the preprocessed folder; this one exists before
        preprocessing, so a report from committed records needs no preprocessed workspace)."""
        return load_json(join(self.raw, "dataset.json"))

    def command(self, name: str, args: list[str], env: dict | None = None) -> None:
        from nnunet_kd.pipeline import console_script, run

        run(console_script(name) + [str(a) for a in args], env or self.env, self.log, quiet=True)
        self.commands_run += 1

    def preprocess(self) -> None:
        if not isfile(join(self.preprocessed, "nnUNetPlans.json")):
            # nnU-Net 2.8.1's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0.
            plan_env = {k: v for k, v in self.env.items() if k != "nnUNet_n_proc_DA"}
            self.command("nnUNetv2_plan_and_preprocess", ["-d", self.p.dataset_id, "-c", self.p.configuration,
                                                          "-np", 2, "--verify_dataset_integrity"], plan_env)
        write_crossval_split(self.preprocessed, self.split)

    def folder(self, trainer: str, plans: str) -> str:
        """The run's folder; a workspace made by an older version keeps its older trainer names (LEGACY_TRAINERS)."""
        from nnunet_kd.pipeline import trainer_of_existing_run

        trainer = trainer_of_existing_run(self.env["nnUNet_results"], self.p.dataset_name, trainer, plans,
                                          self.p.configuration, self.p.fold)
        return join(self.results, model_folder_name(trainer, plans, self.p.configuration))

    def train(self, trainer: str, plans: str, fold: int | None = None) -> str:
        """``fold``: another cross-validation fold than the protocol's (a fold teacher)."""
        from nnunet_kd.compare import train_or_reuse

        folder, ran = train_or_reuse(self.env, self.log, self.p.dataset_id, self.p.dataset_name, self.p.configuration,
                                     self.p.fold if fold is None else fold, trainer, plans, self.p.device, quiet=True)
        self.commands_run += ran
        return folder

    def teacher(self) -> str:
        from nnunet_kd.pipeline import write_budget_plans

        plans_file = write_budget_plans(self.preprocessed, "nnUNetPlans", TEACHER_PLANS, self.p.configuration,
                                        self.p.teacher_epochs, self.p.iterations_per_epoch,
                                        self.p.val_iterations_per_epoch, seed=self.p.teacher_seed,
                                        max_batch_size=self.p.max_batch_size)
        expected = {"dataset": self.p.dataset_name, "configuration": self.p.configuration,
                    "split_sha256": sha256_of(self.p.split_file)}
        if self.p.teacher_archive and restore_teacher(self.p.teacher_archive, self.folder(TEACHER_TRAINER, TEACHER_PLANS),
                                                      self.p.fold, plans_file, expected):
            print(f"  restored the archived teacher {self.p.teacher_archive}", flush=True)
        return self.train(TEACHER_TRAINER, TEACHER_PLANS)

    def teacher_from_records(self) -> str:
        """The teacher of Protocol.teacher_from_records for plain students: its record joins this protocol's records
        (the report compares every student with it) and its model folder holds its plans and dataset.json only (what
        the student planner reads), never a checkpoint, so nothing here can distil from or evaluate it."""
        folder = self.folder(TEACHER_TRAINER, TEACHER_PLANS)
        record = check_teacher_from_records(self.p, self.split)
        if isfile(join(folder, f"fold_{self.p.fold}", "checkpoint_final.pth")):
            raise EvidenceError(f"--teacher-from-records: {folder} holds a trained teacher already; use a new --workdir "
                                f"for plain students of the teacher of {self.p.teacher_from_records}.")
        if self.p.records_dir:
            own = load_records(self.p.records_dir).get(record["model"])
            if own is None:
                os.makedirs(self.p.records_dir, exist_ok=True)
                write_json_atomically({k: v for k, v in record.items() if k != "folder"},
                                      join(self.p.records_dir, record["model"] + ".json"))
            elif own["network_weights_sha256"] != record["network_weights_sha256"]:
                raise EvidenceError(f"--teacher-from-records {self.p.teacher_from_records}: its teacher is not the one "
                                    f"of the committed records in {self.p.records_dir} (other network weights). Use a "
                                    f"new --tag for the plain students of that teacher.")
        os.makedirs(folder, exist_ok=True)
        write_json_atomically(record["plans"], join(folder, "plans.json"))
        write_json_atomically(self.dataset_json(), join(folder, "dataset.json"))
        return folder

    def archive_teacher(self, teacher_folder: str) -> list[str]:
        """The finished, evaluated teacher into Protocol.teacher_archive (once); returns the files written."""
        import platform

        if not self.p.teacher_archive:
            return []
        p = self.p
        return archive_teacher(teacher_folder, p.teacher_archive, p.fold, {
            "dataset": p.dataset_name, "configuration": p.configuration, "split_file": basename(p.split_file),
            "split_sha256": sha256_of(p.split_file), "teacher_epochs": p.teacher_epochs,
            "iterations_per_epoch": p.iterations_per_epoch, "val_iterations_per_epoch": p.val_iterations_per_epoch,
            "max_batch_size": p.max_batch_size, "teacher_seed": p.teacher_seed,
            "trained_on": {**this_machine(p.device), "host": platform.node()}})

    def subset_teachers(self, evaluate: bool = True) -> list[str]:
        """Protocol.subset_teachers teachers, each trained (teacher budget and seed) on one disjoint seeded subset of
        the fold's training cases, each evaluated on the test cases with probabilities, and their ensemble (nnU-Net's
        nnUNetv2_ensemble: the mean of their probabilities) evaluated (not with ``evaluate=False``: a recipe sweep
        never predicts the test cases); returns their model folders."""
        p, k = self.p, self.p.subset_teachers
        plan_env = {key: v for key, v in self.env.items() if key != "nnUNet_n_proc_DA"}  # see preprocess()
        self.command("nnUNetv2_kd_plan_subset_teachers", [
            "-d", p.dataset_id, "-c", p.configuration, "-f", p.fold, "-k", k, "-o", SUBSET_TEACHER_PLANS,
            "--seed", 0, "--epochs", p.subset_teacher_budget, "--iterations-per-epoch", p.iterations_per_epoch,
            "--val-iterations-per-epoch", p.val_iterations_per_epoch, "--training-seed", p.teacher_seed]
            + (["--max-batch-size", p.max_batch_size] if p.max_batch_size else []) + ["--overwrite"], plan_env)
        folders = [self.train(TEACHER_TRAINER, f"{SUBSET_TEACHER_PLANS}{i}of{k}") for i in range(1, k + 1)]
        if not evaluate:
            return folders
        summaries = [self.evaluate_on_test(f, save_probabilities=True) for f in folders]
        out = join(self.results, subset_ensemble_name(p.configuration, k), f"fold_{p.fold}", "test_predictions")
        summary = join(out, "summary.json")
        if not isfile(summary) or os.path.getmtime(summary) < max(os.path.getmtime(x) for x in summaries):
            if isdir(out):
                shutil.rmtree(out)
            self.command("nnUNetv2_ensemble", ["-i"] + [dirname(x) for x in summaries] + ["-o", out, "-np", 1])
            self.command("nnUNetv2_evaluate_folder", [self.test_labels, out, "-djfile", join(folders[0], "dataset.json"),
                                                      "-pfile", join(folders[0], "plans.json"), "-o", summary, "-np", 1])
        return folders

    def fold_teachers(self) -> None:
        """The teacher of every other cross-validation fold of the split's training cases (self.teacher() is the
        protocol fold's; same plans, budget and seed, in its model folder), for the peer at its defaults
        (logit_all_folds). Not evaluated on the test cases: only the student distilled from them is a row."""
        for fold in range(crossval_folds(self)):
            if fold != self.p.fold:
                self.train(TEACHER_TRAINER, TEACHER_PLANS, fold)

    def plan_all_folds_student(self, teacher_folder: str, width: float, seed: int) -> str:
        """Plans of the peer at its defaults: every fold of the teacher as a teacher, their logits averaged (the folds
        other than the student's trained on its validation cases: accepted, as the peer does; the test cases are
        unseen by all of them)."""
        return self.plan_student(
            teacher_folder, width, seed,
            plans_name=student_plans_name(width, seed, self.p.labelled_fraction, self.p.unlabelled_images is not None,
                                          fold_teachers=crossval_folds(self)),
            overrides=["methods.logit.teacher_aggregation=logit_mean"],
            extra=["--teacher-fold", *range(crossval_folds(self)), "--allow-validation-overlap"])

    def plan_student(self, teacher_folder: str | list[str], width: float, seed: int, plans_name: str | None = None,
                     overrides: list[str] = (), extra: list = (), variant: str | None = None) -> str:
        """Student plans at this protocol's budget; ``teacher_folder``: one teacher, or a list (the student of those
        teachers, with plans of its own); ``overrides``: the planner's --set KEY=VALUE (a recipe sweep's variant);
        ``extra``: more planner arguments; ``variant``: the name of the recipe variant ``overrides`` define (plans of
        its own)."""
        teachers = [teacher_folder] if isinstance(teacher_folder, str) else list(teacher_folder)
        name = plans_name or student_plans_name(width, seed, self.p.labelled_fraction, self.p.unlabelled_images is not None,
                                                len(teachers) if len(teachers) > 1 else None, variant=variant)
        labels = [] if self.p.labelled_fraction is None else \
            ["--labelled-fraction", self.p.labelled_fraction, "--labelled-fraction-seed", self.p.labelled_fraction_seed]
        if self.p.unlabelled_images is not None:
            labels += ["--unlabelled-images", self.p.unlabelled_images]
        self.command("nnUNetv2_kd_plan_student", labels + [
            "-d", self.p.dataset_id, "-c", self.p.configuration, *[a for t in teachers for a in ("--teacher", t)],
            "--width", width,
            "-o", name, "--epochs", self.p.student_epochs, "--iterations-per-epoch", self.p.iterations_per_epoch,
            "--val-iterations-per-epoch", self.p.student_val_iterations, "--seed", seed, "--overwrite"]
            + [arg for assignment in overrides for arg in ("--set", assignment)] + list(extra))
        return name

    def evaluate_on_test(self, folder: str, save_probabilities: bool = False) -> str:
        """nnUNetv2_predict on the held-out images, then nnU-Net's evaluation; returns the summary file.
        ``save_probabilities``: keep nnU-Net's .npz probabilities too (for nnUNetv2_ensemble)."""
        out = join(folder, f"fold_{self.p.fold}", "test_predictions")
        summary = join(out, "summary.json")
        checkpoint = join(folder, f"fold_{self.p.fold}", "checkpoint_final.pth")
        has_probabilities = isdir(out) and any(f.endswith(".npz") for f in os.listdir(out))
        if isfile(summary) and os.path.getmtime(summary) > os.path.getmtime(checkpoint) and \
                (has_probabilities or not save_probabilities):
            return summary
        trainer, plans, configuration = basename(folder).split("__")
        if isdir(out):  # a prediction interrupted earlier (or of another test set): never evaluate stale files
            shutil.rmtree(out)
        self.command("nnUNetv2_predict", ["-i", self.test_images, "-o", out, "-d", self.p.dataset_id, "-c",
                                          configuration, "-tr", trainer, "-p", plans, "-f", self.p.fold,
                                          "-device", self.p.device, "-npp", 1, "-nps", 1, "--disable_tta"]
                     + (["--save_probabilities"] if save_probabilities else []))
        # nnU-Net's own evaluation command (labels, regions and ignore label from the model's dataset.json/plans)
        self.command("nnUNetv2_evaluate_folder", [self.test_labels, out, "-djfile", join(folder, "dataset.json"),
                                                  "-pfile", join(folder, "plans.json"), "-o", summary, "-np", 1])
        return summary


def run_protocol(protocol: Protocol, report=None) -> None:
    """Train and evaluate everything the protocol names that is not finished; ``report()`` after every model."""
    check_variants(protocol)  # a misspelt variant stops here, before hours of training
    ws = Workspace(protocol)
    # Multi-teacher students learn from the subset teachers only: the protocol's teacher is trained for them only
    # when no committed record holds it (the report compares every student with it).
    bases = [method_and_variant(m)[0] for m, _ in protocol.runs]
    needs_teacher = not protocol.teacher_from_records and (
        any(m != "multi_teacher" for m in bases) or not teacher_is_committed(ws))
    if needs_teacher:
        refuse_a_new_teacher_beside_committed_records(ws)  # before preprocessing too: minutes of it for nothing
    ws.preprocess()
    teacher = ws.teacher_from_records() if protocol.teacher_from_records else None
    if needs_teacher:
        teacher = ws.teacher()
        ws.evaluate_on_test(teacher)
        ws.archive_teacher(teacher)
        if report:
            report(ws)
    subset_teachers = ws.subset_teachers() if "multi_teacher" in bases else None
    if subset_teachers and report:
        report(ws)
    if "logit_all_folds" in bases:
        ws.fold_teachers()
    for method, width in protocol.runs:
        base, variant = method_and_variant(method)
        for seed in protocol.seeds:
            if base == "logit_all_folds":
                plans = ws.plan_all_folds_student(teacher, width, seed)
            else:
                plans = ws.plan_student(subset_teachers if base == "multi_teacher" else teacher, width, seed,
                                        overrides=[] if variant is None else variant_overrides(protocol.sweeps_dir, method),
                                        variant=variant)
            before = ws.commands_run
            folder = ws.train(TRAINERS[base], plans)
            ws.evaluate_on_test(folder)
            if report and ws.commands_run > before:  # a reused, already reported model changes nothing
                report(ws)
