"""Sentinel-1/2 band specifications and band-order conversions.

Band order is the single most common silent bug in EO pipelines (torchgeo's BigEarthNet returns
Sentinel-1 as [VH, VV] because it sorts file names; EuroSAT-MS stores B8A last), so every array in
fm-suite travels with an explicit tuple of canonical band names and is reordered by name, never by
position.

Canonical names: Sentinel-2 `B01`..`B12` zero-padded plus `B8A`; Sentinel-1 `VV`, `VH`.

Orders used here:
- S2 L1C (13 bands, the SoftCon / SSL4EO-S12 `s2c` order): B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B10
  B11 B12 - spectral order, B8A between B08 and B09.
- S2 L2A (12 bands, SSL4EO-S12 `s2a`, and BigEarthNet v1/v2 which ship one file per band without
  B10): the L1C order without B10, i.e. B01 .. B08 B8A B09 B11 B12. This is also torchgeo's BigEarthNet
  order (it sorts B8A as "B08A"). `to_13_bands` inserts the zero B10 after B09, as SoftCon does.
- S1: [VV, VH].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BandInfo:
    """One band: canonical name, native ground sampling distance (m), centre wavelength (nm)."""

    name: str
    gsd_m: float
    center_nm: float | None


# Sentinel-2A MSI centre wavelengths (ESA Sentinel-2 User Handbook / spectral response functions).
S2_BAND_INFO: dict[str, BandInfo] = {
    b.name: b
    for b in (
        BandInfo("B01", 60, 442.7),
        BandInfo("B02", 10, 492.4),
        BandInfo("B03", 10, 559.8),
        BandInfo("B04", 10, 664.6),
        BandInfo("B05", 20, 704.1),
        BandInfo("B06", 20, 740.5),
        BandInfo("B07", 20, 782.8),
        BandInfo("B08", 10, 832.8),
        BandInfo("B8A", 20, 864.7),
        BandInfo("B09", 60, 945.1),
        BandInfo("B10", 60, 1373.5),
        BandInfo("B11", 20, 1613.7),
        BandInfo("B12", 20, 2202.4),
    )
}
# C-band SAR (5.405 GHz, ~55.5 mm); both polarisations on the 10 m GRD grid.
S1_BAND_INFO: dict[str, BandInfo] = {"VV": BandInfo("VV", 10, 5.55e7), "VH": BandInfo("VH", 10, 5.55e7)}
BAND_INFO: dict[str, BandInfo] = {**S2_BAND_INFO, **S1_BAND_INFO}

S2_L1C_BANDS: tuple[str, ...] = tuple(S2_BAND_INFO)
S2_L2A_BANDS: tuple[str, ...] = tuple(b for b in S2_L1C_BANDS if b != "B10")
BIGEARTHNET_S2_BANDS: tuple[str, ...] = S2_L2A_BANDS
S1_BANDS: tuple[str, ...] = ("VV", "VH")
# Order of the 13 bands inside each EuroSAT-MS GeoTIFF (B8A stored last; torchgeo `EuroSAT.all_band_names`).
EUROSAT_FILE_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)  # fmt: skip

SENSOR_BANDS: dict[str, tuple[str, ...]] = {
    "s2_l1c": S2_L1C_BANDS,
    "s2_l2a": S2_L2A_BANDS,
    "s1": S1_BANDS,
}


def canonical_band(name: str) -> str:
    """'B1'/'b01' -> 'B01', 'b8a' -> 'B8A', 'vv' -> 'VV'; raise on names that are not S1/S2 bands."""
    n = name.strip().upper()
    if n.startswith("B") and n[1:].isdigit():
        n = f"B{int(n[1:]):02d}"
    elif n in ("B8A", "B08A"):
        n = "B8A"
    if n not in BAND_INFO:
        raise ValueError(f"unknown band name {name!r}; expected one of {list(BAND_INFO)}")
    return n


def canonical_bands(names: Sequence[str] | str) -> tuple[str, ...]:
    """Canonical tuple from a sequence of names or a sensor key ('s2_l1c', 's2_l2a', 's1')."""
    if isinstance(names, str):
        if names not in SENSOR_BANDS:
            raise ValueError(f"unknown band set {names!r}; expected one of {list(SENSOR_BANDS)}")
        return SENSOR_BANDS[names]
    out = tuple(canonical_band(n) for n in names)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate bands in {list(names)}")
    return out


def short_band_name(band: str) -> str:
    """SSL4EO-S12 file stem for a band: 'B01' -> 'B1', 'B8A' -> 'B8A', 'VV' -> 'VV'."""
    band = canonical_band(band)
    return f"B{int(band[1:])}" if band.startswith("B") and band[1:].isdigit() else band


def band_indices(have: Sequence[str], want: Sequence[str]) -> list[int]:
    """Positions in `have` of each band of `want`; raise naming the missing bands."""
    have_c, want_c = canonical_bands(list(have)), canonical_bands(list(want))
    missing = [b for b in want_c if b not in have_c]
    if missing:
        raise ValueError(f"bands {missing} are not in the input bands {list(have_c)}")
    return [have_c.index(b) for b in want_c]


def select_bands(x, have: Sequence[str], want: Sequence[str]):
    """Pick `want` out of an array/tensor whose channel axis (-3) holds `have`, in `want`'s order."""
    idx = band_indices(have, want)
    if x.shape[-3] != len(have):
        raise ValueError(f"array has {x.shape[-3]} channels but {len(have)} bands were named: {list(have)}")
    if isinstance(x, torch.Tensor):
        return x.index_select(-3, torch.as_tensor(idx, device=x.device))
    return np.take(x, idx, axis=-3)


def to_band_order(x, have: Sequence[str], want: Sequence[str], fill: float = 0.0, allow_missing=()):
    """Reorder channels (axis -3) from `have` to `want`; bands in `allow_missing` absent from `have`
    become constant `fill` planes, any other missing band is an error."""
    have_c, want_c = canonical_bands(list(have)), canonical_bands(list(want))
    if x.shape[-3] != len(have_c):
        raise ValueError(f"array has {x.shape[-3]} channels but {len(have_c)} bands were named: {list(have_c)}")
    allowed = set(canonical_bands(list(allow_missing))) if allow_missing else set()
    missing = [b for b in want_c if b not in have_c and b not in allowed]
    if missing:
        raise ValueError(f"bands {missing} are needed but the input only has {list(have_c)}")
    planes = []
    for b in want_c:
        if b in have_c:
            i = have_c.index(b)
            planes.append(x[..., i : i + 1, :, :])
        elif isinstance(x, torch.Tensor):
            planes.append(torch.full_like(x[..., :1, :, :], fill))
        else:
            planes.append(np.full_like(x[..., :1, :, :], fill))
    return torch.cat(planes, dim=-3) if isinstance(x, torch.Tensor) else np.concatenate(planes, axis=-3)


def to_13_bands(x, bands: Sequence[str], fill: float = 0.0):
    """13-band S2 L1C order for 13-band encoders: a constant (zero) B10 goes after B09 when absent.

    Apply it after normalisation (SoftCon inserts the zero band into the already scaled BigEarthNet
    input), so the inserted plane stays exactly `fill`.
    """
    return to_band_order(x, bands, S2_L1C_BANDS, fill=fill, allow_missing=("B10",))
