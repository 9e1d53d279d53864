"""`fm-train pathology` on the demo cohort learns: frozen-feature kNN on the tissue classes of held-out
patients beats the same network at initialisation."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import lightning as L
import torch
from mlflow import MlflowClient

from evaluation.knn import knn_classify
from fm.cli import invoke
from fm.config import resolve_config
from fm.registry import load_encoder
from fm.train import build_module
from pathology.demo_slides import demo_cohort
from pathology.tile_dataset import TileDataset
from pathology.tiling import COORDS_NAME

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "pathology" / "configs" / "demo_cpu.yaml"


@torch.no_grad()
def tile_knn_accuracy(backbone, cfg: dict, tiles_dir: Path) -> float:
    """kNN (k=20) of tile CLS features; slide labels; train on patients 0-2, test on patients 3-5."""
    size = cfg["crops"]["global_size"]
    mean = torch.tensor(cfg["crops"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["crops"]["std"]).view(1, 3, 1, 1)
    backbone.eval()
    feats, labels, patients = [], [], []
    records = demo_cohort()
    classes = sorted({r.labels["label"] for r in records})
    for r in records:
        ds = TileDataset(tiles_dir / r.slide_id / COORDS_NAME)
        images = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
        feats.append(backbone((images - mean) / std))
        labels += [classes.index(r.labels["label"])] * len(ds)
        patients += [int(r.patient_id.removeprefix("DEMO-P"))] * len(ds)
    x, y, p = torch.cat(feats), torch.tensor(labels), torch.tensor(patients)
    train = p < 3
    pred, _ = knn_classify(x[train], y[train], x[~train], k=20)
    return float((torch.as_tensor(pred) == y[~train]).float().mean())


def test_demo_pretraining_learns_tissue_classes(tmp_path):
    cfg = resolve_config(DEMO_CONFIG)
    L.seed_everything(cfg["train"]["seed"], verbose=False)  # as run_pretraining seeds before building
    initial = build_module(cfg).backbone
    tiles = tmp_path / "tiles"
    result = invoke("train", ["pathology", "--config", str(DEMO_CONFIG), "--cohorts", "demo", "--tiles-dir", str(tiles),
                              "--output-dir", str(tmp_path / "run"), "--max-steps", "100"])
    assert result["n_tiles"] > 500
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # the run carries the manifest and QC thumbnails
    assert {"manifest.csv", "qc", "config.yaml", "model"} <= {a.path for a in client.list_artifacts(result["run_id"])}
    assert len(client.list_artifacts(result["run_id"], "qc")) == len(demo_cohort())
    trained = load_encoder(result["export"]).backbone
    acc_init = tile_knn_accuracy(initial, cfg, tiles)
    acc_trained = tile_knn_accuracy(trained, cfg, tiles)
    assert acc_trained > acc_init + 0.2, (acc_init, acc_trained)


def test_pretraining_reads_the_cohorts_own_slide_paths_and_one_tile_setting(test_slides, tmp_path, monkeypatch):
    """Tiles made from relative paths in one folder train from any other folder (the cohort's paths are
    read, not those recorded at tiling time); a config at another tile setting than the tiles folder is
    refused; a cohort with no tile at all says so. The training itself is stubbed: only what it gets."""
    import shutil
    from types import SimpleNamespace

    import pandas as pd
    import pytest

    import pathology.pretrain as pretrain
    from fm.cli import UserError

    got = {}
    monkeypatch.setattr(pretrain, "run_pretraining", lambda cfg, source, transform, artifacts: got.update(
        source=source, cfg=cfg) or SimpleNamespace(export="none", run_id="none"))
    (tmp_path / "slides").mkdir()
    shutil.copy(test_slides["x20"], tmp_path / "slides" / "x20.tif")
    shutil.copy(test_slides["background"], tmp_path / "slides" / "empty.tif")
    (tmp_path / "sub").mkdir()
    for name, slides in (("c", ["x20"]), ("empty", ["empty"])):
        pd.DataFrame(dict(slide_path=[f"../slides/{s}.tif" for s in slides], slide_id=slides,
                          patient_id=slides)).to_csv(tmp_path / "sub" / f"{name}.csv", index=False)
    monkeypatch.chdir(tmp_path)
    invoke("prepare", ["pathology", "--cohorts", "csv:sub/c.csv", "--output-dir", "tiles", "--tile-px", "64",
                       "--target-mpp", "1.0", "--min-tissue", "0.3"])
    (tmp_path / "slides").rename(tmp_path / "moved")  # the slides move after tiling; the cohort says where
    pd.DataFrame(dict(slide_path=["../moved/x20.tif"], slide_id=["x20"], patient_id=["x20"])).to_csv(
        tmp_path / "sub" / "c.csv", index=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    train = ["pathology", "--config", str(DEMO_CONFIG), "--tiles-dir", str(tmp_path / "tiles"),
             "--output-dir", str(tmp_path / "run")]
    invoke("train", [*train, "--cohorts", f"csv:{tmp_path / 'sub' / 'c.csv'}"])
    assert got["source"].get(0).shape == (3, 64, 64) and got["source"].skipped.keys == set()
    assert got["cfg"]["pathology"]["min_tissue"] == 0.3  # the threshold of its tiles, recorded with the run
    with pytest.raises(ValueError, match=r"pathology.tile_px must be at least 16 .* got 8 and 1.0"):
        invoke("train", [*train, "--cohorts", f"csv:{tmp_path / 'sub' / 'c.csv'}", "--set", "pathology.tile_px=8",
                         "--set", "pathology.target_mpp=1.0"])
    with pytest.raises(ValueError, match=r"pathology.min_tissue must be a tissue fraction .* got True"):
        invoke("train", [*train, "--cohorts", f"csv:{tmp_path / 'sub' / 'c.csv'}", "--set", "pathology.min_tissue=true"])

    with pytest.raises(UserError, match=r"1 slide\(s\) at 64 px at 1 um/px.*pathology.tile_px"):
        invoke("train", [*train, "--cohorts", f"csv:{tmp_path / 'sub' / 'c.csv'}", "--set", "pathology.tile_px=224"])
    pd.DataFrame(dict(slide_path=["../moved/empty.tif"], slide_id=["empty"], patient_id=["empty"])).to_csv(
        tmp_path / "sub" / "empty.csv", index=False)
    with pytest.raises(ValueError, match="no slide of the cohort has tiles.*without tissue tiles"):
        invoke("train", [*train, "--cohorts", f"csv:{tmp_path / 'sub' / 'empty.csv'}"])
    # the slide tiled on the way took the folder's tissue threshold, not the config's default
    with h5py.File(tmp_path / "tiles" / "empty" / "coords.h5", "r") as f:
        assert f["coords"].attrs["min_tissue"] == 0.3


def test_tiled_only_trains_on_the_tiled_slides_and_tiles_none(test_slides, tmp_path, monkeypatch):
    """A pipeline's PRETRAIN gets the slides its TILE tasks tiled: with --tiled-only a slide of the cohort
    without tiles is left out (said in one line), not tiled inside the GPU job. The control run without
    the flag tiles it."""
    from types import SimpleNamespace

    import pandas as pd

    import pathology.pretrain as pretrain

    got = {}
    monkeypatch.setattr(pretrain, "run_pretraining", lambda cfg, source, transform, artifacts: got.update(
        source=source, cfg=cfg) or SimpleNamespace(export="none", run_id="none"))
    cohort = tmp_path / "c.csv"
    pd.DataFrame(dict(slide_path=[str(test_slides["x20"]), str(test_slides["x40"])], slide_id=["x20", "x40"],
                      patient_id=["p1", "p2"])).to_csv(cohort, index=False)
    tiles = tmp_path / "tiles"
    invoke("prepare", ["pathology", "--cohorts", f"csv:{cohort}", "--slides", "x20", "--output-dir", str(tiles),
                       "--tile-px", "64", "--target-mpp", "1.0"])
    train = ["pathology", "--config", str(DEMO_CONFIG), "--cohorts", f"csv:{cohort}", "--tiles-dir", str(tiles),
             "--output-dir", str(tmp_path / "run")]
    invoke("train", [*train, "--tiled-only"])
    assert [Path(s.slide_path).name for s in got["source"].stream.slides] == [test_slides["x20"].name]
    assert not (tiles / "x40" / COORDS_NAME).exists()
    invoke("train", train)  # the control: without the flag, the untiled slide is tiled and trained on
    assert (tiles / "x40" / COORDS_NAME).is_file() and len(got["source"].stream.slides) == 2


def test_slides_being_tiled_by_another_process_are_waited_for(test_slides, tmp_path):
    """Ranks of one job (srun fm-train) tile a cohort together: each must train on every slide, including
    those another rank had locked when it looked."""
    import threading

    from fm.io import ItemLock
    from pathology.pretrain import _wait_for_others
    from pathology.tiling import tile_slide

    assert tile_slide(test_slides["x20"], tmp_path, "x20").status == "ok"
    lock = ItemLock(tmp_path / "x20" / COORDS_NAME)
    assert lock.acquire()
    threading.Timer(1.0, lock.release).start()
    assert _wait_for_others(tmp_path, ["x20", "gone"]) == {"x20"}
    assert not lock.path.exists()  # it did wait for the holder
