"""The one tile setting (tile px, target um/px) of a tiles folder, shared by every pathology command.

A folder of tiles holds one setting: extraction needs it (one encoder input per run), pretraining reads
every slide at it, and a rerun or a grown cohort must not switch it and strand the finished slides. So the
setting of a run comes from the flags (or config) where given, else from the tiles already in the folder,
else from the tiling defaults; a request that contradicts the folder is refused by name.
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


def folder_settings(tiles_dir: Path) -> Counter:
    """How many slides in `tiles_dir` were tiled at each setting (unreadable outputs are left out)."""
    settings: Counter = Counter()
    for coords_path in Path(tiles_dir).glob(f"*/{COORDS_NAME}"):
        try:
            settings[setting_of(coords_attrs(coords_path)[1])] += 1
        except (OSError, KeyError):
            continue
    return settings


def resolve_setting(tiles_dir: Path, tile_px: int | None = None, target_mpp: float | None = None,
                    found: Iterable[Setting] = ()) -> tuple[Setting, str]:
    """(setting, where it comes from): the values given, completed from the most common setting of
    `found` (the run's own tiled slides) or else of the whole folder (a shard, or a batch of new slides,
    may hold no tiled slide itself while the folder does), else from the tiling defaults."""
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


def refuse_other_setting(tiles_dir: Path, setting: Setting, asked_by: str, fix: str) -> None:
    """Raise when `tiles_dir` already holds slides tiled at another setting than `setting`."""
    other = {s: n for s, n in folder_settings(tiles_dir).items() if s != setting}
    if other:
        held = ", ".join(f"{n} slide(s) at {describe(s)}" for s, n in sorted(other.items()))
        raise UserError(f"{tiles_dir} holds {held}, but {asked_by} asks for {describe(setting)}: one tiles "
                        f"folder holds one tile setting; {fix}")
