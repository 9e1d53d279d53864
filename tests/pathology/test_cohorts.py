from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pathology.cohorts import CohortError, parse_tcga_barcode, read_csv_cohort, resolve_cohorts
from pathology.demo_slides import CLASSES, build_demo_cohort, demo_cohort
from pathology.slides import open_slide, read_tile

UUIDS = [
    "d4ff32cd-38cf-40ea-8213-45c2b100ac01",
    "0a1b2c3d-0000-4000-8000-000000000001",
    "0a1b2c3d-0000-4000-8000-000000000002",
    "0a1b2c3d-0000-4000-8000-000000000003",
]


def test_parse_tcga_barcode():
    info = parse_tcga_barcode(f"TCGA-05-4244-01Z-00-DX1.{UUIDS[0]}.svs")
    assert info == dict(
        barcode="TCGA-05-4244-01Z-00-DX1",
        patient_id="TCGA-05-4244",
        sample_type="01",
        tumour=True,
        slide_type="DX",
    )
    normal = parse_tcga_barcode("TCGA-A7-A0CE-11A-01-TS1.abc.svs")
    assert normal["sample_type"] == "11" and not normal["tumour"] and normal["slide_type"] == "TS"
    assert parse_tcga_barcode("slide_001.svs") is None


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_tcga_scan_reads_projects_from_folders_and_manifest(tmp_path):
    root = tmp_path / "gdc"
    _touch(root / "TCGA-LUAD" / UUIDS[0] / f"TCGA-05-4244-01Z-00-DX1.{UUIDS[0]}.svs")
    _touch(root / "TCGA-LUSC" / UUIDS[1] / f"TCGA-18-3406-11A-01-BS1.{UUIDS[1]}.svs")
    _touch(root / UUIDS[2] / f"TCGA-A7-A0CE-01Z-00-DX1.{UUIDS[2]}.svs")  # GDC layout without project folder
    _touch(root / "notes.txt")
    manifest = pd.DataFrame(
        dict(
            id=[UUIDS[2], UUIDS[3]],
            filename=[f"TCGA-A7-A0CE-01Z-00-DX1.{UUIDS[2]}.svs", f"TCGA-A7-A0CF-01Z-00-DX1.{UUIDS[3]}.svs"],
            md5=["x", "y"],
            size=[1, 2],
            state=["released"] * 2,
            project_id=["TCGA-BRCA"] * 2,
        )
    )
    manifest.to_csv(root / "gdc_manifest.2024.txt", sep="\t", index=False)

    records = {r.slide_id: r for r in resolve_cohorts(["tcga"], data_root=root)}
    assert set(records) == {
        "TCGA-05-4244-01Z-00-DX1",
        "TCGA-18-3406-11A-01-BS1",
        "TCGA-A7-A0CE-01Z-00-DX1",
        "TCGA-A7-A0CF-01Z-00-DX1",
    }
    luad = records["TCGA-05-4244-01Z-00-DX1"]
    assert luad.patient_id == "TCGA-05-4244" and luad.project == "TCGA-LUAD" and luad.cohort == "tcga"
    assert luad.extra["slide_type"] == "DX" and luad.labels == {"tumour": 1}
    assert records["TCGA-18-3406-11A-01-BS1"].labels == {"tumour": 0}
    assert records["TCGA-A7-A0CE-01Z-00-DX1"].project == "TCGA-BRCA"  # from the manifest column
    # listed in the manifest but not downloaded: expected at its GDC location, tiling will report it missing
    assert (
        records["TCGA-A7-A0CF-01Z-00-DX1"].slide_path
        == root / UUIDS[3] / f"TCGA-A7-A0CF-01Z-00-DX1.{UUIDS[3]}.svs"
    )

    only = resolve_cohorts(["tcga"], data_root=root, projects=["LUAD", "TCGA-BRCA"])
    assert {r.project for r in only} == {"TCGA-LUAD", "TCGA-BRCA"} and len(only) == 3
    with pytest.raises(CohortError, match="TCGA-LUSC"):
        resolve_cohorts(["tcga"], data_root=root, projects=["PAAD"])
    with pytest.raises(CohortError, match="--data-root"):
        resolve_cohorts(["tcga"])


def test_csv_cohort_paths_labels_mpp_and_errors(tmp_path):
    (tmp_path / "slides").mkdir()
    table = pd.DataFrame(
        dict(
            slide_path=["slides/a.svs", "/abs/b.ndpi"],
            slide_id=["a", "b"],
            patient_id=["p1", "p1"],
            mpp=[0.25, None],
            subtype=["LUAD", "LUSC"],
            grade=[2, 3],
        )
    )
    table.to_csv(tmp_path / "cohort.csv", index=False)
    records = resolve_cohorts([f"csv:{tmp_path / 'cohort.csv'}"], mpp=0.5)
    assert records[0].slide_path == tmp_path / "slides" / "a.svs" and records[1].slide_path == Path(
        "/abs/b.ndpi"
    )
    assert records[0].mpp == 0.25 and records[1].mpp == 0.5  # the cohort-level --mpp fills only the gap
    assert records[0].labels == {"subtype": "LUAD", "grade": 2} and records[0].cohort == "csv:cohort"

    table.drop(columns=["patient_id", "slide_id"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CohortError) as info:
        read_csv_cohort(tmp_path / "bad.csv")
    assert "bad.csv" in str(info.value) and "slide_id" in str(info.value) and "patient_id" in str(info.value)


def test_unknown_cohort_lists_valid_forms():
    with pytest.raises(CohortError) as info:
        resolve_cohorts(["camelyon"])
    assert "camelyon" in str(info.value) and "csv:PATH" in str(info.value) and "demo" in str(info.value)


def test_demo_cohort_is_generated_once_and_readable(session_cache_dir):
    records = demo_cohort(session_cache_dir)
    assert 8 <= len(records) <= 12 and len({r.patient_id for r in records}) >= 3
    assert {r.labels["label"] for r in records} == set(CLASSES)
    for record in records:  # a patient's slides share a label, so patient-level splits are clean
        assert len({r.labels["label"] for r in records if r.patient_id == record.patient_id}) == 1
    csv_path = build_demo_cohort(session_cache_dir)
    stamp = csv_path.stat().st_mtime_ns, records[0].slide_path.stat().st_mtime_ns
    assert [r.slide_id for r in resolve_cohorts(["demo"])] == [
        r.slide_id for r in records
    ]  # via $FM_CACHE_DIR
    assert (csv_path.stat().st_mtime_ns, records[0].slide_path.stat().st_mtime_ns) == stamp
    with open_slide(records[0].slide_path) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "openslide" and slide.level_count >= 2


def _tile_features(tile: np.ndarray) -> np.ndarray:
    """Colour statistics, dark (nuclei) and bright (lumen) fractions, and fine-texture energy (fibres)."""
    pixels = tile.reshape(-1, 3).astype(np.float32)
    gray = pixels.mean(1).reshape(tile.shape[:2])
    texture = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
    brightness = pixels.sum(1)
    return np.concatenate(
        [pixels.mean(0), pixels.std(0), [(brightness < 420).mean(), (brightness > 650).mean(), texture]]
    )


def test_demo_classes_are_visible_in_224px_tiles(demo_tiles):
    """A nearest-centroid classifier on simple statistics of single interior tiles tells the classes
    apart on held-out patients, far above chance (1/3)."""
    records, tiles_dir = demo_tiles
    features, labels, patients = [], [], []
    for record in records:
        with h5py.File(tiles_dir / record.slide_id / "coords.h5") as f:
            coords = f["coords"][:][f["tissue_fraction"][:] > 0.95]  # no glass in the tile
        with open_slide(record.slide_path) as slide:
            for x, y in coords[:10]:
                features.append(_tile_features(read_tile(slide, x, y, 224, 0.5)))
                labels.append(record.labels["label"])
                patients.append(record.patient_id)
    features, labels, patients = np.array(features), np.array(labels), np.array(patients)
    features = (features - features.mean(0)) / (features.std(0) + 1e-9)
    for held_out in (sorted(set(patients))[::2], sorted(set(patients))[1::2]):
        test = np.isin(patients, held_out)
        centroids = {c: features[~test & (labels == c)].mean(0) for c in CLASSES}
        predicted = [min(CLASSES, key=lambda c: np.linalg.norm(f - centroids[c])) for f in features[test]]
        accuracy = np.mean(np.array(predicted) == labels[test])
        assert accuracy > 0.9, (held_out, accuracy)


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    """Outputs record slide paths and later commands (fm-train, Nextflow tasks) run from other folders."""
    (tmp_path / "sub").mkdir()
    pd.DataFrame(dict(slide_path=["../slides/a.svs"], slide_id=["a"], patient_id=["p"])).to_csv(
        tmp_path / "sub" / "c.csv", index=False)
    _touch(tmp_path / "gdc" / UUIDS[0] / f"TCGA-05-4244-01Z-00-DX1.{UUIDS[0]}.svs")
    monkeypatch.chdir(tmp_path)
    (csv_record,) = resolve_cohorts(["csv:sub/c.csv"])
    (tcga_record,) = resolve_cohorts(["tcga"], data_root="gdc")
    assert csv_record.slide_path == tmp_path / "slides" / "a.svs"  # absolute, `..` resolved
    assert tcga_record.slide_path == tmp_path / "gdc" / UUIDS[0] / f"TCGA-05-4244-01Z-00-DX1.{UUIDS[0]}.svs"


def test_projects_of_a_gdc_download_come_from_its_sample_sheet(tmp_path):
    """`gdc-client download` writes <uuid>/<file>: no project anywhere in the path, and the GDC manifest
    has no project column. The portal's sample sheet names it."""
    root = tmp_path / "tcga"
    names = [f"TCGA-05-4244-01Z-00-DX1.{UUIDS[0]}.svs", f"TCGA-18-3406-01Z-00-DX1.{UUIDS[1]}.svs"]
    for uuid, name in zip(UUIDS, names):
        _touch(root / uuid / name)
    pd.DataFrame(dict(id=UUIDS[:2], filename=names, md5=["x", "y"], size=[1, 2], state=["released"] * 2)).to_csv(
        root / "gdc_manifest.2024-01-01.txt", sep="\t", index=False)
    with pytest.raises(CohortError, match="2 slide.s. have no known project.*sample sheet"):
        resolve_cohorts(["tcga"], data_root=root, projects=["LUAD"])
    names.append(f"TCGA-A7-A0CE-01Z-00-DX1.{UUIDS[2]}.svs")
    _touch(root / UUIDS[2] / names[2])
    pd.DataFrame({"File ID": UUIDS[:3], "File Name": names, "Data Category": ["Biospecimen"] * 3,
                  "Data Type": ["Slide Image"] * 3, "Project ID": ["TCGA-LUAD", "TCGA-LUSC", None],  # a blank cell
                  "Case ID": ["TCGA-05-4244", "TCGA-18-3406", "TCGA-A7-A0CE"]}).to_csv(
        root / "gdc_sample_sheet.2024-01-01.tsv", sep="\t", index=False)
    (luad,) = resolve_cohorts(["tcga"], data_root=root, projects=["LUAD"])
    assert luad.slide_id == "TCGA-05-4244-01Z-00-DX1" and luad.project == "TCGA-LUAD"
    assert luad.slide_path == root / UUIDS[0] / names[0]


def test_a_csv_mpp_that_is_not_a_number_names_the_file_and_slide(tmp_path):
    pd.DataFrame(dict(slide_path=["a.svs", "b.svs"], slide_id=["a", "b"], patient_id=["p", "q"],
                      mpp=["0.25", "abc"])).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(CohortError, match=r"c\.csv: slide b: mpp 'abc' is not a positive number"):
        read_csv_cohort(tmp_path / "c.csv")


def test_csv_cohort_ids_are_text_and_blank_cells_are_not_ids(tmp_path, capsys):
    """`001` stays `001` (a label table naming it must still match), a blank slide id or path is refused
    by line, a slide without a patient id is its own patient (not one patient "nan" for all)."""
    csv = tmp_path / "c.csv"
    csv.write_text("slide_id,patient_id,slide_path\n001,007,a.svs\n 002 ,,b.svs\n003,,c.svs\n")
    records = read_csv_cohort(csv)
    assert [(r.slide_id, r.patient_id) for r in records] == [("001", "007"), ("002", "002"), ("003", "003")]
    assert "2 slide(s) without a patient_id are each taken as their own patient" in capsys.readouterr().out
    csv.write_text("slide_id,patient_id,slide_path\n001,P1,a.svs\n\n,P2,b.svs\n,,\n")
    with pytest.raises(CohortError, match=r"c.csv: no slide_id on line\(s\) 4$"):
        read_csv_cohort(csv)
    csv.write_text("slide_id,patient_id,slide_path\n001,P1,a.svs\n\n002,P2,b.svs\n,,\n,,\n")
    assert [r.slide_id for r in read_csv_cohort(csv)] == ["001", "002"]  # empty rows are no slides
    csv.write_text("slide_id,patient_id,slide_path\n001,P1,a.svs\n002,P2, \n")
    with pytest.raises(CohortError, match=r"c.csv: no slide_path on line\(s\) 3"):
        read_csv_cohort(csv)
    csv.write_bytes("slide_id,patient_id,slide_path\n001,P1,caf\xe9.svs\n".encode("latin-1"))
    with pytest.raises(CohortError, match=r"cohort CSV .*c.csv: not a readable CSV file"):
        read_csv_cohort(csv)
