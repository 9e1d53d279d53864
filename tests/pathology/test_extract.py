"""fm-extract pathology: features of the real fixture slide, provenance, resume after a kill, bad slides."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from data_features import hf_reference_cls, save_tiny_hf_encoder

from pathology.cohorts import SlideRecord
from pathology.extract import MANIFEST_NAME, FailFast, FeatureEncoder, extract_cohort, shard_of
from pathology.feature_files import read_features, weights_sha256
from pathology.tiling import read_coords, tile_cohort


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return save_tiny_hf_encoder(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="module")
def cmu_cohort(cmu_slide, tmp_path_factory):
    """The fixture slide under three ids (a small multi-slide cohort of real tissue), tiled at 0.5 um/px."""
    records = [SlideRecord(f"cmu-{i}", cmu_slide, f"P{i}", "test") for i in range(3)]
    tiles = tmp_path_factory.mktemp("cmu-tiles")
    table = tile_cohort(records, tiles, tile_px=224, target_mpp=0.5, min_tissue=0.6)
    assert (table["status"] == "ok").all(), table
    return records, tiles


def _extract_then_die(records, tiles, out, tiny_hf) -> None:
    """Run an extraction that SIGKILLs its own process right after writing rows of the second slide."""
    from pathology import feature_files

    original, seen = feature_files.FeatureFileWriter.write_rows, []

    def write_rows(self, start, rows):
        original(self, start, rows)
        seen.append(self.path.name)
        if len(set(seen)) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    feature_files.FeatureFileWriter.write_rows = write_rows
    extract_cohort(records, tiles, out, FeatureEncoder(str(tiny_hf), device="cpu"), batch_size=8, workers=0)


def _files(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    return {p.stem: read_features(p) for p in sorted(directory.glob("*.h5"))}


def test_extracts_real_slide_with_phikon_format_encoder(cmu_cohort, tiny_hf, tmp_path):
    records, tiles = cmu_cohort
    encoder = FeatureEncoder(str(tiny_hf), device="cpu")  # HF Dinov2Model folder, as Phikon-v2 ships
    table = extract_cohort(records[:1], tiles, tmp_path, encoder, batch_size=16, workers=2)
    assert table["status"].tolist() == ["ok"], table
    features, coords, attrs = read_features(tmp_path / "cmu-0.h5")
    tiling_coords, tiling_attrs = read_coords(tiles / "cmu-0" / "coords.h5")
    assert features.dtype == np.float16 and features.shape == (len(tiling_coords), 32)
    assert np.array_equal(coords, tiling_coords)
    with h5py.File(tmp_path / "cmu-0.h5") as f:
        assert f["coords"].attrs["patch_size_level0"] == tiling_attrs["patch_size_level0"]  # TRIDENT reads these
    assert attrs["encoder"] == str((tiny_hf / "model.safetensors").resolve())
    assert attrs["encoder_weights_sha256"] == hashlib.sha256((tiny_hf / "model.safetensors").read_bytes()).hexdigest()
    prep = json.loads(attrs["preprocessing"])
    assert prep["tile_px"] == 224 and prep["input_px"] == 64 and prep["resize"] != "none"
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406]) and prep["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert (attrs["target_mpp"], attrs["patch_size"], attrs["feature"]) == (0.5, 224, "cls")
    assert attrs["code_version"].startswith("fm-suite") and attrs["patient_id"] == "P0"

    # the features are the HF model's own CLS output on those tiles (read here with OpenSlide directly)
    slide = openslide.OpenSlide(str(records[0].slide_path))
    pick = [0, len(coords) // 2, len(coords) - 1]
    tiles_rgb = np.stack([np.asarray(slide.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"))
                          for x, y in coords[pick]])
    reference = hf_reference_cls(tiny_hf, tiles_rgb)
    assert np.abs(features[pick].astype(np.float32) - reference).max() < 2e-2
    assert np.abs(features[0] - features[-1]).max() > 0.05  # different tissue, different features


def test_cls_plus_mean_appends_mean_patch_token(cmu_cohort, tiny_hf, tmp_path):
    records, tiles = cmu_cohort
    cls = extract_cohort(records[:1], tiles, tmp_path / "cls", FeatureEncoder(str(tiny_hf), device="cpu"), workers=0)
    both = extract_cohort(records[:1], tiles, tmp_path / "both",
                          FeatureEncoder(str(tiny_hf), feature="cls+mean", device="cpu", input_px=0),
                          dtype="float32", workers=0)
    assert (cls["status"] == "ok").all() and (both["status"] == "ok").all()
    f_cls, _, _ = read_features(tmp_path / "cls" / "cmu-0.h5")
    f_both, _, attrs = read_features(tmp_path / "both" / "cmu-0.h5")
    assert f_both.dtype == np.float32 and f_both.shape == (len(f_cls), 64)
    assert attrs["feature"] == "cls+mean" and json.loads(attrs["preprocessing"])["input_px"] == 224
    assert np.abs(f_both[:, 32:] - f_both[:, :32]).max() > 0.05  # the mean token is not the CLS again


def test_resume_after_kill_gives_identical_files(cmu_cohort, tiny_hf, tmp_path):
    records, tiles = cmu_cohort
    reference_dir, out = tmp_path / "reference", tmp_path / "run"
    extract_cohort(records, tiles, reference_dir, FeatureEncoder(str(tiny_hf), device="cpu"), batch_size=8, workers=0)
    # a process SIGKILLed while writing its second slide (temporary file and dead locks left behind)
    child = multiprocessing.get_context("spawn").Process(target=_extract_then_die, args=(records, tiles, out, tiny_hf))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert [p.name for p in out.glob("*.h5")] == ["cmu-0.h5"]
    assert list(out.glob(".tmp-cmu-1.h5.*")) and list(out.glob("*.lock"))
    first = (out / "cmu-0.h5").read_bytes()

    table = extract_cohort(records, tiles, out, FeatureEncoder(str(tiny_hf), device="cpu"), batch_size=8, workers=0)
    assert dict(zip(table["slide_id"], table["status"])) == {"cmu-0": "skipped_done", "cmu-1": "ok", "cmu-2": "ok"}
    assert (out / "cmu-0.h5").read_bytes() == first
    assert not list(out.glob(".tmp-*")) and not list(out.glob("*.lock"))
    resumed, reference = _files(out), _files(reference_dir)
    assert sorted(resumed) == sorted(reference) == ["cmu-0", "cmu-1", "cmu-2"]
    for sid in reference:
        np.testing.assert_allclose(resumed[sid][0].astype(np.float32), reference[sid][0].astype(np.float32), atol=2e-3)
        assert np.array_equal(resumed[sid][1], reference[sid][1])
        assert resumed[sid][2] == reference[sid][2]


def test_bad_slide_is_recorded_and_the_rest_continue(cmu_cohort, tiny_hf, tmp_path):
    records, tiles = cmu_cohort
    broken = tmp_path / "broken.svs"
    broken.write_bytes(records[0].slide_path.read_bytes()[:50_000])  # the file got truncated after tiling
    cohort = [records[0], SlideRecord("cmu-1", broken, "P1", "test"), records[2]]
    encoder = FeatureEncoder(str(tiny_hf), device="cpu")
    table = extract_cohort(cohort, tiles, tmp_path / "out", encoder, batch_size=16, workers=2)
    status = dict(zip(table["slide_id"], table["status"]))
    assert status == {"cmu-0": "ok", "cmu-1": "failed", "cmu-2": "ok"}
    reason = table.set_index("slide_id").loc["cmu-1", "reason"]
    assert "broken.svs" in reason
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == ["cmu-0.h5", "cmu-2.h5"]
    manifest = (tmp_path / "out" / MANIFEST_NAME).read_text()
    assert "cmu-1,P1" in manifest and "failed" in manifest
    assert not list((tmp_path / "out").glob(".tmp-*")) and not list((tmp_path / "out").glob("*.lock"))
    with pytest.raises(FailFast, match="fail-fast.*cmu-1"):
        extract_cohort(cohort, tiles, tmp_path / "out2", encoder, workers=0, fail_fast=True)


def test_fail_fast_stops_at_a_slide_that_cannot_even_be_tiled(cmu_slide, tiny_hf, tmp_path, capsys):
    """A file that is not a slide fails in planning (tiling), before any embedding: --fail-fast stops
    there too, with one line on the CLI, the manifest written and no lock left; without it, the other
    slides go on and the failure is printed."""
    from fm.cli import extract_main

    not_a_slide = tmp_path / "notes.svs"
    not_a_slide.write_text("this is not a slide")
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"slide_path,slide_id,patient_id\n{cmu_slide},good,P0\n{not_a_slide},bad,P1\n")
    argv = ["pathology", "--cohorts", f"csv:{cohort}", "--tiles-dir", str(tmp_path / "tiles"), "--encoder",
            str(tiny_hf), "--workers", "0", "--tile-px", "64", "--target-mpp", "2.0", "--device", "cpu"]
    assert extract_main([*argv, "--output-dir", str(tmp_path / "ff"), "--fail-fast"]) == 2
    err = capsys.readouterr().err
    assert "fm-extract: error: --fail-fast: slide bad failed: tiling failed" in err and "Traceback" not in err
    assert not list((tmp_path / "ff").glob("*.h5")) and not list((tmp_path / "ff").glob("*.lock"))
    assert "bad,P1" in (tmp_path / "ff" / MANIFEST_NAME).read_text()
    assert extract_main([*argv, "--output-dir", str(tmp_path / "go-on")]) == 0
    assert "FAILED bad: tiling failed" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "go-on").glob("*.h5")] == ["good.h5"]


def test_a_grown_cohort_keeps_the_tile_setting_of_its_tiles(cmu_slide, tiny_hf, tmp_path):
    """Slides added to a cohort are tiled at the setting the tiles folder already has, not the defaults,
    so a rerun without the tiling flags neither strands the finished slides nor mixes two settings."""
    encoder = FeatureEncoder(str(tiny_hf), device="cpu")
    tiles, out = tmp_path / "tiles", tmp_path / "features"
    first = [SlideRecord("a", cmu_slide, "P0", "test")]
    table = extract_cohort(first, tiles, out, encoder, workers=0,
                           tiling=dict(tile_px=64, target_mpp=2.0, min_tissue=0.3))
    assert table["status"].tolist() == ["ok"]
    grown = [*first, SlideRecord("b", cmu_slide, "P1", "test")]
    table = extract_cohort(grown, tiles, out, encoder, workers=0,
                           tiling=dict(tile_px=None, target_mpp=None, min_tissue=None))
    assert dict(zip(table["slide_id"], table["status"])) == {"a": "skipped_done", "b": "ok"}
    attrs_b = read_coords(tiles / "b" / "coords.h5")[1]
    assert attrs_b["patch_size"] == 64 and attrs_b["min_tissue"] == 0.3  # the folder's, not the default 0.6
    # flags that contradict the tiles: the slides tiled otherwise fail, naming the flags and the fix
    table = extract_cohort([*grown, SlideRecord("c", cmu_slide, "P2", "test")], tiles, tmp_path / "f2", encoder,
                           workers=0, tiling=dict(tile_px=32))
    reasons = dict(zip(table["slide_id"], table["reason"]))
    assert dict(zip(table["slide_id"], table["status"]))["c"] == "ok"
    assert "tiled at 64 px" in reasons["a"] and "uses 32 px" in reasons["a"] and "from --tile-px" in reasons["a"]
    # a run over new slides only (a new batch, a shard): the folder's setting still rules
    table = extract_cohort([SlideRecord("d", cmu_slide, "P3", "test")], tiles, out, encoder, workers=0,
                           tiling=dict(tile_px=None, target_mpp=None))
    assert table["status"].tolist() == ["ok"] and read_coords(tiles / "d" / "coords.h5")[1]["patch_size"] == 64

    # another cohort in the same folder tiled with another threshold: a slide added to it takes its own
    table = extract_cohort([SlideRecord(f"o{i}", cmu_slide, f"O{i}", "test") for i in range(5)], tiles, out,
                           encoder, workers=0, tiling=dict(min_tissue=0.5))
    table = extract_cohort([SlideRecord("a", cmu_slide, "P0", "test"), SlideRecord("e", cmu_slide, "P4", "test")],
                           tiles, out, encoder, workers=0, tiling=dict(tile_px=None, target_mpp=None))
    assert read_coords(tiles / "e" / "coords.h5")[1]["min_tissue"] == 0.3

def test_a_plan_stopped_halfway_leaves_no_lock(cmu_cohort, tiny_hf, tmp_path, monkeypatch):
    from pathology import extract_plan

    records, tiles = cmu_cohort
    original, calls = extract_plan.remove_stale_temporaries, []

    def stop_at_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # or SIGTERM's SystemExit, or an error: locks already taken must go
        return original(*args)

    monkeypatch.setattr(extract_plan, "remove_stale_temporaries", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        extract_cohort(records, tiles, tmp_path / "out", FeatureEncoder(str(tiny_hf), device="cpu"), workers=0)
    assert len(calls) == 2 and not list((tmp_path / "out").glob("*.lock"))


def test_the_same_weights_moved_elsewhere_keep_the_finished_files(cmu_cohort, tiny_hf, tmp_path):
    """Weights staged to node-local disk, or moved: same content, so a rerun keeps what is done."""
    records, tiles = cmu_cohort
    extract_cohort(records[:1], tiles, tmp_path / "out", FeatureEncoder(str(tiny_hf), device="cpu"), workers=0)
    moved = Path(shutil.copytree(tiny_hf, tmp_path / "staged" / "tiny-hf"))
    table = extract_cohort(records[:1], tiles, tmp_path / "out", FeatureEncoder(str(moved), device="cpu"), workers=0)
    assert table["status"].tolist() == ["skipped_done"]


def test_a_crashing_reader_fails_only_its_own_slide(cmu_cohort, tiny_hf, tmp_path, monkeypatch):
    """A slide whose decoding kills the worker process (a segfault in a codec, say): the slides that
    were in flight with it are retried one by one; only the culprit is recorded as failed."""
    from pathology import cohort_tiles

    records, tiles = cmu_cohort
    crash = tmp_path / "crash.svs"
    crash.symlink_to(records[0].slide_path)
    original = cohort_tiles.read_tile_view

    def read_tile_view(slide, *args):
        if slide.path.name == "crash.svs":
            os.kill(os.getpid(), signal.SIGKILL)
        return original(slide, *args)

    monkeypatch.setattr(cohort_tiles, "read_tile_view", read_tile_view)  # inherited by the forked workers
    cohort = [records[0], records[1], SlideRecord("cmu-2", crash, "P2", "test")]
    table = extract_cohort(cohort, tiles, tmp_path / "out", FeatureEncoder(str(tiny_hf), device="cpu"),
                           batch_size=16, workers=2)
    assert dict(zip(table["slide_id"], table["status"])) == {"cmu-0": "ok", "cmu-1": "ok", "cmu-2": "failed"}
    assert "worker died" in table.set_index("slide_id").loc["cmu-2", "reason"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == ["cmu-0.h5", "cmu-1.h5"]


def test_locked_conflicting_and_untiled_slides(cmu_cohort, tiny_hf, tmp_path):
    records, tiles = cmu_cohort
    out = tmp_path / "out"
    out.mkdir()
    (out / "cmu-0.h5.lock").write_text("gpu-node-7:4242:0\n")  # another node's lock: cannot be checked, kept
    other = FeatureEncoder(str(tiny_hf), device="cpu", input_px=32)  # another preprocessing
    extract_cohort(records[1:2], tiles, out, other, workers=0)
    missing = SlideRecord("cmu-new", records[0].slide_path, "P9", "test")  # not tiled yet: tiled first
    table = extract_cohort([*records[:2], missing], tiles, out, FeatureEncoder(str(tiny_hf), device="cpu"), workers=0,
                           tiling=dict(tile_px=224, target_mpp=0.5, min_tissue=0.6))
    rows = table.set_index("slide_id")
    assert rows.loc["cmu-0", "status"] == "locked"
    # the reason says who holds it and where the lock file is, for when that node died
    assert "process 4242 on gpu-node-7" in rows.loc["cmu-0", "reason"]
    assert str(out / "cmu-0.h5.lock") in rows.loc["cmu-0", "reason"]
    assert rows.loc["cmu-1", "status"] == "failed" and "--overwrite" in rows.loc["cmu-1", "reason"]
    assert rows.loc["cmu-new", "status"] == "ok" and (tiles / "cmu-new" / "coords.h5").is_file()
    again = extract_cohort(records[1:2], tiles, out, FeatureEncoder(str(tiny_hf), device="cpu"), workers=0,
                           overwrite=True)
    assert again["status"].tolist() == ["ok"]
    assert '"input_px": 64' in read_features(out / "cmu-1.h5")[2]["preprocessing"]


def test_shards_partition_the_cohort(monkeypatch):
    records = [SlideRecord(f"S{i:02d}", Path(f"/x/S{i}.svs"), f"P{i}", "t") for i in range(11)]
    shards = [shard_of(records, f"{i}/3") for i in range(3)]
    ids = [r.slide_id for shard in shards for r in shard]
    assert sorted(ids) == sorted(r.slide_id for r in records) and len(set(ids)) == len(ids)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert shard_of(records, None) == shards[1]
    with pytest.raises(ValueError, match="INDEX/COUNT"):
        shard_of(records, "1-3")


def test_weights_hash_is_cached_and_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 1000)
    assert weights_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert str(path.resolve()) in json.loads((tmp_path / "cache" / "weights-sha256.json").read_text())
    path.write_bytes(b"b" * 1001)
    assert weights_sha256(path) == hashlib.sha256(b"b" * 1001).hexdigest()


def test_cpu_forward_leaves_the_workers_their_cores(cmu_cohort, tiny_hf, tmp_path, monkeypatch):
    """With W decoding workers on C cores, a CPU forward runs on C - W threads (oversubscribed it is
    several times slower), and the caller's setting is back afterwards."""
    import torch

    from pathology import extract

    records, tiles = cmu_cohort
    monkeypatch.setattr(extract, "available_cores", lambda: 8)
    encoder, seen = FeatureEncoder(str(tiny_hf), device="cpu"), []

    class Recording:
        def __getattr__(self, name):
            return getattr(encoder, name)

        def __call__(self, images):
            seen.append(torch.get_num_threads())
            return encoder(images)

    before = torch.get_num_threads()
    table = extract_cohort(records[:1], tiles, tmp_path / "out", Recording(), batch_size=16, workers=3)
    assert table["status"].tolist() == ["ok"]
    assert seen and set(seen) == {5}
    assert torch.get_num_threads() == before


def test_rows_decoded_out_of_order_give_the_same_files(cmu_cohort, tiny_hf, tmp_path, monkeypatch):
    """A slide whose first tiles are slow to read (cold storage): the other worker's batches, later rows
    of that slide among them, are embedded and written first; the files equal an in-order run's."""
    import time

    from torch.utils.data import get_worker_info

    from pathology import cohort_tiles, feature_files

    records, tiles = cmu_cohort
    reference_dir = tmp_path / "reference"
    extract_cohort(records, tiles, reference_dir, FeatureEncoder(str(tiny_hf), device="cpu"), batch_size=16, workers=0)
    slow = tmp_path / "slow.svs"
    slow.symlink_to(records[0].slide_path)
    original_read, original_write, writes = cohort_tiles.read_tile_view, feature_files.FeatureFileWriter.write_rows, []

    def read_tile_view(slide, x, y, *args):
        worker = get_worker_info()
        if slide.path.name == "slow.svs" and worker.id == 0 and not getattr(read_tile_view, "stalled", False):
            read_tile_view.stalled = True  # worker 0 (the first batch), once: a cold slide file
            time.sleep(2.0)
        return original_read(slide, x, y, *args)

    def write_rows(self, start, rows):
        writes.append((self.path.stem, start))
        original_write(self, start, rows)

    monkeypatch.setattr(cohort_tiles, "read_tile_view", read_tile_view)  # inherited by the forked workers
    monkeypatch.setattr(feature_files.FeatureFileWriter, "write_rows", write_rows)
    cohort = [SlideRecord("cmu-0", slow, "P0", "test"), *records[1:]]
    table = extract_cohort(cohort, tiles, tmp_path / "out", FeatureEncoder(str(tiny_hf), device="cpu"),
                           batch_size=16, workers=2)
    assert table["status"].tolist() == ["ok"] * 3
    first_of_slow = [start for stem, start in writes if stem == "cmu-0"][0]
    assert first_of_slow > 0, f"the stalled rows should have been written last: {writes}"
    out, reference = _files(tmp_path / "out"), _files(reference_dir)
    assert sorted(out) == sorted(reference)
    for sid in reference:
        np.testing.assert_allclose(out[sid][0].astype(np.float32), reference[sid][0].astype(np.float32), atol=2e-3)
        assert np.array_equal(out[sid][1], reference[sid][1])


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile needs a C compiler on CPU")
def test_compiled_encoder_pads_the_last_batch_and_matches_eager(cmu_cohort, tiny_hf, tmp_path):
    """--compile runs one static batch shape: the last, partial batch is padded and its padding dropped."""
    records, tiles = cmu_cohort
    eager = extract_cohort(records[:1], tiles, tmp_path / "eager", FeatureEncoder(str(tiny_hf), device="cpu"),
                           batch_size=20, workers=0)
    compiled = FeatureEncoder(str(tiny_hf), device="cpu", compile_model=True)
    calls = []
    original = compiled.backbone.forward_tokens
    compiled.backbone.forward_tokens = lambda x: calls.append(len(x)) or original(x)
    table = extract_cohort(records[:1], tiles, tmp_path / "compiled", compiled, batch_size=20, workers=0)
    n = int(table["n_tiles"].iloc[0])
    assert n % 20 and eager["status"].tolist() == table["status"].tolist() == ["ok"]
    assert set(calls) == {20}  # every call, the last included, at the one compiled batch size
    a, b = read_features(tmp_path / "eager" / "cmu-0.h5"), read_features(tmp_path / "compiled" / "cmu-0.h5")
    assert a[0].shape == b[0].shape == (n, compiled.dim)
    np.testing.assert_allclose(b[0].astype(np.float32), a[0].astype(np.float32), atol=2e-3)


def test_a_worker_stopped_by_sigterm_stops_the_run_and_blames_no_slide(cmu_cohort, tiny_hf, tmp_path, monkeypatch):
    """SLURM and scancel signal the whole process group: a tile-reading worker that dies of SIGTERM
    means the run is being stopped (exit 143, locks released), not that its slide is bad."""
    from pathology import cohort_tiles

    records, tiles = cmu_cohort

    def read_tile_view(slide, *args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cohort_tiles, "read_tile_view", read_tile_view)  # inherited by the forked workers
    with pytest.raises(SystemExit) as stopped:
        extract_cohort(records, tiles, tmp_path / "out", FeatureEncoder(str(tiny_hf), device="cpu"), batch_size=16,
                       workers=2)
    assert stopped.value.code == 143
    out = tmp_path / "out"
    assert not list(out.glob("*.lock")) and not list(out.glob(".tmp-*")) and not list(out.glob(".alive-*"))
    assert not (out / MANIFEST_NAME).exists() or "failed" not in (out / MANIFEST_NAME).read_text()


def test_prepare_and_extract_record_their_runs(cmu_slide, tiny_hf, tmp_path):
    """fm-prepare and fm-extract record an MLflow run in the domain's experiment (flags as params, the
    summary as metrics, the manifest as an artifact); --tracking-uri none records nothing."""
    import os

    import pandas as pd
    from mlflow import MlflowClient

    from fm.cli import invoke

    cohort = tmp_path / "cohort.csv"
    pd.DataFrame(dict(slide_path=[str(cmu_slide)], slide_id=["cmu"], patient_id=["P0"])).to_csv(cohort, index=False)
    tiles, out = tmp_path / "tiles", tmp_path / "features"
    invoke("prepare", ["pathology", "--cohorts", f"csv:{cohort}", "--output-dir", str(tiles), "--tile-px", "224",
                       "--target-mpp", "1.0"])
    invoke("extract", ["pathology", "--cohorts", f"csv:{cohort}", "--tiles-dir", str(tiles), "--output-dir", str(out),
                       "--encoder", str(tiny_hf), "--workers", "0", "--device", "cpu"])
    (tmp_path / "cwd").mkdir()
    os.chdir(tmp_path / "cwd")  # where a store named 'none' would appear if the word were taken as a path
    try:
        invoke("prepare", ["pathology", "--cohorts", f"csv:{cohort}", "--output-dir", str(tiles), "--tracking-uri",
                           "none"])
    finally:
        os.chdir(tmp_path)
    assert list((tmp_path / "cwd").iterdir()) == []

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("fm-pathology").experiment_id])
    by_command = {r.data.tags["fm_command"]: r for r in runs}
    assert len(runs) == 2 and sorted(by_command) == ["fm-extract pathology", "fm-prepare pathology"]
    prepared, extracted = by_command["fm-prepare pathology"], by_command["fm-extract pathology"]
    assert prepared.data.params["tile_px"] == "224" and prepared.data.metrics["statuses/ok"] == 1
    assert extracted.data.metrics["statuses/ok"] == 1 and extracted.data.metrics["n_tiles"] > 0
    assert [a.path for a in client.list_artifacts(prepared.info.run_id) if a.path.endswith(".csv")] == ["manifest.csv"]
    assert MANIFEST_NAME in [a.path for a in client.list_artifacts(extracted.info.run_id)]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_damaged_tiling_output_is_tiled_again_and_extracted(cmu_slide, tiny_hf, tmp_path):
    encoder = FeatureEncoder(str(tiny_hf), device="cpu")
    tiles, out = tmp_path / "tiles", tmp_path / "features"
    records = [SlideRecord("a", cmu_slide, "P0", "test")]
    assert extract_cohort(records, tiles, out, encoder, workers=0)["status"].tolist() == ["ok"]
    (tiles / "a" / "coords.h5").write_bytes(b"not hdf5")
    (out / "a.h5").unlink()
    table = extract_cohort(records, tiles, out, encoder, workers=0)
    assert table["status"].tolist() == ["ok"] and read_coords(tiles / "a" / "coords.h5")[0].shape[0] > 0


def test_a_multispectral_encoder_is_refused_in_one_line(tmp_path, capsys):
    from fm.backbones import build_backbone
    from fm.cli import extract_main
    from fm.weights import save_fm_checkpoint

    thirteen = build_backbone(dict(arch="vitt", patch_size=8, img_size=32, embed_dim=32, depth=1, num_heads=2,
                                   in_chans=13))
    path = save_fm_checkpoint(tmp_path / "eo.safetensors", thirteen, mean=[0.1] * 13, std=[0.2] * 13)
    argv = ["pathology", "--cohorts", "demo", "--encoder", str(path), "--tiles-dir", str(tmp_path / "t"),
            "--output-dir", str(tmp_path / "f"), "--device", "cpu", "--tracking-uri", "none"]
    assert extract_main(argv) == 2
    err = capsys.readouterr().err
    assert "takes 13-band images, but slide tiles are RGB" in err and "Traceback" not in err
