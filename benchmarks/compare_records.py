#!/usr/bin/env python
"""Pair two sets of committed model records seed by seed over the held-out test cases, where no single results file
pairs them: one recipe at two budgets (a `--tag ..._6000it` protocol against the 3,000-iteration one), or students of
two protocols of the same split.

    python benchmarks/compare_records.py -c 2d \\
        --a 'benchmarks/records/Dataset004_Hippocampus-2d-teacher2_6000it/nnUNetTrainerBudget__nnUNetPlans_evidence_w0p25_s{seed}__2d.json' \\
        --b 'benchmarks/records/Dataset004_Hippocampus-2d-teacher2/nnUNetTrainerBudget__nnUNetPlans_evidence_w0p25_s{seed}__2d.json' \\
        --seeds 0 1 2 --label-a 'plain, 6,000 it' --label-b 'plain, 3,000 it'

``{seed}`` in a path is replaced by each seed (seed i of --a pairs with seed i of --b). Prints a markdown table: each
side's test and validation mean Dice, budget and teacher, and the paired difference a - b with the bootstrap 95%
interval of ``nnunet_kd.evidence.statistics.paired_bootstrap`` (cases and seeds resampled), then the command itself. With
``--out <results folder>/<name>`` the same table is also written to ``<name>.md`` and the comparison (both sides, the
difference, the record files, the command) to ``<name>.json``, so that a figure quoted from it has a results file.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from os.path import dirname, isdir, isfile

SEED_FIELD = "{seed}"


def record_files(pattern: str, seeds: list[int], option: str) -> list[str]:
    if SEED_FIELD not in pattern and len(seeds) > 1:
        raise SystemExit(f"{option} {pattern}: with several seeds the path needs '{SEED_FIELD}' where the seed goes "
                         f"(e.g. ..._s{SEED_FIELD}__2d.json).")
    files = [pattern.replace(SEED_FIELD, str(seed)) for seed in seeds]
    missing = [f for f in files if not isfile(f)]
    if missing:
        raise SystemExit(f"{option}: no record {', '.join(missing)}. Records are written by benchmarks/run_evidence.py "
                         f"into benchmarks/records/<dataset>-<configuration>[-<tag>]/ once a model is trained and "
                         f"evaluated; check the path and the seeds.")
    return files


def main(argv=None) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_kd.atomic_files import write_json_atomically, write_text_atomically
    from nnunet_kd.evidence.budget_check import compare_record_sets
    from nnunet_kd.evidence.protocol import EvidenceError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration of the records, e.g. 2d")
    parser.add_argument("--a", required=True, metavar="RECORD", help="Record file of side a, with {seed}")
    parser.add_argument("--b", required=True, metavar="RECORD", help="Record file of side b, with {seed}")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--label-a", default="a")
    parser.add_argument("--label-b", default="b")
    parser.add_argument("--out", metavar="STEM", help="Also write STEM.md (the printed table) and STEM.json (the "
                        "comparison, its record files and this command), e.g. benchmarks/results/<name>")
    args = parser.parse_args(argv)
    if args.out is not None and not isdir(dirname(args.out) or "."):
        raise SystemExit(f"--out {args.out}: no folder {dirname(args.out)}; create it or choose a path in an existing "
                         f"folder (e.g. benchmarks/results/<name>). Nothing was written.")
    files_a = record_files(args.a, args.seeds, "--a")
    files_b = record_files(args.b, args.seeds, "--b")
    try:
        result = compare_record_sets([load_json(f) for f in files_a], [load_json(f) for f in files_b],
                                     args.configuration, files_a, files_b)
    except EvidenceError as e:
        raise SystemExit(str(e))
    a, b = result["a"], result["b"]
    lines = ["| model | seeds | test cases | test mean Dice | per seed | val mean Dice | budget |",
             "|---|---|---|---|---|---|---|"]
    for label, side in ((args.label_a, a), (args.label_b, b)):
        validation = "" if side["validation_mean_dice"] is None else f"{side['validation_mean_dice']:.4f}"
        lines.append(f"| {label} | {len(args.seeds)} | {result['n_cases']} | {side['test_mean_dice']:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in side['test_mean_dice_per_seed'])} | {validation} | "
                     f"{'; '.join(side['budgets'])} |")
    low, high = result["ci95"]
    lines += ["", f"{args.label_a} - {args.label_b}: {result['mean_diff']:+.4f} [{low:+.4f}, {high:+.4f}] "
                  f"(per seed {' / '.join(f'{v:+.4f}' for v in result['mean_diff_per_seed'])}; paired over "
                  f"{len(args.seeds)} seed(s) x {result['n_cases']} test cases)"]
    teachers = set(a["teacher_network_weights_sha256"]) | set(b["teacher_network_weights_sha256"])
    teachers.discard("None")
    if len(teachers) > 1:
        lines.append(f"Note: the two sides learned from different teachers (checkpoint sha256 "
                     f"{', '.join(sorted(teachers))}).")
    command = f"python benchmarks/compare_records.py {shlex.join(sys.argv[1:] if argv is None else argv)}"
    lines += ["", f"Command: `{command}`"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        comparison = {"labels": {"a": args.label_a, "b": args.label_b}, "seeds": args.seeds,
                      "records": {"a": files_a, "b": files_b}, "command": command, **result}
        write_json_atomically(comparison, args.out + ".json")
        write_text_atomically(args.out + ".md", text + "\n")
        print(f"\nwritten: {args.out}.json, {args.out}.md")




if __name__ == "__main__":
    main()
