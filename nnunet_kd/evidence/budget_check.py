"""Is the budget a plateau? The budget-doubling check of the plain students, and paired comparisons of two record
sets."""
from __future__ import annotations

from os.path import isdir
from typing import TYPE_CHECKING

import numpy as np

from nnunet_kd.evidence.protocol import EvidenceError, shown_path
from nnunet_kd.evidence.records import budget_text, load_records, record_name, training_budget, training_section
from nnunet_kd.evidence.statistics import dice_matrix, paired_bootstrap

if TYPE_CHECKING:
    from nnunet_kd.evidence.protocol import Protocol

BUDGET_CHECK_TOLERANCE = 0.01


def budget_doubling_check(shorter: dict, longer: dict, configuration: str, longer_records: str,
                          tolerance: float = BUDGET_CHECK_TOLERANCE) -> dict:
    """Has the plain student stopped improving at this budget? Its seeds (``shorter``: seed -> record) against the same
    models trained for longer (``longer``: seed -> record of a protocol at a larger student budget, same split and
    fold), paired by seed and validation case. The last-fifth test of ``plateau`` cannot answer it: nnU-Net's
    polynomial learning rate is near zero at the end of every budget, so every curve flattens there, and doubling the
    budget has still raised the validation Dice by more than that test's tolerance (Hippocampus 2d, 3,000 to 6,000
    iterations). The budget counts as final quality (``stopped_improving``) only when the upper end of the 95%
    interval of the validation gain is below ``tolerance``: a gain of that size is then ruled out. Records without
    per-case validation Dice (written before it was recorded) give the mean gain and no decision."""
    seeds = sorted(set(shorter) & set(longer))
    if not seeds:
        raise EvidenceError(f"{longer_records}: no record of the plain student's seeds {sorted(shorter)} there. The "
                            f"budget check pairs each seed with the same model at a longer budget: give the records "
                            f"folder of a protocol with more --student-epochs and the same split and seeds.")
    a, b = [longer[s] for s in seeds], [shorter[s] for s in seeds]
    budget_a = {training_budget(training_section(r["plans"], configuration)) for r in a}
    budget_b = {training_budget(training_section(r["plans"], configuration)) for r in b}
    iterations = {name: sorted({(e or 0) * (i or 0) for e, i, _ in budgets})
                  for name, budgets in (("longer", budget_a), ("shorter", budget_b))}
    if len(iterations["longer"]) != 1 or len(iterations["shorter"]) != 1 \
            or iterations["longer"][0] <= iterations["shorter"][0]:
        raise EvidenceError(f"{longer_records}: its plain students trained for {iterations['longer']} iterations, "
                            f"this protocol's for {iterations['shorter']}: the budget check needs one longer budget "
                            f"(e.g. twice --student-epochs, with its own --tag).")
    test = compare_record_sets(a, b, configuration)
    out = {"seeds": seeds, "longer_records": longer_records, "iterations": iterations["shorter"][0],
           "longer_iterations": iterations["longer"][0], "tolerance": tolerance,
           "test_gain": {k: test[k] for k in ("mean_diff", "ci95", "n_cases", "mean_diff_per_seed")}}
    if all(isinstance(r.get("validation"), dict) for r in a + b):
        cases = sorted(b[0]["validation"])
        if any(sorted(r["validation"]) != cases for r in a + b):
            raise EvidenceError(f"{longer_records}: its plain students were validated on other cases than this "
                                f"protocol's: the budget check pairs models of the same fold of the same split.")
        diffs = (np.array([[r["validation"][c] for c in cases] for r in a])
                 - np.array([[r["validation"][c] for c in cases] for r in b]))
        diffs = diffs[:, ~np.isnan(diffs).any(axis=0)]  # a case without foreground in reference and predictions
        gain = paired_bootstrap(diffs)
        out["validation_gain"] = {k: gain[k] for k in ("mean_diff", "ci95", "n_cases", "mean_diff_per_seed")}
        out["stopped_improving"] = bool(gain["ci95"][1] < tolerance)
    else:
        mean = float(np.mean([ra["validation_mean_dice"] - rb["validation_mean_dice"] for ra, rb in zip(a, b)]))
        out["validation_gain"] = {"mean_diff": mean, "ci95": None, "n_cases": None}
        out["stopped_improving"] = None
    return out


def compare_record_sets(a: list[dict], b: list[dict], configuration: str, names_a: list[str] | None = None,
                        names_b: list[str] | None = None) -> dict:
    """Models of two record sets paired seed by seed (a[i] with b[i]) over the held-out test cases: e.g. one recipe at
    two budgets, or two protocols' students, which no single results file pairs. Both sides must hold the same test
    cases (the same split). Returns each side's mean Dice (overall, per seed), validation Dice and budget, and the
    paired differences a - b with ``paired_bootstrap``'s interval (cases and seeds resampled)."""
    if not a or len(a) != len(b):
        raise EvidenceError(f"compare {len(a)} model(s) with {len(b)}: give one model per seed on each side.")
    names_a = names_a or [record_name(r) for r in a]
    names_b = names_b or [record_name(r) for r in b]
    cases = sorted(a[0]["test"])
    for records, names in ((a, names_a), (b, names_b)):
        for record, name in zip(records, names):
            if sorted(record["test"]) != cases:
                raise EvidenceError(f"{name} was evaluated on other test cases than {names_a[0]} "
                                    f"({len(record['test'])} against {len(cases)}): records of different splits do "
                                    f"not pair. Compare records of the same split file.")
    dice_a, dice_b = dice_matrix(a, cases), dice_matrix(b, cases)

    def side(records, dice):
        budgets = sorted({training_budget(training_section(r["plans"], configuration)) for r in records},
                         key=str)
        validation = [r.get("validation_mean_dice") for r in records]
        return {"models": [record_name(r) for r in records], "test_mean_dice": float(dice.mean()),
                "test_mean_dice_per_seed": [float(v) for v in dice.mean(axis=1)],
                "validation_mean_dice": None if None in validation else float(np.mean(validation)),
                "budgets": [budget_text(budget) for budget in budgets],
                "teacher_network_weights_sha256": sorted({str(r.get("teacher_network_weights_sha256"))
                                                          for r in records})}

    return {"a": side(a, dice_a), "b": side(b, dice_b), "n_cases": len(cases),
            **paired_bootstrap(dice_a - dice_b)}


def budget_result(check: dict | None) -> str:
    """What a comparison at this budget measures, by the budget check of the plain student of its width."""
    if not check or not check.get("seeds"):
        return "unchecked"  # no records at a longer budget: the last-fifth test alone cannot tell
    return {True: "final quality", False: "learning speed", None: "undecided"}[check["stopped_improving"]]


def check_budget_check_records(p: "Protocol") -> None:
    """Before any training (run_evidence.py) and when reporting: the budget check's records folder exists."""
    if p.budget_check_records and not isdir(p.budget_check_records):
        raise EvidenceError(f"--budget-check-records {p.budget_check_records}: no such folder. It is the records "
                            f"folder of this protocol run with more --student-epochs and its own --tag, e.g. "
                            f"benchmarks/records/<dataset>-<configuration>-<tag>.")


def budget_checks_of(students: dict, p: "Protocol") -> dict:
    """budget_doubling_check of every plain student width that has records at the longer budget
    (Protocol.budget_check_records); width -> check, and a width without them -> its reason."""
    if not p.budget_check_records:
        return {}
    check_budget_check_records(p)
    longer_all = load_records(p.budget_check_records)
    where = shown_path(p.budget_check_records)
    checks = {}
    for (method, width), by_seed in students.items():
        if method != "plain":
            continue
        longer = {s: longer_all[record_name(r)] for s, r in by_seed.items() if record_name(r) in longer_all}
        checks[str(width)] = budget_doubling_check(by_seed, longer, p.configuration, where) if longer else \
            {"seeds": [], "longer_records": where, "stopped_improving": None,
             "reason": "no record of this width's plain students there"}
    if checks and not any(c["seeds"] for c in checks.values()):
        plain = [record_name(r) for (method, _), by_seed in students.items() if method == "plain"
                 for r in by_seed.values()]
        raise EvidenceError(f"--budget-check-records {where}: none of this protocol's plain students "
                            f"({', '.join(plain)}) has a record there. Give the records folder of the same protocol "
                            f"at a longer budget.")
    return checks
