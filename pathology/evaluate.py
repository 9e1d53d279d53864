"""`fm-eval pathology <task>`: slide-level MIL evaluation of extracted features, k folds x seeds ensembled.

    fm-eval pathology tcga-nsclc --features-dir feats/phikon-v2 --data-root /data/tcga
    fm-eval pathology tcga-brca --features-dir feats --labels brca_subtypes.csv --test-features-dir feats-cptac
    fm-eval pathology demo --features-dir feats --folds 2 --seeds 2 --epochs 5
    fm-eval pathology csv my_task.csv --features-dir feats          # the `csv:PATH` task

Features are read once into a FeatureBank; the protocol (evaluation.mil_protocol) trains folds x seeds
members and averages them on the external cohort (or reports out-of-fold predictions). Outputs:
`results.csv` (metric, value, 95 % CI), `runs.csv` (one row per member), `predictions.csv`,
`summary.md`, and one MLflow parent run with a child run per fold x seed, the ROC curve and attention
heatmaps over the tiling thumbnails.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from evaluation.mil_data import FeatureBank
from evaluation.mil_protocol import run_mil_protocol
from evaluation.mil_report import log_mil_results
from evaluation.mil_results import MILConfig, MILResults, metric_description
from pathology.feature_files import (
    FINGERPRINT_ATTRS,
    extraction_fingerprint,
    fingerprint_difference,
    read_feature_attrs,
)
from pathology.tasks import (
    BUILTIN_TASKS,
    DEFAULT_COHORT,
    Task,
    TaskError,
    build_task,
    slide_table,
    slide_table_from_features,
    task_labels,
    unreadable_feature_files,
)

THUMBNAIL_NAME = "thumbnail.png"
_LISTED = 20


def _show(items) -> str:
    items = list(items)
    return ", ".join(map(str, items[:_LISTED])) + (f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _feature_paths(ids, directory: Path) -> dict[str, Path]:
    return {s: directory / f"{s}.h5" for s in ids}


def check_features(task: Task, features_dir: Path, test_dir: Path | None, drop_missing: bool = False) -> Task:
    """Every labelled slide must have a feature file (else a clear error listing them, or `drop_missing`)."""
    for table, directory, what in ((task.labels, features_dir, "labelled"), (task.test, test_dir or features_dir, "test")):
        if table is None:
            continue
        missing = [s for s, p in _feature_paths(table["slide_id"], directory).items() if not p.is_file()]
        if missing and not drop_missing:
            raise TaskError(f"task {task.name}: {len(missing)} {what} slide(s) have no features in {directory}: "
                            f"{_show(missing)} (extract them, or pass --drop-missing to leave them out)")
        if missing:
            task.notes.append(f"{len(missing)} {what} slide(s) without features left out: {_show(missing)}")
            kept = table[~table["slide_id"].isin(missing)].reset_index(drop=True)
            if what == "test":
                task.test = kept if len(kept) else None
            else:
                task.labels = kept
    return task


def _read_all_attrs(paths: dict[str, Path]) -> dict[str, dict]:
    """Attributes of every file; unreadable files (truncated copy, interrupted write) are one error
    naming them all, never a traceback."""
    attrs, unreadable = {}, []
    for s, p in paths.items():
        try:
            attrs[s] = read_feature_attrs(p)
        except (OSError, RuntimeError) as err:
            unreadable.append((p, str(err)))
    if unreadable:
        raise unreadable_feature_files(unreadable)
    return attrs


def check_same_extraction(paths: dict[str, Path]) -> dict:
    """All files must come from one extraction (weights by content, feature kind, preprocessing); a file
    from another encoder is refused, naming it. Returns the common attributes (FINGERPRINT_ATTRS)."""
    attrs = _read_all_attrs(paths)
    keys = {s: tuple(extraction_fingerprint(a).values()) for s, a in attrs.items()}
    common_key = Counter(keys.values()).most_common(1)[0][0]
    common = next(attrs[s] for s, key in keys.items() if key == common_key)
    odd = [s for s, key in keys.items() if key != common_key]
    if odd:
        shown = _show(f"{paths[s]} ({fingerprint_difference(attrs[s], common, 'the others')})" for s in odd)
        raise ValueError(f"{len(odd)} feature file(s) come from another extraction than the other "
                         f"{len(keys) - len(odd)} (encoder {common.get('encoder')!r}, feature "
                         f"{common.get('feature')!r}): {shown}")
    return {k: common.get(k, "") for k in FINGERPRINT_ATTRS}


def load_bank(task: Task, features_dir: Path, test_dir: Path | None) -> tuple[FeatureBank, dict]:
    """One FeatureBank over the labelled and test slides (read once), and the common extraction attributes."""
    cv_ids = task.labels["slide_id"].tolist()
    test_ids = task.test["slide_id"].tolist() if task.test is not None else []
    paths = _feature_paths(cv_ids, features_dir) | _feature_paths(test_ids, test_dir or features_dir)
    common = check_same_extraction(paths)
    if test_dir is None or not test_ids:
        return FeatureBank.from_h5_dir(features_dir, cv_ids + test_ids, encoder=common["encoder"]), common
    parts = [FeatureBank.from_h5_dir(d, ids, encoder=common["encoder"]) for d, ids in ((features_dir, cv_ids),
                                                                                     (test_dir, test_ids))]
    offsets = np.concatenate([parts[0].offsets, parts[1].offsets[1:] + parts[0].offsets[-1]])
    coords = None if any(p.coords is None for p in parts) else np.concatenate([p.coords for p in parts])
    bank = FeatureBank(cv_ids + test_ids, np.concatenate([p.features for p in parts]), offsets, coords, common["encoder"])
    return bank, common


def _thumbnails(results: MILResults, paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, float]]:
    """slide_id -> (thumbnail, level-0 px per thumbnail px) for the attention slides: the tiling's
    thumbnail.png, else a fresh one from the slide; slides neither way readable get no heatmap."""
    from PIL import Image

    out = {}
    for sid in results.attention:
        try:
            attrs = read_feature_attrs(paths[sid])
            coords_path = str(attrs.get("coords_path") or "")
            png = Path(coords_path).parent / THUMBNAIL_NAME if coords_path else None
            if png is not None and png.is_file():
                image = np.asarray(Image.open(png).convert("RGB"))
                with h5py.File(paths[sid], "r") as f:
                    width0 = float(f["coords"].attrs.get("level0_width", 0)) or None
            else:
                from pathology.slides import open_slide, thumbnail

                with open_slide(attrs["slide_path"], float(attrs.get("slide_mpp") or 0) or None) as slide:
                    width0 = float(slide.dimensions[0])
                    image = thumbnail(slide, max(width0 * slide.mpp / 1024, slide.mpp))
            if width0:
                out[sid] = (image, width0 / image.shape[1])
        except Exception as err:  # noqa: BLE001 - a missing thumbnail only costs one figure
            print(f"  no attention heatmap for {sid}: {type(err).__name__}: {err}")
    return out


def results_table(results: MILResults) -> pd.DataFrame:
    """One row per reported metric: value with its 95 % bootstrap interval where there is one."""
    rows = []
    for key, value in results.summary.items():
        if key.endswith(("_low", "_high")):
            continue
        rows.append({"metric": key, "value": value, "ci_low": results.summary.get(f"{key}_low", np.nan),
                     "ci_high": results.summary.get(f"{key}_high", np.nan), "description": metric_description(key)})
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high", "description"])


def evaluate_task(task: Task, features_dir, output_dir, test_features_dir=None, config: MILConfig | None = None,
                  tracking_uri: str | None = None, experiment: str = "fm-pathology-eval", run_name: str | None = None,
                  drop_missing: bool = False) -> dict:
    """Run the MIL protocol for `task` on extracted features; write and log the results."""
    from fm.tracking import tracked_run

    features_dir = Path(features_dir)
    test_dir = Path(test_features_dir) if test_features_dir else None
    for d in (features_dir, test_dir):
        if d is not None and not d.is_dir():
            raise FileNotFoundError(f"feature directory {d} does not exist")
    task = check_features(task, features_dir, test_dir, drop_missing)
    config = config or MILConfig()
    bank, common = load_bank(task, features_dir, test_dir)
    paths = _feature_paths(task.labels["slide_id"], features_dir)
    if task.test is not None:
        paths |= _feature_paths(task.test["slide_id"], test_dir or features_dir)
    test = None
    if task.test is not None:  # patient ids go along: leakage is checked by patient, and predictions.csv keeps them
        test = task.test[[c for c in ("slide_id", "patient_id", "label") if c in task.test.columns]]
    results = run_mil_protocol(bank, task.labels, test, config)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    table.to_csv(out / "results.csv", index=False)
    results.runs.to_csv(out / "runs.csv", index=False)
    results.predictions.to_csv(out / "predictions.csv", index=False)
    header = (f"# fm-eval pathology {task.name}\n\nencoder `{common['encoder']}` ({common['feature']} features, "
              f"weights sha256 {common['encoder_weights_sha256'][:12]}), {len(task.labels)} labelled slides "
              f"({task.level}-level labels, {task.labels['patient_id'].nunique()} patients), "
              f"{0 if task.test is None else len(task.test)} external test slides\n\n")
    notes = "".join(f"- {n}\n" for n in task.notes + results.notes)
    markdown = header + results.to_markdown(notes=False) + ("\nNotes:\n" + notes if notes else "")
    (out / "summary.md").write_text(markdown)

    name = run_name or f"{task.name}-{Path(str(common['encoder'])).name}-{config.model}"
    run_config = {"task": task.name, "features_dir": str(features_dir), "test_features_dir": str(test_dir or ""),
                  "encoder": common["encoder"], "feature": common["feature"],
                  "preprocessing": json.loads(common["preprocessing"] or "{}")}
    with tracked_run(experiment, run_name=name, config=run_config, tracking_uri=tracking_uri,
                     tags={"task": task.name, "encoder": common["encoder"], "model": config.model}) as run:
        log_mil_results(results, run, thumbnails=_thumbnails(results, paths))
        for file in ("results.csv", "runs.csv", "predictions.csv", "summary.md"):
            run.log_artifact(out / file, "outputs")
    print(markdown)
    return {"task": task.name, "encoder": common["encoder"], "output_dir": str(out), "run_id": run.run_id,
            "metrics": dict(results.summary), "primary": results.primary_split, "markdown": markdown,
            "n_slides": len(task.labels), "n_test": 0 if task.test is None else len(task.test)}


# -- CLI ------------------------------------------------------------------------------------------------
def _slides_for(args: argparse.Namespace, task_name: str, features_dir: Path) -> pd.DataFrame:
    """The slide table a task draws from: the named cohort, else the task's default cohort where it
    needs no data root (demo) or one was given, else the attributes of the feature files."""
    from pathology.prepare import select_slides

    cohort = DEFAULT_COHORT.get(task_name)
    if args.cohorts or (cohort == "demo") or (cohort and args.data_root):
        return slide_table(select_slides(args, [cohort] if cohort else []))
    return slide_table_from_features(features_dir)


def run_eval(args: argparse.Namespace, task_name: str) -> dict:
    """`fm-eval pathology <task_name>` (its flags: pathology.domain._add_eval_args)."""
    name = f"csv:{args.table}" if task_name == "csv" else task_name
    features_dir = Path(args.features_dir)
    for flag, directory in (("--features-dir", args.features_dir), ("--test-features-dir", args.test_features_dir)):
        if directory and not Path(directory).is_dir():  # before anything is read from it
            raise FileNotFoundError(f"feature directory {directory} does not exist ({flag})")
    task = build_task(name, _slides_for(args, task_name, features_dir), getattr(args, "labels", None))
    if args.test_labels or (args.test_features_dir and task.test is None):
        test_dir = Path(args.test_features_dir or args.features_dir)
        test_slides = slide_table_from_features(test_dir)
        if args.test_labels:
            rows, _, notes = task_labels(f"csv:{args.test_labels}", test_slides)
        elif task_name in BUILTIN_TASKS and task_name != "demo":
            try:
                rows, _, notes = task_labels(name, test_slides, getattr(args, "labels", None), external=True)
            except TaskError as err:
                if "--test-labels" in str(err):
                    raise
                raise TaskError(f"external cohort {test_dir}: {err}; label it with --test-labels CSV "
                                "(slide_id or patient_id, label)") from err
        else:
            rows, notes = test_slides[["slide_id", "patient_id"]], ["external cohort without labels: predictions only"]
        task.test = rows[[c for c in ("slide_id", "patient_id", "label") if c in rows.columns]]
        task.notes += notes
    config = MILConfig(model=args.model, folds=args.folds, seeds=args.seeds, epochs=args.epochs, lr=args.lr,
                       max_tiles=args.max_tiles, device=args.device)
    return evaluate_task(task, features_dir, args.output_dir or f"fm-runs/eval/{task_name}", args.test_features_dir,
                         config, args.tracking_uri, args.experiment, args.run_name, args.drop_missing)

