"""Per-case Dice from nnU-Net's evaluation, and the paired bootstrap and plateau statistics of the protocol."""
from __future__ import annotations

from os.path import basename

import numpy as np


def per_case_metrics(summary_file: str) -> dict:
    """nnU-Net's evaluation summary -> {case: {label: {"Dice", "FP", "FN", "TP", "n_ref", "n_pred"}}} (labels as
    strings)."""
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    summary = load_summary_json(summary_file)
    out = {}
    for entry in summary["metric_per_case"]:
        case = basename(entry["reference_file"])
        case = case[:case.index(".")] if "." in case else case
        out[case] = {str(k): {m: float(v[m]) for m in ("Dice", "FP", "FN", "TP", "n_ref", "n_pred")}
                     for k, v in entry["metrics"].items()}
    return out


def mean_foreground_dice(case_metrics: dict) -> float:
    """Mean Dice over the foreground labels of one case (nnU-Net gives NaN Dice when a label is absent from both
    reference and prediction: such a label is skipped, as nnU-Net's foreground mean does)."""
    values = [m["Dice"] for m in case_metrics.values() if not np.isnan(m["Dice"])]
    return float(np.mean(values)) if values else float("nan")


def paired_bootstrap(diffs: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean and 95% percentile bootstrap interval of paired differences ``diffs`` (seeds x cases).

    Each resample draws cases with replacement (the test set is a sample of patients) and, independently,
    seeds with replacement (training is a random process), so the interval reflects both sources of variation; with
    few seeds (2-3 here) the seed part is coarse and understates the between-seed variance by (n - 1) / n. With a
    single seed it reduces to the ordinary case bootstrap."""
    diffs = np.atleast_2d(np.asarray(diffs, dtype=float))
    n_seeds, n_cases = diffs.shape
    rng = np.random.default_rng(seed)
    seeds_idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    cases_idx = rng.integers(0, n_cases, size=(n_boot, n_cases))
    # mean over the resampled seeds of the mean over the resampled cases
    per_seed_case_means = diffs[:, cases_idx]            # (n_seeds, n_boot, n_cases)
    per_seed_means = per_seed_case_means.mean(axis=2).T  # (n_boot, n_seeds)
    boot = np.take_along_axis(per_seed_means, seeds_idx, axis=1).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"mean_diff": float(diffs.mean()), "ci95": [float(low), float(high)], "n_cases": int(n_cases),
            "n_seeds": int(n_seeds), "mean_diff_per_seed": [float(v) for v in diffs.mean(axis=1)]}


def plateau(curve: list[float], fraction: float = 0.2, tolerance: float = 0.01) -> dict:
    """Has a validation curve stopped improving? The gain of a least-squares line over its last ``fraction`` of
    epochs (slope x span). ``flat`` when that gain is below ``tolerance`` (0.01 Dice by default)."""
    curve = [float(v) for v in curve]
    n = max(3, int(round(len(curve) * fraction)))
    if len(curve) < n:
        return {"flat": False, "gain_over_last_fifth": None, "epochs": len(curve)}
    tail = np.asarray(curve[-n:])
    slope = np.polyfit(np.arange(n), tail, 1)[0]
    gain = float(slope * (n - 1))
    return {"flat": bool(gain < tolerance), "gain_over_last_fifth": gain, "epochs_in_window": n,
            "tolerance": tolerance, "epochs": len(curve)}


def dice_matrix(records: list[dict], cases: list[str]) -> np.ndarray:
    return np.array([[mean_foreground_dice(r["test"][c]) for c in cases] for r in records])
