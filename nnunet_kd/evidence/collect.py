"""What a workspace holds: every finished model's record (per-case test metrics, curves, weights' hash), the
inference latency per width, and the records saved for the repository."""
from __future__ import annotations

import os
from os.path import basename, isdir, isfile, join

from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_kd.evidence.protocol import (ALL_LABELS_PLAIN, TEACHER_PLANS, TEACHER_TRAINER, EvidenceError,
                                         preset_differences, subset_ensemble_name, subset_teacher_names, sweep_file_of,
                                         variant_differences, variant_overrides)
from nnunet_kd.evidence.records import (budget_text, load_records, network_weights_sha256, save_record, trained_on,
                                        training_budget, training_section, validation_curves, write_record)
from nnunet_kd.evidence.statistics import mean_foreground_dice, per_case_metrics
from nnunet_kd.evidence.workspace import Workspace, crossval_folds
from nnunet_kd.methods import NO_VARIANTS, TRAINERS, VARIANT_NAME, VARIANT_SEPARATOR, method_and_variant


def model_record(ws: "Workspace", folder: str) -> dict | None:
    """Everything measured for one finished model, or None when it is not finished and evaluated."""
    fold = ws.p.fold
    summary = join(folder, f"fold_{fold}", "test_predictions", "summary.json")
    validation = join(folder, f"fold_{fold}", "validation", "summary.json")
    if not (isfile(summary) and isfile(validation)):
        return None
    return {"folder": folder, "test": per_case_metrics(summary),
            "validation_mean_dice": float(load_json(validation)["foreground_mean"]["Dice"]),
            # per case, for the budget check's paired interval on validation cases (recipe and budget choices are
            # made on validation, never on test cases)
            "validation": {case: mean_foreground_dice(m) for case, m in per_case_metrics(validation).items()},
            "curves": validation_curves(folder, fold), "plans": load_json(join(folder, "plans.json")),
            "network_weights_sha256": network_weights_sha256(join(folder, f"fold_{fold}", "checkpoint_final.pth")),
            "trained_on": trained_on(folder, ws.p.device)}


def latency(ws: "Workspace", folder: str | None, plans: dict | None = None) -> dict:
    """Sliding-window prediction of one real test volume with nnU-Net's predictor (no mirroring): median, min and max
    of ``latency_repeats`` runs after one warm-up, with 1 thread and with all of this machine's cores.

    A model of this workspace is timed from its checkpoint (``folder``). A model known only from a committed record
    (``folder`` None) is timed through the network its ``plans`` define, freshly initialised
    (nnunet_kd.width_budget.time_plans): the weights do not change the time, and every width of one results file is
    then timed on the same machine."""
    import copy

    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.cost import make_predictor, median_inference_seconds
    from nnunet_kd.width_budget import time_plans

    device = torch.device(ws.p.device)
    if folder is not None:
        # nnU-Net's predictor runs in this process and finds trainer classes through os.environ.
        os.environ.update({k: ws.env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                                  "nnUNet_extTrainer")})
        predictor = make_predictor(folder, ws.p.fold, device=device, use_mirroring=False)
        plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
        dataset_json = predictor.dataset_json

        def timing_of(data):
            return median_inference_seconds(predictor, data, repeats=ws.p.latency_repeats, warmup=1)
        weights = "trained (the model's checkpoint)"
    elif plans is not None:
        plans_manager = PlansManager(copy.deepcopy(plans))
        configuration_manager = plans_manager.get_configuration(ws.p.configuration)
        dataset_json = ws.dataset_json()

        def timing_of(data):
            return time_plans(plans, dataset_json, ws.p.configuration, data, device,
                              repeats=ws.p.latency_repeats, warmup=1)
        weights = "freshly initialised network of the record's plans (a model of another session: weights do not " \
                  "change the time)"
    else:
        raise ValueError("latency() needs a model folder or the plans of a committed record")
    case = ws.split["test"][0]
    image_files = sorted(join(ws.test_images, f) for f in os.listdir(ws.test_images) if f.startswith(case + "_"))
    data = _preprocess(plans_manager, configuration_manager, dataset_json, image_files)
    threads_before = torch.get_num_threads()
    result = {"case": case, "preprocessed_shape": list(data.shape), "device": ws.p.device, "weights": weights}
    try:
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            timing = timing_of(data)
            result[f"threads_{threads}"] = {"median_s": timing["median_s"], "min_s": min(timing["all_s"]),
                                            "max_s": max(timing["all_s"]), "runs": len(timing["all_s"])}
    finally:
        torch.set_num_threads(threads_before)
    return result


def _preprocess(plans_manager, configuration_manager, dataset_json: dict, image_files: list[str]):
    """nnU-Net's own preprocessing of one raw case, as its predictor does it."""
    import torch

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case(image_files, None, plans_manager, configuration_manager, dataset_json)
    return torch.from_numpy(data)


def parse_student_folder(name: str, configuration: str) -> tuple[str, float, int, float | None, int | None] | None:
    """'<trainer>__nnUNetPlans_evidence_w0p25_s1__<cfg>' -> (method, 0.25, 1, None, None),
    '<trainer>__nnUNetPlans_evidence_w0p25_f0p5_s1__<cfg>' -> (method, 0.25, 1, 0.5, None) (labelled fraction) and
    'nnUNetTrainerKD_MultiTeacher__nnUNetPlans_evidence_w0p25_k3_s1__<cfg>' -> ('multi_teacher', 0.25, 1, None, 3)
    (subset teachers), 'nnUNetTrainerKD_Logit__nnUNetPlans_evidence_w0p5_folds5_s0__<cfg>' -> ('logit_all_folds',
    0.5, 0, None, None) (the teacher's folds), '<KD trainer>__nnUNetPlans_evidence_w0p25_f0p5_vseg1_s0__<cfg>' ->
    ('<method>:seg1', 0.25, 0, 0.5, None) (a recipe variant); None for anything else."""
    parts = name.split("__")
    if len(parts) != 3 or parts[2] != configuration or not parts[1].startswith("nnUNetPlans_evidence_w"):
        return None
    from nnunet_kd.pipeline import LEGACY_TRAINERS

    methods = {v: k for k, v in TRAINERS.items() if k != "logit_all_folds"}  # its trainer is logit's
    methods.update({old: methods[new] for new, olds in LEGACY_TRAINERS.items() if new in methods for old in olds})
    if parts[0] not in methods:
        return None
    method = methods[parts[0]]
    width, _, seed = parts[1][len("nnUNetPlans_evidence_w"):].partition("_s")
    width, has_variant, variant = width.partition("_v")
    if has_variant and not VARIANT_NAME.match(variant):
        return None
    width, _, folds = width.partition("_folds")
    if folds:  # plans of the teacher's folds: only the peer at its defaults trains from them
        if method != "logit" or not folds.isdigit():
            return None
        method = "logit_all_folds"
    width, _, teachers = width.partition("_k")
    width, _, fraction = width.partition("_f")
    fraction = fraction[:-1] if fraction.endswith("x") else fraction  # extra unlabelled images: collect() checks plans
    if (method == "multi_teacher") != bool(teachers):
        return None  # a multi-teacher student trains only from its own plans, and only it does
    if has_variant and method in NO_VARIANTS:
        return None
    if has_variant:
        method = f"{method}{VARIANT_SEPARATOR}{variant}"
    try:
        return (method, float(width.replace("p", ".")), int(seed),
                float(fraction.replace("p", ".")) if fraction else None, int(teachers) if teachers else None)
    except ValueError:  # another plans name that happens to share the prefix
        return None


def fold_teachers_sha256(ws: "Workspace") -> str | None:
    """One identity for the teacher's folds (their weights' hashes joined in fold order, like _teachers_sha256), or
    None when one of them is not finished in this workspace."""
    folder = ws.folder(TEACHER_TRAINER, TEACHER_PLANS)
    checkpoints = [join(folder, f"fold_{f}", "checkpoint_final.pth") for f in range(crossval_folds(ws))]
    if not all(isfile(c) for c in checkpoints):
        return None
    return "+".join(network_weights_sha256(c) for c in checkpoints)


def collect(ws: "Workspace") -> dict:
    """Every finished, evaluated model trained on this protocol's student budget: the workspace's, and the committed
    records (Protocol.records_dir) of models the workspace does not hold, when they learned from the same teacher
    checkpoint. A record's ``folder`` is None when the model is not in this workspace. With a labelled fraction, the
    plain students of the same budget trained on all labels come as method ALL_LABELS_PLAIN. ``fold_teachers_sha256``:
    the identity of the teacher's folds in this workspace (fold_teachers_sha256; None: not all finished here)."""
    p = ws.p
    committed = load_records(p.records_dir)
    teacher_folder = ws.folder(TEACHER_TRAINER, TEACHER_PLANS)
    teacher = model_record(ws, teacher_folder) or committed.get(basename(teacher_folder))
    teacher_sha = teacher["network_weights_sha256"] if teacher else None
    local = {name: join(ws.results, name) for name in os.listdir(ws.results)} if isdir(ws.results) else {}
    students, skipped = {}, []
    subset, subset_sha = _collect_subset_teachers(ws, local, committed, skipped)
    folds_sha = fold_teachers_sha256(ws)
    folds_committed = set()  # the fold ensembles of committed records used (one only, so that seeds pair)
    for name in sorted(set(local) | set(committed)):
        parsed = parse_student_folder(name, p.configuration)
        if parsed is None:
            continue
        method, width, seed, fraction, n_teachers = parsed
        if n_teachers is not None and n_teachers != p.subset_teachers:
            continue  # a student of another number of subset teachers
        if fraction != p.labelled_fraction:
            if p.labelled_fraction is None or fraction is not None or method != "plain":
                continue  # a model of a protocol with another labelled fraction: reported in that one's results file
            method = ALL_LABELS_PLAIN
        if n_teachers is not None and subset_sha is None:
            skipped.append(f"{name}: its {n_teachers} subset teachers are not all finished and evaluated at this "
                           f"protocol's teacher budget")
            continue
        record = model_record(ws, local[name]) if name in local else None
        if record is None and name in committed:
            record = committed[name]
            recorded = record.get("teacher_network_weights_sha256")
            if method == "logit_all_folds":
                # the folds here, or (a workspace without them) the committed students' one ensemble whose fold of
                # this protocol is the protocol's teacher
                members = str(recorded).split("+")
                if folds_sha is not None and recorded != folds_sha or folds_sha is None and (
                        len(members) <= p.fold or members[p.fold] != teacher_sha or folds_committed - {recorded}):
                    skipped.append(f"{name}: committed record of a student of other fold teachers (other network "
                                   f"weights)")
                    continue
                folds_committed.add(recorded)
            elif recorded != (subset_sha if n_teachers else teacher_sha):
                skipped.append(f"{name}: committed record of a student of another teacher (other network weights)")
                continue
        if record is None:
            continue
        training = training_section(record["plans"], p.configuration)
        budget = training_budget(training)
        if budget != (p.student_epochs, p.iterations_per_epoch, p.student_val_iterations):
            skipped.append(f"{name}: trained for {budget_text(budget)}, not this protocol's budget")
            continue
        labels = (training.get("labelled_fraction"), training.get("labelled_fraction_seed", 0),
                  (training.get("unlabelled_images") or {}).get("source"))
        wanted = (None, 0, None) if method == ALL_LABELS_PLAIN else \
            (p.labelled_fraction, p.labelled_fraction_seed if p.labelled_fraction is not None else 0,
             p.unlabelled_images)
        if labels != wanted:
            skipped.append(f"{name}: trained with (labelled fraction, its seed, unlabelled images) {labels}, not this "
                           f"protocol's {wanted}")
            continue
        if method_and_variant(method)[1] is not None:
            try:
                differences = variant_differences(record["plans"], p.configuration, method,
                                                  variant_overrides(p.sweeps_dir, method))
            except EvidenceError as e:
                skipped.append(f"{name}: {e}")
                continue
            if differences:
                skipped.append(f"{name}: its plans differ from the variant as defined now (the presets with the "
                               f"overrides of {sweep_file_of(p.sweeps_dir, method)}) in "
                               f"{', '.join(differences)}: the variant or the preset changed after it was trained; "
                               f"delete the model folder (and its record) to train the variant as defined now")
                continue
        else:
            differences = preset_differences(record["plans"], p.configuration, method)
            if differences:
                skipped.append(f"{name}: its plans differ from the shipped preset (plans/{method}.json) in "
                               f"{', '.join(differences)}: the preset changed after it was trained, so it is another "
                               f"recipe; a sweep variant that spells out its settings trains it again under a name of "
                               f"its own (e.g. --runs {method}:default@{width:g}, where the sweep file's 'base' holds "
                               f"the preset of its time)")
                continue
        students.setdefault((method, width), {})[seed] = record
    return {"teacher": teacher, "students": students, "skipped": skipped, "fold_teachers_sha256": folds_sha, **subset}


def _teachers_sha256(records: list[dict]) -> str:
    """One identity for a set of teachers (a multi-teacher student's record names the set it learned from)."""
    return "+".join(r["network_weights_sha256"] for r in records)


def _collect_subset_teachers(ws: "Workspace", local: dict, committed: dict, skipped: list) -> tuple[dict, str | None]:
    """({"subset_teachers": [record per teacher], "subset_ensemble": record or None} when all k subset teachers are
    finished and evaluated (from the workspace or the records) and trained at the teacher's budget, else {}; and
    their joint identity (_teachers_sha256)."""
    p = ws.p
    records, names = [], subset_teacher_names(p.configuration, p.subset_teachers)
    # all k from one source: teachers retrained here are never mixed with committed records of earlier ones
    here = any(name in local for name in names)
    for name in names:
        record = (model_record(ws, local[name]) if name in local else None) if here else committed.get(name)
        if record is None:
            return {}, None
        budget = training_budget(training_section(record["plans"], p.configuration))
        wanted = (p.subset_teacher_budget, p.iterations_per_epoch, p.val_iterations_per_epoch)
        if budget != wanted:
            skipped.append(f"{name}: trained for {budget_text(budget)}, not this protocol's subset-teacher budget "
                           f"({wanted[0]} x {wanted[1]}, {wanted[2]})")
            return {}, None
        records.append(record)
    sha = _teachers_sha256(records)
    name = subset_ensemble_name(p.configuration, p.subset_teachers)
    ensemble = join(ws.results, name, f"fold_{p.fold}", "test_predictions", "summary.json")
    if isfile(ensemble):
        ensemble_record = {"model": name, "folder": None, "in_workspace": True, "test": per_case_metrics(ensemble),
                           "validation_mean_dice": None, "curves": {}}
    else:  # the ensemble of another session's subset teachers: its committed per-case record, when of these teachers
        ensemble_record = committed.get(name)
        if ensemble_record is not None and ensemble_record.get("teacher_network_weights_sha256") != sha:
            skipped.append(f"{name}: committed record of an ensemble of other subset teachers (other network weights)")
            ensemble_record = None
    return {"subset_teachers": records, "subset_ensemble": ensemble_record}, sha


def save_ensemble_record(records_dir: str, ensemble: dict, members_sha256: str) -> str:
    """Commit-ready record of the subset teachers' ensemble (it has no checkpoint of its own: its identity is that
    of its members), so that a later session's report, without the workspace, still has its row and comparison."""
    document = {"model": ensemble["model"], "network_weights_sha256": None,
                "teacher_network_weights_sha256": members_sha256,
                **{k: v for k, v in ensemble.items() if k not in ("model", "folder", "in_workspace")}}
    return write_record(records_dir, document)


def save_workspace_records(ws: "Workspace", found: dict) -> list[str]:
    """A record (Protocol.records_dir) of every model of ``found`` that is in this workspace; returns the files."""
    if not ws.p.records_dir or found["teacher"] is None:
        return []
    teacher_sha = found["teacher"]["network_weights_sha256"]
    records = load_records(ws.p.records_dir)
    _refuse_replacing_another_budget(ws, found, records)
    committed = records.get(basename(ws.folder(TEACHER_TRAINER, TEACHER_PLANS)))
    if committed is not None and committed["network_weights_sha256"] != teacher_sha:
        raise EvidenceError(
            f"This workspace's teacher is not the one of the committed records in {ws.p.records_dir} (other network "
            f"weights): its students' records would be mixed with those of another teacher. Restore the archived "
            f"teacher (run without --no-teacher-archive in a new --workdir), give this teacher records and results of "
            f"their own with --tag (e.g. --tag teacher2), or pass --no-records.")
    written = [save_record(ws.p.records_dir, found["teacher"], None)] if found["teacher"]["folder"] else []
    subset = found.get("subset_teachers") or []
    for r in subset:
        earlier = records.get(basename(r["folder"])) if r["folder"] else None
        if earlier is not None and earlier["network_weights_sha256"] != r["network_weights_sha256"]:
            raise EvidenceError(
                f"This workspace's subset teacher {basename(r['folder'])} is not the one of the committed records in "
                f"{ws.p.records_dir} (other network weights): the multi-teacher students' records would be mixed "
                f"with those of other teachers. Use the workspace that trained them, or pass --no-records.")
    written += [save_record(ws.p.records_dir, r, None) for r in subset if r["folder"]]
    ensemble = found.get("subset_ensemble")
    if ensemble is not None and ensemble.get("in_workspace"):
        written.append(save_ensemble_record(ws.p.records_dir, ensemble, _teachers_sha256(subset)))
    folds_sha = found.get("fold_teachers_sha256")
    for (method, _), by_seed in found["students"].items():
        method = method_and_variant(method)[0]
        if method == "logit_all_folds" and folds_sha is None:
            continue  # its fold teachers are not all here (a workspace that only reports committed records)
        sha = _teachers_sha256(subset) if method == "multi_teacher" else folds_sha if method == "logit_all_folds" \
            else teacher_sha
        written += [save_record(ws.p.records_dir, r, sha) for r in by_seed.values() if r["folder"]]
    return written


def _refuse_replacing_another_budget(ws: "Workspace", found: dict, records: dict) -> None:
    """A record is named after its model folder, which does not name the budget: a protocol at another student budget
    (same plans names) would replace the committed records (``records``) of the first one. Checked before anything
    is written."""
    for by_seed in found["students"].values():
        for r in by_seed.values():
            name = basename(r["folder"].rstrip("/")) if r["folder"] else None
            if name not in records:
                continue
            before = training_budget(training_section(records[name]["plans"], ws.p.configuration))
            now = training_budget(training_section(r["plans"], ws.p.configuration))
            if before != now:
                tag = f"{now[0] * now[1]}it" + (f"_val{now[2]}" if before[2] != now[2] else "")
                raise EvidenceError(
                    f"{join(ws.p.records_dir, name + '.json')} records a model trained for {budget_text(before)}; "
                    f"this workspace's {name} trained for {now[0]} x {now[1]} ({now[2]}): writing its record would replace the other budget's. Give this "
                    f"budget records and results of their own with --tag (e.g. --tag {tag}), or pass --no-records. "
                    f"Nothing was written.")
