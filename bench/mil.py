"""Wall time of the 25-member slide-level MIL protocol versus a naive per-bag loop, in the same run.

  protocol  `run_mil_protocol`: 5 folds x 5 seeds ABMIL members trained in lockstep (`StackedMIL`)
            from features held on the device, one gather per step; includes the out-of-fold and
            test predictions, bootstrap CIs and attention maps
  naive     one ABMIL member trained the usual way: a Python loop over bags, each read from the
            memory-mapped features, moved to the device and stepped alone; timed for
            --naive-epochs and scaled to the protocol's members x epochs (training only)

Features are generated (fp16, memory-mapped `.npy` pack); positive slides carry ~1 % signal tiles so
the printed AUC shows the protocol learned something.

  python bench/mil.py --preset cpu        # 200 slides x 500 tiles x 256 dims
  python bench/mil.py --preset gpu        # 1,000 slides x 5,000 tiles x 1,024 dims on CUDA
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from evaluation.mil_data import PACK_FEATURES, PACK_INDEX, FeatureBank
from evaluation.mil_models import build_mil_model
from evaluation.mil_protocol import run_mil_protocol
from evaluation.mil_results import SINGLE_MODEL_LABEL

PRESETS = {
    "cpu": dict(slides=200, tiles=500, dim=256, epochs=2, device="cpu"),
    "gpu": dict(slides=1000, tiles=5000, dim=1024, epochs=10, device="cuda"),
}


def generate_pack(pack_dir: Path, slides: int, tiles: int, dim: int, device: torch.device, seed: int = 0):
    """Write a feature pack of random fp16 tiles; positive slides get 1 % of tiles shifted along one axis."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(slides) % 2)
    features = np.lib.format.open_memmap(
        pack_dir / PACK_FEATURES, mode="w+", dtype=np.float16, shape=(slides * tiles, dim)
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    direction = torch.zeros(dim, device=device)
    direction[0] = 4.0
    n_signal = max(3, tiles // 100)
    chunk = max(1, 2**28 // (tiles * dim))  # ~0.5 GB of fp16 per chunk
    for start in range(0, slides, chunk):
        stop = min(slides, start + chunk)
        x = torch.randn((stop - start, tiles, dim), generator=gen, device=device)
        positive = torch.from_numpy(labels[start:stop] == 1).to(device)
        x[positive, :n_signal] += direction  # which tiles does not matter: MIL is order-invariant
        features[start * tiles : stop * tiles] = x.reshape(-1, dim).half().cpu().numpy()
    features.flush()
    del features
    ids = [f"slide{i:05d}" for i in range(slides)]
    offsets = (np.arange(slides + 1) * tiles).tolist()
    index = {"slide_ids": ids, "offsets": offsets, "encoder": "bench", "coords": False, "sources": {}}
    (pack_dir / PACK_INDEX).write_text(json.dumps(index))
    return pd.DataFrame({"slide_id": ids, "patient_id": ids, "label": labels})


def naive_epoch_seconds(bank: FeatureBank, labels: pd.DataFrame, train_ids: list[str], args, device) -> float:
    """One epoch of one member trained bag by bag from the memory map (the per-bag loop of most MIL code)."""
    torch.manual_seed(0)
    model = build_mil_model("abmil", bank.dim, 2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    y_of = dict(zip(labels["slide_id"], labels["label"]))
    rng = np.random.default_rng(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")
    start = time.perf_counter()
    for sid in rng.permutation(train_ids):
        bag = bank.slide_features(sid)
        if len(bag) > args.max_tiles:
            bag = bag[np.sort(rng.choice(len(bag), args.max_tiles, replace=False))]
        x = torch.from_numpy(np.asarray(bag)).to(device).float()
        with amp:
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float()[None], torch.tensor([y_of[sid]], device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for name in ("slides", "tiles", "dim", "epochs"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--device")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-tiles", type=int, default=5000)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--naive-epochs", type=int, default=1)
    parser.add_argument("--bag-batch-size", type=int, default=1)
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA"
    )
    parser.add_argument("--workdir", type=Path, help="where the feature pack goes (default: a temp dir)")
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="fm-bench-mil-", dir=args.workdir) as tmp:
        pack = Path(tmp)
        t0 = time.perf_counter()
        labels = generate_pack(pack, args.slides, args.tiles, args.dim, device)
        bank = FeatureBank.open_packed(pack)
        generate_s = time.perf_counter() - t0
        n_test = int(round(args.slides * args.test_fraction))
        cv, test = labels.iloc[n_test:], labels.iloc[:n_test]
        gib = bank.features.nbytes / 2**30
        print(
            f"features: {args.slides} slides x {args.tiles} tiles x {args.dim} dims fp16 = {gib:.2f} GiB "
            f"memory-mapped (generated in {generate_s:.1f} s); CV {len(cv)} slides, test {len(test)}; "
            f"device {device}"
        )

        warm = cv.head(40)  # imports, kernels and allocator warm-up, outside the timing
        run_mil_protocol(
            bank,
            warm,
            folds=2,
            seeds=1,
            epochs=1,
            n_boot=10,
            device=str(device),
            amp=args.amp,
            max_tiles=args.max_tiles,
        )
        t0 = time.perf_counter()
        results = run_mil_protocol(
            bank,
            cv,
            test if n_test else None,
            folds=args.folds,
            seeds=args.seeds,
            epochs=args.epochs,
            max_tiles=args.max_tiles,
            device=str(device),
            bag_batch_size=args.bag_batch_size,
            amp=args.amp,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        protocol_s = time.perf_counter() - t0
        members = len(results.runs)
        steps = args.epochs * -(-int(results.runs["n_train"].max()) // args.bag_batch_size)
        split = results.primary_split
        print(
            f"protocol: {members} members x {args.epochs} epochs in {protocol_s:.1f} s "
            f"({protocol_s / members:.2f} s per member, {1000 * protocol_s / steps:.1f} ms per lockstep step, "
            f"train+predict+CIs); "
            f"{split} ensemble AUC {results.summary[f'{split}/ensemble_auc']:.3f}, "
            f"single model ({SINGLE_MODEL_LABEL[split]}) {results.summary[f'{split}/single_auc']:.3f}"
        )
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

        train_ids = cv["slide_id"].tolist()[: int(results.runs["n_train"].iloc[0])]  # one member's set size
        naive_epoch_seconds(bank, labels, train_ids[:3], args, device)  # warm-up (allocator, kernels)
        epoch_s = np.mean(
            [naive_epoch_seconds(bank, labels, train_ids, args, device) for _ in range(args.naive_epochs)]
        )
        naive_total = epoch_s * args.epochs * members
        print(
            f"naive per-bag loop: {epoch_s:.2f} s per member-epoch ({len(train_ids)} bags) -> "
            f"{naive_total:.1f} s for {members} members x {args.epochs} epochs (training only)"
        )
        print(f"speed-up of the protocol over the naive loop: {naive_total / protocol_s:.1f}x")


if __name__ == "__main__":
    main()
