"""Cohorts: named sets of slides with patient ids and labels, resolved from the forms users type.

Forms (`fm-train pathology --cohorts ...`):
  `tcga`       slides under `--data-root` (any layout, including the GDC download layout
               `<file uuid>/<barcode>.<uuid>.svs`), plus any GDC manifest (`*manifest*.txt|tsv`) there;
  `tcga:PATH`  the slides listed in the GDC manifest at PATH (looked up under `--data-root`);
  `csv:PATH`   a user cohort CSV with columns slide_path, slide_id, patient_id [, mpp, labels...];
  `demo`       the built-in synthetic demo cohort.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
COHORT_FORMS = "`tcga`, `tcga:GDC_MANIFEST`, `csv:PATH` or `demo`"
REQUIRED_CSV_COLUMNS = ("slide_path", "slide_id", "patient_id")
_RESERVED_CSV_COLUMNS = {*REQUIRED_CSV_COLUMNS, "mpp", "cohort", "project"}

# TCGA-<TSS>-<participant>-<sample><vial>-<portion><analyte?>-<slide type><n>, e.g. TCGA-05-4244-01Z-00-DX1
_TCGA_BARCODE = re.compile(
    r"(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(?P<sample>\d{2})(?P<vial>[A-Z])?"
    r"(?:-(?P<portion>\d{2}[A-Z]?)-(?P<slide>(?:DX|TS|BS|MS)[A-Z0-9]*))?",
    re.IGNORECASE,
)
_TCGA_PROJECT = re.compile(r"^TCGA-[A-Z]{2,6}$", re.IGNORECASE)


class CohortError(ValueError):
    """A cohort could not be resolved; the message names the cohort/file and what is wrong."""


@dataclass
class SlideRecord:
    """One slide of a cohort. `mpp` is used only when the slide itself carries no pixel size."""

    slide_id: str
    slide_path: Path
    patient_id: str
    cohort: str
    project: str | None = None
    mpp: float | None = None
    labels: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def parse_tcga_barcode(name: str) -> dict | None:
    """Patient, sample type (01 tumour / 11 normal ...) and slide type (DX, TS, BS) from a TCGA name."""
    match = _TCGA_BARCODE.search(name)
    if not match:
        return None
    sample = match.group("sample")
    slide = (match.group("slide") or "").upper()
    return dict(
        barcode=match.group(0).upper(),
        patient_id=match.group("patient").upper(),
        sample_type=sample,
        tumour=1 <= int(sample) <= 9,  # 01-09 tumour, 10-19 normal, 20-29 control
        slide_type=slide[:2] or None,  # DX: diagnostic FFPE; TS/BS: frozen (top/bottom section)
    )


def _project_from_path(path: Path) -> str | None:
    for part in reversed(path.parts[:-1]):
        if _TCGA_PROJECT.match(part):
            return part.upper()
    return None


def _find_slides(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())


# the GDC portal's sample sheet (gdc_sample_sheet.<date>.tsv) names its columns for people
_SAMPLE_SHEET_COLUMNS = {"File ID": "id", "File Name": "filename", "Project ID": "project_id"}


def _read_gdc_manifest(path: Path) -> pd.DataFrame:
    """GDC manifest (`id filename md5 size state`, + optional project column) or GDC sample sheet
    (`File ID, File Name, ..., Project ID, Case ID, ...`): the only GDC files that name the project of a
    slide downloaded to the `<uuid>/<file>` layout."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str).rename(columns=_SAMPLE_SHEET_COLUMNS)
    except Exception as err:
        raise CohortError(f"{path}: cannot read as a GDC manifest (tab-separated): {err}") from err
    missing = [c for c in ("id", "filename") if c not in table.columns]
    if missing:
        raise CohortError(f"{path}: GDC manifest lacks column(s) {missing}; found {list(table.columns)}")
    return table


def _is_gdc_listing(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix.lower() in (".txt", ".tsv") and ("manifest" in name or "sample_sheet" in name)


def _tcga_record(path: Path, project: str | None, file_id: str | None = None) -> SlideRecord:
    info = parse_tcga_barcode(path.name)
    stem = path.name.split(".")[0] if info else path.stem
    extra = {"file_id": file_id} if file_id else {}
    if info is None:
        log.warning("%s: no TCGA barcode in the name; patient id = file name", path)
        return SlideRecord(stem, path, stem, "tcga", project, extra=extra)
    extra.update(barcode=info["barcode"], sample_type=info["sample_type"], slide_type=info["slide_type"])
    return SlideRecord(
        info["barcode"],
        path,
        info["patient_id"],
        "tcga",
        project,
        labels={"tumour": int(info["tumour"])},
        extra=extra,
    )


def resolve_tcga(
    data_root: str | os.PathLike | None, manifest: str | None = None, projects=None
) -> list[SlideRecord]:
    """TCGA slides found under `data_root` and/or listed in a GDC manifest, filtered by project."""
    if data_root is None and manifest is None:
        raise CohortError("cohort `tcga` needs --data-root (the folder holding the downloaded slides)")
    root = _absolute(data_root) if data_root is not None else None
    if root is not None and not root.is_dir():
        raise CohortError(f"--data-root {root} is not a directory")
    manifests = [_absolute(manifest)] if manifest else sorted(p for p in root.rglob("*") if _is_gdc_listing(p))
    records: dict[Path, SlideRecord] = {}
    found = _find_slides(root) if root is not None else []
    by_name = {p.name: p for p in found}
    for manifest_path in manifests:
        table = _read_gdc_manifest(manifest_path)
        base = root if root is not None else manifest_path.parent
        project_col = next(
            (c for c in ("project_id", "project", "cases.0.project.project_id") if c in table), None
        )
        for row in table.itertuples(index=False):
            row = row._asdict()
            if Path(row["filename"]).suffix.lower() not in SLIDE_SUFFIXES:
                continue
            path = by_name.get(row["filename"], base / row["id"] / row["filename"])  # GDC layout if not found
            project = row.get(project_col) if project_col else None
            project = (None if pd.isna(project) or not str(project).strip() else str(project)) or _project_from_path(path)
            known = records.get(path)  # a manifest and a sample sheet may both list it: keep what either knows
            records[path] = _tcga_record(path, project or (known.project if known else None), row["id"])
    if not manifest:
        for path in found:
            if path not in records:
                file_id = path.parent.name if re.fullmatch(r"[0-9a-f-]{36}", path.parent.name) else None
                records[path] = _tcga_record(path, _project_from_path(path), file_id)
    result = list(records.values())
    counts = pd.Series([r.slide_id for r in result]).value_counts()
    for record in result:  # a re-scanned slide keeps its barcode but gets a new uuid: keep both apart
        if counts.get(record.slide_id, 0) > 1:
            record.slide_id = record.slide_path.name[: -len(record.slide_path.suffix)]
    if projects:
        wanted = {p.upper() if p.upper().startswith("TCGA-") else f"TCGA-{p.upper()}" for p in projects}
        present = sorted({r.project for r in result if r.project})
        unknown = sum(r.project is None for r in result)
        result = [r for r in result if r.project in wanted]
        if unknown:
            log.warning("--projects: %d TCGA slide(s) under %s have no known project and are left out", unknown, root)
        if not result:
            raise CohortError(
                f"no TCGA slides of projects {sorted(wanted)}; projects found: {present or 'none'}"
                + (f"; {unknown} slide(s) have no known project" if unknown else "")
                + " (the project comes from a `TCGA-XXXX/` folder in the path, or from the GDC sample sheet "
                "(gdc_sample_sheet.*.tsv, saved beside the slides) or a manifest with a project_id column)"
            )
    if not result:
        raise CohortError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) found for cohort `tcga` under {root}")
    return sorted(result, key=lambda r: r.slide_id)


def _absolute(path: str | os.PathLike) -> Path:
    """An absolute path: outputs record slide paths, and later commands run from other folders."""
    return Path(os.path.abspath(path))


def _csv_mpp(value, path: Path, slide_id) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not math.isfinite(mpp) or mpp <= 0:
        raise CohortError(f"cohort CSV {path}: slide {slide_id}: mpp {value!r} is not a positive number "
                          "(microns per pixel, e.g. 0.25; leave it empty to use the slide's own)")
    return mpp


def read_csv_table(path: Path, error: type[Exception], what: str, **kwargs) -> pd.DataFrame:
    """`pd.read_csv`, with a file that is no readable CSV (another encoding, broken quoting, empty)
    reported in one line that names it."""
    try:
        return pd.read_csv(path, **kwargs)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise error(f"{what} {path}: not a readable CSV file ({type(err).__name__}: {err}); "
                    "save it as a comma-separated UTF-8 file") from None


def read_csv_cohort(path: str | os.PathLike, cohort: str | None = None) -> list[SlideRecord]:
    """A user cohort CSV; relative slide paths are relative to the CSV; other columns are labels."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"cohort CSV {path} not found")
    # ids are text ("001" is not 1), and a blank id is no id (not the text "nan")
    table = read_csv_table(path, CohortError, "cohort CSV", dtype={c: str for c in REQUIRED_CSV_COLUMNS},
                           skip_blank_lines=False)  # index + 2 is then the line number
    table = table.dropna(how="all")  # blank lines, and the ",,," rows spreadsheets leave at the end
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in table.columns]
    if missing:
        raise CohortError(
            f"cohort CSV {path} lacks column(s) {missing}; required: {list(REQUIRED_CSV_COLUMNS)}, "
            f"optional: mpp and label columns; found {list(table.columns)}"
        )
    for column in REQUIRED_CSV_COLUMNS:
        table[column] = table[column].str.strip().mask(lambda ids: ids == "")
    for column in ("slide_id", "slide_path"):
        blank = table.index[table[column].isna()]
        if len(blank):
            lines = ", ".join(str(i + 2) for i in blank[:5]) + (", ..." if len(blank) > 5 else "")
            raise CohortError(f"cohort CSV {path}: no {column} on line(s) {lines}")
    no_patient = table["patient_id"].isna()
    if no_patient.any():  # as in the label tables (evaluation.cv): such a slide is a patient of its own
        print(f"cohort CSV {path}: {int(no_patient.sum())} slide(s) without a patient_id are each taken as their "
              f"own patient (e.g. {table.loc[no_patient, 'slide_id'].iloc[0]})")
        table.loc[no_patient, "patient_id"] = table.loc[no_patient, "slide_id"]
    duplicated = table["slide_id"][table["slide_id"].duplicated()].tolist()
    if duplicated:
        raise CohortError(f"cohort CSV {path}: duplicated slide_id values {duplicated[:5]}")
    label_columns = [c for c in table.columns if c not in _RESERVED_CSV_COLUMNS]
    records = []
    for row in table.to_dict("records"):
        slide_path = Path(str(row["slide_path"]))
        if not slide_path.is_absolute():
            slide_path = _absolute(path.parent / slide_path)
        mpp = _csv_mpp(row.get("mpp"), path, row["slide_id"])
        project = row.get("project")
        records.append(
            SlideRecord(
                slide_id=str(row["slide_id"]),
                slide_path=slide_path,
                patient_id=str(row["patient_id"]),
                cohort=cohort or f"csv:{path.stem}",
                project=None if pd.isna(project) else str(project),
                mpp=mpp,
                labels={c: row[c] for c in label_columns},
            )
        )
    return records


def resolve_cohorts(
    names: list[str] | str,
    data_root: str | os.PathLike | None = None,
    projects: list[str] | None = None,
    mpp: float | None = None,
) -> list[SlideRecord]:
    """All slides of the named cohorts. `mpp` fills in for slides (and CSV rows) without a pixel size."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    records: list[SlideRecord] = []
    for name in names:
        kind, _, arg = name.partition(":")
        if kind == "tcga":
            records += resolve_tcga(data_root, arg or None, projects)
        elif kind == "csv" and arg:
            records += read_csv_cohort(arg)
        elif kind == "demo" and not arg:
            from pathology.demo_slides import demo_cohort

            records += demo_cohort()
        else:
            raise CohortError(f"unknown cohort {name!r}; valid forms: {COHORT_FORMS}")
    if mpp is not None:
        for record in records:
            record.mpp = record.mpp if record.mpp is not None else float(mpp)
    seen: dict[str, SlideRecord] = {}
    for record in records:
        other = seen.setdefault(record.slide_id, record)
        if other is not record and other.slide_path != record.slide_path:
            raise CohortError(
                f"slide_id {record.slide_id!r} names two files: {other.slide_path} and {record.slide_path}"
            )
    return list(seen.values())
