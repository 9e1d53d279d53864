"""SoftCon scaling (x - (mu - 2 sigma)) / (4 sigma) clipped to [0, 1], S1 quantile clip, spec lookup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from earthobs.bands import BIGEARTHNET_S2_BANDS, S1_BANDS, S2_L1C_BANDS
from earthobs.normalize import BAND_STATS, EncoderInput, NormSpec, norm_spec_for, stats_spec, with_bands


def test_softcon_maps_mu_minus_2sigma_to_0_and_mu_plus_2sigma_to_1():
    spec = NormSpec("softcon", ("B02", "B03"), mean=(1000.0, 500.0), std=(100.0, 50.0))
    x = np.array([[800.0, 1000.0, 1200.0, 1500.0], [400.0, 500.0, 600.0, 0.0]], dtype=np.float32)[:, None, :]
    y = spec(x)
    np.testing.assert_allclose(y[0, 0], [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(y[1, 0], [0.0, 0.5, 1.0, 0.0])  # 400 = mu - 2 sigma; 0 clipped to 0


def test_zscore_and_minmax():
    z = NormSpec("zscore", ("VV",), mean=(-10.0,), std=(5.0,))
    np.testing.assert_allclose(z(np.array([[[-20.0, 0.0]]], dtype=np.float32)), [[[-2.0, 2.0]]])
    m = NormSpec("minmax", ("B04",), low=(0.0,), high=(10000.0,))
    np.testing.assert_allclose(m(np.array([[[5000.0, 20000.0]]], dtype=np.float32)), [[[0.5, 1.0]]])


def test_numpy_and_torch_agree_and_batches_equal_single_images():
    rng = np.random.default_rng(0)
    spec = norm_spec_for("earthobs/softcon-vits14-s1", S1_BANDS)
    x = rng.normal(-15, 5, (3, 2, 16, 16)).astype(np.float32)
    y_np = spec(x)
    y_t = spec(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_np, y_t, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(spec(x[i]), y_np[i], atol=1e-6)


def test_s1_quantile_clip_is_per_image_and_per_band():
    rng = np.random.default_rng(1)
    x = rng.normal(-15, 2, (2, 50, 50)).astype(np.float32)
    x[0, 0, 0] = 30.0  # one bright scatterer
    spec = norm_spec_for("softcon", S1_BANDS)
    assert spec.clip_quantiles == (0.01, 0.99)
    q_hi = np.quantile(x[0], 0.99)
    mu, sd = BAND_STATS["ssl4eo_s12_s1"]["VV"]
    expected = np.clip((q_hi - (mu - 2 * sd)) / (4 * sd), 0, 1)
    assert spec(x)[0, 0, 0] == pytest.approx(expected, abs=1e-5)
    unclipped = NormSpec("softcon", S1_BANDS, mean=spec.mean, std=spec.std)
    assert unclipped(x)[0, 0, 0] == 1.0  # without the clip the scatterer saturates
    # the other band's quantiles are its own: clipping VV's outlier leaves VH unchanged
    np.testing.assert_allclose(spec(x)[1], spec(np.stack([x[0] * 0 - 15, x[1]]))[1], atol=1e-6)


def test_spec_rejects_wrong_band_count_naming_the_bands():
    spec = norm_spec_for("earthobs/softcon-vitb14-s2", S2_L1C_BANDS)
    with pytest.raises(ValueError, match="13 bands"):
        spec(np.zeros((12, 8, 8), dtype=np.float32))


def test_norm_spec_lookup_by_encoder_and_dataset():
    s2 = norm_spec_for("earthobs/softcon-vits14-s2", S2_L1C_BANDS)
    assert s2.kind == "softcon" and s2.source == "ssl4eo_s12_l1c" and s2.clip_quantiles is None
    assert s2.mean[10] == BAND_STATS["ssl4eo_s12_l1c"]["B10"][0]
    ben = norm_spec_for("earthobs/softcon-vits14-s2", BIGEARTHNET_S2_BANDS, dataset="bigearthnet")
    assert ben.source == "bigearthnet_s2" and len(ben.bands) == 12
    assert norm_spec_for("some-unknown-encoder", S1_BANDS).kind == "softcon"
    assert norm_spec_for("zscore-baseline", S1_BANDS).kind == "zscore"
    with pytest.raises(ValueError, match="separately"):
        norm_spec_for("softcon", ("B02", "VV"))
    with pytest.raises(ValueError, match="B10"):
        stats_spec("softcon", "bigearthnet_s2", S2_L1C_BANDS)


def test_stat_tables_cover_their_bands():
    assert tuple(BAND_STATS["ssl4eo_s12_l1c"]) == S2_L1C_BANDS
    assert tuple(BAND_STATS["eurosat_ms"]) == S2_L1C_BANDS
    assert tuple(BAND_STATS["bigearthnet_s2"]) == BIGEARTHNET_S2_BANDS
    assert tuple(BAND_STATS["ssl4eo_s12_s1"]) == S1_BANDS
    assert all(s > 0 for table in BAND_STATS.values() for _, s in table.values())


def test_encoder_input_normalises_then_inserts_exact_zero_b10():
    spec = norm_spec_for("softcon", BIGEARTHNET_S2_BANDS, dataset="bigearthnet")
    x = torch.full((12, 4, 4), 5000.0)
    out = EncoderInput(spec, out_bands=S2_L1C_BANDS)({"image": x, "id": "a"})
    assert out["image"].shape == (13, 4, 4) and out["id"] == "a"
    assert torch.all(out["image"][10] == 0)
    torch.testing.assert_close(out["image"][[0, 11]], spec(x)[[0, 10]])


def test_with_bands_restricts_a_spec():
    spec = norm_spec_for("softcon", S2_L1C_BANDS)
    rgb = with_bands(spec, ["B04", "B03", "B02"])
    assert rgb.mean == (spec.mean[3], spec.mean[2], spec.mean[1])
    with pytest.raises(ValueError, match="VV"):
        with_bands(spec, ["VV"])
