"""Multispectral augmentations: shapes, seeds, value range, and each operation doing what it says."""

from __future__ import annotations

import pytest
import torch

from earthobs.ms_augment import (
    MSAugmentConfig,
    MultispectralAugment,
    band_dropout,
    crop_box,
    gain_offset_jitter,
    gaussian_blur,
    ms_two_views,
    random_resized_crop,
)


def scene(channels: int = 12, size: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.rand(channels, size, size, generator=torch.Generator().manual_seed(seed))


def everything_on(**overrides) -> MSAugmentConfig:
    cfg = dict(size=112, jitter_p=1.0, noise_p=1.0, blur_p=1.0, band_dropout_p=0.3, contrast=0.8, brightness=0.5)
    cfg.update(overrides)
    return MSAugmentConfig(**cfg)


@pytest.mark.parametrize(("channels", "size"), [(13, 224), (2, 112), (12, 96)])
def test_shapes(channels, size):
    aug = MultispectralAugment(MSAugmentConfig(size=size))
    out = aug(scene(channels), torch.Generator().manual_seed(0))
    assert out.shape == (channels, size, size)
    assert out.dtype == torch.float32


def test_seed_reproduces_the_view_and_another_seed_does_not():
    aug = MultispectralAugment(everything_on())
    x = scene()
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_no_nan_and_clipped_to_unit_range():
    aug = MultispectralAugment(everything_on(noise_std=0.5))
    for seed in range(5):
        out = aug(scene(seed=seed), torch.Generator().manual_seed(seed))
        assert out.isfinite().all()
        assert out.min() >= 0.0 and out.max() <= 1.0
    # Control: without clipping, strong jitter and noise leave the unit range.
    unclipped = MultispectralAugment(everything_on(noise_std=0.5, clip=False))(scene(), torch.Generator().manual_seed(0))
    assert unclipped.min() < 0.0 or unclipped.max() > 1.0


def test_two_views_differ_and_are_reproducible():
    x = scene(13)
    s1, t1 = ms_two_views(x, generator=torch.Generator().manual_seed(1))
    s2, t2 = ms_two_views(x, generator=torch.Generator().manual_seed(1))
    assert s1.shape == t1.shape == (13, 224, 224)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(t1, t2)
    assert not torch.allclose(s1, t1)


def test_crop_box_stays_inside_and_respects_scale():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = crop_box(120, 120, (0.2, 0.5), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 120
        assert 0.18 <= h * w / 120**2 <= 0.52


def test_full_crop_is_a_plain_resize():
    x = scene(3, 64)
    out = random_resized_crop(x, 64, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    torch.testing.assert_close(out, x)


def test_global_jitter_moves_all_bands_alike():
    x = torch.zeros(4, 8, 8)
    x[:, :4] = 1.0
    gen = torch.Generator().manual_seed(3)
    out = gain_offset_jitter(x, contrast=0.5, brightness=0.3, per_band=False, generator=gen)
    assert all(torch.allclose(out[0], out[i]) for i in range(1, 4))
    per_band = gain_offset_jitter(x, contrast=0.5, brightness=0.3, per_band=True, generator=gen)
    assert not all(torch.allclose(per_band[0], per_band[i]) for i in range(1, 4))


def test_blur_keeps_the_mean_and_smooths():
    x = scene(2, 32)
    out = gaussian_blur(x, 1.5)
    assert out.shape == x.shape
    torch.testing.assert_close(out.mean(), x.mean(), atol=1e-2, rtol=0)
    assert out.std() < 0.5 * x.std()


def test_band_dropout_never_drops_every_band():
    x = scene(5, 8) + 0.1
    out = band_dropout(x, 1.0, generator=torch.Generator().manual_seed(0))
    kept = [i for i in range(5) if out[i].abs().sum() > 0]
    assert len(kept) == 1
    torch.testing.assert_close(out[kept[0]], x[kept[0]])


def test_bad_input_is_refused():
    aug = MultispectralAugment()
    with pytest.raises(ValueError, match="float tensor"):
        aug(torch.zeros(13, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown multispectral augmentation keys"):
        MultispectralAugment({"sise": 224})
