"""The frozen-part cache against the uncached path: `large-similar` with `frozen_cache_views=0` and `=4`, same
seed, on one folder, side by side.

    python scripts/make_fashion_mnist.py --out data/fm-full --per-class 5400 --val-per-class 600 --test-per-class 1000
    python scripts/bench_frozen_cache.py --data data/fm-full --epochs 3 --out bench/frozen-cache-avx2.json

Each run is one `scripts/bench_large.py fit` process (itself running `finetune fit` in a child process, so
that each run's peak resident memory is its own): held-out test accuracy, validation accuracy, wall time,
Lightning's training time per epoch, the cache's fill time and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_train import _machine

HERE = Path(__file__).resolve().parent
VIEWS = (0, 4)


def run(data: Path, epochs: int, views: int, sets: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "fit.json"
        subprocess.run([sys.executable, str(HERE / "bench_large.py"), "fit", "--data", str(data), "--recipe",
                        "large-similar", "--set", f"epochs={epochs}", "--set", f"frozen_cache_views={views}",
                        *(a for kv in sets for a in ("--set", kv)), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        fit = json.loads(out.read_text())["fit"]
    timings, cache = fit["timings_s"], fit["frozen_cache"] or {"used": False}
    lightning_epochs = max(1, fit["epochs_run"])
    return {"frozen_cache_views": views, "test_acc": fit["test_acc"], "val_acc": fit["val_acc"],
            "wall_s": fit["wall_s"], "train_s_per_epoch": round(timings.get("train_s", 0.0) / lightning_epochs, 1),
            "cache_fill_s": timings.get("frozen_cache_s", 0.0), "frozen_cache": cache,
            "peak_rss_mb": fit["peak_rss_mb"], "epochs_run": fit["epochs_run"], "training": fit["training"],
            "timings_s": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3, help="the recipe's epochs (the probe counts as one)")
    parser.add_argument("--out", type=Path, help="e.g. bench/frozen-cache-<machine>.json")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both runs (a smoke run: --set model=test_efficientnet)")
    args = parser.parse_args(argv)
    rows = []
    for views in VIEWS:
        rows.append(run(args.data, args.epochs, views, args.sets))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": _machine(), "data": str(args.data), "recipe": "large-similar", "epochs": args.epochs,
              "sets": args.sets,
              "results": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| frozen_cache_views | test accuracy | validation accuracy | wall time | train s / epoch | cache fill | "
          "peak RSS |\n|---|---|---|---|---|---|---|")
    for r in rows:
        test = "n/a" if r["test_acc"] is None else f"{r['test_acc']:.3f}"
        print(f"| {r['frozen_cache_views']} | {test} | {r['val_acc']:.3f} | {r['wall_s']:.0f} s | "
              f"{r['train_s_per_epoch']:.1f} s | {r['cache_fill_s']:.1f} s | {r['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
