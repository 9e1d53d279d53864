"""Slide-level tasks: built-in label rules, patient-level labels, user CSV tasks and their errors."""

from __future__ import annotations

import pandas as pd
import pytest
from data_features import write_feature_files

from evaluation.cv import cv_splits
from pathology.tasks import TaskError, build_task, slide_table, slide_table_from_features


def _tcga_slides() -> pd.DataFrame:
    rows = [
        ("TCGA-05-4244-01Z-00-DX1", "TCGA-LUAD"),
        ("TCGA-05-4244-01A-01-TS1", "TCGA-LUAD"),  # frozen section: left out
        ("TCGA-05-4245-01Z-00-DX1", "TCGA-LUAD"),
        ("TCGA-05-4245-11A-01-BS1", "TCGA-LUAD"),  # normal tissue: left out
        ("TCGA-18-3406-01Z-00-DX1", "TCGA-LUSC"),
        ("TCGA-18-3406-01Z-00-DX2", "TCGA-LUSC"),
        ("TCGA-18-3407-01Z-00-DX1", "TCGA-LUSC"),
        ("TCGA-A1-A0SB-01Z-00-DX1", "TCGA-BRCA"),
    ]
    return pd.DataFrame([{"slide_id": s, "patient_id": s[:12], "project": p, "cohort": "tcga"} for s, p in rows])


def test_nsclc_labels_are_the_project_of_diagnostic_tumour_slides():
    task = build_task("tcga-nsclc", _tcga_slides())
    labels = dict(zip(task.labels["slide_id"], task.labels["label"]))
    assert labels == {
        "TCGA-05-4244-01Z-00-DX1": "LUAD",
        "TCGA-05-4245-01Z-00-DX1": "LUAD",
        "TCGA-18-3406-01Z-00-DX1": "LUSC",
        "TCGA-18-3406-01Z-00-DX2": "LUSC",
        "TCGA-18-3407-01Z-00-DX1": "LUSC",
    }
    assert task.level == "patient" and task.classes == ["LUAD", "LUSC"]
    assert any("2 frozen-section or normal-tissue" in n for n in task.notes)
    with pytest.raises(TaskError, match="no TCGA project"):
        build_task("tcga-nsclc", _tcga_slides().assign(project=""))


def test_brca_needs_labels_and_maps_clinical_spellings(tmp_path):
    with pytest.raises(TaskError, match="--labels CSV"):
        build_task("tcga-brca", _tcga_slides())
    slides = pd.concat([_tcga_slides(), pd.DataFrame([
        {"slide_id": "TCGA-A1-A0SB-01Z-00-DX2", "patient_id": "TCGA-A1-A0SB", "project": "TCGA-BRCA"},
        {"slide_id": "TCGA-A2-A0CM-01Z-00-DX1", "patient_id": "TCGA-A2-A0CM", "project": "TCGA-BRCA"},
        {"slide_id": "TCGA-A2-A0D0-01Z-00-DX1", "patient_id": "TCGA-A2-A0D0", "project": "TCGA-BRCA"},
    ])])
    csv = tmp_path / "brca.csv"
    pd.DataFrame({"patient_id": ["TCGA-A1-A0SB", "TCGA-A2-A0CM", "TCGA-A2-A0D0", "TCGA-ZZ-0000"],
                  "label": ["Infiltrating Ductal Carcinoma", "ILC", "Mixed Histology", "IDC"]}).to_csv(csv, index=False)
    task = build_task("tcga-brca", slides, labels_csv=csv)
    labels = dict(zip(task.labels["slide_id"], task.labels["label"]))
    # patient labels reach every slide of the patient; NSCLC slides and the mixed case are not in the task
    assert labels == {"TCGA-A1-A0SB-01Z-00-DX1": "IDC", "TCGA-A1-A0SB-01Z-00-DX2": "IDC", "TCGA-A2-A0CM-01Z-00-DX1": "ILC"}
    assert any("Mixed Histology" in n for n in task.notes) and any("TCGA-ZZ-0000" in n for n in task.notes)


def test_demo_task_keeps_patients_within_one_fold(session_cache_dir):
    from pathology.demo_slides import demo_cohort

    task = build_task("demo", slide_table(demo_cohort(session_cache_dir)))
    assert len(task.labels) == 12 and task.classes == ["glandular", "stroma", "tumour"]
    assert task.labels["patient_id"].nunique() == 6
    for split in cv_splits(task.labels, n_folds=2, seeds=2):
        train = set(task.labels["patient_id"].iloc[split.train])
        assert train.isdisjoint(task.labels["patient_id"].iloc[split.val])


def test_csv_task_with_fixed_folds_and_external_test_rows(tmp_path):
    csv = tmp_path / "task.csv"
    pd.DataFrame({"slide_id": ["a", "b", "c", "d", "e"], "patient_id": ["p1", "p1", "p2", "p3", "p4"],
                  "label": ["x", "x", "y", "y", "x"], "fold": [0, 0, 1, 1, None],
                  "split": ["", "", "", "", "test"]}).to_csv(csv, index=False)
    task = build_task(f"csv:{csv}", pd.DataFrame(columns=["slide_id", "patient_id"]))
    assert task.labels["slide_id"].tolist() == ["a", "b", "c", "d"] and "fold" in task.labels
    assert task.test["slide_id"].tolist() == ["e"] and task.test["label"].tolist() == ["x"]


def test_patient_level_csv_expands_over_the_feature_files(tmp_path):
    write_feature_files(tmp_path / "f", {"s1": 0, "s2": 0, "s3": 1, "s4": 1},
                        patients={"s1": "p1", "s2": "p1", "s3": "p2", "s4": "p3"})
    slides = slide_table_from_features(tmp_path / "f")
    csv = tmp_path / "patients.csv"
    pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "label": ["pos", "neg", "neg"]}).to_csv(csv, index=False)
    task = build_task(f"csv:{csv}", slides)
    assert dict(zip(task.labels["slide_id"], task.labels["label"])) == {"s1": "pos", "s2": "pos", "s3": "neg", "s4": "neg"}
    assert task.level == "patient" and task.labels.set_index("slide_id").loc["s2", "patient_id"] == "p1"


@pytest.mark.parametrize(
    "table, message",
    [
        (pd.DataFrame({"slide_id": ["a", "b"], "label": ["x", "x"]}), "at least two classes"),
        (pd.DataFrame({"slide_id": ["a", "b"], "target": [0, 1]}), "needs a `label` column"),
        (pd.DataFrame({"patient_id": ["p1", "p1"], "label": ["x", "y"]}), "more than one label: p1"),
        (pd.DataFrame({"slide_id": ["a", "b"], "label": ["x", None]}), "without a label for slide_id b"),
        (pd.DataFrame({"patient_id": ["q1", "q2"], "label": ["x", "y"]}), "none of its 2 patients has a slide"),
        (pd.DataFrame({"slide_id": ["a", "b", "a"], "label": ["x", "y", "y"]}), "on more than one row: a"),
    ],
)
def test_bad_task_tables_get_clear_errors(tmp_path, table, message):
    csv = tmp_path / "bad.csv"
    table.to_csv(csv, index=False)
    slides = pd.DataFrame({"slide_id": ["a", "b"], "patient_id": ["p1", "p1"]})
    with pytest.raises(TaskError, match=message):
        build_task(f"csv:{csv}", slides)
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        build_task("nope", slides)


def test_an_unreadable_feature_file_is_an_error_naming_it_not_a_vanished_slide(tmp_path):
    paths = write_feature_files(tmp_path / "f", {"s1": 0, "s2": 1, "s3": 0})
    with open(paths["s2"], "r+b") as f:
        f.truncate(3000)  # an interrupted copy
    (tmp_path / "f" / "s4.h5").write_text("not hdf5")
    with pytest.raises(TaskError, match=r"2 feature file\(s\) cannot be read .*s2\.h5, .*s4\.h5; re-extract them"):
        slide_table_from_features(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="feature directory .*nowhere does not exist"):
        slide_table_from_features(tmp_path / "nowhere")


def test_nsclc_notes_every_slide_it_leaves_out_for_want_of_a_project():
    slides = _tcga_slides()
    slides.loc[slides["slide_id"] == "TCGA-18-3407-01Z-00-DX1", "project"] = ""  # file without the attribute
    task = build_task("tcga-nsclc", slides)
    assert "TCGA-18-3407-01Z-00-DX1" not in set(task.labels["slide_id"])
    assert any("1 slide(s) without a TCGA project left out" in n and "TCGA-18-3407-01Z-00-DX1" in n for n in task.notes)
    assert any("1 slide(s) of other projects left out: TCGA-BRCA (1)" in n for n in task.notes)


def test_an_external_cohort_without_projects_is_pointed_at_test_labels():
    from pathology.tasks import task_labels

    external = pd.DataFrame({"slide_id": ["x1", "x2"], "patient_id": ["q1", "q2"], "project": ["", ""]})
    with pytest.raises(TaskError, match="external cohort.*--test-labels CSV") as err:
        task_labels("tcga-nsclc", external, external=True)
    assert "--cohorts" not in str(err.value)


def test_a_label_file_that_is_no_csv_is_named_in_one_line(tmp_path):
    latin1 = tmp_path / "labels.csv"
    latin1.write_bytes("slide_id,label\na,caf\xe9\nb,th\xe9\n".encode("latin-1"))
    slides = pd.DataFrame({"slide_id": ["a", "b"], "patient_id": ["p1", "p2"]})
    with pytest.raises(TaskError, match=rf"{latin1}: not a readable CSV file \(UnicodeDecodeError.*UTF-8"):
        build_task(f"csv:{latin1}", slides)
