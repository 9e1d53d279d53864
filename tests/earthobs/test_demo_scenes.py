"""Demo scenes: BigEarthNet v1 layout read by our loader and torchgeo's, written once, seeded, and with
classes that differ in spectrum and in texture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from earthobs.bands import BIGEARTHNET_S2_BANDS
from earthobs.bigearthnet import BEN43_TO_19, BigEarthNetV1
from earthobs.demo_scenes import DEMO_CLASSES, demo_bigearthnet, make_scene


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return demo_bigearthnet(cache_dir=tmp_path_factory.mktemp("cache"), n=12, seed=0)


def test_layout_is_read_by_our_loader_and_written_once(demo_root):
    assert demo_root.parts[-3:-1] == ("demo", "earthobs")
    sizes = {s: len(BigEarthNetV1(demo_root, split=s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 7, "val": 2, "test": 3}
    both = BigEarthNetV1(demo_root, split="train", sensor="s1s2")
    sample = both[0]
    assert sample["image"].shape == (14, 120, 120)
    assert 1 <= sample["label"].sum() <= 2
    s1_only = BigEarthNetV1(demo_root, split="train", sensor="s1")
    torch.testing.assert_close(s1_only[0]["label"], sample["label"])  # S1 and S2 label files agree
    marker = demo_root / "demo.json"
    before = marker.stat().st_mtime_ns
    assert demo_bigearthnet(cache_dir=demo_root.parents[2], n=12, seed=0) == demo_root
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["n"] == 12


def test_torchgeo_reads_the_same_files(demo_root):
    from torchgeo.datasets import BigEarthNet as TorchgeoBEN

    theirs = TorchgeoBEN(demo_root, split="val", bands="s2")
    ours = BigEarthNetV1(demo_root, split="val")
    assert len(theirs) == len(ours)
    for k in range(len(ours)):
        assert (theirs[k]["image"] - ours[k]["image"]).abs().max() <= 0.51
        assert torch.equal(theirs[k]["label"].float(), ours[k]["label"])


def test_scenes_are_seeded():
    a = make_scene(np.random.default_rng(5))
    b = make_scene(np.random.default_rng(5))
    c = make_scene(np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] and not np.array_equal(a[0], c[0])


def single_class_scenes(per_class=4):
    rng = np.random.default_rng(0)
    scenes = {c: [] for c in range(len(DEMO_CLASSES))}
    while min(len(v) for v in scenes.values()) < per_class:
        s2, _, classes = make_scene(rng)
        if len(classes) == 1 and len(scenes[classes[0]]) < per_class:
            scenes[classes[0]].append(s2)
    return scenes


def test_classes_differ_in_spectrum_and_texture():
    scenes = single_class_scenes()
    assert all(BEN43_TO_19[name] is not None for name, _, _ in DEMO_CLASSES)
    # spectrum: the nearest class signature (shape only: each spectrum scaled to unit norm) is the label
    signatures = np.array([np.asarray(s, float) / np.linalg.norm(s) for _, s, _ in DEMO_CLASSES])
    for c, items in scenes.items():
        for s2 in items:
            mean = s2.mean(axis=(1, 2))
            assert int(np.argmax(signatures @ (mean / np.linalg.norm(mean)))) == c
    # texture: relative high-frequency energy of the NIR band separates smooth from structured classes
    nir = BIGEARTHNET_S2_BANDS.index("B08")

    def roughness(s2):
        x = s2[nir]
        return float(np.abs(x - uniform_filter(x, 5)).mean() / x.mean())

    rough = {DEMO_CLASSES[c][0]: np.mean([roughness(s) for s in items]) for c, items in scenes.items()}
    for structured in ("Discontinuous urban fabric", "Non-irrigated arable land", "Coniferous forest"):
        for smooth in ("Pastures", "Water bodies"):
            assert rough[structured] > 2 * rough[smooth], (structured, smooth, rough)
