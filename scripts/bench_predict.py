"""Benchmark predict: images/s of onnxruntime, torch eager fp32 and torch bf16, side by side in one process.

    python scripts/bench_predict.py runs/fm-auto --out bench/predict.json

MODEL is a run folder (its export/model.onnx is made when missing) or an export folder with model.onnx and
model.safetensors. Every backend gets the same uint8 batches of real validation images (the run's, or
--images DIR), through the same normalising wrapper. The backends take turns within each repeat, so that
load from other processes hits them alike; the figures are medians over the repeats. The load average
before and after is recorded: on a shared machine it moves every figure.

Besides the three backends it measures onnxruntime variants (threads, graph optimisation level, the
TorchScript-based exporter at opset 17) and end-to-end predict (decode + crop + model) so that a
shortfall against the target (onnxruntime >= 1.3x torch eager fp32 at batch 32) can be explained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from finetune import export, runs
from finetune.predict import OnnxRunner, TorchRunner, find_images, load
from finetune.runtime import cpu_has_bf16, tune_allocator, usable_cpus
from finetune.serving import ServingModel

TARGET_RATIO = 1.3
# The thread pools of onnxruntime and torch spin for a while after a call; measured here, a torch call right
# after an onnxruntime call took 1.3-2x as long. A pause before each timed block keeps them from taxing the other.
SETTLE_S = 0.2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tune_allocator()
    model_dir, onnx_path = _model(Path(args.model))
    classifier, config = runs.load_model(model_dir)
    predictor = load(onnx_path)
    paths = _image_paths(args.images, model_dir)
    pixels = _batch(predictor, paths, max(args.batch_sizes))
    report: dict = {
        "model": str(model_dir), "architecture": config["architecture"],
        "input_size": config["pretrained_cfg"]["input_size"], "repeats": args.repeats,
        "machine": _machine(), "load_average_before": os.getloadavg(),
    }

    backends: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "onnxruntime": OnnxRunner(onnx_path),
        "torch_fp32": TorchRunner(ServingModel.from_config(classifier, config)),
    }
    bf16_model = ServingModel.from_config(runs.load_model(model_dir)[0], config).to(memory_format=torch.channels_last)
    backends["torch_bf16"] = TorchRunner(bf16_model, autocast=torch.bfloat16)
    report["torch_bf16_note"] = ("native bf16 (AVX-512 BF16 / AMX), autocast + channels_last" if cpu_has_bf16()
                                 else "no native bf16 on this CPU: emulated, expected slower than fp32")
    report["results"] = {f"batch_{bs}": _compare(backends, pixels[:bs], args.repeats, args.min_seconds)
                         for bs in args.batch_sizes}
    report["onnxruntime_vs_torch_fp32"] = {
        key: round(r["onnxruntime"]["images_per_s"] / r["torch_fp32"]["images_per_s"], 2)
        for key, r in report["results"].items()}
    biggest = f"batch_{max(args.batch_sizes)}"
    report["target"] = {"onnxruntime_vs_torch_fp32_at": biggest, "ratio": TARGET_RATIO,
                        "met": report["onnxruntime_vs_torch_fp32"][biggest] >= TARGET_RATIO}
    if not args.quick:
        report["torch_variants"] = _compare(_torch_variants(model_dir), pixels[: max(args.batch_sizes)],
                                            args.repeats, args.min_seconds)
        report["onnxruntime_variants"] = _compare(_variants(onnx_path, model_dir), pixels[: max(args.batch_sizes)],
                                                  args.repeats, args.min_seconds)
        report["end_to_end_predict"] = _end_to_end(onnx_path, model_dir, paths, args.repeats)
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_bytes(args.out, (text + "\n").encode())
    print(text)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run folder or export folder")
    p.add_argument("--out", type=Path, help="write the JSON here too (e.g. bench/predict.json)")
    p.add_argument("--images", help="folder of images to use (default: the run's validation images)")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 32])
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per backend (default 7)")
    p.add_argument("--min-seconds", type=float, default=0.5,
                   help="each repeat calls the model until this long has passed (default 0.5)")
    p.add_argument("--quick", action="store_true", help="only the three backends, no variants or end-to-end")
    return p


def _model(path: Path) -> tuple[Path, Path]:
    """The folder with model.safetensors + config.json, and an ONNX export of it (made when missing)."""
    for candidate in (path / export.ONNX_NAME, path / export.EXPORT_DIR / export.ONNX_NAME):
        if candidate.is_file():
            return path, candidate
    out = Path(tempfile.mkdtemp(prefix="bench-export-"))
    export.export_run(path, ("onnx",), out)
    return path, out / export.ONNX_NAME


def _image_paths(images: str | None, model_dir: Path) -> list[Path]:
    if images:
        return [p for _, p in find_images([images]) if isinstance(p, Path)]
    run = model_dir if (model_dir / "split.json").is_file() else model_dir.parent
    split = json.loads((run / "split.json").read_text())
    return [Path(split["root"]) / rel for rel, _ in split["val"]]


def _batch(predictor, paths: list[Path], size: int) -> np.ndarray:
    from finetune.data import load_rgb

    crops = [predictor.preprocess(load_rgb(p)) for p in paths[:size]]
    while len(crops) < size:
        crops += crops[: size - len(crops)]
    return np.stack(crops)


def _compare(backends: dict[str, Callable], pixels: np.ndarray, repeats: int, min_seconds: float) -> dict:
    """Median images/s per backend; each repeat runs every backend once, in rotating order."""
    for run in backends.values():  # warm-up: first-call allocation and kernel selection
        run(pixels)
    times: dict[str, list[float]] = {name: [] for name in backends}
    names = list(backends)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(SETTLE_S)
            calls, started = 0, time.perf_counter()
            while True:
                backends[name](pixels)
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= min_seconds:
                    break
            times[name].append(elapsed / calls)
    return {name: {"images_per_s": round(len(pixels) / statistics.median(t), 2),
                   "seconds_per_batch": [round(v, 4) for v in t]} for name, t in times.items()}


def _variants(onnx_path: Path, model_dir: Path) -> dict[str, Callable]:
    def session(path: Path, threads: int, level: ort.GraphOptimizationLevel, spinning: bool = True):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda pixels: s.run(["probabilities"], {"images": pixels})[0]

    levels = ort.GraphOptimizationLevel
    cores = usable_cpus()
    variants = {
        f"all_opt_{cores}_threads (the default)": session(onnx_path, cores, levels.ORT_ENABLE_ALL),
        "all_opt_1_thread": session(onnx_path, 1, levels.ORT_ENABLE_ALL),
        f"basic_opt_{cores}_threads": session(onnx_path, cores, levels.ORT_ENABLE_BASIC),
        f"no_opt_{cores}_threads": session(onnx_path, cores, levels.ORT_DISABLE_ALL),
        f"all_opt_{cores}_threads_no_spinning": session(onnx_path, cores, levels.ORT_ENABLE_ALL, spinning=False),
    }
    legacy = Path(tempfile.mkdtemp(prefix="bench-legacy-")) / "model.onnx"
    classifier, config = runs.load_model(model_dir)
    export._onnx_legacy(ServingModel.from_config(classifier, config), export._example_input(config), legacy)
    variants[f"torchscript_exporter_opset17_all_opt_{cores}_threads"] = session(legacy, cores, levels.ORT_ENABLE_ALL)
    return variants


def _torch_variants(model_dir: Path) -> dict[str, Callable]:
    """torch's two OpenMP threads wait for each other at every operator; on a loaded machine one thread can be
    faster. And denormal floats are slow on x86 unless flushed to zero."""
    classifier, config = runs.load_model(model_dir)
    fp32 = TorchRunner(ServingModel.from_config(classifier, config))

    def with_threads(threads: int, flush_denormal: bool = False) -> Callable:
        def run(pixels: np.ndarray) -> np.ndarray:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            torch.set_flush_denormal(flush_denormal)
            try:
                return fp32(pixels)
            finally:
                torch.set_num_threads(before)
                torch.set_flush_denormal(False)
        return run

    cores = usable_cpus()
    return {f"torch_fp32_{cores}_threads": with_threads(cores), "torch_fp32_1_thread": with_threads(1),
            f"torch_fp32_{cores}_threads_flush_denormal": with_threads(cores, flush_denormal=True)}


def _end_to_end(onnx_path: Path, model_dir: Path, paths: list[Path], repeats: int) -> dict:
    """predict() on files: decode, crop, model, top-k; batch 32."""
    files = paths[:64]
    result = {}
    for name, predictor in (("onnxruntime", load(onnx_path)), ("torch_fp32", load(model_dir, backend="torch"))):
        predictor.predict(files[:32], batch_size=32)
        times = []
        for _ in range(max(3, repeats // 2)):
            started = time.perf_counter()
            predictor.predict(files, batch_size=32)
            times.append(time.perf_counter() - started)
        result[name] = {"images": len(files), "images_per_s": round(len(files) / statistics.median(times), 2)}
    return result


def _machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "usable_cores": usable_cpus(), "native_bf16": cpu_has_bf16(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    raise SystemExit(main())
