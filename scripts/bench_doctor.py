"""Time `finetune doctor` on a generated folder of 10,000 images: a cold scan (empty cache, every file decoded)
and a warm one (every result from the cache). Writes the timings as JSON.

    python scripts/bench_doctor.py --out bench_doctor.json          # 10,000 files in a temporary folder
    python scripts/bench_doctor.py --files 2000 --workers 0         # smaller, in one process

The images are 256 x 192 pixels, 90% JPEG and 10% PNG, in 10 class folders, with a few bad files mixed in.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_train import write_result
from PIL import Image


def make_folder(root: Path, files: int, seed: int = 0) -> Path:
    """`files` images in root/class_<k>/; every 500th file is truncated, so the scan has something to find."""
    rng = np.random.default_rng(seed)
    for i in range(files):
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((256, 192))
        pixels = np.asarray(smooth, dtype=np.int16) + rng.integers(-12, 13, (192, 256, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        fmt, ext = ("PNG", "png") if i % 10 == 9 else ("JPEG", "jpg")
        image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        data = buffer.getvalue()
        if i % 500 == 499:
            data = data[: len(data) // 2]
        (folder / f"{i:06d}.{ext}").write_bytes(data)
    return root


def run(root: Path, workers: int | None) -> dict[str, float | int]:
    from finetune.data.doctor import diagnose

    started = time.perf_counter()
    report = diagnose(root, workers=workers, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "files_per_s": round(report.files / seconds, 1),
            "files": report.files, "cache_hits": report.cache_hits, "findings": len(report.findings),
            "blocking": len(report.blocking)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--workers", type=int, help="decoding processes (default: one per CPU)")
    parser.add_argument("--out", type=Path, help="write the timings here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-doctor-") as tmp:
        os.environ["FINETUNE_CACHE"] = str(Path(tmp) / "cache")  # a cold cache, and nothing left behind
        started = time.perf_counter()
        root = make_folder(Path(tmp) / "images", args.files)
        made = time.perf_counter() - started
        cold = run(root, args.workers)
        warm = run(root, args.workers)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    result = {
        "files": args.files,
        "image": "256 x 192, 90% JPEG (quality 90) / 10% PNG, 10 classes, 1 in 500 truncated",
        "megabytes": round(size / 1e6, 1),
        "workers": args.workers if args.workers is not None else len(os.sched_getaffinity(0)),
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "generate_s": round(made, 1),
        "cold": cold,
        "warm": warm,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
