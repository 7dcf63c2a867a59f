"""Every built-in recipe (and `auto`) on the Fashion-MNIST demo folder: validation and held-out test accuracy,
wall time.

    python scripts/bench_recipes.py --out bench/recipes.json
    python scripts/bench_recipes.py --recipes auto auto auto --out bench/demo-avx2.json   # the demo, 3 times
    python scripts/bench_recipes.py --recipes large-similar --fp32 --set epochs=3   # bf16 against fp32, shorter

Each recipe runs in its own process through the CLI (`finetune fit DIR --recipe NAME`), timed end to end,
imports included. The demo folder is made first if missing (scripts/make_fashion_mnist.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(data: Path, recipe: str, workdir: Path, precision: str = "auto", sets: list[str] = ()) -> dict:
    out = workdir / f"{recipe}-{precision}-{len(list(workdir.iterdir()))}"  # a recipe may run several times
    command = [sys.executable, "-m", "finetune.cli", "fit", str(data), "--recipe", recipe, "--no-progress",
               "--out", str(out), "--precision", precision, *(a for kv in sets for a in ("--set", kv))]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    return {"recipe": recipe, "precision": summary["precision"], "chosen": summary["recipe"],
            "val_acc": summary["val"]["acc"], "test_acc": summary["test"].get("acc"),
            "macro_f1": summary["val"]["macro_f1"], "wall_s": round(wall, 1),
            "training": summary["training"], "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
            "sets": list(sets), "load_at_start": load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data/fashion-mnist")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/recipes.json")
    parser.add_argument("--recipes", nargs="*",
                        default=["auto", "small-similar", "small-different", "large-similar", "large-different"])
    parser.add_argument("--fp32", action="store_true",
                        help="also run each recipe in fp32, to check that bf16 autocast costs no accuracy")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override passed to every run (finetune fit --set)")
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts/make_fashion_mnist.py"), "--out", str(args.data),
                        "--per-class", "100", "--val-per-class", "100", "--test-per-class", "100"], check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for precision in ("auto", "fp32") if args.fp32 else ("auto",):
                rows.append(run_recipe(args.data, recipe, Path(tmp), precision, args.sets))
                print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = "avx512_bf16" if "avx512_bf16" in flags else "avx2" if "avx2" in flags else "other"
    args.out.write_text(json.dumps({"data": str(args.data), "cpu": cpu, "cores": os.cpu_count(), "sets": args.sets,
                                    "results": rows}, indent=2) + "\n")
    print("| recipe | precision | test accuracy | validation accuracy | wall time | training |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        name = f"auto -> {r['chosen']}" if r["recipe"] == "auto" else r["recipe"]
        test = "n/a" if r["test_acc"] is None else f"{r['test_acc']:.3f}"
        print(f"| `{name}` | {r['precision']} | {test} | {r['val_acc']:.3f} | {r['wall_s']:.0f} s | {r['training']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
