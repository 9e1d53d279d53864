"""`fm-demo`: the whole suite end to end on built-in data, on a CPU, in a few minutes.

Pathology: generated demo cohort -> tissue detection + tiling -> short DINOv2 pretraining -> feature
extraction with the pretrained teacher -> ABMIL with k-fold x seed ensembling.
Earth observation: generated Sentinel-2 scenes -> short SoftCon pretraining -> BigEarthNet-style linear
probe before/after; then the same probe on the real BigEarthNet v1 fixture patches when present.

Each step runs exactly the `fm-*` command a user would type (through the domain plugins), so this
module imports no domain package. The data is synthetic: the numbers show that the machinery works
end to end, not how good a model is.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from fm.cli import invoke, run_reporting
from fm.domains import load_domains

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def _step(title: str, verb: str, argv: list[str], log: list[dict]):
    print(f"\n=== {title}\n$ fm-{verb} {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    result = invoke(verb, argv)
    log.append({"step": title, "command": f"fm-{verb} {argv[0]}", "seconds": round(time.perf_counter() - t0, 1)})
    return result


def run_pathology(out: Path, steps: int, log: list[dict], rows: list[dict]) -> None:
    cfg = load_domains()["pathology"].configs_dir / "demo_cpu.yaml"
    tiles, pre, feats, ev = out / "tiles", out / "pretrain", out / "features", out / "eval"
    _step("pathology: tissue detection + tiling", "prepare",
          ["pathology", "--cohorts", "demo", "--output-dir", str(tiles), "--tile-px", "64", "--target-mpp", "1.0"], log)
    trained = _step("pathology: DINOv2 pretraining (tiny ViT)", "train",
                    ["pathology", "--config", str(cfg), "--cohorts", "demo", "--tiles-dir", str(tiles),
                     "--output-dir", str(pre), "--max-steps", str(steps)], log)
    _step("pathology: feature extraction", "extract",
          ["pathology", "--cohorts", "demo", "--tiles-dir", str(tiles), "--encoder", trained["export"],
           "--output-dir", str(feats), "--workers", "0"], log)
    # the demo cohort has 2 patients per class: 2 folds is the most patient-level CV allows
    result = _step("pathology: ABMIL, 2-fold x 3-seed ensemble", "eval",
                   ["pathology", "demo", "--features-dir", str(feats), "--output-dir", str(ev),
                    "--folds", "2", "--seeds", "3", "--epochs", "50"], log)
    for key, value in sorted(result["metrics"].items()):
        if isinstance(value, float) and not key.endswith(("_low", "_high")) and ("auc" in key or "accuracy" in key):
            rows.append({"domain": "pathology", "metric": key, "value": round(value, 3)})


def run_earthobs(out: Path, steps: int, log: list[dict], rows: list[dict]) -> None:
    trained = _step("earth observation: SoftCon pretraining on generated S2 scenes + linear probe", "train",
                    ["earthobs", "--preset", "demo_cpu", "--output-dir", str(out / "pretrain"),
                     "--max-steps", str(steps)], log)
    for protocol in ("knn", "linear"):
        for when in ("before", "after"):
            rows.append({"domain": "earthobs (generated scenes)", "metric": f"{protocol} micro mAP, {when} pretraining",
                         "value": round(trained[when][protocol]["map_micro"], 3)})
    real = FIXTURES / "earthobs" / "bigearthnet-v1" / "s2-tiny"
    if real.is_dir():
        result = _step("earth observation: linear probe on the real BigEarthNet v1 fixture patches", "eval",
                       ["earthobs", "bigearthnet", "--encoder", trained["export"], "--root", str(real),
                        "--splits", "all", "--train-fraction", "1.0", "--output-dir", str(out / "eval-fixture")], log)
        rows.append({"domain": "earthobs (3 real BigEarthNet patches, train = test)", "metric": "linear micro mAP",
                     "value": round(result["metrics"]["map_micro"], 3)})
    else:
        print(f"(real BigEarthNet fixture not found at {real}: skipped)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fm-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="fm-demo", help="everything goes here (default ./fm-demo)")
    ap.add_argument("--steps", type=_positive_int, default=100, help="pretraining steps per domain")
    ap.add_argument("--only", choices=["pathology", "earthobs"], help="run one domain only")
    args = ap.parse_args(argv)
    return run_reporting("fm-demo", lambda: _demo(args))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _demo(args: argparse.Namespace) -> None:
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("MLFLOW_TRACKING_URI") and not os.environ.get("FM_TRACKING_DIR"):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    os.environ.setdefault("FM_CACHE_DIR", str(out / "cache"))
    domains = load_domains()
    log: list[dict] = []
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name, runner in (("pathology", run_pathology), ("earthobs", run_earthobs)):
        if args.only and args.only != name:
            continue
        if name not in domains:
            print(f"(domain {name!r} is not installed: skipped)")
            continue
        runner(out / name, args.steps, log, rows)

    import pandas as pd

    from fm.tracking import markdown_table

    print("\n## Steps\n")
    print(markdown_table(pd.DataFrame(log)))
    print("\n## Results (SYNTHETIC demo data: they show the pipeline works, not model quality)\n")
    print(markdown_table(pd.DataFrame(rows)))
    print(f"\nDone in {time.perf_counter() - t0:.0f} s. Outputs: {out}")
    print(f"Browse the runs: mlflow ui --backend-store-uri {os.environ.get('MLFLOW_TRACKING_URI')}")


if __name__ == "__main__":
    raise SystemExit(main())
