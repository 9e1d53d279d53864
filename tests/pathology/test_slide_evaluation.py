"""fm-eval pathology: the demo end to end through the CLI, label/feature alignment, and bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from data_features import save_tiny_hf_encoder, write_feature_files
from mlflow.tracking import MlflowClient
from PIL import Image

from evaluation.mil_results import MILConfig
from fm.cli import invoke
from pathology.evaluate import evaluate_task
from pathology.tasks import Task, TaskError, build_task, slide_table_from_features

FAST = MILConfig(folds=2, seeds=2, epochs=8, max_tiles=64, n_boot=200, attention_slides=1, device="cpu")


def test_demo_end_to_end_through_the_cli(tmp_path, monkeypatch):
    tiles, feats, out = tmp_path / "tiles", tmp_path / "feats", tmp_path / "eval"
    encoder = save_tiny_hf_encoder(tmp_path / "tiny-hf")
    invoke("prepare", ["pathology", "--cohorts", "demo", "--output-dir", str(tiles), "--tile-px", "64",
                       "--target-mpp", "2.0"])
    extracted = invoke("extract", ["pathology", "--cohorts", "demo", "--tiles-dir", str(tiles), "--output-dir",
                                   str(feats), "--encoder", str(encoder), "--workers", "0"])
    assert extracted["statuses"] == {"ok": 12}
    result = invoke("eval", ["pathology", "demo", "--features-dir", str(feats), "--output-dir", str(out),
                             "--folds", "2", "--seeds", "2", "--epochs", "3", "--max-tiles", "16"])
    assert {"results.csv", "runs.csv", "predictions.csv", "summary.md"} <= {p.name for p in out.iterdir()}
    metrics = pd.read_csv(out / "results.csv").set_index("metric")
    assert 0.0 <= metrics.loc["oof/ensemble_auc", "value"] <= 1.0
    assert metrics.loc["oof/ensemble_auc", "value"] == pytest.approx(result["metrics"]["oof/ensemble_auc"])
    predictions = pd.read_csv(out / "predictions.csv")
    assert sorted(predictions["slide_id"]) == [f"DEMO-{i:02d}" for i in range(12)]
    summary = (out / "summary.md").read_text()
    assert "MIL protocol: abmil, 2 folds x 2 seeds" in summary
    # one std everywhere (ddof=1), and the out-of-fold "single model" named for what it is
    assert f"| val_auc | {metrics.loc['cv/val_auc_mean', 'value']:.4f} | {metrics.loc['cv/val_auc_std', 'value']:.4f} |" \
        in summary
    assert "single seed (k-fold pooled)" in summary
    assert "single seed (k-fold pooled)" in metrics.loc["oof/single_auc", "description"]

    client = MlflowClient()
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["task"] == "demo"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["seed0-fold0", "seed0-fold1", "seed1-fold0", "seed1-fold1"]
    logged = {a.path for d in ("outputs", "figures", "attention")
              for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"outputs/results.csv", "outputs/predictions.csv", "figures/mil_roc.png"} <= logged
    assert any(p.startswith("attention/attention_DEMO") and p.endswith(".png") for p in logged)  # over the thumbnail


def _labels(n_per_class: int = 8) -> tuple[dict[str, int], dict[str, str]]:
    labels = {f"s{i:02d}": (i // 2) % 2 for i in range(2 * n_per_class)}
    patients = {s: f"p{i // 2}" for i, s in enumerate(labels)}  # two slides per patient, same class
    return labels, patients


def test_features_and_labels_stay_aligned_against_a_shuffled_control(tmp_path):
    labels, patients = _labels()
    write_feature_files(tmp_path / "f", labels, patients)
    write_feature_files(tmp_path / "ext", {f"x{i}": i % 2 for i in range(8)}, seed=1)
    table = pd.DataFrame({"slide_id": list(labels), "patient_id": [patients[s] for s in labels],
                          "label": ["neg" if v == 0 else "pos" for v in labels.values()]})
    test = pd.DataFrame({"slide_id": [f"x{i}" for i in range(8)], "label": ["neg", "pos"] * 4})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = evaluate_task(Task("aligned", table, test), tmp_path / "f", tmp_path / "out", tmp_path / "ext", FAST, uri)
    assert real["metrics"]["test/ensemble_auc"] > 0.95 and real["metrics"]["oof/ensemble_auc"] > 0.9
    assert real["n_test"] == 8
    # control: the labels of whole patients swapped at random; the features no longer predict them
    flipped = {p: (i % 4 in (0, 3)) for i, p in enumerate(sorted(set(patients.values())))}
    control = table.assign(label=[("pos" if flipped[patients[s]] else "neg") for s in table["slide_id"]])
    assert (control["label"] != table["label"]).sum() == len(table) // 2
    shuffled = evaluate_task(Task("control", control), tmp_path / "f", tmp_path / "out2", None, FAST, uri)
    assert shuffled["metrics"]["oof/ensemble_auc"] < 0.8


def test_labelled_slides_without_features_are_listed(tmp_path):
    labels, patients = _labels(4)
    write_feature_files(tmp_path / "f", {s: v for s, v in labels.items() if s not in ("s01", "s04")}, patients)
    csv = tmp_path / "task.csv"
    pd.DataFrame({"slide_id": list(labels), "label": list(labels.values())}).to_csv(csv, index=False)
    task = build_task(f"csv:{csv}", slide_table_from_features(tmp_path / "f"))
    with pytest.raises(TaskError, match=r"2 labelled slide\(s\) have no features .*: s01, s04 .*--drop-missing"):
        evaluate_task(task, tmp_path / "f", tmp_path / "out", config=FAST)


def test_single_class_task_is_refused_before_training(tmp_path):
    write_feature_files(tmp_path / "f", {"a": 0, "b": 0})
    csv = tmp_path / "task.csv"
    pd.DataFrame({"slide_id": ["a", "b"], "label": ["x", "x"]}).to_csv(csv, index=False)
    with pytest.raises(TaskError, match="at least two classes"):
        invoke("eval", ["pathology", "csv", str(csv), "--features-dir", str(tmp_path / "f")])


def test_features_from_another_encoder_are_refused(tmp_path):
    labels, patients = _labels(4)
    write_feature_files(tmp_path / "f", labels, patients)
    write_feature_files(tmp_path / "f", {"s03": 1}, patients, encoder="other-encoder")  # overwrites one file
    table = pd.DataFrame({"slide_id": list(labels), "label": list(labels.values())})
    with pytest.raises(ValueError, match=r"1 feature file\(s\) come from another extraction.*s03.h5 \(weights="
                                         r".*\[encoder 'other-encoder' vs 'tiny-encoder'\]"):
        evaluate_task(Task("mixed", table), tmp_path / "f", tmp_path / "out", config=FAST)


def test_the_same_weights_at_another_path_are_the_same_encoder(tmp_path):
    """Weights staged to node-local disk per shard: same content, other path; the files go together."""
    labels, patients = _labels(4)
    sha = "ab" * 32
    write_feature_files(tmp_path / "f", labels, patients, encoder="/scratch/node1/teacher.safetensors",
                        weights_sha256=sha)
    write_feature_files(tmp_path / "f", {"s03": 1}, patients, encoder="/scratch/node2/teacher.safetensors",
                        weights_sha256=sha)
    table = pd.DataFrame({"slide_id": list(labels), "patient_id": [patients[s] for s in labels],
                          "label": list(labels.values())})
    out = evaluate_task(Task("staged", table), tmp_path / "f", tmp_path / "out", config=FAST)
    assert out["encoder"] == "/scratch/node1/teacher.safetensors"


def test_attention_thumbnails_come_from_tiling_or_the_slide(cmu_slide, tmp_path):
    from types import SimpleNamespace

    from pathology.evaluate import _thumbnails
    from pathology.tiling import tile_slide

    tile_slide(cmu_slide, tmp_path / "tiles", "cmu", tile_px=224, target_mpp=0.5)
    paths = write_feature_files(tmp_path / "f", {"tiled": 0, "fresh": 1})
    for sid, coords_path in (("tiled", tmp_path / "tiles" / "cmu" / "coords.h5"), ("fresh", "")):
        with h5py.File(paths[sid], "a") as f:
            f.attrs.update(coords_path=str(coords_path), slide_path=str(cmu_slide), slide_mpp=0.499)
            f["coords"].attrs["level0_width"] = 2220  # the fixture's width, as tiling records it
    thumbs = _thumbnails(SimpleNamespace(attention={"tiled": {}, "fresh": {}}), paths)
    png = np.asarray(Image.open(tmp_path / "tiles" / "cmu" / "thumbnail.png").convert("RGB"))
    assert np.array_equal(thumbs["tiled"][0], png) and thumbs["tiled"][1] == pytest.approx(2220 / png.shape[1])
    fresh, downsample = thumbs["fresh"]
    assert fresh.shape[1] <= 1024 and downsample == pytest.approx(2220 / fresh.shape[1])


def _nsclc_features(directory, n_patients: int = 6) -> dict:
    """Feature files named by TCGA barcodes, with the project attribute fm-extract records."""
    labels = {f"TCGA-{i:02d}-{1000 + i}-01Z-00-DX1": i % 2 for i in range(n_patients)}
    paths = write_feature_files(directory, labels)
    for sid, path in paths.items():
        with h5py.File(path, "a") as f:
            f.attrs["project"] = ("TCGA-LUAD", "TCGA-LUSC")[labels[sid]]
    return paths


def test_a_truncated_feature_file_is_named_not_dropped(tmp_path):
    paths = _nsclc_features(tmp_path / "f")
    broken = sorted(paths)[2]
    with open(paths[broken], "r+b") as f:
        f.truncate(3000)
    argv = ["pathology", "tcga-nsclc", "--features-dir", str(tmp_path / "f"), "--output-dir", str(tmp_path / "out"),
            "--folds", "2", "--seeds", "1", "--epochs", "1"]
    with pytest.raises(TaskError, match=rf"1 feature file\(s\) cannot be read .*{broken}\.h5; re-extract them"):
        invoke("eval", argv)
    assert not (tmp_path / "out").exists()
    # labels from elsewhere (a cohort, --data-root): the extraction check reads the file and names it too
    table = pd.DataFrame({"slide_id": list(paths), "label": [i % 2 for i in range(len(paths))]})
    with pytest.raises(TaskError, match=rf"cannot be read .*{broken}\.h5; re-extract"):
        evaluate_task(Task("nsclc", table), tmp_path / "f", tmp_path / "out", config=FAST)


def test_missing_or_unlabelled_external_feature_folders_get_the_right_advice(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature directory .*nonexistent does not exist"):
        invoke("eval", ["pathology", "tcga-nsclc", "--features-dir", str(tmp_path / "nonexistent")])
    _nsclc_features(tmp_path / "f")
    write_feature_files(tmp_path / "ext", {"x1": 0, "x2": 1})  # another cohort: no TCGA project
    with pytest.raises(TaskError, match="external cohort.*no TCGA project.*--test-labels CSV") as err:
        invoke("eval", ["pathology", "tcga-nsclc", "--features-dir", str(tmp_path / "f"),
                        "--test-features-dir", str(tmp_path / "ext")])
    assert "--cohorts" not in str(err.value)


@pytest.mark.parametrize("flag, value", [("--max-tiles", "0"), ("--max-tiles", "-5"), ("--epochs", "0"),
                                         ("--folds", "1"), ("--seeds", "0"), ("--lr", "-0.001"), ("--lr", "0")])
def test_nonsense_eval_flags_are_refused_by_name(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        invoke("eval", ["pathology", "demo", "--features-dir", str(tmp_path), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_test_patients_stay_out_of_the_folds_and_keep_their_ids(tmp_path):
    labels, patients = _labels(4)
    write_feature_files(tmp_path / "f", {**labels, "t1": 0, "t2": 1}, {**patients, "t1": "p0", "t2": "q9"})
    csv = tmp_path / "task.csv"
    rows = pd.DataFrame({"slide_id": [*labels, "t1", "t2"], "patient_id": [*patients.values(), "p0", "q9"],
                         "label": [*labels.values(), 0, 1], "split": [""] * len(labels) + ["test", "test"]})
    rows.to_csv(csv, index=False)
    argv = ["pathology", "csv", str(csv), "--features-dir", str(tmp_path / "f"), "--output-dir", str(tmp_path / "o"),
            "--folds", "2", "--seeds", "1", "--epochs", "1", "--max-tiles", "8"]
    with pytest.raises(ValueError, match=r"1 patient\(s\) have slides both in the CV labels and in the test cohort "
                                         r"\(patient leakage.*p0 \(cv: s00, s01; test: t1\)"):
        invoke("eval", argv)
    rows.assign(patient_id=rows["patient_id"].replace({"p0": "q8"}).where(rows["split"] == "test", rows["patient_id"]))\
        .to_csv(csv, index=False)
    invoke("eval", argv)
    predictions = pd.read_csv(tmp_path / "o" / "predictions.csv").set_index("slide_id")
    assert predictions.loc[["t1", "t2"], "patient_id"].tolist() == ["q8", "q9"]  # not the slide ids
    assert predictions.loc["s00", "patient_id"] == "p0"
