"""Channel adaptation and SoftCon checkpoint loading, on tiny random ViTs saved to tmp_path."""

from __future__ import annotations

import pytest
import torch

from earthobs.models import (
    RGB_BANDS,
    adapt_patch_embed,
    band_adapter,
    channel_adapted_backbone,
    load_softcon_checkpoint,
)
from fm.backbones import BackboneConfig, build_backbone

S2_L1C = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def tiny_cfg(img_size: int = 56, in_chans: int = 3) -> BackboneConfig:
    return BackboneConfig(
        arch="vitt", patch_size=14, img_size=img_size, in_chans=in_chans, embed_dim=32, depth=2,
        num_heads=2, drop_path_rate=0.0, layerscale_init=1e-5,
    )


def rgb_model_and_state(img_size: int = 56, seed: int = 0):
    torch.manual_seed(seed)
    model = build_backbone(tiny_cfg(img_size)).eval()
    # Give LayerScale real weight so the blocks, not just the patch embed, shape the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model, model.state_dict()


def test_rgb_map_reproduces_rgb_model_on_rgb_only_input():
    rgb_model, state = rgb_model_and_state()
    model = channel_adapted_backbone(tiny_cfg(), state, S2_L1C, "rgb_map").eval()
    rgb = torch.rand(2, 3, 56, 56)
    ms = torch.zeros(2, 13, 56, 56)
    for i, band in enumerate(RGB_BANDS):
        ms[:, S2_L1C.index(band)] = rgb[:, i]
    with torch.no_grad():
        expected = rgb_model(rgb)
        got = model(ms)
        # Control: red and blue swapped (B02 <-> B04) gives another embedding, so bands matter by name.
        other = model(ms[:, [0, 3, 2, 1, *range(4, 13)]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other, expected, atol=1e-3)
    # Bands the checkpoint never saw start at zero: they cannot change the embedding yet.
    assert model.vit.patch_embed.proj.weight[:, S2_L1C.index("B08")].abs().sum() == 0


def test_rgb_map_refuses_targets_without_rgb():
    weight = torch.randn(8, 3, 14, 14)
    with pytest.raises(ValueError, match="B04"):
        adapt_patch_embed(weight, ["VV", "VH"], "rgb_map")


@pytest.mark.parametrize("channels", [6, 12])
def test_repeat_matches_rgb_model_on_grayscale(channels):
    rgb_model, state = rgb_model_and_state()
    bands = S2_L1C[:channels]
    model = channel_adapted_backbone(tiny_cfg(), state, bands, "repeat").eval()
    gray = torch.rand(2, 1, 56, 56)
    with torch.no_grad():
        expected = rgb_model(gray.expand(-1, 3, -1, -1))
        got = model(gray.expand(-1, channels, -1, -1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_repeat_tiles_and_scales():
    weight = torch.randn(4, 3, 14, 14)
    out = adapt_patch_embed(weight, S2_L1C[:5], "repeat")
    assert out.shape == (4, 5, 14, 14)
    torch.testing.assert_close(out[:, 3], weight[:, 0] * 3 / 5)
    torch.testing.assert_close(out[:, 4], weight[:, 1] * 3 / 5)


def test_band_select_keeps_named_kernels_and_draws_the_rest():
    weight = torch.randn(8, 13, 14, 14)
    # Short names in another order are matched by name; VV is a band the 13-band checkpoint lacks.
    bigearthnet = ["B4", "B3", "B2"] + [b for b in S2_L1C if b not in ("B10", "B04", "B03", "B02")] + ["VV"]
    gen = torch.Generator().manual_seed(0)
    out = adapt_patch_embed(weight, bigearthnet, "band_select", source_bands=S2_L1C, generator=gen)
    assert out.shape == (8, 13, 14, 14)
    torch.testing.assert_close(out[:, 0], weight[:, S2_L1C.index("B04")])
    for band in bigearthnet[3:-1]:
        torch.testing.assert_close(out[:, bigearthnet.index(band)], weight[:, S2_L1C.index(band)])
    new = out[:, -1]
    assert new.abs().sum() > 0
    assert not any(torch.allclose(new, weight[:, i]) for i in range(13))
    # Same generator seed, same fresh kernels.
    again = adapt_patch_embed(weight, bigearthnet, "band_select", S2_L1C, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out)


def test_random_mode_ignores_checkpoint_kernels():
    weight = torch.randn(8, 3, 14, 14) * 100
    out = adapt_patch_embed(weight, S2_L1C, "random", generator=torch.Generator().manual_seed(1))
    assert out.shape == (8, 13, 14, 14)
    assert out.abs().max() <= 1.0 / (13 * 14 * 14) ** 0.5 + 1e-6


def test_band_adapter_for_the_encoder_registry():
    weight = torch.randn(8, 3, 14, 14)
    adapt = band_adapter(S2_L1C, "rgb_map")
    out = adapt(weight, 13)
    torch.testing.assert_close(out[:, S2_L1C.index("B03")], weight[:, 1])
    with pytest.raises(ValueError, match="13 target bands"):
        adapt(weight, 12)


def test_unknown_mode_and_band_count_mismatch_are_refused():
    weight = torch.randn(8, 3, 14, 14)
    with pytest.raises(ValueError, match="unknown patch-embed init mode"):
        adapt_patch_embed(weight, S2_L1C, "copy")
    with pytest.raises(ValueError, match="3 input channels"):
        adapt_patch_embed(weight, S2_L1C, "band_select", source_bands=S2_L1C)
    with pytest.raises(ValueError, match="unknown band name"):
        adapt_patch_embed(weight, ["B04", "B03", "B13"], "rgb_map")


def test_pos_embed_resampled_from_37_grid_to_16_grid():
    torch.manual_seed(0)
    big, _ = rgb_model_and_state(img_size=518)  # 37 x 37 grid, as DINOv2 hub weights
    state = big.state_dict()
    assert state["vit.pos_embed"].shape[1] == 37 * 37 + 1
    model = channel_adapted_backbone(tiny_cfg(224), state, S2_L1C, "rgb_map").eval()
    pos = model.vit.pos_embed
    assert pos.shape == (1, 16 * 16 + 1, 32)
    torch.testing.assert_close(pos[:, 0], state["vit.pos_embed"][:, 0])  # CLS position untouched
    # A smooth grid stays smooth: a linear ramp along x resamples to (close to) a linear ramp.
    ramp = torch.linspace(0, 1, 37).repeat(37, 1).reshape(1, 37 * 37, 1).expand(1, -1, 32)
    state["vit.pos_embed"] = torch.cat([torch.zeros(1, 1, 32), ramp], dim=1)
    ramped = channel_adapted_backbone(tiny_cfg(224), state, S2_L1C, "rgb_map")
    out = ramped.vit.pos_embed[0, 1:, 0].detach().reshape(16, 16)
    torch.testing.assert_close(out[5], torch.linspace(0, 1, 16), atol=0.05, rtol=0)
    with torch.no_grad():
        assert model(torch.rand(1, 13, 224, 224)).isfinite().all()


def test_same_grid_load_is_exact():
    model_a, state = rgb_model_and_state()
    model_b = channel_adapted_backbone(tiny_cfg(), state, RGB_BANDS, "random").eval()
    for key, value in state.items():
        torch.testing.assert_close(model_b.state_dict()[key], value, rtol=0, atol=0)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model_b(x), model_a(x), rtol=0, atol=0)


def test_checkpoint_with_wrong_layout_is_refused():
    _, state = rgb_model_and_state()
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    with pytest.raises(KeyError, match="our layout"):
        channel_adapted_backbone(tiny_cfg(), state, S2_L1C, "rgb_map")
    _, state = rgb_model_and_state()
    state["vit.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected.*vit.extra.weight"):
        channel_adapted_backbone(tiny_cfg(), state, S2_L1C, "rgb_map")


# -- SoftCon checkpoints -------------------------------------------------------------------------

def softcon_cfg(in_chans: int) -> BackboneConfig:
    return tiny_cfg(img_size=224, in_chans=in_chans)


def save_in_softcon_format(model, path) -> None:
    """The released files are plain state dicts of Meta's DINOv2 `DinoVisionTransformer` (block_chunks=0,
    img_size 224, so a 16x16+1 pos-embed): timm keys without our `vit.` prefix, plus `mask_token`."""
    meta = {k.removeprefix("vit."): v.clone() for k, v in model.state_dict().items()}
    torch.save(meta, path)


@pytest.mark.parametrize(("modality", "channels"), [("s2", 13), ("s1", 2)])
def test_softcon_checkpoint_loads_to_the_same_forward(tmp_path, modality, channels):
    torch.manual_seed(3)
    source = build_backbone(softcon_cfg(channels)).eval()
    with torch.no_grad():
        source.mask_token.normal_()
    path = tmp_path / f"B{channels}_vitt14_softcon.pth"
    save_in_softcon_format(source, path)
    state = load_softcon_checkpoint(path, modality)
    assert set(state) == set(source.state_dict())
    bands = S2_L1C if channels == 13 else ["VV", "VH"]
    model = channel_adapted_backbone(softcon_cfg(channels), state, bands, source_bands=bands).eval()
    x = torch.rand(2, channels, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    torch.testing.assert_close(model.mask_token, source.mask_token)


def test_softcon_checkpoint_of_the_wrong_modality_is_refused(tmp_path):
    source = build_backbone(softcon_cfg(2))
    path = tmp_path / "B2_vitt14_softcon.pth"
    save_in_softcon_format(source, path)
    with pytest.raises(ValueError, match="B2_vitt14_softcon.pth"):
        load_softcon_checkpoint(path, "s2")
    with pytest.raises(ValueError, match="modality"):
        load_softcon_checkpoint(path, "rgb")


def test_softcon_timm_layout_copy_loads_without_mask_token(tmp_path):
    """torchgeo's `*_softcon_enc.pth` copies are timm state dicts: no mask token, same tensors."""
    torch.manual_seed(4)
    source = build_backbone(softcon_cfg(13)).eval()
    path = tmp_path / "B13_vitt14_softcon_enc.pth"
    torch.save({k.removeprefix("vit."): v for k, v in source.state_dict().items() if k != "mask_token"}, path)
    state = load_softcon_checkpoint(path, "s2")
    assert torch.count_nonzero(state["mask_token"]) == 0
    model = channel_adapted_backbone(softcon_cfg(13), state, S2_L1C, source_bands=S2_L1C).eval()
    x = torch.rand(1, 13, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
