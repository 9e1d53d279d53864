"""SoftCon LightningModule: Siamese masking, loss composition, EMA pairing, band-adapted continual
init, resume, and that a short CPU pretraining learns (against the same encoder at initialisation)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from data_scenes import TextureScenes
from data_ssl4eo import make_ssl4eo, write_labels
from training_callbacks import CrashAt, RecordLosses

from earthobs.domain import CONFIGS
from earthobs.evaluate import demo_probe
from earthobs.models import RGB_BANDS
from earthobs.normalize import stats_spec
from earthobs.softcon_module import SoftConModule, build_softcon_module, run_softcon_pretraining
from earthobs.ssl_data import EOSource, MultispectralViews, SoftConBatches, modality_bands, training_source
from fm.backbones import build_backbone
from fm.config import resolve_config
from fm.weights import save_fm_checkpoint

TINY = ["model.backbone.embed_dim=48", "model.backbone.depth=2", "model.backbone.num_heads=3",
        "data.batch_size=16", "train.epoch_length=20", "train.checkpoint_every=1"]


def tiny_cfg(tmp_path, *extra: str) -> dict:
    return resolve_config(CONFIGS / "demo_cpu.yaml", overrides=[*TINY, f"train.output_dir={tmp_path}/run", *extra])


def texture_source(n: int = 32, seed: int = 0) -> EOSource:
    scenes = TextureScenes(n, size=48, seed=seed)
    return EOSource(scenes, stats_spec("softcon", "bigearthnet_s2", scenes.bands), modality_bands("s2"))


def a_batch(cfg: dict, source: EOSource | None = None) -> dict:
    source = source or texture_source()
    views = MultispectralViews(cfg["views"], cfg["views"]["n_local"])
    return SoftConBatches(source, views, cfg["data"]["batch_size"], cfg["model"]["backbone"]["patch_size"],
                          mask_probability=0.5, seed=0).make_batch(0)


def logged(module: SoftConModule) -> dict:
    """Capture what training_step logs (no Trainer attached)."""
    seen: dict = {}
    module.log_dict = lambda metrics, **kw: seen.update({k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()})
    module.log = lambda name, value, **kw: seen.update({name: float(torch.as_tensor(value).detach())})
    return seen


def test_student_sees_dropped_tokens_teacher_sees_all(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.softcon.mask_ratio=0.75")
    module = build_softcon_module(cfg)
    logged(module)
    lengths: dict[str, list[int]] = {"student": [], "teacher": []}
    for name in lengths:
        getattr(module, name)["backbone"].vit.blocks[0].register_forward_hook(
            lambda mod, inp, out, name=name: lengths[name].append(inp[0].shape[1]))
    module.train()
    module.training_step(a_batch(cfg), 0)
    n_patches = (48 // 8) ** 2
    assert lengths["teacher"] == [1 + n_patches]
    assert lengths["student"] == [1 + n_patches - round(0.75 * n_patches)]


def test_loss_is_softcon_plus_weighted_dinov2(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.softcon.soft_weight=0.5")
    module = build_softcon_module(cfg)
    assert "dino_head" not in module.student and "softcon_head" in module.teacher
    seen = logged(module)
    loss = module.training_step(a_batch(cfg), 0)
    assert seen["train/instance"] > 0 and seen["train/soft"] > 0
    assert loss.item() == pytest.approx(seen["train/instance"] + 0.5 * seen["train/soft"], rel=1e-5)
    assert "train/dinov2" not in seen

    cfg = tiny_cfg(tmp_path, "model.softcon.dinov2_weight=0.3")
    module = build_softcon_module(cfg)
    assert "dino_head" in module.student and "dino_head" in module.teacher
    seen = logged(module)
    loss = module.training_step(a_batch(cfg), 0)
    assert seen["train/dino"] > 0 and seen["train/ibot"] >= 0  # the core DINOv2 terms ran on the same views
    assert loss.item() == pytest.approx(seen["train/softcon"] + 0.3 * seen["train/dinov2"], rel=1e-5)
    assert seen["train/loss"] == pytest.approx(loss.item(), rel=1e-6)  # the total, not the parent's DINOv2 loss
    loss.backward()
    assert module.student["dino_head"].mlp[0].weight.grad is not None


def test_labels_reach_the_soft_term(tmp_path):
    """Same views, same seed: only the labels differ, so only the soft term may change."""
    cfg = tiny_cfg(tmp_path)
    module = build_softcon_module(cfg)
    batch = a_batch(cfg)
    seen_labelled = logged(module)
    module.training_step(batch, 0)
    unlabelled = dict(batch, labels=torch.zeros_like(batch["labels"]))
    seen_unlabelled = logged(module)
    module.training_step(unlabelled, 0)
    assert seen_labelled["train/instance"] == pytest.approx(seen_unlabelled["train/instance"], rel=1e-6)
    assert abs(seen_labelled["train/soft"] - seen_unlabelled["train/soft"]) > 1e-3
    assert seen_labelled["train/labelled_fraction"] == 1.0 and seen_unlabelled["train/labelled_fraction"] == 0.0


def test_teacher_is_ema_of_student_including_projector(tmp_path):
    module = build_softcon_module(tiny_cfg(tmp_path))
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in module.teacher.named_parameters()}
    student = {k: v.clone() for k, v in module.student.named_parameters()}
    assert set(before) == set(student)
    opt = torch.optim.SGD(module.student.parameters(), lr=0.0)
    module.optimizer_step(0, 0, opt, optimizer_closure=lambda: None)  # step 0, lr 0: only the EMA moves
    m = module.schedules.at(0)["momentum"]
    for name, p in module.teacher.named_parameters():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * student[name])


def test_gradients_clipped_per_student_submodule(tmp_path):
    module = build_softcon_module(tiny_cfg(tmp_path))
    for p in module.student.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(None)
    clip = module.cfg["optim"]["clip_grad"]
    for name, sub in module.student.items():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sub.parameters()]))
        assert norm == pytest.approx(clip, rel=1e-4), name


def test_continual_init_adapts_rgb_checkpoint_to_13_bands(tmp_path):
    cfg = tiny_cfg(tmp_path)
    rgb = build_backbone({**cfg["model"]["backbone"], "in_chans": 3, "img_size": 96})  # other grid: resampled
    with torch.no_grad():
        for p in rgb.parameters():
            p.normal_()
    path = save_fm_checkpoint(tmp_path / "rgb.safetensors", rgb)
    cfg["model"]["init"] = str(path)
    cfg["model"]["init_mode"] = "auto"  # -> rgb_map: RGB kernels into B04/B03/B02, other bands zero
    module = build_softcon_module(cfg)
    bands = modality_bands("s2")
    for branch in (module.student, module.teacher):
        weight = branch["backbone"].vit.patch_embed.proj.weight
        for k, band in enumerate(RGB_BANDS):
            torch.testing.assert_close(weight[:, bands.index(band)], rgb.vit.patch_embed.proj.weight[:, k])
        others = [i for i, b in enumerate(bands) if b not in RGB_BANDS]
        assert weight[:, others].abs().max() == 0
        torch.testing.assert_close(branch["backbone"].vit.blocks[1].mlp.fc2.weight, rgb.vit.blocks[1].mlp.fc2.weight)
        assert branch["backbone"].vit.pos_embed.shape[1] == 1 + (48 // 8) ** 2

    cfg["model"]["init_mode"] = "rgb_map"
    cfg["data"]["modality"] = "s1"  # RGB bands are not SAR bands: rgb_map must refuse, naming the way out
    with pytest.raises(ValueError, match="band_select, repeat or random"):
        build_softcon_module(copy.deepcopy(cfg))


def test_ssl4eo_batches_carry_labels_and_unlabelled_rows(tmp_path):
    make_ssl4eo(tmp_path / "ssl4eo", "s2c", size=24)
    labels = write_labels(tmp_path / "dw.json", {"0000000": ["water", 4]})  # one of three locations labelled
    cfg = tiny_cfg(tmp_path, f"data.source=ssl4eo:{tmp_path}/ssl4eo", f"data.labels={labels}")
    for packed in (None, str(tmp_path / "packed")):
        cfg["data"]["packed_dir"] = packed
        source = training_source(cfg)
        assert len(source) == 12 and source.bands == modality_bands("s2")
        assert source.norm.source == "ssl4eo_s12_l1c"  # the data set's own statistics
        batch = a_batch(cfg, source)
        assert batch["global_crops"].shape == (32, 13, 48, 48)
        for i, y, has in zip(batch["indices"], batch["labels"], batch["has_label"]):
            labelled = source.dataset.ids[int(i)].startswith("0000000/")
            assert bool(has) == labelled
            assert y.tolist() == ([1.0, 0, 0, 0, 1.0, 0, 0, 0, 0] if labelled else [0.0] * 9)
    cfg["data"]["source"] = "demo"
    with pytest.raises(ValueError, match="--labels is for SSL4EO-S12"):
        training_source(cfg)


def test_resume_after_crash_gives_identical_losses(tmp_path):
    source = texture_source()
    straight = RecordLosses()
    run_softcon_pretraining(tiny_cfg(tmp_path / "a", "train.max_steps=5"), source, [straight], progress=False)
    cfg = tiny_cfg(tmp_path / "b", "train.max_steps=5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_softcon_pretraining(cfg, source, [CrashAt(3)], progress=False)
    resumed = RecordLosses()
    result = run_softcon_pretraining(cfg, source, [resumed], progress=False)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert torch.equal(resumed.losses[step], straight.losses[step]), f"step {step} differs after resume"
    assert result.export.is_file()


def learning_run(tmp_path, steps: int) -> tuple[dict, dict]:
    """Micro mAP on held-out demo scenes (BigEarthNet layout, classes differing in spectrum and texture)
    of the demo_cpu encoder at initialisation and after `steps` of SoftCon pretraining."""
    cfg = resolve_config(CONFIGS / "demo_cpu.yaml", overrides=[
        f"train.output_dir={tmp_path}/run", f"train.max_steps={steps}", f"train.epoch_length={steps}"])
    L.seed_everything(cfg["train"]["seed"], workers=True, verbose=False)  # as run_softcon_pretraining seeds
    init = build_softcon_module(copy.deepcopy(cfg)).backbone
    before = {p: demo_probe(init, cfg, p)["map_micro"] for p in ("linear", "knn")}
    result = run_softcon_pretraining(cfg, progress=False)
    torch.testing.assert_close(  # the baseline really is the network the run started from
        build_softcon_module(copy.deepcopy(cfg)).student["backbone"].vit.cls_token, init.vit.cls_token)
    after = {p: demo_probe(result.module.backbone, cfg, p)["map_micro"] for p in ("linear", "knn")}
    return before, after


def test_short_pretraining_organises_features_by_class(tmp_path):
    """100 steps of the demo_cpu config (under a minute): the kNN micro mAP of the frozen teacher CLS
    rises far above the same network at initialisation, and the linear-probe micro mAP does not fall.
    (A linear probe on random-init features is already strong on these scenes - their mean spectra
    separate the classes - so the clear linear-probe gain needs the longer run below.)"""
    before, after = learning_run(tmp_path, 100)
    assert after["knn"] > before["knn"] + 0.3, (before, after)
    assert after["linear"] > before["linear"] - 0.02, (before, after)


@pytest.mark.slow
def test_pretraining_raises_linear_probe_map(tmp_path):
    """600 steps (about 5 minutes on two busy cores): linear-probe micro mAP (shipped eval protocol)
    clearly above the same encoder at initialisation."""
    before, after = learning_run(tmp_path, 600)
    assert after["linear"] > before["linear"] + 0.1, (before, after)
    assert after["knn"] > before["knn"] + 0.3, (before, after)


class _DamagedScenes(TextureScenes):
    """Texture scenes where some patches cannot be read, as a missing band file or a corrupt GeoTIFF."""

    def __init__(self, n: int, bad: set[int]):
        super().__init__(n, size=48, seed=0)
        self.bad = bad

    def load_image(self, i: int):
        from earthobs.readers import EOReadError

        if i in self.bad:
            raise EOReadError(f"/data/patch_{i}/B02.tif", "missing band file")
        return super().load_image(i)


def test_an_unreadable_patch_is_replaced_with_its_own_label_and_never_stops_training(tmp_path):
    from earthobs.readers import EOReadError

    scenes = _DamagedScenes(32, bad={3, 5, 11})
    source = EOSource(scenes, stats_spec("softcon", "bigearthnet_s2", scenes.bands), modality_bands("s2"))
    clean = texture_source()
    for i in (3, 5, 11):
        image, (label, _) = source.get(i), source.label(i)
        j = source.replaced[i]
        assert j not in scenes.bad and j != i
        assert torch.equal(image, clean.get(j)) and torch.equal(label, clean.label(j)[0])  # image and label agree
    assert torch.equal(source.get(4), clean.get(4)) and 4 not in source.replaced
    assert source.skipped.keys == {3, 5, 11}
    batch = a_batch(tiny_cfg(tmp_path), source)  # a whole batch despite the bad patches
    assert batch["labels"].shape[0] == len(batch["has_label"]) == 16
    assert torch.equal(batch["global_crops"], a_batch(tiny_cfg(tmp_path), EOSource(
        _DamagedScenes(32, bad={3, 5, 11}), stats_spec("softcon", "bigearthnet_s2", scenes.bands),
        modality_bands("s2")))["global_crops"])  # still a pure function of the seed

    hopeless = EOSource(_DamagedScenes(4, bad={1, 2, 3}), stats_spec("softcon", "bigearthnet_s2", scenes.bands),
                        modality_bands("s2"))
    hopeless.dataset.bad.add(0)
    with pytest.raises(EOReadError, match="could not be read"):
        hopeless.get(0)


def test_a_run_sums_up_the_patches_its_workers_replaced(tmp_path, caplog):
    """Two DataLoader workers each find some unreadable patches; the end of the run names all of them
    once (what the batches it trained on contain, plus at most what the workers prefetched)."""
    import json

    bad = {i for i in range(32) if i % 5 == 2}
    cfg = tiny_cfg(tmp_path, "train.max_steps=3", "data.num_workers=2")

    def damaged() -> EOSource:
        scenes = _DamagedScenes(32, bad=bad)
        return EOSource(scenes, stats_spec("softcon", "bigearthnet_s2", scenes.bands), modality_bands("s2"))

    with caplog.at_level("WARNING", logger="fm.train"):
        run_softcon_pretraining(cfg, damaged(), progress=False)
    listing = tmp_path / "run" / "skipped" / "this_run.json"
    recorded = {e["name"] for e in json.loads(listing.read_text())}

    def met_in(batches: range) -> set[str]:  # replay the batches in this process
        source = damaged()
        for k in batches:
            SoftConBatches(source, MultispectralViews(cfg["views"], 0), cfg["data"]["batch_size"],
                           cfg["model"]["backbone"]["patch_size"], seed=cfg["data"]["seed"]).make_batch(k)
        return {source._name(i) for i in source.skipped.keys}

    trained, prefetched = met_in(range(3)), met_in(range(3 + 2 * 4))
    assert trained and trained <= recorded <= prefetched
    assert len(list((tmp_path / "run" / "skipped").glob("*.jsonl"))) >= 2  # one file per worker process
    message = next(r.getMessage() for r in caplog.records if "replaced unreadable inputs" in r.getMessage())
    assert f"{len(recorded)} sample" in message and "B02.tif: missing band file" in message
