"""What a new user meets first: the --help texts, the nnUNet_extTrainer warning, the demo's plots. No training."""
from __future__ import annotations

import os
import subprocess
from os.path import dirname, join

import pytest

from nnunet_kd.pipeline import console_script
from nnunet_kd.planning import plan_student_main
from nnunet_kd.resources import EXPORT_LINE, ext_trainer_problem, trainers_dir


# ------------------------------------------------------------------------------------- nnUNetv2_kd_trainers_dir
def test_trainers_dir_prints_the_path_and_explains_it_on_help():
    command = console_script("nnUNetv2_kd_trainers_dir")
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str(trainers_dir()), proc.stderr

    for flag in ("--help", "-h"):
        proc = subprocess.run(command + [flag], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert EXPORT_LINE in proc.stdout and "nnUNet_extTrainer" in proc.stdout
        assert str(trainers_dir()) not in proc.stdout  # usage, not the path

    proc = subprocess.run(command + ["--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr and not proc.stdout


# ------------------------------------------------------------------------------------- nnUNetv2_kd_benchmark --help
def test_benchmark_help_states_each_real_default_once(capsys):
    from nnunet_kd.benchmark import build_parser, main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping

    assert "(default: None)" not in text
    defaults = {a.dest: a.default for a in build_parser()._actions}
    for option, value in (("-f", "0"), ("--student-checkpoint", "checkpoint_final.pth"), ("--steps", 20),
                          ("--warmup", 3), ("--inference-repeats", 3), ("--inference-warmup", 1), ("--seed", 12345)):
        dest = option.lstrip("-").replace("-", "_")
        assert defaults[dest] == value, option
        assert f"(default: {value})" in text, option
    # Options whose default depends on other inputs say so in words, without a contradicting "(default: None)".
    assert "default: cuda if torch sees a CUDA device, else cpu" in text
    assert "required with --student-plans; default with --student: the one in its folder name" in text
    assert "default: nnUNetTrainerKD_BalancedHints, or the trainer of the --student folder" in text
    for phrase in ("default: the one in the student plans' recipe", "default: the fold's first validation case"):
        assert phrase in text
    assert "default: kd_benchmark_<d>_<configuration>_fold<f>_<device>.json in the current folder" in text
    parser = build_parser()
    for action in parser._actions:  # no option states its default twice (argparse's and the text's own)
        assert parser._get_formatter()._get_help_string(action).lower().count("default:") <= 1, action.option_strings


# ------------------------------------------------------------------------------------- nnUNet_extTrainer
def test_ext_trainer_problem_names_unset_and_foreign_folders(tmp_path):
    ours = str(trainers_dir())
    assert "is not set" in ext_trainer_problem({})
    assert "is not set" in ext_trainer_problem({"nnUNet_extTrainer": " "})
    problem = ext_trainer_problem({"nnUNet_extTrainer": str(tmp_path)})
    assert str(tmp_path) in problem and ours in problem
    assert ext_trainer_problem({"nnUNet_extTrainer": ours}) is None
    assert ext_trainer_problem({"nnUNet_extTrainer": ours + os.sep}) is None
    assert ext_trainer_problem({"nnUNet_extTrainer": os.pathsep.join([str(tmp_path), ours])}) is None


def test_nnunet_finds_the_kd_trainers_only_through_nnUNet_extTrainer(monkeypatch):
    """What the warning is about: nnU-Net 2.8.1's own lookup, which has no registration hook for plugins."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert ext_trainer_problem() is not None
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerKD_Adaptive"):
        recursive_find_trainer_class_by_name("nnUNetTrainerKD_Adaptive")
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_dir()))
    assert ext_trainer_problem() is None
    assert recursive_find_trainer_class_by_name("nnUNetTrainerKD_Adaptive").__name__ == "nnUNetTrainerKD_Adaptive"


def test_plan_student_entry_point_ends_with_the_export_line(monkeypatch, capsys):
    import nnunet_kd.planning
    setup_py = open(join(dirname(dirname(os.path.abspath(__file__))), "setup.py")).read()
    assert '"nnUNetv2_kd_plan_student=nnunet_kd.planning:plan_student_main"' in setup_py
    calls = []
    monkeypatch.setattr(nnunet_kd.planning, "main", lambda argv=None: calls.append(argv))

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    plan_student_main(["-d", "4"])
    assert calls == [["-d", "4"]]
    err = capsys.readouterr().err
    assert "nnUNetv2_kd_plan_student: warning: nnUNet_extTrainer is not set" in err and EXPORT_LINE in err

    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_dir()))
    plan_student_main([])
    assert capsys.readouterr().err == ""

    def failing(argv=None):
        raise SystemExit(2)
    monkeypatch.delenv("nnUNet_extTrainer")
    monkeypatch.setattr(nnunet_kd.planning, "main", failing)
    with pytest.raises(SystemExit):  # a planning error stays the last word
        plan_student_main([])
    assert EXPORT_LINE not in capsys.readouterr().err


def test_demo_ends_with_the_export_line_when_the_shell_lacks_it(monkeypatch, tmp_path, capsys):
    import nnunet_kd.demo
    monkeypatch.setattr(nnunet_kd.demo, "run_demo", lambda *a, **k: None)
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path))
    nnunet_kd.demo.main(["--workdir", str(tmp_path / "w"), "--synthetic", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "nnUNetv2_kd_demo: warning: nnUNet_extTrainer=" in err and EXPORT_LINE in err



def test_demo_runs_on_generated_data_unless_given_a_dataset_and_its_configuration(monkeypatch, tmp_path):
    import nnunet_kd.demo
    calls = []
    monkeypatch.setattr(nnunet_kd.demo, "run_demo", lambda *a, **k: calls.append(a))
    nnunet_kd.demo.main(["--workdir", str(tmp_path / "a"), "--device", "cpu"])
    nnunet_kd.demo.main(["--workdir", str(tmp_path / "b"), "--device", "cpu", "--data", "/x/Dataset004_H", "-c", "2d"])
    assert calls[0][6] is None and calls[0][7] == "3d_fullres"  # generated data by default, even beside shared data
    assert calls[1][6] == "/x/Dataset004_H" and calls[1][7] == "2d"
    with pytest.raises(SystemExit):
        nnunet_kd.demo.main(["--workdir", str(tmp_path / "c"), "--data", "/x/Dataset004_H", "--synthetic"])


def test_demo_names_models_that_have_not_learned_a_class_yet():
    from nnunet_kd.demo import DEFAULT_BUDGET, unlearned_classes
    result = {"labels": {"1": "peripheral_zone", "2": "transition_zone"},
              "models": [{"model": "teacher", "dice_per_class": {"1": 0.89, "2": 0.88}},
                         {"model": "plain student", "dice_per_class": {"1": 0.0, "2": 0.71}},
                         {"model": "Adaptive KD", "dice_per_class": {"1": 0.85, "2": 0.84}}]}
    assert unlearned_classes(result) == {"plain student": ["peripheral_zone"]}
    # the quarter-width plain student predicts no foreground for its first ~200 iterations on the demo data
    assert DEFAULT_BUDGET.student_epochs * DEFAULT_BUDGET.iterations_per_epoch >= 400


# ------------------------------------------------------------------------------------- plots
def _fake_result() -> dict:
    def curves(epochs):
        return {"0": {"ema_fg_dice": [0.1 * e for e in range(epochs)],
                      "val_losses": [1 - 0.1 * e for e in range(epochs)]}}
    models = [{"model": "teacher", "parameters": 5_520_000, "mean_dice": 0.89, "curves": curves(8)},
              {"model": "plain student", "parameters": 346_065, "mean_dice": 0.0, "curves": curves(4)},
              {"model": "logit KD (Fast-nnUNet recipe)", "parameters": 346_065, "mean_dice": 0.0, "curves": curves(4)},
              {"model": "Adaptive KD", "parameters": 346_065, "mean_dice": 0.85, "curves": curves(4),
               "iterations_per_epoch": 10}]
    return {"dataset": "Dataset990_X", "configuration": "3d_fullres", "device_name": "cpu", "folds": [0],
            "budget": {"teacher_epochs": 8, "student_epochs": 4, "iterations_per_epoch": 25}, "models": models}


def test_plots_use_a_legend_not_overlapping_labels_and_iterations_on_x(monkeypatch, tmp_path):
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from nnunet_kd.compare import plot_results
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to look at them
    paths = plot_results(_fake_result(), str(tmp_path / "demo"))
    assert [os.path.basename(p) for p in paths] == ["demo_dice_vs_params.png", "demo_curves.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)

    scatter, curves = figures
    ax = scatter.axes[0]
    assert not ax.texts  # no text at the points: students share a parameter count and would overlap
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 4 and legend[2].startswith("logit KD (Fast-nnUNet recipe): 346.06 k params, Dice 0.000")
    assert len({tuple(c.get_paths()[0].vertices.round(3).ravel()) for c in ax.collections}) == 4  # distinct markers
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1  # legend outside the axes

    x_end = {line.get_label(): line.get_xdata()[-1] for line in curves.axes[0].lines}
    assert x_end == {"teacher": 8 * 25, "plain student": 4 * 25, "logit KD (Fast-nnUNet recipe)": 4 * 25,
                     "Adaptive KD": 4 * 10}
    assert curves.axes[0].lines[0].get_xdata()[0] == 25  # the first value is logged after one epoch
    assert "training iterations" in curves.axes[0].get_xlabel()
