#!/usr/bin/env python
"""Held-out evidence runner: teacher, plain students and distilled students on a fixed test split, several seeds.

    python benchmarks/run_evidence.py --raw-dataset ../shared/data/Dataset004_Hippocampus -c 2d --n-test 50 \
        --teacher-epochs 50 --student-epochs 40 --iterations-per-epoch 50 --max-batch-size 32 \
        --runs plain@0.25 adaptive@0.25 --seeds 0 1 2

Trains what is missing (resumable: finished models are reused, an interrupted one resumes with --c) in --workdir
(outside the repository), predicts the held-out test cases with nnUNetv2_predict, evaluates them with nnU-Net's
evaluation, and rewrites benchmarks/results/<dataset>-<configuration>-<device>-heldout[-<tag>].{json,md,
_width_sweep.png,_curves.png} after every model, from every finished model of the workspace trained on the same
budget (and of the committed records in benchmarks/records/<dataset>-<configuration>[-<tag>]/). The protocol itself
(split, statistics, plateau check) is nnunet_kd.evidence.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from os.path import abspath, basename, dirname, expanduser, join

HERE = dirname(abspath(__file__))
RESULTS = join(HERE, "results")
SPLITS = join(HERE, "splits")
RECORDS = join(HERE, "records")    # one record per finished model, committed (sessions end; machines change)
SWEEPS = join(HERE, "sweeps")      # the recipe variants a run METHOD:VARIANT@WIDTH names
# The protocol's teacher, kept so that later runs distil from the same one. Outside the repository: its checkpoint
# (7.8 MB for Hippocampus 2d) exceeds the project's 5 MiB limit on tracked files; copy the folder along (or point
# --teacher-archive at a shared one) to continue on another machine.
TEACHERS = expanduser("~/kd_teachers")


def main(argv=None) -> None:
    import torch

    from nnunet_kd.compare import device_label
    from nnunet_kd.evidence.budget_check import check_budget_check_records
    from nnunet_kd.evidence.collect import collect, model_record, save_workspace_records
    from nnunet_kd.evidence.protocol import (TEACHER_PLANS, TEACHER_TRAINER, EvidenceError, Protocol, check_variants,
                                             model_folder_name, parse_runs, reproducing_commands, results_tag_error)
    from nnunet_kd.evidence.records import check_teacher_from_records
    from nnunet_kd.evidence.report import build_report, write_report
    from nnunet_kd.evidence.workspace import Workspace, run_protocol

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw-dataset", required=True, help="A DatasetXXX_Name folder in nnU-Net raw format (read only)")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("--n-test", type=int, default=50, help="Held-out test cases (used only when the split file "
                                                               "does not exist yet)")
    parser.add_argument("--split-file", default=None, help="Default: benchmarks/splits/<dataset>.json")
    parser.add_argument("--workdir", default=None, help="Default: ~/kd_evidence/<dataset>-<configuration>")
    parser.add_argument("--runs", nargs="+", default=["plain@0.25", "adaptive@0.25"], metavar="METHOD@WIDTH",
                        help="Students to train, in this order, each for every seed. METHOD:VARIANT@WIDTH trains a "
                             "recipe variant of a KD method, one of the variants of --sweeps-dir/METHOD.json (the "
                             "validation sweep's overrides; e.g. multiscale_contrastive:noContrastive@0.25), compared "
                             "with the method's preset as well")
    parser.add_argument("--sweeps-dir", default=SWEEPS, help="Folder of the sweep files that define recipe variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-epochs", type=int, required=True)
    parser.add_argument("--student-epochs", type=int, required=True)
    parser.add_argument("--iterations-per-epoch", type=int, required=True)
    parser.add_argument("--val-iterations-per-epoch", type=int, default=10)
    parser.add_argument("--student-val-iterations-per-epoch", type=int, default=None,
                        help="The students' validation batches per epoch (default: --val-iterations-per-epoch; the "
                             "teacher keeps that): more where a batch holds few slices, so that the plateau test "
                             "reads a curve above its noise")
    parser.add_argument("--max-batch-size", type=int, default=None, help="Cap on nnU-Net's planned batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--labelled-fraction", type=float, default=None,
                        help="Every student (plain and KD) trains with labels on this seeded fraction of the fold's "
                             "training cases, e.g. 0.5; the report adds the plain students of the same budget trained "
                             "on all labels. Results go to a file of their own (...-heldout-labelled0p5.json)")
    parser.add_argument("--labelled-fraction-seed", type=int, default=0,
                        help="Seed of that fraction: one draw for every training seed, so that seeds pair")
    parser.add_argument("--unlabelled-images", default=None, metavar="FOLDER",
                        help="Extra images without labels for methods with train_on_unlabelled (nnU-Net raw naming, "
                             "e.g. PROMISE12's imagesTs; only read); needs --labelled-fraction")
    parser.add_argument("--subset-teachers", type=int, default=3, metavar="K",
                        help="For multi_teacher runs: K teachers, each trained at the teacher's budget on one of K "
                             "disjoint seeded subsets of the fold's training cases")
    parser.add_argument("--subset-teacher-epochs", type=int, default=None, metavar="EPOCHS",
                        help="For multi_teacher runs: each subset teacher's epochs (default: --teacher-epochs)")
    parser.add_argument("--budget-check-records", default=None, metavar="FOLDER",
                        help="Records folder of this protocol at a longer student budget (e.g. twice --student-epochs, "
                             "its own --tag): the plain students' seeds there are paired with this protocol's on the "
                             "validation cases, and every comparison is labelled final quality or learning speed")
    parser.add_argument("--teacher-from-records", default=None, metavar="FOLDER",
                        help="Plain students only: the teacher of this records folder (its plans and record) instead "
                             "of training or restoring one. A plain student learns nothing from the teacher's weights, "
                             "so a longer budget of a series whose teacher archive is lost can still be checked")
    parser.add_argument("--report-only", action="store_true", help="Train nothing; rewrite the results files")
    parser.add_argument("--commit", action="store_true",
                        help="git commit the results files every time they are rewritten (long runs across sessions)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default=None,
                        help="A protocol at another student budget than the committed records' (e.g. 6000it), or "
                             "with another teacher (e.g. teacher2: a retrained one, the archive of the records' "
                             "teacher being lost): its results file (...-heldout[-labelled<fraction>]-<tag>.json) and "
                             "records folder (<dataset>-<configuration>-<tag>) are its own, so neither replaces the "
                             "other's")
    parser.add_argument("--no-records", action="store_true",
                        help="Neither write nor read the committed per-model records (benchmarks/records/<dataset>-"
                             "<configuration>[-<tag>]/): report this workspace's models only")
    parser.add_argument("--teacher-archive-root", default=TEACHERS,
                        help="Folder of teacher archives (<dataset>-<configuration>/ inside), outside the repository")
    parser.add_argument("--no-teacher-archive", action="store_true",
                        help="Neither restore nor write the teacher archive: train the teacher in the workspace")
    args = parser.parse_args(argv)
    if args.labelled_fraction is not None and not 0 < args.labelled_fraction < 1:
        parser.error(f"--labelled-fraction {args.labelled_fraction}: expected a fraction in (0, 1), e.g. 0.5 (leave it "
                     f"out to train on all labels).")
    if args.student_val_iterations_per_epoch is not None and args.student_val_iterations_per_epoch < 1:
        parser.error(f"--student-val-iterations-per-epoch {args.student_val_iterations_per_epoch}: expected at least 1.")
    if args.subset_teachers < 2:
        parser.error(f"--subset-teachers {args.subset_teachers}: expected at least 2 teachers.")
    if args.unlabelled_images is not None:
        if args.labelled_fraction is None:
            parser.error("--unlabelled-images needs --labelled-fraction (the protocol of students on part of the labels).")
        if not os.path.isdir(args.unlabelled_images):
            parser.error(f"--unlabelled-images {args.unlabelled_images}: not a folder.")

    if results_tag_error(args.tag):
        parser.error(results_tag_error(args.tag))
    tag = f"-{args.tag}" if args.tag else ""
    dataset = basename(os.path.normpath(args.raw_dataset))
    try:
        runs = parse_runs(args.runs)
    except ValueError as e:
        parser.error(str(e))
    protocol = Protocol(
        raw_dataset=abspath(args.raw_dataset),
        split_file=abspath(args.split_file or join(SPLITS, f"{dataset}.json")), n_test=args.n_test,
        workdir=abspath(expanduser(args.workdir or f"~/kd_evidence/{dataset}-{args.configuration}")),
        configuration=args.configuration, runs=runs, seeds=args.seeds,
        teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
        iterations_per_epoch=args.iterations_per_epoch, val_iterations_per_epoch=args.val_iterations_per_epoch,
        student_val_iterations_per_epoch=args.student_val_iterations_per_epoch,
        max_batch_size=args.max_batch_size, device=args.device, labelled_fraction=args.labelled_fraction,
        subset_teachers=args.subset_teachers, subset_teacher_epochs=args.subset_teacher_epochs,
        labelled_fraction_seed=args.labelled_fraction_seed,
        unlabelled_images=abspath(args.unlabelled_images) if args.unlabelled_images else None,
        records_dir=None if args.no_records else join(RECORDS, f"{dataset}-{args.configuration}{tag}"),
        teacher_archive=None if args.no_teacher_archive else join(expanduser(args.teacher_archive_root),
                                                                  f"{dataset}-{args.configuration}"),
        sweeps_dir=abspath(args.sweeps_dir),
        budget_check_records=abspath(args.budget_check_records) if args.budget_check_records else None,
        teacher_from_records=abspath(args.teacher_from_records) if args.teacher_from_records else None)
    try:
        check_variants(protocol)
        check_budget_check_records(protocol)
        if protocol.teacher_from_records:
            check_teacher_from_records(protocol)
    except EvidenceError as e:
        parser.error(str(e))
    # This invocation (--report-only and --commit change nothing that is measured); the results file states the
    # command that reproduces all of its rows (reproducing_commands), this one only where it differs
    invocation = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report-only", "--commit")]
    last_invocation = "python benchmarks/run_evidence.py " + " ".join(shlex.quote(a) for a in invocation)
    labels = "" if args.labelled_fraction is None else \
        f"-labelled{args.labelled_fraction:g}".replace(".", "p") + ("-extra-unlabelled" if args.unlabelled_images else "")
    json_path = join(args.out, f"{dataset}-{args.configuration}-{device_label(args.device)}-heldout{labels}{tag}.json")
    # Latency is measured once per width on this machine and kept in the workspace, never committed: it is a figure of
    # the machine (and of its load). A width whose models all come from committed records is timed through its plans'
    # architecture, so every row of one file is timed on one machine.
    latency_cache = join(protocol.workdir, "latency.json")

    def report(ws: Workspace) -> None:
        found = collect(ws)
        records = save_workspace_records(ws, found)
        commands = reproducing_commands(invocation, found["students"])
        result = build_report(ws, commands["command"] or last_invocation, latency_cache, found,
                              all_labels_command=commands.get("all_labels"), last_invocation=last_invocation)
        written = write_report(result, json_path)
        print(f"\n{result['table']}\n\nwritten: {', '.join(written)}"
              + (f"; {len(records)} model records in {protocol.records_dir}" if records else ""), flush=True)
        if args.commit:
            paths = written + [protocol.split_file] + records
            if protocol.teacher_from_records and protocol.records_dir:  # the teacher's record, copied in once
                paths.append(join(protocol.records_dir,
                                  model_folder_name(TEACHER_TRAINER, TEACHER_PLANS, args.configuration) + ".json"))
            repo = dirname(HERE)
            subprocess.run(["git", "-C", repo, "add", "--"] + paths, check=False)
            subprocess.run(["git", "-C", repo, "commit", "-q", "-m", f"Held-out results {basename(json_path)}: "
                            f"{len(result['models'])} model rows", "--"] + paths, check=False)

    if args.report_only:
        ws = Workspace(protocol)
        teacher = ws.folder(TEACHER_TRAINER, TEACHER_PLANS)
        if model_record(ws, teacher) is not None:  # a finished, evaluated teacher is committed here too
            ws.archive_teacher(teacher)
        report(ws)
    else:
        try:
            run_protocol(protocol, report)
        except EvidenceError as e:  # a refusal names its file and fix: no traceback
            sys.exit(f"run_evidence.py: {e}")


if __name__ == "__main__":
    main()
