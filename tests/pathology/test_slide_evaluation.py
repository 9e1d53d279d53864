"""fm-eval pathology: the demo end to end through the CLI, label/feature alignment, and bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from data_features import save_tiny_hf_encoder, write_feature_files
from mlflow.tracking import MlflowClient
from PIL import Image

from evaluation.mil_protocol import MILConfig
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
    assert "MIL protocol: abmil, 2 folds x 2 seeds" in (out / "summary.md").read_text()

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
    with pytest.raises(ValueError, match=r"1 feature file\(s\) come from another extraction.*s03.h5 \(encoder='other"):
        evaluate_task(Task("mixed", table), tmp_path / "f", tmp_path / "out", config=FAST)


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
