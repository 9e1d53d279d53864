"""SoftCon registry entries: architecture, bands and file names fit the released checkpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from earthobs.bands import S1_BANDS, S2_L1C_BANDS
from earthobs.encoders import EO_ENCODERS, encoder_bands
from fm.backbones import build_backbone
from fm.registry import get_encoder_spec, load_encoder

NAMES = [f"earthobs/softcon-{m}-{s}" for m in ("vits14", "vitb14") for s in ("s2", "s1")]


@pytest.mark.parametrize("name", NAMES)
def test_spec_matches_the_released_architecture(name):
    spec = get_encoder_spec(name)
    bands = S2_L1C_BANDS if name.endswith("s2") else S1_BANDS
    assert encoder_bands(name) == bands
    assert spec.backbone.in_chans == len(bands) == len(spec.mean) == len(spec.std)
    assert (spec.backbone.patch_size, spec.backbone.img_size, spec.backbone.num_registers) == (14, 224, 0)
    assert spec.backbone.layerscale_init == 1e-5
    prefix = "B13" if name.endswith("s2") else "B2"
    assert spec.filenames[0] == f"{prefix}_{name.split('-')[1]}_softcon.pth"
    dim = {"vits14": 384, "vitb14": 768}[name.split("-")[1]]
    assert spec.backbone.resolved()["embed_dim"] == dim
    assert EO_ENCODERS[name].norm_kind == "softcon"


def test_registered_encoder_loads_a_file_in_softcon_format(tmp_path):
    """A ViT-S/14 S1 file laid out as the release (Meta keys, 16x16+1 pos-embed, mask token) loads by
    name through the registry and gives the source model's output (one block only, to stay fast)."""
    spec = get_encoder_spec("earthobs/softcon-vits14-s1")
    torch.manual_seed(0)
    source = build_backbone(replace(spec.backbone, depth=1)).eval()
    assert source.vit.pos_embed.shape == (1, 16 * 16 + 1, 384)
    path = tmp_path / spec.filenames[0]
    torch.save({k.removeprefix("vit."): v for k, v in source.state_dict().items()}, path)
    loaded = load_encoder("earthobs/softcon-vits14-s1", weights=tmp_path, depth=1)
    x = torch.rand(1, 2, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(x), source(x), rtol=0, atol=0)


def test_unknown_eo_encoder_is_named():
    with pytest.raises(KeyError, match="dinov2/vits14"):
        encoder_bands("dinov2/vits14")
