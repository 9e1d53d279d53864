"""Feature extraction speed end to end (slide decode -> features on disk) against the encoder's forward
pass alone on random tiles, both measured in the same run with the same encoder object, plus memory.

    python bench/extract.py                                   # CPU: tiny ViT (vitt/16) on the fixture slide
    python bench/extract.py --device cuda --arch vitl14 --bf16 --compile --workers 14
    python bench/extract.py --device cuda --arch vitl16 --bf16 --compile --workers 14 --copies 400
    python bench/extract.py --simulate-forward 600 --workers 1  # CPU: can decoding + writing feed a device this fast?
    python bench/extract.py --big-slide 60000 --copies 2         # memory with big slides (vs the default small ones)

The cohort is the real fixture slide (`--slide`, else ../shared/fixtures, ./shared/fixtures or
$FM_SHARED_FIXTURES), tiled once and listed `--copies` times under different slide ids, so the
loader crosses many slide boundaries, as in a real cohort. Without the fixture it falls back to the
generated demo cohort (needs imagecodecs). Weights are random (built with fm.backbones; no files).
Needs only torch, timm, h5py, pandas, scipy, pillow, pyyaml, safetensors and OpenSlide
(`openslide-python` + `openslide-bin` wheels are enough; no system library); runs from a plain
checkout (the repo root is put on sys.path).

`--simulate-forward RATE` replaces the forward pass by a stand-in device of that speed (calls return
at once, the loop then blocks until the previous batch is done, as with CUDA), so a machine without a
GPU can check that decoding and writing keep up with a given GPU rate. `--big-slide SIDE` uses a
generated SIDE x SIDE px slide (0.25 um/px, thousands of tiles) instead of the small fixture slide, to
show that memory does not grow with slide size.

Prints one `BENCH extract` line: end-to-end tiles/s, forward-only tiles/s, their ratio (target >= 0.9
on GPU when the workers decode fast enough), the start-up and the steady rate after it, where the main
loop's time went (waiting for tiles / encoder / writing), peak RSS of the main process, its growth
during extraction (bounded by workers x prefetch x batch; must not grow with slide or cohort size)
and the workers' peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ARCHS = {"vitt": ("vitt", 16), "vits14": ("vits", 14), "vitb14": ("vitb", 14), "vitl14": ("vitl", 14),
         "vitl16": ("vitl", 16), "vitg14": ("vitg", 14)}


def _fixture(explicit: str | None) -> Path | None:
    candidates = [explicit] if explicit else [
        os.environ.get("FM_SHARED_FIXTURES", "") and Path(os.environ["FM_SHARED_FIXTURES"]) / "pathology",
        REPO.parent / "shared" / "fixtures" / "pathology", REPO / "shared" / "fixtures" / "pathology",
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
        if c and (Path(c) / "cmu-1-small-region.svs").is_file():
            return Path(c) / "cmu-1-small-region.svs"
    if explicit:
        raise SystemExit(f"--slide {explicit}: not found")
    return None


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """Peak resident memory of this process while a block runs (sampled every 50 ms)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _rss_mib(), threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, _rss_mib())


def build_cohort(args, work: Path):
    """(records, tiles dir): the slide tiled once, its coords copied under `--copies` slide ids."""
    from pathology.cohorts import SlideRecord
    from pathology.tiling import tile_cohort

    slide = _fixture(args.slide) if not args.big_slide else None
    if args.big_slide:
        from pathology_read import write_big_slide  # bench/ is on sys.path when run as a script

        path = write_big_slide(work / f"big-{args.big_slide}.tif", side=args.big_slide)
        base = [SlideRecord("big", path, "P0", "bench")]
    elif slide is not None:
        base = [SlideRecord("base", slide, "P0", "bench")]
    else:
        try:
            from pathology.demo_slides import demo_cohort  # needs tifffile + imagecodecs
        except ImportError as err:
            raise SystemExit(f"no slide to read: pass --slide FILE, put cmu-1-small-region.svs under "
                             f"{REPO / 'shared/fixtures/pathology'}, or install imagecodecs for the demo cohort "
                             f"({err})") from err
        print("fixture slide not found: using the generated demo cohort")
        base = demo_cohort(work / "cache")
    tiles = work / "tiles"
    table = tile_cohort(base, tiles, tile_px=args.tile_px, target_mpp=args.target_mpp, min_tissue=args.min_tissue)
    ok = [r for r, s in zip(base, table["status"]) if s == "ok"]
    if not ok:
        raise SystemExit(f"tiling produced no tiles: {table.to_dict('records')}")
    records = []
    for i in range(args.copies):
        src = ok[i % len(ok)]
        sid = f"copy-{i:05d}"
        (tiles / sid).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiles / src.slide_id / "coords.h5", tiles / sid / "coords.h5")
        records.append(SlideRecord(sid, src.slide_path, f"P{i}", "bench"))
    return records, tiles


def build_encoder(args):
    from fm.backbones import BackboneConfig, build_backbone
    from fm.registry import EncoderSpec, LoadedEncoder
    from pathology.extract import FeatureEncoder

    precision = "bf16" if args.bf16 else ("fp32" if args.device == "cpu" else "auto")
    if args.encoder:
        import pathology.encoders  # noqa: F401  (registers pathology/phikon-v2 without an installed package)

        return FeatureEncoder(args.encoder, args.feature, args.weights, args.device, precision, None, args.compile)
    arch, patch = ARCHS[args.arch]
    cfg = BackboneConfig(arch=arch, patch_size=patch, img_size=224, drop_path_rate=0.0)
    torch.manual_seed(0)
    spec = EncoderSpec(name=f"random/{args.arch}", backbone=cfg, weights_format="random", filenames=[])
    loaded = LoadedEncoder(build_backbone(cfg).eval(), spec)
    return FeatureEncoder(spec.name, args.feature, None, args.device, precision, None, args.compile, loaded=loaded)


class SimulatedDevice:
    """Stands in for a device encoder of `rate` tiles/s: a call returns at once (like kernel launches),
    then blocks until the PREVIOUS batch is done, which is when embed_stream's CUDA loop would return
    from its event sync; so the loop sees the timing of a real device, without one."""

    def __init__(self, encoder, rate: float):
        self.encoder, self.rate = encoder, rate
        self.free_at = self.previous_done = 0.0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        now = time.perf_counter()
        self.free_at = max(now, self.free_at) + len(images) / self.rate
        if self.previous_done > now:
            time.sleep(self.previous_done - now)
        self.previous_done = self.free_at
        return torch.zeros(len(images), self.encoder.dim)


def forward_only(encoder, batch_size: int, tile_px: int, batches: int, warmup: int) -> float:
    """Tiles/s of the encoder (H2D copy of uint8 tiles, resize/normalise, forward) on random tiles."""
    cuda = encoder.device.type == "cuda"
    images = torch.randint(0, 256, (batch_size, 3, tile_px, tile_px), dtype=torch.uint8)
    if cuda:
        images = images.pin_memory()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        encoder(images)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        out = encoder(images)
    out.cpu()
    sync()
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--arch", default="vitt", choices=sorted(ARCHS), help="random-weight ViT (patch size in the name)")
    p.add_argument("--encoder", help="a registered encoder or checkpoint instead of --arch (needs the weights)")
    p.add_argument("--weights")
    p.add_argument("--feature", default="cls", choices=["cls", "cls+mean"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPU anyway)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, help="default 256 on GPU, 32 on CPU")
    p.add_argument("--slide", help="slide file to use (default: the fixture slide)")
    p.add_argument("--copies", type=int, help="slide ids in the cohort (default 200 on GPU, 6 on CPU)")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--min-tissue", type=float, default=0.6)
    p.add_argument("--forward-batches", type=int, help="timed forward-only batches (default 30 GPU, 5 CPU)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--simulate-forward", type=float, metavar="RATE",
                   help="a stand-in device of RATE tiles/s instead of the forward pass (checks the input side)")
    p.add_argument("--big-slide", type=int, metavar="SIDE", help="use a generated SIDE x SIDE px slide")
    p.add_argument("--keep", help="keep tiles and features in this folder (default: a temporary folder)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    batch_size = args.batch_size or (256 if cuda else 32)
    args.copies = args.copies or (200 if cuda else 6)
    torch.backends.cuda.matmul.allow_tf32 = True

    from fm.host import available_cores, fix_mmap_threshold, intra_op_threads
    from pathology.extract import extract_cohort

    fix_mmap_threshold()  # as fm-extract does

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fm-bench-extract-"))
    try:
        records, tiles = build_cohort(args, work)
        encoder = build_encoder(args)
        if args.simulate_forward:
            encoder = SimulatedDevice(encoder, args.simulate_forward)
        began = time.perf_counter()
        # on the CPU, the forward alone gets the threads extraction gives it (the cores the workers leave):
        # a fair baseline, and torch.compile guards on the thread count (another count recompiles)
        threads = None if cuda else max(1, available_cores() - args.workers)
        with intra_op_threads(threads):
            forward = forward_only(encoder, batch_size, args.tile_px, args.forward_batches or (30 if cuda else 5),
                                   warmup=3 if args.compile or cuda else 1)
        warm_s = time.perf_counter() - began
        rss_before = _rss_mib()
        sampler = RssSampler()
        sampler.start()
        start = time.perf_counter()
        table = extract_cohort(records, tiles, work / "features", encoder, batch_size, args.workers, args.dtype,
                               overwrite=True)
        seconds = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = table[table["status"] == "ok"]
    if len(ok) != len(records):
        print(table[table["status"] != "ok"].to_string())
    n_tiles = int(ok["n_tiles"].sum())
    stream = table.attrs["stream"]
    e2e = n_tiles / seconds
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = dict(e2e=e2e, forward=forward, ratio=e2e / forward, tiles=n_tiles, slides=len(ok), seconds=seconds,
                  steady=stream.steady_tiles_per_s, startup_s=stream.startup_s,
                  rss_main=sampler.peak, rss_growth=sampler.peak - rss_before, rss_workers=workers_peak)
    name = args.encoder or f"{args.arch} (random)"
    if args.simulate_forward:
        name = f"simulated device at {args.simulate_forward:g} tiles/s"
    print(f"BENCH extract: {name} device={args.device} precision={'bf16' if encoder.amp else 'fp32'} "
          f"compile={args.compile} batch={batch_size} workers={args.workers} | {len(ok)} slides, {n_tiles} tiles "
          f"({int(ok['n_tiles'].max())} per slide) in {seconds:.1f} s | end-to-end {e2e:.1f} tiles/s | forward only "
          f"{forward:.1f} tiles/s | ratio {e2e / forward:.2f} | steady {stream.steady_tiles_per_s:.1f} tiles/s "
          f"(ratio {stream.steady_tiles_per_s / forward:.2f}) after {stream.startup_s:.1f} s start-up | main loop: "
          f"waiting for tiles {stream.share(stream.wait_input_s):.0%}, encoder {stream.share(stream.encoder_s + stream.device_s):.0%}, "
          f"writing {stream.share(stream.write_s):.0%} | peak RSS main {sampler.peak:.0f} MiB "
          f"(+{result['rss_growth']:.0f} MiB during extraction), workers {workers_peak:.0f} MiB | warm-up {warm_s:.1f} s")
    return result


if __name__ == "__main__":
    main()
