"""Slide-level tasks for `fm-eval pathology <task>`: which slides, which labels, which splits.

A task turns a table of slides (from a cohort, or from the attributes of extracted feature files)
into a labels table `slide_id, patient_id, label [, fold]` and an optional external test table.
Labels may be given per slide or per patient; patient labels go to every slide of the patient, and
the cross-validation groups by patient either way, so a patient never sits on both sides of a fold.

Built-ins:
  `tcga-nsclc`  LUAD vs LUSC: the label is the TCGA project of each diagnostic (DX) tumour slide;
  `tcga-brca`   IDC vs ILC: needs `--labels CSV` (slide_id or patient_id, label), since TCGA slide
                names do not carry the histological type; common spellings are mapped to IDC/ILC;
  `demo`        the demo cohort's `label` column (stroma / tumour / glandular);
  `csv:PATH`    a user table: slide_id or patient_id, label, optional fold (fixed CV folds) and
                optional split (rows with split=test form the external test set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pandas as pd

from pathology.cohorts import SlideRecord, parse_tcga_barcode, read_csv_table

BUILTIN_TASKS = ("tcga-nsclc", "tcga-brca", "demo")
DEFAULT_COHORT = {"tcga-nsclc": "tcga", "tcga-brca": "tcga", "demo": "demo"}
NSCLC_PROJECTS = {"TCGA-LUAD": "LUAD", "TCGA-LUSC": "LUSC"}
BRCA_SYNONYMS = {
    "IDC": ("idc", "infiltrating ductal carcinoma", "invasive ductal carcinoma", "ductal"),
    "ILC": ("ilc", "infiltrating lobular carcinoma", "invasive lobular carcinoma", "lobular"),
}
_LISTED = 20


class TaskError(ValueError):
    """A task cannot be built; the message names the task or file and what is wrong."""


def _show(items) -> str:
    items = list(items)
    return ", ".join(map(str, items[:_LISTED])) + (f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


@dataclass
class Task:
    name: str
    labels: pd.DataFrame  # slide_id, patient_id, label [, fold]
    test: pd.DataFrame | None = None  # slide_id, patient_id [, label]
    level: str = "slide"  # where the labels were given: "slide" or "patient"
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list:
        return sorted(self.labels["label"].unique().tolist(), key=str)


# -- slide tables -----------------------------------------------------------------------------------------
def slide_table(records: list[SlideRecord]) -> pd.DataFrame:
    """slide_id, patient_id, project, cohort and the records' label columns."""
    rows = [{"slide_id": r.slide_id, "patient_id": r.patient_id, "project": r.project or "", "cohort": r.cohort,
             **r.labels} for r in records]
    return pd.DataFrame(rows, columns=None if rows else ["slide_id", "patient_id", "project", "cohort"])


def unreadable_feature_files(problems: list[tuple[Path, str]]) -> TaskError:
    """The error for feature files that cannot be read (truncated by an interrupted copy, not HDF5):
    they are never silently left out, since a labelled slide would vanish from the task."""
    shown = _show(str(path) for path, _ in problems)
    return TaskError(f"{len(problems)} feature file(s) cannot be read ({problems[0][1]}): {shown}; re-extract "
                     "them (rerun fm-extract with the same --output-dir: it redoes unreadable files), or delete "
                     "them and pass --drop-missing to leave those slides out")


def slide_table_from_features(features_dir: str | os.PathLike) -> pd.DataFrame:
    """The slides of a feature folder, from the attributes `fm-extract` writes (patient, project, cohort);
    files written elsewhere get the patient from a TCGA barcode in the name, else their own id.
    An unreadable file is an error naming it (its slide would otherwise drop out of the task unseen)."""
    directory = Path(features_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"feature directory {directory} does not exist")
    rows, unreadable = [], []
    for path in sorted(directory.glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        except (OSError, RuntimeError) as err:
            unreadable.append((path, str(err)))
            continue
        barcode = parse_tcga_barcode(path.stem)
        patient = attrs.get("patient_id") or (barcode["patient_id"] if barcode else path.stem)
        rows.append({"slide_id": path.stem, "patient_id": str(patient), "project": str(attrs.get("project", "")),
                     "cohort": str(attrs.get("cohort", ""))})
    if unreadable:
        raise unreadable_feature_files(unreadable)
    return pd.DataFrame(rows, columns=["slide_id", "patient_id", "project", "cohort"])


# -- label tables -----------------------------------------------------------------------------------------
def read_label_table(path: str | os.PathLike, flag: str = "--labels") -> pd.DataFrame:
    """A label CSV: slide_id or patient_id, label, optional fold and split columns."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{flag} {path}: file not found")
    table = read_csv_table(path, TaskError, flag, dtype={"slide_id": str, "patient_id": str})
    if "label" not in table.columns or not {"slide_id", "patient_id"} & set(table.columns):
        raise TaskError(f"{flag} {path}: needs a `label` column and a `slide_id` or `patient_id` column; "
                        f"found {list(table.columns)}")
    key = "slide_id" if "slide_id" in table.columns else "patient_id"
    if key == "slide_id" and table["slide_id"].duplicated().any():
        twice = table.loc[table["slide_id"].duplicated(), "slide_id"].unique().tolist()
        raise TaskError(f"{flag} {path}: slide_id(s) on more than one row: {_show(twice)}")
    empty = table.loc[table["label"].isna(), key].tolist()
    if empty:
        raise TaskError(f"{flag} {path}: rows without a label for {key} {_show(empty)}")
    if "split" in table.columns:
        table["split"] = table["split"].fillna("").astype(str).str.strip().str.lower()
    return table


def attach_labels(table: pd.DataFrame, slides: pd.DataFrame, source: str) -> tuple[pd.DataFrame, str, list[str]]:
    """Slide-level rows (slide_id, patient_id, label [, fold, split]) from a slide or patient label table.

    Returns (rows, level, notes). Patient labels are given to every slide of the patient in `slides`."""
    notes: list[str] = []
    extra = [c for c in ("fold", "split") if c in table.columns]
    patients = dict(zip(slides["slide_id"].astype(str), slides["patient_id"].astype(str)))
    if "slide_id" in table.columns:
        rows = table[["slide_id", "label", *extra] + (["patient_id"] if "patient_id" in table.columns else [])].copy()
        rows["slide_id"] = rows["slide_id"].astype(str)
        if "patient_id" not in rows.columns:
            def patient_of(slide_id: str) -> str:
                barcode = parse_tcga_barcode(slide_id)
                return patients.get(slide_id) or (barcode["patient_id"] if barcode else slide_id)

            rows["patient_id"] = rows["slide_id"].map(patient_of)
        return rows[["slide_id", "patient_id", "label", *extra]].reset_index(drop=True), "slide", notes
    table = table.assign(patient_id=table["patient_id"].astype(str))
    conflicting = table.groupby("patient_id")["label"].nunique()
    conflicting = conflicting[conflicting > 1].index.tolist()
    if conflicting:
        raise TaskError(f"{source}: patients with more than one label: {_show(conflicting)}")
    table = table.drop_duplicates("patient_id")
    rows = slides[["slide_id", "patient_id"]].astype(str).merge(table[["patient_id", "label", *extra]], on="patient_id")
    unmatched = sorted(set(table["patient_id"]) - set(rows["patient_id"]))
    if unmatched:
        notes.append(f"{len(unmatched)} labelled patient(s) of {source} have no slide here (ignored): {_show(unmatched)}")
    if rows.empty:
        raise TaskError(f"{source}: none of its {len(table)} patients has a slide among the {len(slides)} slides "
                        f"considered (patient ids e.g. {_show(slides['patient_id'].head(3))})")
    return rows.reset_index(drop=True), "patient", notes


def _diagnostic_tumour(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep diagnostic (DX) tumour slides; slides without a TCGA barcode are kept as they are."""
    def keep(slide_id: str) -> bool:
        info = parse_tcga_barcode(slide_id)
        return info is None or (info["tumour"] and info["slide_type"] in (None, "DX"))

    kept = rows[rows["slide_id"].map(keep)]
    return kept, len(rows) - len(kept)


def _nsclc(slides: pd.DataFrame, external: bool = False) -> tuple[pd.DataFrame, str, list[str]]:
    projects = slides.get("project", pd.Series("", index=slides.index)).fillna("").astype(str).str.upper()
    if not projects.str.len().any():
        if external:
            raise TaskError("tcga-nsclc: the external cohort's slides carry no TCGA project to label them by; "
                            "pass --test-labels CSV (slide_id or patient_id, label LUAD or LUSC)")
        raise TaskError("tcga-nsclc: the slides carry no TCGA project; pass --cohorts tcga --data-root DIR (the "
                        "project comes from TCGA-LUAD/ TCGA-LUSC/ folders or a GDC manifest), or extract the "
                        "features with fm-extract from such a cohort (it records the project)")
    rows = slides.assign(label=projects.map(NSCLC_PROJECTS))
    notes = []
    unlabelled = slides.loc[projects == "", "slide_id"].tolist()
    if unlabelled:
        notes.append(f"{len(unlabelled)} slide(s) without a TCGA project left out (no LUAD/LUSC label): "
                     f"{_show(unlabelled)}")
    others = projects[(projects != "") & rows["label"].isna()].value_counts()
    if len(others):
        notes.append(f"{int(others.sum())} slide(s) of other projects left out: "
                     f"{_show(f'{k} ({v})' for k, v in others.items())}")
    rows = rows[rows["label"].notna()][["slide_id", "patient_id", "label"]]
    if rows.empty:
        raise TaskError(f"tcga-nsclc: no slide of TCGA-LUAD or TCGA-LUSC; projects found: {_show(sorted(set(projects)))}")
    rows, dropped = _diagnostic_tumour(rows)
    notes += [f"{dropped} frozen-section or normal-tissue slide(s) left out (diagnostic tumour slides only)"] * bool(dropped)
    return rows.reset_index(drop=True), "patient", notes


def _normalise_brca(label) -> str | None:
    text = str(label).strip().lower()
    return next((name for name, spellings in BRCA_SYNONYMS.items() if text in spellings), None)


def _brca(slides: pd.DataFrame, labels_csv) -> tuple[pd.DataFrame, str, list[str]]:
    if not labels_csv:
        raise TaskError("tcga-brca needs --labels CSV with columns slide_id or patient_id, and label (IDC or ILC, "
                        "e.g. from the TCGA-BRCA clinical `histological_type`): slide names carry no subtype")
    table = read_label_table(labels_csv)
    mapped = table["label"].map(_normalise_brca)
    notes = []
    if mapped.isna().any():
        others = table.loc[mapped.isna(), "label"].astype(str).value_counts()
        notes.append(f"{int(mapped.isna().sum())} row(s) of {labels_csv} are neither IDC nor ILC (left out): "
                     f"{_show(f'{k} ({v})' for k, v in others.items())}")
    table = table.assign(label=mapped)[mapped.notna()]
    projects = slides.get("project", pd.Series("", index=slides.index)).fillna("").astype(str).str.upper()
    if (projects == "TCGA-BRCA").any():
        slides = slides[projects == "TCGA-BRCA"]
    rows, level, more = attach_labels(table, slides, str(labels_csv))
    rows, dropped = _diagnostic_tumour(rows)
    if dropped:
        more.append(f"{dropped} frozen-section or normal-tissue slide(s) left out (diagnostic tumour slides only)")
    return rows, level, notes + more


def _demo(slides: pd.DataFrame) -> tuple[pd.DataFrame, str, list[str]]:
    if "label" not in slides.columns:
        raise TaskError("demo: the slides have no `label` column (use the demo cohort: --cohorts demo)")
    rows = slides[slides["label"].notna()][["slide_id", "patient_id", "label"]]
    return rows.reset_index(drop=True), "slide", []


def task_labels(name: str, slides: pd.DataFrame, labels_csv=None,
                external: bool = False) -> tuple[pd.DataFrame, str, list[str]]:
    """(slide-level label rows, level, notes) of task `name` over the slides in `slides`; `external`:
    they are an external test cohort (errors then point at --test-labels)."""
    if name == "tcga-nsclc":
        return _nsclc(slides, external)
    if name == "tcga-brca":
        return _brca(slides, labels_csv)
    if name == "demo":
        return _demo(slides)
    if name.startswith("csv:") and len(name) > 4:
        return attach_labels(read_label_table(name[4:], flag="task"), slides, name[4:])
    raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}, or csv:PATH")


def build_task(name: str, slides: pd.DataFrame, labels_csv=None) -> Task:
    """The task over `slides`: CV labels, plus test rows where the table marks them (split=test)."""
    rows, level, notes = task_labels(name, slides, labels_csv)
    test = None
    if "split" in rows.columns:
        is_test = rows["split"] == "test"
        test = rows[is_test].drop(columns=[c for c in ("split", "fold") if c in rows.columns]).reset_index(drop=True)
        rows = rows[~is_test].drop(columns="split").reset_index(drop=True)
        test = test if len(test) else None
    classes = rows["label"].unique()
    if len(rows) == 0:
        raise TaskError(f"task {name}: no labelled slides")
    if len(classes) < 2:
        raise TaskError(f"task {name}: every labelled slide ({len(rows)}) has the label {classes[0]!r}; "
                        "a slide-level classifier needs at least two classes")
    return Task(name, rows, test, level, notes)
