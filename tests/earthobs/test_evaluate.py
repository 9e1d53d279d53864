"""Frozen-encoder evaluation: encoder input handling, feature extraction, protocols, metrics, MLflow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from data_eurosat import make_eurosat

from earthobs.bands import BIGEARTHNET_S2_BANDS, S2_L1C_BANDS
from earthobs.domain import CONFIGS
from earthobs.evaluate import (
    EncoderInput,
    EOEncoder,
    Features,
    eval_split,
    evaluate_features,
    evaluate_task,
    extract_features,
    load_eo_encoder,
)
from earthobs.normalize import stats_spec
from earthobs.readers import EOReadError
from earthobs.softcon_module import save_eo_checkpoint
from earthobs.ssl_data import modality_bands
from fm.backbones import build_backbone
from fm.config import load_yaml
from fm.weights import IMAGENET_MEAN, save_fm_checkpoint

TINY = dict(arch="vitt", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)


def eval_cfg(tmp_path, **changes) -> dict:
    cfg = load_yaml(CONFIGS / "eval_bigearthnet.yaml")
    cfg.update(output_dir=str(tmp_path / "eval"), num_workers=0, device="cpu", **changes)
    return cfg


def tiny_encoder(bands=modality_bands("s2"), seed: int = 0) -> EOEncoder:
    torch.manual_seed(seed)
    return EOEncoder(build_backbone({**TINY, "in_chans": len(bands)}), "tiny", tuple(bands), image_size=32)


def synthetic_features(n: int, informative: bool, multilabel: bool, seed: int) -> Features:
    """Labels and features; informative features are a noisy linear image of the labels."""
    rng = np.random.default_rng(seed)
    if multilabel:
        labels = (rng.random((n, 5)) < 0.3).astype(np.float32)
        code = labels
    else:
        labels = rng.integers(0, 5, n)
        code = np.eye(5, dtype=np.float32)[labels]
    mixing = np.random.default_rng(99).standard_normal((5, 16)).astype(np.float32)
    signal = code @ mixing if informative else rng.standard_normal((n, 16)).astype(np.float32)
    cls = signal + 0.3 * rng.standard_normal((n, 16)).astype(np.float32)
    return Features(cls, np.concatenate([cls, rng.standard_normal((n, 16)).astype(np.float32)], 1), labels,
                    [f"s{i}" for i in range(n)])


@pytest.mark.parametrize("protocol", ["linear", "knn", "last4"])
@pytest.mark.parametrize("multilabel", [True, False])
def test_protocols_tell_informative_from_random_features(tmp_path, protocol, multilabel):
    cfg = dict(eval_cfg(tmp_path), num_classes=5)
    cfg["linear"].update(lr=1e-2, loss="bce" if multilabel else "cross_entropy")
    names = [f"c{k}" for k in range(5)]
    key = "map_micro" if multilabel else "accuracy"
    scores = {}
    for informative in (True, False):
        train = synthetic_features(200, informative, multilabel, seed=1)
        test = synthetic_features(100, informative, multilabel, seed=2)
        metrics, per_class, _ = evaluate_features(train, test, protocol, multilabel, cfg, names)
        scores[informative] = metrics[key]
        assert len(per_class) == 5
    assert scores[True] > 0.9, scores
    assert scores[False] < 0.6, scores


@pytest.mark.parametrize("multilabel", [True, False])
def test_headline_metrics_come_with_bootstrap_intervals(tmp_path, multilabel):
    cfg = dict(eval_cfg(tmp_path), num_classes=5, bootstrap=100)
    cfg["linear"].update(lr=1e-2, loss="bce" if multilabel else "cross_entropy")
    names = [f"c{k}" for k in range(5)]
    train = synthetic_features(200, False, multilabel, seed=1)  # uninformative: metrics well inside (0, 1)
    test = synthetic_features(60, False, multilabel, seed=2)
    metrics, _, _ = evaluate_features(train, test, "knn", multilabel, cfg, names)
    for key in (["map_micro", "map_macro"] if multilabel else ["accuracy"]):
        assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"] and metrics[f"{key}_low"] < metrics[f"{key}_high"]
    if multilabel:
        assert metrics["map_macro_classes"] == 5
    bigger = synthetic_features(600, False, multilabel, seed=2)  # more test samples: a narrower interval
    wide, _, _ = evaluate_features(train, test, "knn", multilabel, cfg, names)
    narrow, _, _ = evaluate_features(train, bigger, "knn", multilabel, cfg, names)
    key = "map_micro" if multilabel else "accuracy"
    assert narrow[f"{key}_high"] - narrow[f"{key}_low"] < wide[f"{key}_high"] - wide[f"{key}_low"]
    assert "map_micro_low" not in evaluate_features(train, test, "knn", multilabel, dict(cfg, bootstrap=0), names)[0]


def test_macro_map_says_how_many_classes_it_averages(caplog):
    from earthobs.evaluate import multilabel_report

    y = np.zeros((6, 3), np.float32)
    y[:3, 0], y[3:, 1] = 1, 1  # class c2 has no positive in the test set
    with caplog.at_level("WARNING", logger="earthobs.evaluate"):
        metrics, _ = multilabel_report(y, np.random.default_rng(0).random((6, 3)), ["c0", "c1", "c2"])
    assert metrics["map_macro_classes"] == 2 and "averages 2 of 3 classes" in caplog.text


def test_encoder_input_scales_reorders_and_inserts_b10():
    raw = np.stack([np.full((12, 12), 1000.0 * (k + 1), np.float32) for k in range(12)])  # BigEarthNet order
    transform = EncoderInput(tiny_encoder(), BIGEARTHNET_S2_BANDS, "bigearthnet_s2", image_size=24)
    x = transform(raw)
    assert x.shape == (13, 24, 24)
    spec = stats_spec("softcon", "bigearthnet_s2", BIGEARTHNET_S2_BANDS)
    expected = spec.apply(raw)[:, 0, 0]
    for k, band in enumerate(S2_L1C_BANDS):
        want = 0.0 if band == "B10" else expected[BIGEARTHNET_S2_BANDS.index(band)]
        assert x[k].mean().item() == pytest.approx(float(want), abs=1e-5), band

    rgb = EOEncoder(build_backbone({**TINY, "in_chans": 3}), "rgb", ("B04", "B03", "B02"), mean=IMAGENET_MEAN,
                    std=(0.229, 0.224, 0.225), image_size=32)
    y = EncoderInput(rgb, BIGEARTHNET_S2_BANDS, "bigearthnet_s2")(raw)
    red = expected[BIGEARTHNET_S2_BANDS.index("B04")]
    assert y.shape == (3, 32, 32)
    assert y[0].mean().item() == pytest.approx((red - IMAGENET_MEAN[0]) / 0.229, abs=1e-4)

    with pytest.raises(ValueError, match="--modality"):
        EncoderInput(tiny_encoder(modality_bands("s1")), BIGEARTHNET_S2_BANDS, "bigearthnet_s2")


def test_load_eo_encoder_follows_checkpoint_metadata(tmp_path):
    sar = build_backbone({**TINY, "in_chans": 2})
    path = save_eo_checkpoint(tmp_path / "sar.safetensors", sar, modality_bands("s1"), "bigearthnet_s1")
    enc = load_eo_encoder(str(path))
    assert enc.bands == ("VV", "VH") and enc.modality == "s1" and enc.norm_kind == "softcon"
    assert enc.mean == (0.0, 0.0) and enc.image_size == 32
    torch.testing.assert_close(enc.backbone.vit.patch_embed.proj.weight, sar.vit.patch_embed.proj.weight)

    plain = save_fm_checkpoint(tmp_path / "rgb.safetensors", build_backbone({**TINY, "in_chans": 3}))
    enc = load_eo_encoder(str(plain))
    assert enc.bands == ("B04", "B03", "B02") and enc.mean == tuple(IMAGENET_MEAN)


class FlakyScenes:
    """Six tiny scenes; scene 2 cannot be read."""

    bands = BIGEARTHNET_S2_BANDS

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = rng.uniform(200, 3000, (6, 12, 16, 16)).astype(np.float32)
        self.ids = [f"p{i}" for i in range(6)]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 2:
            raise EOReadError(f"/data/{self.ids[i]}/B04.tif", "truncated file")
        return {"image": torch.from_numpy(self.images[i]), "label": torch.tensor([i % 2, 1.0]), "id": self.ids[i]}


def test_extract_features_skips_unreadable_samples_and_keeps_order():
    encoder = tiny_encoder()
    data = FlakyScenes()
    feats = extract_features(encoder, data, EncoderInput(encoder, data.bands, "bigearthnet_s2"), batch_size=4)
    assert feats.ids == ["p0", "p1", "p3", "p4", "p5"]
    assert [s["id"] for s in feats.skipped] == ["p2"] and "truncated" in feats.skipped[0]["error"]
    assert feats.cls.shape == (5, 32) and feats.last4.shape == (5, 2 * 32)  # depth 2: both blocks
    np.testing.assert_allclose(feats.last4[:, -32:], feats.cls, atol=1e-5)  # last block's CLS = the final CLS
    single = extract_features(encoder, data, EncoderInput(encoder, data.bands, "bigearthnet_s2"), batch_size=1)
    np.testing.assert_allclose(single.cls, feats.cls, atol=1e-4)  # batching does not change features


def test_bigearthnet_task_logs_results_and_saves_the_subset(tmp_path, session_cache_dir):
    from earthobs.demo_scenes import demo_bigearthnet

    root = demo_bigearthnet(session_cache_dir)
    cfg = eval_cfg(tmp_path, root=str(root), train_fraction=0.5, protocol="last4")
    out = evaluate_task("bigearthnet", cfg, encoder=tiny_encoder())
    assert out["n_train"] == 45 and out["n_test"] == 30  # 150 scenes: 90 train (half kept), 30 test
    assert 0.0 < out["metrics"]["map_micro"] <= 1.0 and 0.0 <= out["metrics"]["f1_macro"] <= 1.0
    assert len(out["per_class"]) == 19 and out["per_class"]["ap"].notna().sum() == 6  # six demo classes
    saved = [line for line in out["subset_file"].read_text().splitlines() if not line.startswith("#")]
    assert len(saved) == 45

    client = mlflow.MlflowClient()
    files = {a.path for folder in ("tables", "figures", "subsets") for a in client.list_artifacts(out["run_id"], folder)}
    assert {"tables/results.csv", "tables/per_class_ap.csv", "figures/pr_curves.png",
            f"subsets/{out['subset_file'].name}"} <= files
    assert client.get_run(out["run_id"]).data.metrics["test/map_micro"] == pytest.approx(out["metrics"]["map_micro"])

    _, again = eval_split("bigearthnet-v1", cfg, "train", subset=True)  # the saved list is read back
    assert again == out["subset_file"] and again.read_text() == out["subset_file"].read_text()
    other, other_file = eval_split("bigearthnet-v1", dict(cfg, seed=1), "train", subset=True)
    assert other_file != again and len(other.ids) == 45 and sorted(other.ids) != sorted(saved)


def test_eurosat_task_reports_accuracy(tmp_path):
    make_eurosat(tmp_path / "eurosat")
    cfg = load_yaml(CONFIGS / "eval_eurosat.yaml")
    assert cfg["linear"]["loss"] == "cross_entropy" and cfg["train_fraction"] == 1.0
    cfg.update(root=str(tmp_path / "eurosat"), output_dir=str(tmp_path / "eval"), num_workers=0, device="cpu",
               image_size=16)
    out = evaluate_task("eurosat", cfg, encoder=tiny_encoder(S2_L1C_BANDS))
    assert out["n_train"] == 10 and out["n_test"] == 10
    assert set(out["metrics"]) == {"accuracy", "balanced_accuracy", "accuracy_low", "accuracy_high"}
    # (one test patch per class: every class-stratified resample is the test set itself, so the interval has no
    # width here; test_headline_metrics_come_with_bootstrap_intervals checks the intervals)
    assert list(out["per_class"]["test_samples"]) == [1] * 10
    with pytest.raises(ValueError, match="Sentinel-2 only"):
        evaluate_task("eurosat", dict(cfg, modality="s1"), encoder=tiny_encoder(S2_L1C_BANDS))


def test_local_softcon_files_get_the_eo_scaling_not_imagenet(tmp_path):
    """SoftCon's released files carry no mean/std; the core's defaults for foreign files are ImageNet's RGB
    values, which a 13- or 2-channel encoder must not get."""
    def softcon_file(name: str, channels: int):
        torch.manual_seed(0)
        backbone = build_backbone({**TINY, "in_chans": channels})
        torch.save({k.removeprefix("vit."): v for k, v in backbone.state_dict().items()}, tmp_path / name)
        return str(tmp_path / name)

    for name, bands in (("B13_vits14_softcon.pth", S2_L1C_BANDS), ("B2_vits14_softcon.pth", ("VV", "VH")),
                        ("my_13_band_model.pth", S2_L1C_BANDS)):
        enc = load_eo_encoder(softcon_file(name, len(bands)))
        assert enc.bands == tuple(bands) and enc.norm_kind == "softcon", name
        assert enc.mean == (0.0,) * len(bands) and enc.std == (1.0,) * len(bands), name
    x = EncoderInput(enc, BIGEARTHNET_S2_BANDS, "bigearthnet_s2")(np.full((12, 8, 8), 900.0, np.float32))
    assert x.shape == (13, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0  # SoftCon scaling only
    rgb = load_eo_encoder(softcon_file("rgb.pth", 3))  # RGB keeps the ImageNet mean/std
    assert rgb.mean == tuple(IMAGENET_MEAN) and rgb.bands == ("B04", "B03", "B02")


def test_extract_features_with_nothing_readable_is_a_one_line_user_error():
    from earthobs.readers import NoReadableSampleError

    class AllUnreadable(FlakyScenes):
        root = "/data/wrong-root"

        def __getitem__(self, i):
            raise EOReadError(f"/data/{self.ids[i]}/B04.tif", "truncated file")

    encoder = tiny_encoder()
    with pytest.raises(NoReadableSampleError, match=r"none of the 6 samples of /data/wrong-root could be read; "
                                                    r"first errors: p0: EOReadError: /data/p0/B04.tif: truncated"):
        extract_features(encoder, AllUnreadable(), EncoderInput(encoder, BIGEARTHNET_S2_BANDS, "bigearthnet_s2"))


def _scenes_with_test_labels_permuted(root, destination):
    """A copy of the demo scenes root (GeoTIFFs linked, not copied) whose test patches swap label files in a
    cycle, so every test image carries another test patch's labels while the train split is untouched."""
    import shutil

    def link_images_copy_the_rest(src, dst):
        if str(src).endswith(".tif"):
            return os.symlink(src, dst)
        return shutil.copy2(src, dst)

    copy = shutil.copytree(root, destination, copy_function=link_images_copy_the_rest)
    test_patches = [line.split(",")[0] for line in (copy / "bigearthnet-test.csv").read_text().splitlines()]
    label_files = [copy / "BigEarthNet-v1.0" / p / f"{p}_labels_metadata.json" for p in test_patches]
    contents = [path.read_text() for path in label_files]
    for path, text in zip(label_files, contents[1:] + contents[:1]):
        path.write_text(text)
    return copy


def test_bigearthnet_task_scores_matching_labels_far_above_permuted_test_labels(tmp_path, session_cache_dir):
    """The task's micro mAP depends on each test image keeping its own labels: the demo scenes' spectra
    separate the classes, so a random-init tiny encoder + linear probe scores high, while the same task on a
    copy whose test-split label files are permuted among the test patches scores near chance."""
    from earthobs.demo_scenes import demo_bigearthnet

    root = demo_bigearthnet(session_cache_dir)
    permuted = _scenes_with_test_labels_permuted(root, tmp_path / "permuted-scenes")
    micro_map = {}
    for name, scenes in (("real", root), ("control", permuted)):
        cfg = eval_cfg(tmp_path / name, root=str(scenes), train_fraction=1.0, protocol="linear", bootstrap=0)
        cfg["linear"].update(lr=1e-2)
        micro_map[name] = evaluate_task("bigearthnet", cfg, encoder=tiny_encoder())["metrics"]["map_micro"]
    # observed over encoder seeds 0-4: real 0.83-0.89, control 0.17-0.18
    assert micro_map["real"] > micro_map["control"] + 0.4, micro_map


def test_packed_evaluation_reports_the_samples_skipped_when_packed(shared_fixtures, tmp_path, caplog):
    """With --packed, the samples the cache could not read when packed count, print and are logged as a direct
    read's unreadable samples are: fm-eval reported n_skipped 0 and said nothing, hiding that they were dropped."""
    root = Path(shutil.copytree(shared_fixtures / "earthobs/bigearthnet-v1/s2-tiny", tmp_path / "s2"))
    bad = "S2A_MSIL2A_20170617T113321_4_55"
    (root / bad / f"{bad}_B05.tif").unlink()
    reports = {}
    for name, packed in (("direct", None), ("packed", str(tmp_path / "packed"))):
        cfg = eval_cfg(tmp_path / name, root=str(root), packed_dir=packed, splits="all", train_fraction=1.0,
                       protocol="knn", bootstrap=0)
        caplog.clear()
        with caplog.at_level("WARNING", logger="earthobs.evaluate"):
            out = evaluate_task("bigearthnet", cfg, encoder=tiny_encoder())
        logged = mlflow.MlflowClient().download_artifacts(out["run_id"], "skipped.json", str(tmp_path / name))
        printed = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        reports[name] = (out["results"]["n_skipped"].tolist(), printed, json.loads(Path(logged).read_text()))
    assert reports["packed"] == reports["direct"]
    n_skipped, (printed,), logged = reports["packed"]
    assert n_skipped == [1] and printed.startswith(f"skipped unreadable sample {bad}: ") and "B05" in printed
    assert [s["id"] for s in logged["skipped"]] == [bad]
