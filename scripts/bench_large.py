"""Large data: what `fit` spends before training on a big folder (full Fashion-MNIST: 54,000 train, 6,000 val,
10,000 test images), phase by phase.

    python scripts/make_fashion_mnist.py --out data/fm-full --per-class 5400 --val-per-class 600 --test-per-class 1000
    python scripts/bench_large.py pipeline --data data/fm-full --out bench/large-pipeline-avx2.json
    python scripts/bench_large.py fit --data data/fm-full --set epochs=3 --out bench/large-fit-e3-avx2.json
    python scripts/bench_large.py fit --data data/fm-full --keep /tmp/full-run --out bench/large-fit-avx2.json
    python scripts/bench_large.py loader --data data/fm-full --out bench/large-loader-avx2.json

`pipeline` times the scan and split, the pre-flight doctor check with an empty cache (every file read, decoded
and hashed; the leakage comparison of every held-out image against every training image) and again with a
warm one, the native-size reading of the resolution choice, and the domain-gap pass, in this process. It also
records the peak resident memory. `fit` runs `finetune fit DIR` (its defaults, plus any `--set`) end to end in
its own process: held-out test accuracy, wall time, the time of each phase, validation accuracy per epoch and
the process's peak resident memory. `loader` times passes of the training loader from the files against
passes through the decoded-image cache. Accuracy against time at several resolutions comes from
`scripts/bench_recipes.py --set resolution=N` (docs/benchmarks.md, "Resolution").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import _machine, write_result


def pipeline(data: Path) -> dict:
    import timm

    from finetune.data.doctor import preflight
    from finetune.data.splits import load_splits
    from finetune.device import resolve_device
    from finetune.model.backbones import create_backbone
    from finetune.recipe_choice import measure_domain
    from finetune.resolution import native_side
    from finetune.runtime import choose_precision

    seconds = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FINETUNE_CACHE"] = cache  # an empty cache: the cold doctor scan
        started = time.perf_counter()
        splits = load_splits(data)
        seconds["scan_and_split"] = time.perf_counter() - started
        for state in ("cold", "warm"):
            started = time.perf_counter()
            checked = preflight(splits)
            seconds[f"preflight_{state}"] = time.perf_counter() - started
        started = time.perf_counter()
        native = native_side(checked.splits)
        seconds["native_size"] = time.perf_counter() - started
        del os.environ["FINETUNE_CACHE"]
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True, num_classes=len(splits.classes))
    device = resolve_device("cpu")
    started = time.perf_counter()
    gap = measure_domain(backbone, checked.splits, timm.data.resolve_model_data_config(backbone),
                         choose_precision("auto", device), device=device)
    seconds["domain_gap"] = time.perf_counter() - started
    return {"files": {name: len(getattr(splits, name)) for name in ("train", "val", "test")},
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "native_side": native,
            "domain_gap": None if gap is None else gap.score,
            "warnings": checked.to_dict()["warnings"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def loader(data: Path, side: int = 64, images: int = 10_000, repeats: int = 3) -> dict:
    """One pass of `fit`'s training loader (decode, augmentation, collation at ``side`` px, its default
    workers) over a seeded sample of ``images`` training images, read from the files and through a filled decoded-image
    cache, alternating; the median pass of each."""
    import dataclasses
    import random
    import statistics

    import timm

    from finetune.data import ImageFolderDataModule
    from finetune.data.cache import DecodedImageCache
    from finetune.data.splits import load_splits
    from finetune.resolution import with_side

    splits = load_splits(data)
    rng = random.Random(0)
    splits = dataclasses.replace(splits, train=rng.sample(splits.train, min(images, len(splits.train))),
                                 val=rng.sample(splits.val, min(100, len(splits.val))), test=[])
    config = with_side(timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0")), side)
    seconds: dict[str, list[float]] = {"files": [], "decoded_cache": []}
    with tempfile.TemporaryDirectory() as folder:
        cache = DecodedImageCache.for_dataset(data, config, directory=folder)
        modules = {"files": ImageFolderDataModule(splits, config, decoded_cache=False),
                   "decoded_cache": ImageFolderDataModule(splits, config, decoded_cache=cache)}
        started = time.perf_counter()
        modules["decoded_cache"].fill_decoded_cache()
        fill = time.perf_counter() - started
        for _ in range(repeats):
            for name, module in modules.items():
                started = time.perf_counter()
                for _batch in module.train_dataloader():
                    pass
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"images": len(splits.train), "side": side, "workers": modules["files"].num_workers,
            "fill_s": round(fill, 2), "fill_images": len(splits.train) + len(splits.val) + len(splits.test),
            "pass_s": {k: round(v, 2) for k, v in median.items()},
            "images_per_s": {k: round(len(splits.train) / v, 1) for k, v in median.items()}}


def fit(data: Path, sets: list[str], recipe: str = "auto", keep: Path | None = None) -> dict:
    from finetune.runs import read_epoch_metrics

    with tempfile.TemporaryDirectory() as work:
        out = keep or Path(work) / "run"
        command = [sys.executable, "-m", "finetune", "fit", str(data), "--recipe", recipe, "--no-progress",
                   "--out", str(out), *(a for kv in sets for a in ("--set", kv))]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        summary = json.loads((out / "summary.json").read_text())
        epochs = [{k: row[k] for k in ("epoch", "val/acc", "train/loss") if k in row}
                  for row in read_epoch_metrics(out / "metrics.csv") if "val/acc" in row]
    return {"sets": sets, "recipe": summary["recipe"], "resolution": summary["resolution"],
            "test_acc": summary["test"].get("acc"), "val_acc": summary["val"]["acc"], "wall_s": round(wall, 1),
            "training": summary["training"], "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
            "timings_s": {k: round(v, 1) for k, v in summary["timings"].items()},
            "train_images_per_s": summary["train_images_per_s"], "frozen_cache": summary.get("frozen_cache"),
            "decoded_cache": summary.get("decoded_cache"), "probe": summary.get("probe"), "kept": summary.get("kept"),
            "val_acc_per_epoch": epochs,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=("pipeline", "loader", "fit"))
    parser.add_argument("--data", type=Path, default=Path("data/fm-full"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--recipe", default="auto", help="the recipe (fit)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (fit)")
    parser.add_argument("--keep", type=Path, help="keep the run folder here (fit; new or empty)")
    args = parser.parse_args(argv)
    measured = {"pipeline": lambda: pipeline(args.data), "loader": lambda: loader(args.data),
                "fit": lambda: fit(args.data, args.set, args.recipe, args.keep)}[args.bench]()
    write_result({"machine": _machine(), "data": str(args.data), args.bench: measured}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
