"""The one tile setting (tile px, target um/px) of a tiles folder, shared by every pathology command.

A folder of tiles holds one setting: extraction needs it (one encoder input per run), pretraining reads
every slide at it, and a rerun or a grown cohort must not switch it and strand the finished slides. So the
setting of a run comes from the flags (or config) where given, else from the tiles already in the folder,
else from the tiling defaults; a request that contradicts the folder is refused by name.

The tissue threshold (`--min-tissue`) follows the tiles the same way (the run's own slides first, then
the folder's), so slides added later (by fm-extract or fm-train tiling what is missing) are selected like
the ones there; a different threshold breaks nothing downstream, so asking for one is not refused: slides
already tiled keep theirs, and say so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import h5py

from fm.cli import UserError
from pathology.tiling import COORDS_NAME, tiling_defaults

Setting = tuple[int, float]  # (tile px, target um/px)


def coords_attrs(coords_path: Path) -> tuple[int, dict]:
    """(tile count, the attributes the setting checks need) of one coords.h5."""
    with h5py.File(coords_path, "r") as f:
        coords = f["coords"]  # only the attributes used here: reading all costs 3x as much
        return int(coords.shape[0]), {k: coords.attrs[k] for k in ("patch_size", "target_mpp", "slide_mpp")}


def setting_of(attrs: dict) -> Setting:
    return int(attrs["patch_size"]), float(attrs["target_mpp"])


def describe(setting: Setting) -> str:
    return f"{setting[0]} px at {setting[1]:g} um/px"


def folder_settings(tiles_dir: Path, by_slide: dict | None = None) -> Counter:
    """How many slides in `tiles_dir` were tiled at each setting (unreadable outputs are left out);
    `by_slide`, if given, receives slide id -> setting."""
    settings: Counter = Counter()
    for coords_path in Path(tiles_dir).glob(f"*/{COORDS_NAME}"):
        try:
            setting = setting_of(coords_attrs(coords_path)[1])
        except (OSError, KeyError):
            continue
        settings[setting] += 1
        if by_slide is not None:
            by_slide[coords_path.parent.name] = setting
    return settings


def _min_tissue_of(coords_path: Path) -> float | None:
    try:
        with h5py.File(coords_path, "r") as f:
            return float(f["coords"].attrs["min_tissue"])
    except (OSError, KeyError):
        return None


def _most_common(values: Iterable[float | None]) -> float | None:
    """The most frequent value; a tie goes to the stricter (larger) threshold, whatever the listing order."""
    counts = Counter(v for v in values if v is not None)
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def check_min_tissue(value: float, where: str = "--min-tissue") -> float:
    """`value` as a tissue fraction in [0, 1], or a one-line error naming `where`."""
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a tissue fraction between 0 and 1, got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{where} must be a tissue fraction between 0 and 1, got {value!r}")
    return fraction


def resolve_min_tissue(tiles_dir: Path, asked: float | None, slide_ids: Iterable[str] = (),
                       where: str = "--min-tissue") -> float:
    """The tissue threshold of a run: the one asked for; else the one most of the run's own slides
    (`slide_ids`) already in `tiles_dir` were tiled with, else most of the folder's (a folder may hold
    several cohorts), else the tiling default."""
    if asked is not None:
        return check_min_tissue(asked, where)
    tiles_dir = Path(tiles_dir)
    held = _most_common(_min_tissue_of(tiles_dir / sid / COORDS_NAME) for sid in slide_ids)
    if held is None:
        held = _most_common(_min_tissue_of(path) for path in tiles_dir.glob(f"*/{COORDS_NAME}"))
    return float(held if held is not None else tiling_defaults()["min_tissue"])


def resolve_setting(tiles_dir: Path, tile_px: int | None = None, target_mpp: float | None = None,
                    found: Iterable[Setting] = ()) -> tuple[Setting, str]:
    """(setting, where it comes from): the values given, completed from the most common setting of
    `found` (the run's own tiled slides) or else of the whole folder (a shard, or a batch of new slides,
    may hold no tiled slide itself while the folder does), else from the tiling defaults."""
    if tile_px is not None and target_mpp is not None:  # fully given: no need to read the folder
        return (int(tile_px), float(target_mpp)), f"--tile-px {tile_px:g} --target-mpp {target_mpp:g}"
    existing = Counter(found).most_common(1) or folder_settings(tiles_dir).most_common(1)
    if existing:
        base, source = existing[0][0], f"the tiles already in {tiles_dir}"
    else:
        defaults = tiling_defaults()
        base, source = (int(defaults["tile_px"]), float(defaults["target_mpp"])), "the tiling defaults"
    if tile_px is None and target_mpp is None:
        return base, source
    flags = " ".join(f"{f} {v:g}" for f, v in (("--tile-px", tile_px), ("--target-mpp", target_mpp)) if v is not None)
    return (int(tile_px if tile_px is not None else base[0]),
            float(target_mpp if target_mpp is not None else base[1])), flags


def refuse_other_setting(tiles_dir: Path, setting: Setting, asked_by: str, fix: str,
                         besides: Iterable[str] = ()) -> None:
    """Raise when slides of `tiles_dir` (other than those in `besides`, about to be re-tiled) hold another
    setting than `setting`; the message names them, so `--slides ... --overwrite` can fix just those."""
    by_slide: dict[str, Setting] = {}
    folder_settings(tiles_dir, by_slide)
    skip = set(besides)
    other = {sid: s for sid, s in by_slide.items() if s != setting and sid not in skip}
    if other:
        counts = Counter(other.values())
        held = ", ".join(f"{n} slide(s) at {describe(s)}" for s, n in sorted(counts.items()))
        names = ", ".join(sorted(other)[:5]) + (", ..." if len(other) > 5 else "")
        raise UserError(f"{tiles_dir} holds {held} ({names}), but {asked_by} asks for {describe(setting)}: one "
                        f"tiles folder holds one tile setting; {fix}")
