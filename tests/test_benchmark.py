"""nnUNetv2_kd_benchmark: the real trainer, teacher and predictor timed on the test workspace, and bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
from os.path import join

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from conftest import CONFIGURATION, DATASET_ID, DATASET_NAME, STUDENT_PLANS
from nnunet_kd.benchmark import run_benchmark
from nnunet_kd.pipeline import console_script


def _files_under(folder: str) -> set[str]:
    return {join(root, f) for root, _, files in os.walk(folder) for f in files}


def test_benchmark_measures_teacher_student_and_kd_step(workspace, monkeypatch, tmp_path, capsys):
    workspace.set_env(monkeypatch)
    results_before = _files_under(workspace.results)
    out = tmp_path / "bench" / "kd.json"
    res = run_benchmark(str(DATASET_ID), CONFIGURATION, "0", teacher=workspace.teacher_folder,
                        student_plans=STUDENT_PLANS, device="cpu", steps=2, warmup=1, inference_repeats=1,
                        output=str(out))
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed[printed.index("KD step / (plain"):])

    # The JSON on disk is what run_benchmark returned; the markdown table beside it is what was printed.
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    md = (tmp_path / "bench" / "kd.md").read_text()
    assert md.strip() in printed
    assert md.index("KD step / (plain student step + teacher forward) =") < md.index("| | teacher | student |")
    assert printed.index("KD step / (plain") < printed.index("| training step |")

    # Training steps: medians of exactly `steps` timings, on the CPU, with the loss terms each step really computed.
    training = res["training"]
    for key in ("plain_student_step", "kd_step", "teacher_forward"):
        m = training[key]
        assert len(m["all_s"]) == 2 and all(t > 0 for t in m["all_s"]), key
        assert m["median_s"] == pytest.approx(sum(m["all_s"]) / 2), key
        assert m["peak_memory_bytes"] > 0 and m["peak_memory_increase_bytes"] >= 0, key
        assert m["memory_measure"] == "cpu_rss_sampled_5ms", key
    assert training["plain_student_step"]["loss_terms"] == ["segmentation"]
    assert training["kd_step"]["loss_terms"] == ["segmentation", "kl", "lovasz", "feature"]

    plain, kd, teacher = (training[k]["median_s"] for k in ("plain_student_step", "kd_step", "teacher_forward"))
    assert res["ratios"]["kd_over_student_plus_teacher"] == pytest.approx(kd / (plain + teacher), rel=1e-12)
    assert res["ratios"]["kd_over_plain"] == pytest.approx(kd / plain, rel=1e-12)
    rounds = [k / (p + t) for k, p, t in zip(*(training[key]["all_s"] for key in
                                               ("kd_step", "plain_student_step", "teacher_forward")))]
    assert res["ratios"]["kd_over_student_plus_teacher_paired"]["median"] == pytest.approx(sum(rounds) / 2, rel=1e-12)
    assert f"round by round: median {sum(rounds) / 2:.3f}" in printed
    assert f"= {kd / (plain + teacher):.3f}" in printed and f"= {kd / plain:.3f}" in printed

    # Cost: the deployed networks, matching what the planner recorded for the same plans.
    recipe = load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json"))["kd"][CONFIGURATION]["student"]
    cost = res["cost"]
    assert cost["teacher"]["parameters"] == recipe["teacher_parameters"]
    assert cost["student"]["parameters"] == recipe["student_parameters"]
    assert cost["teacher"]["flops_per_patch"] == recipe["teacher_flops_per_patch"]
    assert cost["student"]["flops_per_patch"] == recipe["student_flops_per_patch"]
    assert cost["teacher"]["parameters"] > 8 * cost["student"]["parameters"] > 0
    assert cost["adapters_parameters"] > 0

    # Sliding-window inference of both networks on a real preprocessed validation case, mirroring off and on.
    splits = load_json(join(workspace.preprocessed, "splits_final.json"))
    assert res["setup"]["case"] == sorted(splits[0]["val"])[0]
    assert res["setup"]["case_shape"][0] == 1 and len(res["setup"]["case_shape"]) == 4
    for who in ("teacher", "student"):
        assert res["inference"][who]["mirror_axes"] == [0, 1, 2]
        for mode in ("mirroring_off", "mirroring_on"):
            m = res["inference"][who][mode]
            assert len(m["all_s"]) == 1 and m["median_s"] > 0 and m["peak_memory_bytes"] > 0, (who, mode)
    assert "untrained" in res["setup"]["student_inference_weights"]

    # Provenance.
    env = res["environment"]
    assert env["versions"]["nnunetv2"] == "2.8.1" and env["versions"]["torch"] == torch.__version__
    assert env["device"] == "cpu" and env["device_name"] and env["cpu_count"] >= 1
    assert res["command"].startswith(f"nnUNetv2_kd_benchmark -d {DATASET_ID} -c {CONFIGURATION} -f 0 --teacher ")
    assert res["setup"]["dataset"] == DATASET_NAME and res["setup"]["trainer"] == "nnUNetTrainerKD_BalancedHints"
    assert res["setup"]["steps"] == 2 and res["setup"]["warmup"] == 1 and res["setup"]["fixed_batches"] == 2

    # A measurement, not a training run: nothing is left under nnUNet_results.
    assert _files_under(workspace.results) == results_before


def test_benchmark_cli_names_the_bad_input_and_the_fix(workspace, tmp_path):
    bad_teacher = str(tmp_path / "no_such_teacher" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    common = ["-d", str(DATASET_ID), "-c", CONFIGURATION, "--device", "cpu", "-o", str(tmp_path / "b.json")]
    proc = subprocess.run(console_script("nnUNetv2_kd_benchmark") + common +
                          ["--teacher", bad_teacher, "--student-plans", STUDENT_PLANS],
                          env=workspace.env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--teacher {bad_teacher}: teacher model folder not found" in proc.stderr
    assert "nnUNetv2_kd_plan_student" in proc.stderr and "Traceback" not in proc.stderr

    proc = subprocess.run(console_script("nnUNetv2_kd_benchmark") + common + ["--student-plans", "nnUNetPlans_missing"],
                          env=workspace.env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    missing = join(workspace.preprocessed, "nnUNetPlans_missing.json")
    assert f"Student plans not found: {missing}" in proc.stderr
    assert "nnUNetv2_kd_plan_student -d" in proc.stderr and "-o nnUNetPlans_missing" in proc.stderr
    assert not os.path.exists(tmp_path / "b.json")


class _Payload:
    """Pickled into a poisoned checkpoint: unpickling it without weights_only runs os.makedirs(marker)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_benchmark_refuses_a_poisoned_student_checkpoint_without_running_it(workspace, monkeypatch, tmp_path):
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunet_kd.teacher import UnsafeCheckpointError
    workspace.set_env(monkeypatch)
    student = tmp_path / f"nnUNetTrainerKD_Adaptive__{STUDENT_PLANS}__{CONFIGURATION}"
    (student / "fold_0").mkdir(parents=True)
    save_json(load_json(join(workspace.preprocessed, STUDENT_PLANS + ".json")), str(student / "plans.json"))
    save_json(load_json(join(workspace.preprocessed, "dataset.json")), str(student / "dataset.json"))
    marker = str(tmp_path / "payload_ran")
    checkpoint = str(student / "fold_0" / "checkpoint_final.pth")
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainerKD_Adaptive",
                "init_args": {"configuration": CONFIGURATION}, "payload": _Payload(marker)}, checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_final\.pth holds Python objects") as error:
        run_benchmark(str(DATASET_ID), None, "0", student=str(student), device="cpu", steps=1, warmup=0,
                      inference_repeats=1, inference_warmup=0, output=str(tmp_path / "b.json"), verbose=False)
    assert checkpoint in str(error.value) and "re-save the checkpoint" in str(error.value)
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "b.json")


def test_memory_is_sampled_only_in_untimed_rounds_never_beside_a_timed_call(monkeypatch):
    """The CPU's memory sampler is a thread: it must not run while a call is timed (it would slow that call)."""
    from nnunet_kd import benchmark

    sampling = []

    class RecordingPeakMemory(benchmark.PeakMemory):
        def __enter__(self):
            sampling.append(True)
            return super().__enter__()

        def __exit__(self, *exc):
            sampling.append(False)
            return super().__exit__(*exc)

    calls = []
    monkeypatch.setattr(benchmark, "PeakMemory", RecordingPeakMemory)
    out = benchmark.time_interleaved({"step": (lambda x: calls.append(bool(sampling) and sampling[-1]), [0])},
                                     steps=3, warmup=0, device=torch.device("cpu"))
    assert calls == [True, False, False, False]  # one untimed round with the sampler, then three timed without
    assert len(out["step"]["all_s"]) == 3 and out["step"]["peak_memory_bytes"] > 0
