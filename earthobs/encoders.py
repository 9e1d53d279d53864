"""Earth-observation encoders for the `fm` registry, loaded through the `fm.encoders` entry point.

SoftCon's released ViTs (zhu-xlab/softcon; weights on Hugging Face `wangyi111/softcon`): DINOv2 ViT-S/14
and ViT-B/14 continued on SSL4EO-S12, 224 px, LayerScale 1e-5, no registers, for 13-band Sentinel-2
L1C or 2-band Sentinel-1 [VV, VH]. Their input is already scaled to [0, 1] by SoftCon's per-band
normalisation (`earthobs.normalize`, kind `softcon`), so the registry's mean/std are the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from earthobs.bands import S1_BANDS, S2_L1C_BANDS
from fm.backbones import BackboneConfig
from fm.registry import EncoderSpec, register_encoder

SOFTCON_HF_REPO = "wangyi111/softcon"
SOFTCON_LICENCE = (
    "no licence stated in zhu-xlab/softcon or on the weights' page when we read them; weights derive from "
    "DINOv2 (Apache-2.0) trained on SSL4EO-S12 - ask the authors before redistributing"
)
SOFTCON_PAPER = "Wang, Albrecht, Zhu, arXiv 2405.20462"


@dataclass(frozen=True)
class EOEncoderInfo:
    """What the registry's EncoderSpec has no field for: the input bands (in order), the scaling kind
    and the statistics table of `earthobs.normalize`, and the modality key."""

    bands: tuple[str, ...]
    modality: str
    norm_kind: str
    norm_stats: str
    filenames: tuple[str, ...] = ()  # the registry spec's weights file names


EO_ENCODERS: dict[str, EOEncoderInfo] = {}

_MODALITIES = {
    # modality: (file prefix, bands, statistics table, description)
    "s2": ("B13", S2_L1C_BANDS, "ssl4eo_s12_l1c", "Sentinel-2 L1C, 13 bands B01..B08 B8A B09 B10 B11 B12"),
    "s1": ("B2", S1_BANDS, "ssl4eo_s12_s1", "Sentinel-1 GRD dB, 2 bands [VV, VH] (not torchgeo's [VH, VV])"),
}
_SIZES = {"vits14": "vits", "vitb14": "vitb"}


def _register_softcon() -> None:
    for model, arch in _SIZES.items():
        for modality, (prefix, bands, stats, description) in _MODALITIES.items():
            name = f"earthobs/softcon-{model}-{modality}"
            stem = f"{prefix}_{model}_softcon"
            filenames = (f"{stem}.pth", f"{stem}_enc.pth")
            register_encoder(EncoderSpec(
                name=name,
                backbone=BackboneConfig(arch=arch, patch_size=14, img_size=224, in_chans=len(bands),
                                        num_registers=0, layerscale_init=1e-5, drop_path_rate=0.0),
                weights_format="dinov2-meta",
                filenames=list(filenames),
                hf_repo=SOFTCON_HF_REPO,
                url=f"https://huggingface.co/{SOFTCON_HF_REPO}/resolve/main/{stem}.pth",
                mean=(0.0,) * len(bands),
                std=(1.0,) * len(bands),
                licence=SOFTCON_LICENCE,
                feature="cls",
                notes=(f"SoftCon {model} ({SOFTCON_PAPER}); input: {description}, each band scaled by "
                       f"earthobs.normalize kind 'softcon' ((x - (mu - 2 sigma)) / (4 sigma), clipped to "
                       f"[0, 1]) with '{stats}' statistics"
                       + ("; S1 first clipped to 1-99 % quantiles" if modality == "s1" else
                          "; BigEarthNet (12 bands) gets a zero B10 after B09 (earthobs.bands.to_13_bands)")
                       + f"; {stem}_enc.pth is torchgeo's timm-layout copy"),
            ))
            EO_ENCODERS[name] = EOEncoderInfo(bands=tuple(bands), modality=modality, norm_kind="softcon",
                                              norm_stats=stats, filenames=filenames)


def encoder_bands(name: str) -> tuple[str, ...]:
    """Input bands, in order, of a registered EO encoder."""
    if name not in EO_ENCODERS:
        raise KeyError(f"{name!r} is not an earth-observation encoder; known: {sorted(EO_ENCODERS)}")
    return EO_ENCODERS[name].bands


def eo_encoder_for_file(path: str | os.PathLike) -> str | None:
    """The registered EO encoder whose weights file has this file name (`B13_vits14_softcon.pth` ...):
    a local copy passed as --encoder PATH gets that entry's bands and scaling."""
    name = Path(path).name
    return next((n for n, info in EO_ENCODERS.items() if name in info.filenames), None)


_register_softcon()
