#!/usr/bin/env python
"""Recipe sweep on validation cases: one student per variant of a KD method's recipe, scored on fold 0's validation
cases of the held-out protocol's training split (never on its test cases).

    python benchmarks/run_recipe_sweep.py --raw-dataset ../shared/data/Dataset004_Hippocampus -c 2d \
        --sweep benchmarks/sweeps/adaptive.json --teacher-epochs 50 --student-epochs 30 --iterations-per-epoch 50 \
        --max-batch-size 32 --seeds 0

Shares the workspace (and so the teacher) of benchmarks/run_evidence.py; resumable (finished models are reused).
Rewrites benchmarks/results/<dataset>-<configuration>-<device>-<method>-sweep-<iterations>it.{json,md} after every
model (with --tag, ...-<tag>.{json,md}). The protocol is nnunet_kd.sweep.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from os.path import abspath, basename, dirname, expanduser, join

HERE = dirname(abspath(__file__))


def main(argv=None) -> None:
    import torch

    from nnunet_kd.compare import device_label
    from nnunet_kd.evidence.protocol import Protocol, results_tag_error
    from nnunet_kd.evidence.workspace import Workspace
    from nnunet_kd.methods import load_sweep
    from nnunet_kd.sweep import build_sweep_report, run_sweep, write_sweep_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw-dataset", required=True)
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("--sweep", required=True, help="Sweep file (benchmarks/sweeps/<method>.json)")
    parser.add_argument("--variants", nargs="+", default=None, help="Default: every variant of the sweep file")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n-test", type=int, default=50, help="Only used when the split file does not exist yet")
    parser.add_argument("--split-file", default=None, help="Default: benchmarks/splits/<dataset>.json")
    parser.add_argument("--workdir", default=None, help="Default: ~/kd_evidence/<dataset>-<configuration>")
    parser.add_argument("--teacher-epochs", type=int, required=True)
    parser.add_argument("--student-epochs", type=int, required=True)
    parser.add_argument("--iterations-per-epoch", type=int, required=True)
    parser.add_argument("--val-iterations-per-epoch", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--labelled-fraction", type=float, default=None,
                        help="Students on this seeded fraction of the fold's training labels (run_evidence.py's "
                             "protocol); the plain student gets the same subset")
    parser.add_argument("--labelled-fraction-seed", type=int, default=0)
    parser.add_argument("--subset-teachers", type=int, default=3, metavar="K",
                        help="A multi_teacher sweep: its students learn from K subset teachers (run_evidence.py's)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--commit", action="store_true", help="git commit the results files after every model")
    parser.add_argument("--out", default=join(HERE, "results"))
    parser.add_argument("--tag", default=None,
                        help="The teacher series of this workspace, as run_evidence.py's --tag names it (e.g. teacher2): "
                             "the results file (...-sweep-<iterations>it[-labelled<fraction>]-<tag>.json) is its own, "
                             "so a sweep on another teacher does not replace the first series' file")
    args = parser.parse_args(argv)
    if results_tag_error(args.tag):
        parser.error(results_tag_error(args.tag))
    if args.labelled_fraction is not None and not 0 < args.labelled_fraction < 1:
        parser.error(f"--labelled-fraction {args.labelled_fraction}: expected a fraction in (0, 1), e.g. 0.5")
    if args.subset_teachers < 2:
        parser.error(f"--subset-teachers {args.subset_teachers}: expected at least 2 teachers.")

    sweep = load_sweep(args.sweep)
    variants = args.variants or list(sweep.variants)
    unknown = [v for v in variants if v not in sweep.variants]
    if unknown:
        parser.error(f"--variants {unknown} are not in {args.sweep} (it has {list(sweep.variants)})")
    dataset = basename(os.path.normpath(args.raw_dataset))
    protocol = Protocol(
        raw_dataset=abspath(args.raw_dataset),
        split_file=abspath(args.split_file or join(HERE, "splits", f"{dataset}.json")), n_test=args.n_test,
        workdir=abspath(expanduser(args.workdir or f"~/kd_evidence/{dataset}-{args.configuration}")),
        configuration=args.configuration, runs=[], seeds=args.seeds, teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs, iterations_per_epoch=args.iterations_per_epoch,
        val_iterations_per_epoch=args.val_iterations_per_epoch, max_batch_size=args.max_batch_size,
        device=args.device, labelled_fraction=args.labelled_fraction,
        labelled_fraction_seed=args.labelled_fraction_seed, subset_teachers=args.subset_teachers)
    command = "python benchmarks/run_recipe_sweep.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report-only", "--commit"))
    suffix = "" if args.labelled_fraction is None else f"-labelled{str(args.labelled_fraction).replace('.', 'p')}"
    if sweep.method == "multi_teacher":  # the students of another number of subset teachers have their own file
        suffix += f"-k{args.subset_teachers}"
    suffix += f"-{args.tag}" if args.tag else ""
    json_path = join(args.out, f"{dataset}-{args.configuration}-{device_label(args.device)}-{sweep.method}-sweep-"
                               f"{args.student_epochs * args.iterations_per_epoch}it{suffix}.json")
    ws = Workspace(protocol)

    def report() -> None:
        result = build_sweep_report(ws, sweep, args.width, args.seeds, variants, command)
        if not result:
            return
        written = write_sweep_report(result, json_path)
        print(f"\n{result['table']}\n\nwritten: {', '.join(written)}", flush=True)
        if args.commit:
            repo = dirname(HERE)
            subprocess.run(["git", "-C", repo, "add", "--"] + written, check=False)
            subprocess.run(["git", "-C", repo, "commit", "-q", "-m", f"Recipe sweep {basename(json_path)}: "
                            f"{len(result['models'])} models", "--"] + written, check=False)

    if not args.report_only:
        run_sweep(ws, sweep, args.width, args.seeds, variants, report)
    report()


if __name__ == "__main__":
    main()
