"""The `earthobs` domain through the fm-* command line: help, configs, errors, and end-to-end runs on
generated scenes and on the real BigEarthNet v1 fixture patches."""

from __future__ import annotations

import mlflow
import pytest
import torch
import yaml

from earthobs.demo_scenes import demo_bigearthnet
from earthobs.domain import DOMAIN
from earthobs.softcon_module import save_eo_checkpoint
from earthobs.ssl_data import modality_bands
from fm.backbones import build_backbone
from fm.cli import eval_main, prepare_main, train_main
from fm.config import load_yaml
from fm.domains import load_domains

TINY_MODEL = ["model.backbone.embed_dim=48", "model.backbone.depth=2", "model.backbone.num_heads=3",
              "data.batch_size=16", "train.epoch_length=10", "train.log_every=1"]


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_domain_is_registered_and_every_shipped_config_parses():
    assert load_domains()["earthobs"] is DOMAIN
    assert set(DOMAIN.eval_tasks) == {"bigearthnet", "eurosat"}
    for path in sorted(DOMAIN.configs_dir.glob("*.yaml")):
        assert isinstance(load_yaml(path), dict), path


def test_help_shows_the_earthobs_flags(capsys):
    with pytest.raises(SystemExit) as done:
        train_main(["earthobs", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--modality", "--init", "--init-mode", "--data", "--labels", "--preset", "--print-config"):
        assert flag in text
    with pytest.raises(SystemExit):
        eval_main(["earthobs", "bigearthnet", "--help"])
    text = capsys.readouterr().out
    for flag in ("--encoder", "--protocol", "--train-fraction", "--splits", "--packed", "--modality"):
        assert flag in text


def test_print_config_applies_preset_flags_and_sets(capsys):
    assert train_main(["earthobs", "--print-config", "--preset", "demo_cpu", "--modality", "s1", "--init",
                       "dinov2/vitb14", "--init-mode", "repeat", "--data", "demo",
                       *sets("model.softcon.soft_weight=0.25")]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"]["arch"] == "vitt"  # the preset
    assert cfg["data"]["modality"] == "s1" and cfg["model"]["backbone"]["in_chans"] == 2
    assert cfg["model"]["init"] == "dinov2/vitb14" and cfg["model"]["init_mode"] == "repeat"
    assert cfg["model"]["softcon"]["soft_weight"] == 0.25
    assert train_main(["earthobs", "--print-config"]) == 0  # the default: ViT-B/14 from DINOv2, 13 bands
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"]["arch"] == "vitb" and cfg["model"]["backbone"]["in_chans"] == 13
    assert cfg["model"]["init"] == "dinov2/vitb14"


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert train_main(["earthobs", "--data", "landsat:/x", "--output-dir", str(tmp_path)]) == 2
    assert "--data 'landsat:/x'" in capsys.readouterr().err
    assert train_main(["earthobs", "--data", f"ssl4eo:{tmp_path}/missing", "--output-dir", str(tmp_path)]) == 2
    assert f"{tmp_path}/missing does not exist" in capsys.readouterr().err
    assert train_main(["earthobs", *sets("model.softcon.bogus=1")]) == 2
    assert "model.softcon.bogus" in capsys.readouterr().err
    assert eval_main(["earthobs", "bigearthnet", "--encoder", "earthobs/no-such-model", "--root", str(tmp_path)]) == 2
    assert "unknown encoder 'earthobs/no-such-model'" in capsys.readouterr().err


def test_train_then_evaluate_on_generated_scenes(tmp_path, capsys, session_cache_dir):
    out = tmp_path / "run"
    assert train_main(["earthobs", "--preset", "demo_cpu", "--data", "demo", "--max-steps", "4",
                       "--output-dir", str(out), *sets(*TINY_MODEL)]) == 0
    text = capsys.readouterr().out
    assert "linear micro mAP on held-out demo scenes: at initialisation" in text
    assert "knn micro mAP on held-out demo scenes: at initialisation" in text
    export = out / "export" / "teacher.safetensors"
    assert export.is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    runs = mlflow.search_runs(experiment_names=["fm-earthobs"], output_format="list")
    assert {r.info.run_name for r in runs if r.info.status == "FINISHED"} >= {"probe-demo-scenes"}
    assert any("train/soft" in r.data.metrics for r in runs)

    root = demo_bigearthnet(session_cache_dir)
    common = ["earthobs", "bigearthnet", "--encoder", str(export), "--root", str(root), "--protocol", "knn",
              "--train-fraction", "0.5", "--num-workers", "0", "--output-dir", str(tmp_path / "eval")]
    assert eval_main(common) == 0
    text = capsys.readouterr().out
    assert "| bigearthnet |" in text and "map_micro" in text and "Pastures" in text
    raw_list = (tmp_path / "eval" / "subsets" / "bigearthnet-v1-train-50pct-seed0.txt").read_text()
    assert eval_main([*common, "--packed", str(tmp_path / "packed")]) == 0  # memory-mapped cache, same subset
    packed_list = (tmp_path / "packed" / "bigearthnet-v1" / "train-50pct-seed0.txt").read_text()
    assert [s for s in packed_list.splitlines() if not s.startswith("#")] == \
           [s for s in raw_list.splitlines() if not s.startswith("#")]
    evals = mlflow.search_runs(experiment_names=["fm-earthobs-eval"], output_format="list")
    assert len(evals) == 2 and all(0 < r.data.metrics["test/map_micro"] <= 1 for r in evals)


def test_prepare_packs_a_split(tmp_path, capsys, session_cache_dir):
    assert prepare_main(["earthobs", "demo", "--root", str(session_cache_dir), "--out", str(tmp_path),
                         "--split", "test"]) == 0
    assert "packed 30 samples (0 skipped)" in capsys.readouterr().out
    assert (tmp_path / "demo" / "s2" / "test" / "meta.json").is_file()
    assert prepare_main(["earthobs", "demo", "--root", str(session_cache_dir), "--out", str(tmp_path),
                         "--split", "test"]) == 0
    again = capsys.readouterr().out
    assert "reusing the cache packed on" in again and "30 samples, 0 skipped when it was packed" in again
    assert "packed 30" not in again


@pytest.mark.parametrize("modality", ["s2", "s1"])
def test_eval_on_real_bigearthnet_patches(shared_fixtures, tmp_path, capsys, modality):
    """The real v1 layout (3 S2 / 6 S1 patches, native 10/20/60 m band sizes, 43-class labels): only a
    pipeline check (train = test = all patches), so the assertions are about well-formed outputs."""
    root = shared_fixtures / "earthobs" / "bigearthnet-v1" / f"{modality}-tiny"
    bands = modality_bands(modality)
    torch.manual_seed(0)
    backbone = build_backbone(dict(arch="vitt", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2,
                                   in_chans=len(bands)))
    encoder = save_eo_checkpoint(tmp_path / "tiny.safetensors", backbone, bands, None)
    assert eval_main(["earthobs", "bigearthnet", "--encoder", str(encoder), "--root", str(root), "--modality",
                      modality, "--splits", "all", "--train-fraction", "1.0", "--protocol", "last4",
                      "--num-workers", "0", "--output-dir", str(tmp_path / "eval")]) == 0
    text = capsys.readouterr().out
    n = 3 if modality == "s2" else 6
    assert f"| bigearthnet | {encoder} | last4 | 1.0000 | {n} | {n} |" in text
    (run,) = mlflow.search_runs(experiment_names=["fm-earthobs-eval"], output_format="list")
    metrics = run.data.metrics
    assert all(0 <= metrics[f"test/{k}"] <= 1 for k in ("map_micro", "map_macro", "f1_micro", "f1_macro"))
    client = mlflow.MlflowClient()
    per_class = client.download_artifacts(run.info.run_id, "tables/per_class_ap.csv", str(tmp_path))
    import pandas as pd

    table = pd.read_csv(per_class).set_index("class")
    assert len(table) == 19
    if modality == "s2":  # labels of the three fixture patches, mapped 43 -> 19 classes
        assert table.loc["Pastures", "test_positives"] == 2 and table.loc["Arable land", "test_positives"] == 1
        assert table.loc["Transitional woodland, shrub", "test_positives"] == 1
    assert table["test_positives"].sum() >= n


def _with_nodata_patch(shared_fixtures, tmp_path):
    """A copy of the real S2 patches where one band of one patch declares 25 nodata pixels."""
    import shutil

    import rasterio

    root = shutil.copytree(shared_fixtures / "earthobs" / "bigearthnet-v1" / "s2-tiny", tmp_path / "s2")
    patch = "S2A_MSIL2A_20170617T113321_4_55"
    path = root / patch / f"{patch}_B03.tif"
    with rasterio.open(path) as src:
        profile, band = src.profile, src.read(1)
    band[:5, :5] = 0
    with rasterio.open(path, "w", **dict(profile, nodata=0)) as dst:
        dst.write(band, 1)
    return root, patch


def test_prepare_names_skips_refuses_other_requests_and_takes_nan_policy(shared_fixtures, tmp_path, capsys):
    root, patch = _with_nodata_patch(shared_fixtures, tmp_path)
    common = ["earthobs", "bigearthnet", "--root", str(root), "--split", "all", "--output-dir"]
    assert prepare_main([*common, str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    cache = tmp_path / "a" / "bigearthnet-v1" / "s2" / "all"
    assert f"packed 2 samples (1 skipped) into {cache}" in out
    assert f"  skipped {patch}: EOReadError: {root / patch / patch}_B03.tif: 25 of 14400" in out
    assert "pass --nan-policy zero" in out and f'"skipped" in {cache / "meta.json"}' in out
    assert prepare_main([*common, str(tmp_path / "a"), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert f"{cache} holds a cache packed for another request: dtype float16 (asked float32)" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 2  # the message and the FM_DEBUG hint
    assert prepare_main([*common, str(tmp_path / "a"), "--nan-policy", "zero", "--overwrite"]) == 0
    assert f"packed 3 samples (0 skipped) into {cache}" in capsys.readouterr().out


def test_a_root_with_nothing_readable_is_one_line(shared_fixtures, tmp_path, capsys):
    ben = shared_fixtures / "earthobs" / "bigearthnet-v1"
    assert prepare_main(["earthobs", "bigearthnet", "--root", str(ben), "--sensor", "s1", "--split", "all",
                         "--output-dir", str(tmp_path)]) == 2
    assert f"no S1* patch folders under {ben}" in capsys.readouterr().err
    broken = tmp_path / "broken"
    for name in ("S2A_MSIL2A_1_1", "S2A_MSIL2A_1_2"):
        (broken / name).mkdir(parents=True)
    assert prepare_main(["earthobs", "bigearthnet", "--root", str(broken), "--split", "all",
                         "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"none of the 2 samples of {broken} could be read; first errors: S2A_MSIL2A_1_1:" in err
    assert "Traceback" not in err


def test_nan_policy_is_a_flag_and_reaches_the_readers(shared_fixtures, tmp_path, capsys):
    from earthobs.evaluate import eval_split
    from earthobs.readers import EOReadError
    from earthobs.ssl_data import training_dataset

    assert train_main(["earthobs", "--print-config", "--nan-policy", "zero"]) == 0
    train_cfg = yaml.safe_load(capsys.readouterr().out)
    assert train_cfg["data"]["nan_policy"] == "zero"
    assert eval_main(["earthobs", "bigearthnet", "--print-config", "--nan-policy", "zero"]) == 0
    eval_cfg = yaml.safe_load(capsys.readouterr().out)
    assert eval_cfg["nan_policy"] == "zero"
    assert load_yaml(DOMAIN.configs_dir / "eval_bigearthnet.yaml")["nan_policy"] == "raise"  # documented default
    root, patch = _with_nodata_patch(shared_fixtures, tmp_path)
    for policy in ("raise", "zero"):
        data = dict(train_cfg["data"], source=f"bigearthnet:{root}", split=None, nan_policy=policy)
        evaluated, _ = eval_split("bigearthnet-v1", dict(eval_cfg, root=str(root), nan_policy=policy), None)
        for dataset in (training_dataset({"data": data})[0], evaluated):
            k = dataset.ids.index(patch)
            if policy == "raise":
                with pytest.raises(EOReadError, match="--nan-policy zero"):
                    dataset[k]
            else:
                assert float(dataset[k]["image"][2, :5, :5].abs().max()) == 0.0  # B03, filled
