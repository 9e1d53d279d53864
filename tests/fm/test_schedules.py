"""Per-step schedules of the DINOv2 recipe, and the shipped ViT-L/16 defaults against DESIGN.md section 5."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import fm.config
from fm.config import load_yaml
from fm.schedules import build_schedules, cosine_schedule, scaled_lr

VITL16 = Path(fm.config.__file__).parent / "configs" / "core" / "dinov2_vitl16.yaml"


def _cosine_reference(base, final, total, warmup=0, warmup_start=0.0, freeze=0) -> list[float]:
    """DINOv2 CosineScheduler written out per step: zeros, np.linspace warm-up (inclusive), half cosine."""
    out = []
    n_cos = total - freeze - warmup
    for s in range(total):
        if s < freeze:
            out.append(0.0)
        elif s < freeze + warmup:
            i = s - freeze
            out.append(warmup_start + (base - warmup_start) * i / (warmup - 1) if warmup > 1 else warmup_start)
        else:
            t = s - freeze - warmup
            out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / n_cos)))
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(base=1.0, final=0.1, total=20),
        dict(base=2.0, final=0.0, total=30, warmup=5, warmup_start=0.5),
        dict(base=1.0, final=0.01, total=25, warmup=4, freeze=3),
    ],
)
def test_cosine_schedule_matches_written_out_formula(kw):
    got = cosine_schedule(
        kw["base"], kw["final"], kw["total"], kw.get("warmup", 0), kw.get("warmup_start", 0.0), kw.get("freeze", 0)
    )
    expected = _cosine_reference(**kw)
    assert got.shape == (kw["total"],)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_cosine_schedule_rejects_empty():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, 0)


def test_sqrt_lr_scaling():
    assert scaled_lr(4e-3, 4096) == pytest.approx(8e-3)
    assert scaled_lr(4e-3, 1024) == pytest.approx(4e-3)
    assert scaled_lr(4e-3, 256) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 512, "linear_wrt_256") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 512, "none") == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="sqrt_wrt_2048"):
        scaled_lr(1e-3, 512, "sqrt_wrt_2048")


@pytest.fixture(scope="module")
def vitl16() -> dict:
    return load_yaml(VITL16)


def test_shipped_defaults_equal_design_vitl16_column(vitl16):
    m, o, c, t = vitl16["model"], vitl16["optim"], vitl16["crops"], vitl16["train"]
    assert m["backbone"]["arch"] == "vitl" and m["backbone"]["patch_size"] == 16
    assert m["backbone"]["drop_path_rate"] == pytest.approx(0.3)
    assert (m["dino"]["n_prototypes"], m["dino"]["hidden_dim"], m["dino"]["bottleneck_dim"], m["dino"]["nlayers"]) == (
        65536, 2048, 256, 3,
    )
    assert m["ibot"]["separate_head"] is False  # iBOT head shared with the DINO head
    assert m["dino"]["centering"] == "softmax" and m["dino"]["center_momentum"] == pytest.approx(0.9)
    assert m["dino"]["sk_iterations"] == 3
    assert m["student_temp"] == pytest.approx(0.1)
    assert m["teacher_temp"] == {"warmup_start": 0.04, "final": 0.07, "warmup_epochs": 30}
    assert m["teacher_momentum"] == {"base": 0.992, "final": 1.0}
    assert m["ibot"]["mask_probability"] == pytest.approx(0.5) and m["ibot"]["mask_ratio"] == [0.1, 0.5]
    assert m["koleo_weight"] == pytest.approx(0.1)
    assert (c["global_size"], c["local_size"], c["n_local"]) == (224, 96, 8)
    assert c["global_scale"] == [0.32, 1.0] and c["local_scale"] == [0.05, 0.32]
    assert o["base_lr"] == pytest.approx(4e-3) and o["lr_scaling"] == "sqrt_wrt_1024"
    assert o["min_lr"] == pytest.approx(1e-6) and o["warmup_epochs"] == 10
    assert o["weight_decay"] == pytest.approx(0.04) and o["weight_decay_end"] == pytest.approx(0.4)
    assert o["betas"] == [0.9, 0.999]
    assert o["layerwise_decay"] == pytest.approx(0.9) and o["patch_embed_lr_mult"] == pytest.approx(0.2)
    assert o["clip_grad"] == pytest.approx(3.0) and o["freeze_last_layer_epochs"] == 1
    assert t["epoch_length"] == 1250


def test_recipe_schedules_from_shipped_config(vitl16):
    o, m = vitl16["optim"], vitl16["model"]
    epochs, epoch_length, batch = 100, 1250, 4096
    s = build_schedules(o, m, epochs, epoch_length, batch)
    total = epochs * epoch_length
    for arr in (s.lr, s.last_layer_lr, s.weight_decay, s.momentum, s.teacher_temp):
        assert arr.shape == (total,)

    # lr: linear warm-up 0 -> 8e-3 over 10 epochs (np.linspace, inclusive), then cosine to 1e-6
    warm = 10 * epoch_length
    peak = 4e-3 * math.sqrt(4096 / 1024)
    assert s.lr[0] == 0.0
    assert s.lr[warm - 1] == pytest.approx(peak)
    assert s.lr[warm // 2] == pytest.approx(peak * (warm // 2) / (warm - 1))
    assert s.lr[warm] == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert s.lr[mid] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (mid - warm) / (total - warm))))
    assert s.lr[-1] == pytest.approx(1e-6, abs=1e-9)

    # last layer: zero during the first (freeze) epoch, then the lr schedule
    assert np.all(s.last_layer_lr[:epoch_length] == 0.0)
    np.testing.assert_array_equal(s.last_layer_lr[epoch_length:], s.lr[epoch_length:])

    # teacher temperature: 0.04 -> 0.07 linear over 30 epochs, then flat
    tw = 30 * epoch_length
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[tw - 1] == pytest.approx(0.07)
    assert s.teacher_temp[1000] == pytest.approx(0.04 + 0.03 * 1000 / (tw - 1))
    assert np.all(s.teacher_temp[tw:] == pytest.approx(0.07))

    # teacher momentum: cosine 0.992 -> 1.0, monotone, ending at 1.0
    assert s.momentum[0] == pytest.approx(0.992)
    assert np.all(np.diff(s.momentum) >= -1e-15)
    assert s.momentum[-1] == pytest.approx(1.0, abs=1e-9)
    assert s.momentum[total // 2] == pytest.approx(0.996, abs=1e-6)

    # weight decay: cosine 0.04 -> 0.4
    assert s.weight_decay[0] == pytest.approx(0.04)
    assert s.weight_decay[-1] == pytest.approx(0.4, abs=1e-8)
    assert np.all(np.diff(s.weight_decay) >= -1e-15)


def test_at_holds_final_values_past_the_end(vitl16):
    o, m = vitl16["optim"], vitl16["model"]
    s = build_schedules(o, m, epochs=2, epoch_length=10, global_batch=1024)
    last = s.at(19)
    assert s.at(20) == last and s.at(10_000) == last
    assert last["lr"] == pytest.approx(float(s.lr[-1]))
    assert last["teacher_temp"] == pytest.approx(float(s.teacher_temp[-1]))
    assert last["momentum"] == pytest.approx(float(s.momentum[-1]))
    assert s.at(0) == {
        "lr": 0.0, "last_layer_lr": 0.0, "weight_decay": pytest.approx(0.04),
        "momentum": pytest.approx(0.992), "teacher_temp": pytest.approx(0.04),
    }


def test_short_run_gives_full_length_arrays(vitl16):
    """A run shorter than the warm-ups (CPU demo, smoke tests) still gets one value per step."""
    s = build_schedules(vitl16["optim"], vitl16["model"], epochs=1, epoch_length=7, global_batch=64)
    for arr in (s.lr, s.last_layer_lr, s.weight_decay, s.momentum, s.teacher_temp):
        assert arr.shape == (7,)
        assert np.isfinite(arr).all()


def test_teacher_temp_warmup_keeps_its_slope_in_short_runs(vitl16):
    """DINOv2 builds the teacher-temperature schedule with its own length (warm-up epochs x epoch length),
    independent of the run: a run shorter than the warm-up sees the first part of the same ramp, e.g.
    `--set train.epochs=20` ends at 0.04 + 0.03 * 20/30, not at 0.07."""
    epochs, epoch_length = 2, 10
    s = build_schedules(vitl16["optim"], vitl16["model"], epochs, epoch_length, global_batch=1024)
    warm = 30 * epoch_length
    expected = [0.04 + 0.03 * i / (warm - 1) for i in range(epochs * epoch_length)]
    np.testing.assert_allclose(s.teacher_temp, expected, rtol=1e-9)


def test_lr_warmup_longer_than_run_is_truncated_or_refused(vitl16):
    """lr warm-up of 10 epochs in a 5-epoch run: DINOv2's scheduler refuses (its length assert fails).
    Acceptable here: the same ramp, truncated (peak never reached), or a clear error naming the warm-up.
    Not acceptable: silently squeezing the warm-up into the run so the lr peaks at the last step."""
    epochs, epoch_length = 5, 10
    try:
        s = build_schedules(vitl16["optim"], vitl16["model"], epochs, epoch_length, global_batch=1024)
    except ValueError as e:
        assert "warmup" in str(e) or "warm-up" in str(e)
        return
    warm = 10 * epoch_length
    expected = [4e-3 * i / (warm - 1) for i in range(epochs * epoch_length)]
    np.testing.assert_allclose(s.lr, expected, rtol=1e-9)
