"""Per-encoder input normalisation for Sentinel-1/2 data.

Readers and the packed cache keep raw sensor values (S2 digital numbers = reflectance x 10,000, S1
backscatter in dB); normalisation is a separate, explicit step chosen per encoder, because encoders
were pretrained with different scalings and a mismatch silently costs accuracy.

`softcon` is the SoftCon / SSL4EO-S12 authors' scaling: per band `(x - (mu - 2 sigma)) / (4 sigma)`
clipped to [0, 1] (their code maps the same interval to uint8 0..255; zhu-xlab/SSL4EO-S12 README says
the released models take input "clip to [0,1]"). For Sentinel-1 each band is first clipped to its 1 %
and 99 % quantiles. Whether the authors take those quantiles per image or over the data set is not
published; we take them **per image and per band** (computable in a DataLoader worker without a
pass over the data set, and robust to single bright scatterers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from earthobs.bands import S1_BANDS, canonical_bands, to_13_bands, to_band_order

# ---- published band statistics (raw units: S2 DN = reflectance x 1e4, S1 dB) -------------------------
# zhu-xlab/SSL4EO-S12 src/benchmark/pretrain_ssl/datasets/SSL4EO/ssl4eo_dataset.py (commit 1dc0c83),
# "calculated from 50k data": S2C = L1C (13 bands), S2A = L2A (12 bands), S1 = GRD dB [VV, VH].
_L1C = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_L2A = tuple(b for b in _L1C if b != "B10")


def _table(bands: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> dict[str, tuple[float, float]]:
    assert len(bands) == len(mean) == len(std)
    return {b: (float(m), float(s)) for b, m, s in zip(bands, mean, std)}


BAND_STATS: dict[str, dict[str, tuple[float, float]]] = {
    "ssl4eo_s12_l1c": _table(
        _L1C,
        [1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991, 2091.74883118,
         2371.7172463, 2299.90463006, 2560.29504086, 830.06605044, 22.10351321, 2177.07172323,
         1524.06546312],
        [786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652, 1161.59187054,
         1274.39184232, 1248.42891965, 1345.52684884, 577.31607053, 51.15431158, 1336.09932639,
         1136.53823676],
    ),
    "ssl4eo_s12_l2a": _table(
        _L2A,
        [752.40087073, 884.29673756, 1144.16202635, 1297.47289228, 1624.90992062, 2194.6423161,
         2422.21248945, 2517.76053101, 2581.64687018, 2645.51888987, 2368.51236873, 1805.06846033],
        [1108.02887453, 1155.15170768, 1183.6292542, 1368.11351514, 1370.265037, 1355.55390699,
         1416.51487101, 1474.78900051, 1439.3086061, 1582.28010962, 1455.52084939, 1343.48379601],
    ),
    "ssl4eo_s12_s1": _table(S1_BANDS, [-12.54847273, -20.19237134], [5.25697717, 5.91150917]),
    # BigEarthNet v1 S2 (L2A) statistics from TU Berlin's bigearthnet-models-tf, as used by the SoftCon
    # authors' BigEarthNet loader: zhu-xlab/SSL4EO-S12 src/benchmark/transfer_classification/datasets/
    # BigEarthNet/bigearthnet_dataset_seco.py. No B10 (BigEarthNet has none).
    "bigearthnet_s2": _table(
        _L2A,
        [340.76769064, 429.9430203, 614.21682446, 590.23569706, 950.68368468, 1792.46290469,
         2075.46795189, 2218.94553375, 2266.46036911, 2246.0605464, 1594.42694882, 1009.32729131],
        [554.81258967, 572.41639287, 582.87945694, 675.88746967, 729.89827633, 1096.01480586,
         1273.45393088, 1365.45589904, 1356.13789355, 1302.3292881, 1079.19066363, 818.86747235],
    ),
    # BigEarthNet-S1 v1 [VV, VH] dB statistics: kai-tub/bigearthnet_common constants (BAND_STATS_S1).
    # The SoftCon authors' S1 BigEarthNet statistics are not published; these are the closest public ones.
    "bigearthnet_s1": _table(S1_BANDS, [-12.619993741972035, -19.29044597721542], [5.115911777546365, 5.464428464912864]),
    # EuroSAT-MS (L1C, 13 bands): zhu-xlab/SSL4EO-S12 src/benchmark/transfer_classification/datasets/
    # EuroSat/eurosat_dataset.py. The file labels them "SSL4EO stats" but the values are EuroSAT's own.
    "eurosat_ms": _table(
        _L1C,
        [1353.72696296, 1117.20222222, 1041.8842963, 946.554, 1199.18896296, 2003.00696296, 2374.00874074,
         2301.22014815, 2599.78311111, 732.18207407, 12.09952894, 1820.69659259, 1118.20259259],
        [897.27143653, 736.01759721, 684.77615743, 620.02902871, 791.86263829, 1341.28018273,
         1595.39989386, 1545.52915718, 1750.12066835, 475.11595216, 98.26600935, 1216.48651476,
         736.6981037],
    ),
}  # fmt: skip

KINDS = ("softcon", "zscore", "minmax")
S1_CLIP_QUANTILES = (0.01, 0.99)


@dataclass(frozen=True)
class NormSpec:
    """How raw values become encoder input. `mean`/`std` drive `softcon` and `zscore`; `low`/`high`
    drive `minmax` (`(x - low) / (high - low)` clipped to [0, 1]). Tuples are in `bands` order."""

    kind: str
    bands: tuple[str, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    clip_quantiles: tuple[float, float] | None = None
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown normalisation kind {self.kind!r}; expected one of {KINDS}")
        object.__setattr__(self, "bands", canonical_bands(list(self.bands)))
        n = len(self.bands)
        pairs = (("low", "high") if self.kind == "minmax" else ("mean", "std"))
        for field_name in pairs:
            values = tuple(float(v) for v in getattr(self, field_name))
            if len(values) != n:
                raise ValueError(f"NormSpec {field_name} has {len(values)} values for {n} bands {self.bands}")
            object.__setattr__(self, field_name, values)
        if self.kind != "minmax" and any(s <= 0 for s in self.std):
            raise ValueError(f"NormSpec std must be > 0, got {self.std}")
        if self.clip_quantiles is not None:
            q0, q1 = self.clip_quantiles
            if not 0.0 <= q0 < q1 <= 1.0:
                raise ValueError(f"clip_quantiles must satisfy 0 <= q0 < q1 <= 1, got {self.clip_quantiles}")

    def __call__(self, x):
        return self.apply(x)

    def apply(self, x):
        """Normalise a (C,H,W) or (B,C,H,W) numpy array or tensor; returns float32 of the same kind."""
        if x.ndim not in (3, 4) or x.shape[-3] != len(self.bands):
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the {len(self.bands)} bands "
                f"{list(self.bands)} this normalisation expects (source: {self.source or self.kind})"
            )
        if isinstance(x, torch.Tensor):
            return self._apply_torch(x.float())
        return self._apply_numpy(np.asarray(x, dtype=np.float32))

    def _coeffs(self) -> tuple[np.ndarray, np.ndarray]:
        """Affine (offset, scale) so that y = (x - offset) / scale."""
        if self.kind == "minmax":
            lo, hi = np.asarray(self.low), np.asarray(self.high)
            return lo, hi - lo
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        if self.kind == "softcon":
            return mean - 2.0 * std, 4.0 * std
        return mean, std

    def _apply_numpy(self, x: np.ndarray) -> np.ndarray:
        if self.clip_quantiles is not None:
            q = np.quantile(x, self.clip_quantiles, axis=(-2, -1)).astype(np.float32)  # (2, ..., C)
            x = np.clip(x, q[0][..., None, None], q[1][..., None, None])
        offset, scale = (c.astype(np.float32)[:, None, None] for c in self._coeffs())
        y = (x - offset) / scale
        return np.clip(y, 0.0, 1.0) if self.kind != "zscore" else y

    def _apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip_quantiles is not None:
            flat = x.flatten(-2)
            q = torch.quantile(flat, torch.tensor(self.clip_quantiles, dtype=x.dtype, device=x.device), dim=-1)
            x = torch.maximum(torch.minimum(x, q[1][..., None, None]), q[0][..., None, None])
        offset, scale = (torch.as_tensor(c, dtype=x.dtype, device=x.device)[:, None, None] for c in self._coeffs())
        y = (x - offset) / scale
        return y.clamp(0.0, 1.0) if self.kind != "zscore" else y


def stats_spec(kind: str, stats: str | Mapping[str, tuple[float, float]], bands: Sequence[str],
               clip_quantiles: tuple[float, float] | None = None) -> NormSpec:
    """NormSpec for `bands` from a named table of `BAND_STATS` (or a band -> (mean, std) mapping)."""
    table = BAND_STATS[stats] if isinstance(stats, str) else stats
    bands = canonical_bands(list(bands))
    missing = [b for b in bands if b not in table]
    if missing:
        raise ValueError(f"statistics {stats if isinstance(stats, str) else '<mapping>'} have no values "
                         f"for bands {missing}; insert such bands after normalisation (see to_13_bands)")
    return NormSpec(kind=kind, bands=bands, mean=tuple(table[b][0] for b in bands),
                    std=tuple(table[b][1] for b in bands), clip_quantiles=clip_quantiles,
                    source=stats if isinstance(stats, str) else "custom")


@dataclass(frozen=True)
class EncoderNorm:
    """Which scaling an encoder family was pretrained with, and its pretraining statistics per modality."""

    kind: str
    pretrain_stats: dict[str, str]
    s1_clip_quantiles: tuple[float, float] | None = S1_CLIP_QUANTILES


# Encoder-name prefixes -> scaling. Our own EO checkpoints continue SoftCon, so they share its scaling.
ENCODER_NORMS: dict[str, EncoderNorm] = {
    "softcon": EncoderNorm("softcon", {"s2": "ssl4eo_s12_l1c", "s1": "ssl4eo_s12_s1"}),
    "fm-earthobs": EncoderNorm("softcon", {"s2": "ssl4eo_s12_l1c", "s1": "ssl4eo_s12_s1"}),
    "ssl4eo": EncoderNorm("softcon", {"s2": "ssl4eo_s12_l1c", "s1": "ssl4eo_s12_s1"}),
    "zscore": EncoderNorm("zscore", {"s2": "ssl4eo_s12_l1c", "s1": "ssl4eo_s12_s1"}, s1_clip_quantiles=None),
}
DEFAULT_ENCODER_NORM = ENCODER_NORMS["softcon"]

# Data-set statistics the authors normalise each evaluation set with (see BAND_STATS comments).
# BigEarthNet v2 has no published statistics; the v1 values are used (same sensor, same processing).
DATASET_STATS: dict[str, dict[str, str]] = {
    "bigearthnet": {"s2": "bigearthnet_s2", "s1": "bigearthnet_s1"},
    "bigearthnet-v1": {"s2": "bigearthnet_s2", "s1": "bigearthnet_s1"},
    "bigearthnet-v2": {"s2": "bigearthnet_s2", "s1": "bigearthnet_s1"},
    "eurosat": {"s2": "eurosat_ms"},
    "ssl4eo-s12": {"s2": "ssl4eo_s12_l1c", "s1": "ssl4eo_s12_s1"},
    "ssl4eo-s12-l2a": {"s2": "ssl4eo_s12_l2a", "s1": "ssl4eo_s12_s1"},
    "demo": {"s2": "bigearthnet_s2", "s1": "bigearthnet_s1"},  # demo scenes imitate BigEarthNet L2A
}


def encoder_norm(encoder_name: str) -> EncoderNorm:
    """Scaling of an encoder, by name prefix after any registry namespace ('earthobs/softcon-vits14-s2')."""
    name = encoder_name.lower().replace("_", "-").rsplit("/", 1)[-1]
    for prefix, norm in ENCODER_NORMS.items():
        if name.startswith(prefix):
            return norm
    return DEFAULT_ENCODER_NORM


def norm_spec_for(encoder_name: str, bands: Sequence[str], dataset: str | None = None) -> NormSpec:
    """NormSpec for feeding `bands` of `dataset` to `encoder_name`.

    Scaling kind comes from the encoder family (default: SoftCon's); statistics from the data set when
    known (as the SoftCon authors evaluate), else from the encoder's pretraining data. Sentinel-1 input
    gets the 1-99 % quantile clip under the SoftCon scaling.
    """
    bands = canonical_bands(list(bands))
    is_s1 = set(bands) <= set(S1_BANDS)
    if not is_s1 and set(bands) & set(S1_BANDS):
        raise ValueError(f"normalise S1 and S2 bands separately, got {list(bands)}")
    modality = "s1" if is_s1 else "s2"
    enc = encoder_norm(encoder_name)
    table = None
    if dataset is not None:
        table = DATASET_STATS.get(dataset.lower(), {}).get(modality)
    table = table or enc.pretrain_stats[modality]
    clip = enc.s1_clip_quantiles if is_s1 else None
    return stats_spec(enc.kind, table, bands, clip_quantiles=clip)


class EncoderInput:
    """Sample transform: normalise `sample[key]` with `spec`, then (optionally) reorder to `out_bands`
    filling absent bands (B10) with zeros - the order SoftCon uses for BigEarthNet."""

    def __init__(self, spec: NormSpec, out_bands: Sequence[str] | None = None, key: str = "image"):
        self.spec, self.key = spec, key
        self.out_bands = canonical_bands(list(out_bands)) if out_bands is not None else None

    def __call__(self, sample: dict) -> dict:
        x = self.spec.apply(sample[self.key])
        if self.out_bands is not None and self.out_bands != self.spec.bands:
            if len(self.out_bands) == 13 and "B10" not in self.spec.bands:
                x = to_13_bands(x, self.spec.bands)
            else:
                x = to_band_order(x, self.spec.bands, self.out_bands)
        return {**sample, self.key: x}


def with_bands(spec: NormSpec, bands: Sequence[str]) -> NormSpec:
    """The same normalisation restricted/reordered to `bands` (all must be in `spec.bands`)."""
    bands = canonical_bands(list(bands))
    missing = [b for b in bands if b not in spec.bands]
    if missing:
        raise ValueError(f"bands {missing} are not covered by this normalisation ({list(spec.bands)})")
    idx = [spec.bands.index(b) for b in bands]

    def pick(values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(values[i] for i in idx) if values else ()

    return replace(spec, bands=bands, mean=pick(spec.mean), std=pick(spec.std), low=pick(spec.low), high=pick(spec.high))
