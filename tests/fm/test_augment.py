"""Multi-crop transform: crop counts and sizes, normalisation, crop scales, seeded determinism."""

from __future__ import annotations

import torch

from fm.augment import MultiCropTransform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _plain(**kw) -> MultiCropTransform:
    """No photometric changes, so pixel values can be predicted."""
    args = dict(global_size=16, local_size=8, n_local=3, photometric=(_identity, _identity, _identity)) | kw
    return MultiCropTransform(**args)


def test_crop_counts_and_sizes_with_default_photometric():
    torch.manual_seed(0)
    globals_, locals_ = MultiCropTransform(global_size=16, local_size=8, n_local=3)(torch.rand(3, 40, 40))
    assert len(globals_) == 2 and len(locals_) == 3
    assert all(g.shape == (3, 16, 16) and g.dtype == torch.float32 for g in globals_)
    assert all(c.shape == (3, 8, 8) for c in locals_)
    assert all(torch.isfinite(c).all() for c in globals_ + locals_)


def test_no_local_crops():
    globals_, locals_ = _plain(n_local=0)(torch.rand(3, 32, 32))
    assert len(globals_) == 2 and locals_ == []


def test_normalisation_applied_per_channel():
    value = torch.tensor([0.2, 0.5, 0.9])
    img = value.view(3, 1, 1).expand(3, 32, 32).clone()  # constant image survives any crop/resize/flip
    expected = torch.tensor([(v - m) / s for v, m, s in zip(value.tolist(), MEAN, STD)]).view(3, 1, 1)
    torch.manual_seed(1)
    globals_, locals_ = _plain()(img)
    for crop in globals_ + locals_:
        torch.testing.assert_close(crop, expected.expand_as(crop), rtol=1e-5, atol=1e-5)


def test_uint8_input_is_scaled_to_unit_range():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    t = _plain()
    torch.manual_seed(2)
    from_uint8 = t(img)
    torch.manual_seed(2)
    from_float = t(img.float() / 255.0)
    for a, b in zip(from_uint8[0] + from_uint8[1], from_float[0] + from_float[1]):
        torch.testing.assert_close(a, b)


def test_extra_geometric_is_applied_to_every_crop():
    calls = []

    def mark(x):
        calls.append(x.shape)
        return torch.zeros_like(x)

    t = _plain(extra_geometric=mark)
    globals_, locals_ = t(torch.rand(3, 32, 32))
    assert len(calls) == 2 + 3
    expected = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
    for crop in globals_ + locals_:
        torch.testing.assert_close(crop, expected.expand_as(crop))


def _covered_area(crop: torch.Tensor) -> float:
    """Fraction of the source covered by a crop of a coordinate image (channel 0 = x, channel 1 = y)."""
    x = crop[0] * STD[0] + MEAN[0]
    y = crop[1] * STD[1] + MEAN[1]
    return float((x.max() - x.min()) * (y.max() - y.min()))


def test_global_and_local_crop_scales():
    size = 128
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    img = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size), torch.zeros(size, size)])
    t = _plain(global_size=32, local_size=16)
    torch.manual_seed(3)
    global_areas, local_areas = [], []
    for _ in range(25):
        g, loc = t(img)
        global_areas += [_covered_area(c) for c in g]
        local_areas += [_covered_area(c) for c in loc]
    # recipe: global scale (0.32, 1), local scale (0.05, 0.32); resampling trims the edges a little
    assert min(global_areas) > 0.32 * 0.75 and max(global_areas) <= 1.0
    assert max(local_areas) < 0.32 * 1.05 and min(local_areas) > 0.05 * 0.5
    assert max(global_areas) > 0.6  # the scale range is actually used
    assert min(local_areas) < 0.15


def test_seeded_determinism_with_default_photometric():
    t = MultiCropTransform(global_size=16, local_size=8, n_local=2)
    img = torch.rand(3, 32, 32)
    torch.manual_seed(7)
    a = t(img)
    torch.manual_seed(7)
    b = t(img)
    torch.manual_seed(8)
    c = t(img)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert any(not torch.equal(x, z) for x, z in zip(a[0] + a[1], c[0] + c[1]))
