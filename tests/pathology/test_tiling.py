from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pathology.cohorts import SlideRecord
from pathology.slides import open_slide, read_tile
from pathology.tile_setting import resolve_min_tissue
from pathology.tiling import (
    FAILED,
    LOCKED,
    OK,
    OK_EMPTY,
    SKIPPED_DONE,
    grid_coords,
    read_coords,
    read_manifest,
    tile_cohort,
    tile_slide,
)
from pathology.tissue import saturation_u8


def _records(test_slides, names, mpp=None):
    return [SlideRecord(name, test_slides[name], f"P-{name}", "test", mpp=mpp) for name in names]


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".lock")


def _run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout
    )


def test_real_slide_tiles_with_coords_attributes_and_thumbnail(cmu_slide, tmp_path):
    result = tile_slide(cmu_slide, tmp_path, "cmu1")
    assert result.status == OK and result.n_tiles > 10
    coords, attrs = read_coords(tmp_path / "cmu1" / "coords.h5")
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 224  # 0.499 um/px: no resampling
    assert attrs["target_mpp"] == 0.5 and attrs["slide_mpp"] == pytest.approx(0.499)
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
    assert attrs["target_magnification"] == pytest.approx(20.0) and attrs["slide_id"] == "cmu1"
    assert coords.dtype == np.int64 and len(coords) == result.n_tiles
    assert (coords >= 0).all() and (coords[:, 0] + 224 <= 2220).all() and (coords[:, 1] + 224 <= 2967).all()
    with h5py.File(tmp_path / "cmu1" / "coords.h5") as f:
        assert (f["tissue_fraction"][:] >= 0.6).all()
        assert f["coords"].attrs["patch_size_level0"] == 224  # TRIDENT reads attributes from `coords`
    # kept tiles hold stained tissue, the rest of the grid mostly glass
    with open_slide(cmu_slide) as slide:
        kept = {tuple(c) for c in coords}
        grid = grid_coords(2220, 2967, 224)
        sat = {tuple(c): saturation_u8(read_tile(slide, *c, 224, 0.5)).mean() for c in grid}
    assert np.mean([sat[c] for c in kept]) > 2 * np.mean([v for c, v in sat.items() if c not in kept])
    thumb = Image.open(tmp_path / "cmu1" / "thumbnail.png")
    assert thumb.format == "PNG" and min(thumb.size) > 100
    assert _leftovers(tmp_path) == []


def test_40x_and_20x_scans_give_the_same_tile_grid(test_slides, tmp_path):
    r40 = tile_slide(test_slides["x40"], tmp_path, "x40")
    r20 = tile_slide(test_slides["x20"], tmp_path, "x20")
    assert r40.status == r20.status == OK
    _, a40 = read_coords(tmp_path / "x40" / "coords.h5")
    assert a40["patch_size_level0"] == 448 and a40["slide_mpp"] == 0.25

    def tiles_in_microns(name):
        with h5py.File(tmp_path / name / "coords.h5") as f:
            mpp = f.attrs["slide_mpp"]
            return {
                (round(x * mpp), round(y * mpp)): fr
                for (x, y), fr in zip(f["coords"][:], f["tissue_fraction"][:])
            }

    t40, t20 = tiles_in_microns("x40"), tiles_in_microns("x20")
    common = t40.keys() & t20.keys()
    assert len(common) >= 8
    # masks come from different pyramid levels: edges may move by about one 4 um mask pixel
    assert max(abs(t40[k] - t20[k]) for k in common) < 0.1
    # a tile may only be in one grid when its tissue fraction sits at the threshold
    for key in t40.keys() ^ t20.keys():
        assert abs(t40.get(key, t20.get(key)) - 0.6) < 0.1


def test_cohort_isolates_failures_records_manifest_and_resumes(test_slides, tmp_path):
    names = ["x20", "nompp", "truncated", "corrupt", "nonslide", "background", "x40"]
    table = tile_cohort(_records(test_slides, names), tmp_path)
    status = dict(zip(table.slide_id, table.status))
    assert status == {
        "x20": OK,
        "nompp": FAILED,
        "truncated": FAILED,
        "corrupt": FAILED,
        "nonslide": FAILED,
        "background": OK_EMPTY,
        "x40": OK,
    }
    reason = dict(zip(table.slide_id, table.reason))
    assert str(test_slides["nompp"]) in reason["nompp"] and "--mpp" in reason["nompp"]
    for name in ("truncated", "corrupt", "nonslide"):
        assert str(test_slides[name]) in reason[name]
    assert (
        reason["background"] == "no tissue tiles" and table.set_index("slide_id").n_tiles["background"] == 0
    )
    assert not (tmp_path / "nompp" / "coords.h5").exists()
    manifest = read_manifest(tmp_path / "manifest.csv")
    assert list(manifest.columns) == [
        "slide_id",
        "patient_id",
        "slide_path",
        "status",
        "reason",
        "n_tiles",
        "seconds",
        "mpp",
    ]
    assert dict(zip(manifest.slide_id, manifest.status)) == status
    assert manifest.set_index("slide_id").loc["x40", "mpp"] == 0.25
    assert manifest.set_index("slide_id").loc["x20", "patient_id"] == "P-x20"
    n_tiles = dict(zip(table.slide_id, table.n_tiles))

    # rerun: finished slides are skipped, the slide without mpp passes with a cohort-level override
    records = _records(test_slides, names)
    records[1].mpp = 0.5
    again = tile_cohort(records, tmp_path)
    status2 = dict(zip(again.slide_id, again.status))
    assert status2["x20"] == status2["x40"] == status2["background"] == SKIPPED_DONE
    assert status2["nompp"] == OK and status2["truncated"] == FAILED
    assert again.set_index("slide_id").n_tiles["x40"] == n_tiles["x40"]
    assert again.set_index("slide_id").mpp["x40"] == 0.25
    assert again.set_index("slide_id").n_tiles["nompp"] == n_tiles["x20"]  # same pixels as the 20x slide
    coords_nompp, attrs = read_coords(tmp_path / "nompp" / "coords.h5")
    np.testing.assert_array_equal(coords_nompp, read_coords(tmp_path / "x20" / "coords.h5")[0])
    assert attrs["mpp_source"] == "override"
    assert _leftovers(tmp_path) == []
    # the manifest keeps each slide's outcome: `ok` rows stay, the fixed slide is now `ok`
    manifest = read_manifest(tmp_path / "manifest.csv").set_index("slide_id")
    assert (
        manifest.status["x40"] == OK
        and manifest.status["nompp"] == OK
        and manifest.status["truncated"] == FAILED
    )

    overwritten = tile_slide(test_slides["x20"], tmp_path, "x20", overwrite=True)
    assert overwritten.status == OK and overwritten.n_tiles == n_tiles["x20"]
    escaping = tile_slide(test_slides["x20"], tmp_path, "../outside")
    assert escaping.status == FAILED and "slide_id" in escaping.reason
    assert not (tmp_path.parent / "outside").exists()


def test_process_pool_matches_serial(test_slides, tmp_path):
    names = ["x20", "nonslide", "background", "x40"]
    serial = tile_cohort(_records(test_slides, names), tmp_path / "serial")
    pooled = tile_cohort(_records(test_slides, names), tmp_path / "pooled", workers=2)
    pd.testing.assert_frame_equal(serial.drop(columns="seconds"), pooled.drop(columns="seconds"))
    for name in ("x20", "x40"):
        assert (tmp_path / "serial" / name / "coords.h5").read_bytes() == (
            tmp_path / "pooled" / name / "coords.h5"
        ).read_bytes()


CRASH_IN_ATOMIC_WRITE = """
import os, signal, sys
import pathology.tiling as tiling
from fm.io import atomic_path

def crash(path, *args):
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"half-written hdf5")
        os.kill(os.getpid(), signal.SIGKILL)

tiling._write_coords = crash
tiling.tile_slide(sys.argv[1], sys.argv[2], "slide")
"""


def test_crash_inside_write_then_rerun_gives_identical_outputs(test_slides, tmp_path):
    out = tmp_path / "crashed"
    proc = _run_python(CRASH_IN_ATOMIC_WRITE, str(test_slides["x20"]), str(out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "slide" / "coords.h5").exists()  # never a partial file under the final name
    assert _leftovers(out), "the simulated crash should leave a temporary and a lock behind"

    result = tile_slide(test_slides["x20"], out, "slide")  # the dead process's lock is broken
    assert result.status == OK
    assert _leftovers(out) == []
    reference = tile_slide(test_slides["x20"], tmp_path / "clean", "slide")
    for name in ("coords.h5", "thumbnail.png"):
        assert (out / "slide" / name).read_bytes() == (tmp_path / "clean" / "slide" / name).read_bytes()
    assert result.n_tiles == reference.n_tiles


CONCURRENT_WORKER = """
import json, os, sys, time
from pathlib import Path
import pathology.tiling as tiling
from pathology.cohorts import SlideRecord

slide, out, log, ready, go, result = sys.argv[1:7]
real_open = tiling.open_slide

def logged_open(path, *args):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {path}\\n")
    time.sleep(0.5)  # long enough for the other process to reach the same slide
    return real_open(path, *args)

tiling.open_slide = logged_open
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
records = [SlideRecord(f"s{i}", Path(slide), f"p{i}", "test") for i in range(6)]  # one file, six slide ids
table = tiling.tile_cohort(records, out)
Path(result).write_text(json.dumps(dict(zip(table.slide_id, table.status))))
"""


def test_concurrent_cohort_processes_never_tile_a_slide_twice(test_slides, tmp_path):
    out, log, go = tmp_path / "out", tmp_path / "opened.log", tmp_path / "go"
    procs = []
    for k in range(2):
        args = [
            str(test_slides["x20"]),
            str(out),
            str(log),
            str(tmp_path / f"ready{k}"),
            str(go),
            str(tmp_path / f"result{k}.json"),
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CONCURRENT_WORKER, *args], stderr=subprocess.PIPE, text=True
            )
        )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    go.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    results = [json.loads((tmp_path / f"result{k}.json").read_text()) for k in range(2)]
    opened_by = [line.split()[0] for line in log.read_text().splitlines()]
    assert len(opened_by) == 6, "each slide is opened exactly once across both processes"
    assert len(set(opened_by)) == 2, "both processes did part of the work"
    for slide_id in results[0]:
        statuses = sorted(r[slide_id] for r in results)
        assert statuses.count(OK) == 1 and set(statuses) <= {OK, LOCKED, SKIPPED_DONE}
    manifest = read_manifest(out / "manifest.csv")
    assert (manifest.status == OK).all() and len(manifest) == 6  # a `locked` row never hides the outcome
    assert _leftovers(out) == []


def test_sigterm_to_the_job_releases_every_lock_and_records_the_finished_slides(cmu_slide, tmp_path):
    """SLURM at the time limit (or scancel) sends SIGTERM to the whole process group, pool workers
    included: each worker ends through its cleanup, and the manifest records what was finished."""
    import os

    n = 40
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("slide_path,slide_id,patient_id\n" + "".join(f"{cmu_slide},s{i:03d},P{i}\n" for i in range(n)))
    out = tmp_path / "tiles"
    command = "import sys; from fm.cli import prepare_main; sys.exit(prepare_main(sys.argv[1:]))"
    child = subprocess.Popen([sys.executable, "-c", command, "pathology", "--cohorts", f"csv:{cohort}", "--output-dir",
                              str(out), "--workers", "2"], start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/coords.h5"))) < 3 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    done = {p.parent.name for p in out.glob("*/coords.h5")}
    assert 3 <= len(done) < n, "the job should have been stopped halfway"
    assert not list(out.glob("*/*.lock")) and not list(out.glob("*/.alive-*")) and not list(out.glob("*/.tmp-*"))
    manifest = pd.read_csv(out / "manifest.csv")
    recorded = set(manifest.loc[manifest["status"] == "ok", "slide_id"])
    assert recorded and recorded <= done and "failed" not in set(manifest["status"])
    assert "terminated (SIGTERM)" in err


def _csv_cohort(path: Path, slides: dict[str, Path]) -> str:
    pd.DataFrame(dict(slide_path=[str(p) for p in slides.values()], slide_id=list(slides),
                      patient_id=[f"P-{n}" for n in slides])).to_csv(path, index=False)
    return f"csv:{path}"


def _setting(coords_path: Path) -> tuple[int, float]:
    attrs = read_coords(coords_path)[1]
    return int(attrs["patch_size"]), float(attrs["target_mpp"])


def test_a_tiles_folder_keeps_one_tile_setting(test_slides, tmp_path):
    """A rerun or a grown cohort without the flags keeps the folder's setting; flags that contradict it are
    refused (they used to report `skipped_done` and leave the old tiles, which pretraining then read at
    the new setting); --overwrite re-tiles."""
    from fm.cli import UserError, invoke

    out = tmp_path / "tiles"
    first = _csv_cohort(tmp_path / "one.csv", {"x20": test_slides["x20"]})
    invoke("prepare", ["pathology", "--cohorts", first, "--output-dir", str(out), "--tile-px", "112",
                       "--target-mpp", "1.0"])
    grown = _csv_cohort(tmp_path / "two.csv", {"x20": test_slides["x20"], "x40": test_slides["x40"]})
    invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out)])
    assert _setting(out / "x40" / "coords.h5") == (112, 1.0)  # the folder's setting, not the defaults

    with pytest.raises(UserError, match=r"2 slide\(s\) at 112 px at 1 um/px \(x20, x40\).*--tile-px 224.*--overwrite"):
        invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out), "--tile-px", "224"])
    assert _setting(out / "x20" / "coords.h5") == (112, 1.0)
    invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out), "--tile-px", "224",
                       "--overwrite"])
    assert _setting(out / "x20" / "coords.h5") == _setting(out / "x40" / "coords.h5") == (224, 1.0)
    with pytest.raises(UserError, match=r"1 slide\(s\) at 224 px at 1 um/px \(x40\)"):  # would leave it mixed
        invoke("prepare", ["pathology", "--cohorts", grown, "--slides", "x20", "--output-dir", str(out),
                           "--tile-px", "112", "--overwrite"])

    # a single slide asked at another setting (the API, or a mixed folder) fails by name, tiles untouched
    other = tile_slide(test_slides["x20"], out, "x20", tile_px=224, target_mpp=0.5)
    assert other.status == FAILED and "224 px, 1 um/px" in other.reason and "--overwrite" in other.reason
    assert _setting(out / "x20" / "coords.h5") == (224, 1.0)


def test_the_tissue_threshold_follows_the_folder_and_another_one_is_reported(test_slides, tmp_path, capsys):
    """New slides take the folder's --min-tissue unless it is given (they took the default 0.6, mixing two
    selections in one folder); asking for another threshold keeps the finished slides and lists them,
    and --overwrite re-tiles with it."""
    from fm.cli import invoke

    def min_tissue(slide_id: str) -> float:
        return float(read_coords(out / slide_id / "coords.h5")[1]["min_tissue"])

    out = tmp_path / "tiles"
    invoke("prepare", ["pathology", "--cohorts", _csv_cohort(tmp_path / "one.csv", {"x20": test_slides["x20"]}),
                       "--output-dir", str(out), "--min-tissue", "0.3"])
    grown = _csv_cohort(tmp_path / "two.csv", {"x20": test_slides["x20"], "x40": test_slides["x40"]})
    invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out)])
    assert min_tissue("x40") == min_tissue("x20") == 0.3
    n_loose = len(read_coords(out / "x40" / "coords.h5")[0])
    capsys.readouterr()

    invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out), "--min-tissue", "0.95"])
    said = capsys.readouterr().out
    assert "kept 2 slide(s) tiled with another --min-tissue than 0.95 (x20, x40)" in said and "--overwrite" in said
    assert min_tissue("x20") == min_tissue("x40") == 0.3  # kept as they were
    kept = tile_slide(test_slides["x40"], out, "x40", min_tissue=0.95)
    assert kept.status == SKIPPED_DONE and "already tiled with --min-tissue 0.3, not 0.95" in kept.reason

    invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out), "--min-tissue", "0.95",
                       "--overwrite"])
    assert min_tissue("x20") == min_tissue("x40") == 0.95
    assert len(read_coords(out / "x40" / "coords.h5")[0]) < n_loose  # a stricter threshold keeps fewer tiles
    invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out)])
    assert "another --min-tissue" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--min-tissue must be a tissue fraction between 0 and 1, got 1.5"):
        resolve_min_tissue(out, 1.5)


@pytest.mark.parametrize("flag, value, complaint", [
    ("--tile-px", "0", "must be at least 16"), ("--target-mpp", "0", "must be a number > 0"),
    ("--mpp", "-1", "must be a number > 0"), ("--min-tissue", "1.5", "must be a fraction between 0 and 1")])
def test_nonsense_tiling_flags_are_refused_before_any_slide_is_read(tmp_path, capsys, flag, value, complaint):
    """They failed every slide apart, each with a logged ZeroDivisionError traceback (--mpp 0 was ignored)."""
    from fm.cli import extract_main, prepare_main

    with pytest.raises(SystemExit) as stop:
        prepare_main(["pathology", "--cohorts", "demo", "--output-dir", str(tmp_path / "t"), flag, value])
    assert stop.value.code == 2 and f"argument {flag}: {complaint}" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    with pytest.raises(SystemExit) as stop:  # fm-extract tiles what is missing: the same checks
        extract_main(["pathology", "--cohorts", "demo", "--tiles-dir", str(tmp_path / "t"), "--output-dir",
                      str(tmp_path / "f"), flag, value])
    assert stop.value.code == 2 and f"argument {flag}: {complaint}" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()


def test_a_cohort_keeps_its_own_threshold_in_a_folder_shared_with_others(test_slides, tmp_path):
    """One tiles folder, two cohorts: new slides of cohort Y take Y's threshold, not the majority's."""
    from fm.cli import invoke

    out = tmp_path / "tiles"
    cohort_x = _csv_cohort(tmp_path / "x.csv", {f"x{i}": test_slides["x20"] for i in range(3)})
    invoke("prepare", ["pathology", "--cohorts", cohort_x, "--output-dir", str(out)])  # 3 slides at 0.6
    two = {f"y{i}": test_slides["x40"] for i in range(2)}
    invoke("prepare", ["pathology", "--cohorts", _csv_cohort(tmp_path / "y.csv", two), "--output-dir", str(out),
                       "--min-tissue", "0.3"])
    grown = _csv_cohort(tmp_path / "y3.csv", {**two, "y2": test_slides["x40"]})
    invoke("prepare", ["pathology", "--cohorts", grown, "--output-dir", str(out)])
    assert float(read_coords(out / "y2" / "coords.h5")[1]["min_tissue"]) == 0.3
    # a new cohort holding none of the tiles: the folder's most common threshold
    assert resolve_min_tissue(out, None, ["z0"]) == 0.6
    # a tie goes to the stricter threshold, whatever order the folder lists its slides in
    assert resolve_min_tissue(out, None, ["x0", "y0"]) == 0.6


def test_a_failed_overwrite_leaves_no_old_outputs_looking_done(test_slides, tmp_path):
    slide = tmp_path / "s.tif"
    slide.write_bytes(test_slides["x20"].read_bytes())
    assert tile_slide(slide, tmp_path / "tiles", "s").status == OK
    slide.write_text("replaced by something that is not a slide")
    assert tile_slide(slide, tmp_path / "tiles", "s", overwrite=True).status == FAILED
    assert not (tmp_path / "tiles" / "s" / "coords.h5").exists()
    assert not (tmp_path / "tiles" / "s" / "thumbnail.png").exists()
    assert tile_slide(slide, tmp_path / "tiles", "s").status == FAILED  # not `skipped_done` on stale tiles


def test_samplesheet_only_writes_the_cohort_and_tiles_nothing(test_slides, tmp_path):
    from fm.cli import invoke

    cohort = _csv_cohort(tmp_path / "c.csv", {"x20": test_slides["x20"], "x40": test_slides["x40"]})
    sheet, out = tmp_path / "sheet.csv", tmp_path / "tiles"
    invoke("prepare", ["pathology", "--cohorts", cohort, "--output-dir", str(out), "--write-samplesheet",
                       str(sheet), "--samplesheet-only"])
    rows = pd.read_csv(sheet)
    assert sorted(rows["slide_id"]) == ["x20", "x40"] and all(Path(p).is_absolute() for p in rows["slide_path"])
    assert not list(out.glob("*/coords.h5"))
    with pytest.raises(ValueError, match="--samplesheet-only needs --write-samplesheet"):
        invoke("prepare", ["pathology", "--cohorts", cohort, "--output-dir", str(out), "--samplesheet-only"])


def test_a_damaged_coords_file_is_tiled_again_not_taken_as_done(test_slides, tmp_path):
    """coords.h5 is derived data: when it cannot be read (a damaged disk or copy) a rerun re-tiles the slide
    (it was `skipped_done`, and fm-extract then failed the slide with no way out but --overwrite of all)."""
    out = tmp_path / "tiles"
    assert tile_slide(test_slides["x20"], out, "s").status == OK
    coords = read_coords(out / "s" / "coords.h5")[0]
    data = (out / "s" / "coords.h5").read_bytes()
    (out / "s" / "coords.h5").write_bytes(data[: len(data) // 3])
    again = tile_slide(test_slides["x20"], out, "s")
    assert again.status == OK and np.array_equal(read_coords(out / "s" / "coords.h5")[0], coords)
    assert tile_slide(test_slides["x20"], out, "s").status == SKIPPED_DONE
