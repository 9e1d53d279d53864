"""The work of `fm-prepare earthobs <dataset>`: which data set a name means, our class for it, and one
split packed into `<out_dir>/<dataset>/<sensor>/<split>` (the cache fm-train and fm-eval read)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from earthobs.cache_request import cache_diffs, file_sha256, movable_keys, refuse
from earthobs.choices import DATASETS
from earthobs.packed import IdSubset, pack_split

log = logging.getLogger(__name__)

SKIPS_SHOWN = 5  # skipped samples fm-prepare prints; meta.json lists them all


def resolve_dataset_name(dataset_name: str, root: str | os.PathLike | None, version: str = "auto") -> str:
    """The data set a name means, as fm-prepare, fm-train and fm-eval all read it (so they find one
    another's caches): `bigearthnet` is bigearthnet-v2 when `root` holds metadata.parquet (reBEN), else
    bigearthnet-v1, unless `version` (v1 / v2) says which."""
    name = dataset_name.lower()
    if name not in DATASETS:
        raise ValueError(f"unknown EO data set {dataset_name!r}; expected one of {DATASETS}")
    if name != "bigearthnet":
        return name
    if version == "auto":
        if root is None:
            raise ValueError("--root is required: the BigEarthNet folder (v1 patches, or v2 with metadata.parquet)")
        version = "v2" if (Path(root).expanduser() / "metadata.parquet").is_file() else "v1"
    if version not in ("v1", "v2"):
        raise ValueError(f"BigEarthNet version must be auto, v1 or v2, got {version!r}")
    return f"bigearthnet-{version}"


def build_dataset(dataset_name: str, root: str | os.PathLike | None, split: str | None = "train",
                  sensor: str = "s2", **kwargs) -> Dataset:
    """Our data set class for `dataset_name` (one of DATASETS; `bigearthnet` by `resolve_dataset_name`).
    `sensor`: s2 / s1 / s1s2 for BigEarthNet; s2c / s2a / s1 (s2 = s2c) for SSL4EO-S12; ignored for
    EuroSAT. For "demo", `root` is the cache dir of the generated scenes (default $FM_CACHE_DIR); `n` and
    `demo_seed` choose them. `kwargs` go to the data set (e.g. nan_policy, labels)."""
    name = resolve_dataset_name(dataset_name, root)
    if name == "bigearthnet-v1":
        from earthobs.bigearthnet import BigEarthNetV1

        return BigEarthNetV1(root, split=split, sensor=sensor, **kwargs)
    if name == "bigearthnet-v2":
        from earthobs.bigearthnet import BigEarthNetV2

        return BigEarthNetV2(root, split=split, sensor=sensor, **kwargs)
    if name == "eurosat":
        from earthobs.eurosat import EuroSAT

        return EuroSAT(root, split=split, **kwargs)
    if name == "ssl4eo-s12":
        from earthobs.ssl4eo import SSL4EOS12

        return SSL4EOS12(root, modality={"s2": "s2c"}.get(sensor, sensor), **kwargs)
    from earthobs.bigearthnet import BigEarthNetV1  # demo
    from earthobs.demo_scenes import demo_bigearthnet

    demo = {"n": kwargs.pop("n", 150), "seed": kwargs.pop("demo_seed", 0)}
    return BigEarthNetV1(demo_bigearthnet(cache_dir=root, **demo), split=split, sensor=sensor, **kwargs)


def _absolute(path: str | os.PathLike | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path is not None else None


def _warn_of_old_cache(old: Path, out: Path) -> None:
    """fm-prepare once stored `bigearthnet` under that name, where fm-train and fm-eval never looked; say
    so before packing again (hours on the full set) rather than leave a cache unused without a word."""
    if old != out and (old / "meta.json").is_file() and not (out / "meta.json").is_file():
        log.warning("a cache packed by an older fm-prepare is at %s but is read from %s: packing anew; to reuse "
                    "it instead, stop now and move it there (mkdir -p %s && mv %s %s)", old, out, out.parent, old, out)


def cache_summary(path: Path, reused: bool) -> list[str]:
    """What fm-prepare says of the cache at `path`: the samples it skipped and why when just packed; when
    `reused`, one line, since its skip reasons are those of the packing run, not of the data as it is now
    (a patch fixed since then is still skipped until --overwrite repacks)."""
    meta, where = json.loads((path / "meta.json").read_text()), path / "meta.json"
    skipped = meta.get("skipped", [])
    if reused:
        created = str(meta.get("created", "")).replace("T", " ")
        return [f"reusing the cache packed{f' on {created}' if created else ''} at {path}: {meta['n']} samples, "
                f"{len(skipped)} skipped when it was packed (reasons in {where}); --overwrite repacks"]
    lines = [f"packed {meta['n']} samples ({len(skipped)} skipped) into {path}"]
    lines += [f"  skipped {item['id']}: {item['error']}" for item in skipped[:SKIPS_SHOWN]]
    if skipped:
        more = f"{len(skipped) - SKIPS_SHOWN} more; " if len(skipped) > SKIPS_SHOWN else ""
        lines.append(f"  ({more}every skipped sample and why: \"skipped\" in {where})")
    return lines


def prepare(dataset_name: str, root: str | os.PathLike | None, out_dir: str | os.PathLike,
            split: str | None = "train", sensor: str = "s2", dtype: str | None = None,
            fraction: float | None = None, seed: int = 0, num_workers: int = 0, overwrite: bool = False,
            nan_policy: str = "raise", say: Callable[[str], None] | None = None, **dataset_kwargs) -> Path:
    """Pack one split into `<out_dir>/<dataset>/<sensor>/<split>[-<pct>pct-seed<seed>]` and return it
    (`<dataset>` as `resolve_dataset_name` reads it: bigearthnet-v1 or -v2 for `bigearthnet`).

    With `fraction` (e.g. 0.1 for BigEarthNet-10 %), the deterministic subset list is saved first as
    `<out_dir>/<dataset>/<split>-<pct>pct-seed<seed>.txt` (shared by all sensors) and only those
    samples are packed. An existing cache of another request is refused (see `packed._reuse_cache`), a
    damaged one too (`cache_request.open_cache`). `say` (e.g. print) gets the `cache_summary` lines.
    """
    from earthobs.bigearthnet import training_subset

    name = resolve_dataset_name(dataset_name, root)
    base, split_name = Path(out_dir) / name, split or "all"
    source = {"name": name, "root": _absolute(root), "split": split, "sensor": sensor, "nan_policy": nan_policy}
    if "labels" in dataset_kwargs:
        source["labels"] = _absolute(dataset_kwargs["labels"])
        if Path(source["labels"]).is_file():  # so that a labels file moved with its data is recognised
            source["labels_sha256"] = file_sha256(source["labels"])
    if fraction is not None:
        split_name = f"{split_name}-{fraction * 100:g}pct-seed{seed}"
        source.update(fraction=fraction, seed=seed)
    out = base / sensor / split_name
    reused = (out / "meta.json").is_file() and not overwrite
    if reused:  # refuse before reading the data or its subset list,
        diffs = cache_diffs(out, dtype, source)  # unless only the data moved: pack_split compares it
        if set(diffs) - movable_keys(out, source):
            refuse(out, diffs)
    _warn_of_old_cache(Path(out_dir) / dataset_name.lower() / sensor / split_name, out)
    dataset = build_dataset(name, root, split=split, sensor=sensor, nan_policy=nan_policy, **dataset_kwargs)
    if fraction is not None:
        subset_file = base / f"{split_name}.txt"
        dataset = IdSubset(dataset, training_subset(dataset.ids, fraction=fraction, seed=seed, path=subset_file))
        source["subset_file"] = str(subset_file)
    out = pack_split(dataset, out, dtype=dtype, num_workers=num_workers, overwrite=overwrite, source=source)
    if say is not None:
        for line in cache_summary(out, reused):
            say(line)
    return out
