"""Portable models: safetensors, ONNX and torch.export, each checked against the eager model on real
validation images before it is written.

    <export>/ (default RUN/export)
      config.json         timm hub layout (architecture, num_classes, label_names, pretrained_cfg) + temperature
      model.safetensors   plain timm loads it for linear heads; the multi-stage head loads through finetune
      model.onnx          images -> logits, probabilities; labels, temperature and config in its metadata
      model.pt2           a torch.export program with the same contract
      manifest.json       the input contract, every file with its sha256, and the parity figures

The ONNX and torch.export graphs take images as a decoder gives them: uint8 RGB, NCHW, already resized and
centre-cropped to the model's input size (``serving.model_input`` does that), any batch size. They normalise
inside, so a consumer needs no mean or std, and also return ``softmax(logits / temperature)``.

Every format is written to a staging folder, loaded back the way a consumer would load it, and compared with
the eager fp32 model at batch sizes 1 and 7: top-1 must agree on every image and no probability may differ by
more than 1e-4. Only then is it renamed into place, so an interrupted or failed export never leaves a
half-written or unchecked model behind. A failed check raises `ExportError`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
from torch import nn

from . import __version__, runs
from .data import build_transforms, load_rgb, parse_data_config
from .device import CPU, Device, resolve_device
from .errors import FinetuneError, ImageDecodeError, UsageError, first_line
from .files import atomic_write_bytes, atomic_write_json, sha256_file
from .formats import (  # noqa: F401 - export.DEFAULT_FORMATS etc. are part of its API
    DEFAULT_FORMATS,
    EXPORT_DIR,
    FORMAT_ALIASES,
    FORMATS,
    INPUT_NAME,
    MANIFEST_NAME,
    ONNX_NAME,
    OUTPUT_NAMES,
    PT2_NAME,
    parse_formats,
)
from .model.surgery import fix_same_padding
from .onnx_graph import TRACE_OPSET, check_against_eager, trace_onnx
from .runtime import onnx_session, tune_allocator
from .serving import MirrorAverage, ServingModel, load_pt2, model_input

log = logging.getLogger("finetune")

ONNX_OPSET = 18
PARITY_BATCH_SIZES = (1, 7)
PARITY_IMAGES = 14
MAX_PROB_DIFF = 1e-4

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ExportError(FinetuneError):
    """An export could not be produced, or does not predict what the trained model predicts."""


# --- the images of the parity check ----------------------------------------------------------------------
@dataclass(frozen=True)
class CheckImages:
    """Real images in both forms: ``pixels`` (N, 3, H, W) uint8 for the exports, ``normalised`` float32
    through the eval transform that validation used, for the eager reference."""

    paths: list[str]
    pixels: np.ndarray
    normalised: torch.Tensor


def check_images(run_dir: Path, config: dict[str, Any], n: int = PARITY_IMAGES,
                 paths: Sequence[str | Path] | None = None, min_count: int = max(PARITY_BATCH_SIZES)) -> CheckImages:
    """``n`` validation images of the run (from split.json, spread over the classes), or ``paths``.

    Unreadable files are passed over. Fewer than ``min_count`` images are repeated so that the largest
    checked batch is full.
    """
    candidates = [Path(p) for p in paths] if paths is not None else _validation_files(run_dir)
    data_config = runs.data_config(config)
    cfg = parse_data_config(data_config)
    transform = build_transforms(data_config, train=False)
    found: list[tuple[str, np.ndarray, torch.Tensor]] = []
    for path in candidates:
        try:
            image = load_rgb(path)
        except ImageDecodeError as exc:
            log.debug("parity check passes over %s: %s", path, exc.reason)
            continue
        found.append((str(path), model_input(image, cfg), transform(image=image)["image"]))
        if len(found) == n:
            break
    if not found:
        where = "the given images" if paths is not None else f"the validation images listed in {run_dir / 'split.json'}"
        raise ExportError(f"no readable image among {where}: the parity check needs real images; pass a folder "
                          "of images like the training data (--images DIR, or images= in Python)")
    while len(found) < min_count:
        found += found[: min_count - len(found)]
    return CheckImages([f[0] for f in found], np.stack([f[1] for f in found]), torch.stack([f[2] for f in found]))


def _validation_files(run_dir: Path) -> list[Path]:
    """Validation files of split.json, round-robin over the labels so that every class is represented."""
    split_path = run_dir / "split.json"
    try:
        split = json.loads(split_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {split_path} ({exc}); the parity check needs the run's validation "
                          "images, or pass images (--images DIR)") from exc
    root = Path(split["root"])
    by_label: dict[int, list[Path]] = {}
    for rel, label in split.get("val") or split.get("train", []):
        by_label.setdefault(label, []).append(root / rel)
    columns = [by_label[k] for k in sorted(by_label)]
    return [column[i] for i in range(max(map(len, columns), default=0)) for column in columns if i < len(column)]


# --- parity ----------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_outputs(classifier: nn.Module, images: CheckImages, temperature: float,
                      device: Device = CPU) -> tuple[np.ndarray, np.ndarray]:
    """Logits and probabilities of the eager fp32 model on the eval-transformed images, computed on ``device``
    (a copy of ``classifier`` is placed there: the exporters trace the one on the CPU)."""
    model = device.place(copy.deepcopy(classifier).float().eval())
    logits = model(device.place(images.normalised)).float().cpu()
    return logits.numpy(), (logits / temperature).softmax(dim=1).numpy()


def parity(run: Runner, images: CheckImages, reference: tuple[np.ndarray, np.ndarray],
           batch_sizes: Sequence[int] = PARITY_BATCH_SIZES, max_prob_diff: float = MAX_PROB_DIFF) -> dict[str, Any]:
    """Run an export over the images at each batch size and compare with the eager reference."""
    ref_logits, ref_probs = reference
    figures: dict[str, Any] = {"images": len(images.paths), "max_prob_diff_allowed": max_prob_diff, "batch_sizes": {}}
    passed = True
    for bs in batch_sizes:
        outputs = [run(images.pixels[i : i + bs]) for i in range(0, len(images.pixels), bs)]
        logits = np.concatenate([o[0] for o in outputs])
        probs = np.concatenate([o[1] for o in outputs])
        agreement = float((probs.argmax(1) == ref_probs.argmax(1)).mean())
        prob_diff = float(np.abs(probs - ref_probs).max())
        figures["batch_sizes"][str(bs)] = {
            "top1_agreement": agreement,
            "max_abs_prob_diff": prob_diff,
            "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
        }
        passed &= agreement == 1.0 and prob_diff <= max_prob_diff
    figures["passed"] = bool(passed)
    return figures


def _torch_runner(model: nn.Module, device: Device) -> Runner:
    device.place(model)

    @torch.no_grad()
    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = model(device.place(torch.from_numpy(pixels)))
        return logits.cpu().numpy(), probs.cpu().numpy()

    return run


def _onnx_runner(path: Path) -> Runner:
    session = onnx_session(path)

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels})
        return logits, probs

    return run


# --- the formats -----------------------------------------------------------------------------------------
# Each writer puts its files into the staging folder and returns (file names, a runner that loads them
# back the way a consumer would, details for the manifest). PyTorch runners compute on the device given,
# onnxruntime on the CPU; the exporters trace the classifier on the CPU.
Written = tuple[list[str], Runner, dict[str, Any]]


def _write_safetensors(classifier: nn.Module, config: dict[str, Any], staging: Path, device: Device) -> Written:
    weights = safetensors.torch.save(runs.export_state_dict(classifier), metadata={"format": "pt"})
    atomic_write_bytes(staging / runs.WEIGHTS_NAME, weights)
    extra = config.get("finetune", {})
    if extra.get("head", "linear") == "linear" and not extra.get("ensemble"):
        # what a user without finetune does: plain timm, the hub config, the weights
        model = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"])
        model.load_state_dict(safetensors.torch.load_file(str(staging / runs.WEIGHTS_NAME)))
        loader = "timm.create_model + load_state_dict (no finetune code)"
        if config.get("finetune", {}).get("test_flip"):
            model, loader = MirrorAverage(model), loader + ", logits averaged with the mirror image's (test_flip)"
    else:
        model, _ = runs.load_model(staging)
        loader = "finetune.runs.load_model (" + ("ensemble" if extra.get("ensemble") else "multi-stage head") + ")"
    runner = _torch_runner(ServingModel.from_config(model.eval(), config), device)
    return [runs.WEIGHTS_NAME], runner, {"loaded_with": loader}


def _example_input(config: dict[str, Any]) -> torch.Tensor:
    # batch 2: an example batch of 1 can get the batch dimension specialised to a constant
    return torch.zeros((2, *config["pretrained_cfg"]["input_size"]), dtype=torch.uint8)


def _write_onnx(classifier: nn.Module, config: dict[str, Any], staging: Path, device: Device) -> Written:
    import onnx

    serving = ServingModel.from_config(classifier, config)
    path = staging / ONNX_NAME
    try:
        exporter = _onnx_traced(serving, _example_input(config), path)
    except Exception as exc:  # noqa: BLE001 - the quick path is an optimisation: the dynamo exporter is the rule
        log.debug("quick ONNX export not used (%s: %s)", type(exc).__name__, first_line(exc))
        try:
            exporter = _onnx_dynamo(serving, _example_input(config), path)
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other exporter, parity decides
            log.warning("the torch.export-based ONNX exporter failed (%s: %s); using the TorchScript-based one",
                        type(exc).__name__, first_line(exc))
            exporter = _onnx_legacy(serving, _example_input(config), path)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, onnx_metadata(config))
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return [ONNX_NAME], _onnx_runner(path), {"exporter": exporter, "opset": opset}


def _onnx_traced(serving: nn.Module, example: torch.Tensor, path: Path) -> str:
    """The quick path: the TorchScript-based exporter (much quicker than the dynamo exporter, and its graph
    runs about as fast) on a copy of the model with fixed TF-"same" padding, then onnxscript's optimizer.
    Raises if the graph still computes shapes at run time (a module ``fix_same_padding`` does not know) or
    if it differs from the eager model at batch sizes 1 and 3; the caller then uses the dynamo exporter."""
    import onnx

    fixed = fix_same_padding(copy.deepcopy(serving), example)
    graph = trace_onnx(fixed, example, INPUT_NAME, OUTPUT_NAMES, opset=ONNX_OPSET, dynamic_batch=True, optimize=True)
    computed = sorted({n.op_type for n in onnx.load_from_string(graph).graph.node if n.op_type in ("Shape", "Size")})
    if computed:
        raise ValueError(f"the traced graph still computes shapes at run time ({', '.join(computed)})")
    session = onnx_session(graph)
    g = torch.Generator().manual_seed(0)
    for n in (1, 3):
        batch = torch.randint(0, 256, (n, *example.shape[1:]), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            want = serving(batch)[1].numpy()
        got = session.run([OUTPUT_NAMES[1]], {INPUT_NAME: batch.numpy()})
        check_against_eager(got, [want], atol=MAX_PROB_DIFF, inputs=f"a random batch of {n}")
    atomic_write_bytes(path, graph)
    return "torch.onnx.export (TorchScript-based, fixed TF padding) + onnxscript optimizer"


def _onnx_dynamo(serving: nn.Module, example: torch.Tensor, path: Path) -> str:
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript", "torch.export"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(serving, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},),
                                    opset_version=ONNX_OPSET, verbose=False)
        program.save(str(path), external_data=False)
    return "torch.onnx.export (dynamo)"


def _onnx_legacy(serving: nn.Module, example: torch.Tensor, path: Path) -> str:
    atomic_write_bytes(path, trace_onnx(serving, example, INPUT_NAME, OUTPUT_NAMES, opset=TRACE_OPSET,
                                        dynamic_batch=True))
    return "torch.onnx.export (TorchScript-based)"


def onnx_metadata(config: dict[str, Any]) -> dict[str, str]:
    """What a consumer of model.onnx alone needs: labels, temperature and the whole hub config."""
    cfg = config["pretrained_cfg"]
    return {
        "label_names": json.dumps(config["label_names"]),
        "temperature": repr(runs.temperature(config)),
        "architecture": config["architecture"],
        "config": json.dumps(config),
        "input": f"{INPUT_NAME}: uint8 RGB, NCHW (N, {', '.join(map(str, cfg['input_size']))}), resized and "
                 f"centre-cropped (crop_pct {cfg.get('crop_pct')}, {cfg.get('interpolation')}); normalised inside",
        "outputs": "logits; probabilities = softmax(logits / temperature)",
        "producer": f"finetune {__version__}",
    }


def _write_pt2(classifier: nn.Module, config: dict[str, Any], staging: Path, device: Device) -> Written:
    serving = ServingModel.from_config(classifier, config)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), _quiet("torch.export"):
        warnings.simplefilter("ignore")
        program = torch.export.export(serving, (_example_input(config),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(staging / PT2_NAME), extra_files={"config.json": json.dumps(config)})
    runner = _torch_runner(load_pt2(staging / PT2_NAME), device)
    return [PT2_NAME], runner, {"exporter": "torch.export", "load": "load_pt2"}


WRITERS: dict[str, Callable[[nn.Module, dict[str, Any], Path, Device], Written]] = {
    "safetensors": _write_safetensors,
    "onnx": _write_onnx,
    "pt2": _write_pt2,
}


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


# --- the whole export ------------------------------------------------------------------------------------
def export_run(
    run_dir: str | Path,
    formats: str | Sequence[str] = DEFAULT_FORMATS,
    out: str | Path | None = None,
    *,
    images: Sequence[str | Path] | None = None,
    n_images: int = PARITY_IMAGES,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Export the model of a run folder to ``out`` (default ``RUN/export``) and return the manifest.

    Each format is checked against the eager fp32 model on ``n_images`` validation images of the run (or
    ``images``) at each of ``batch_sizes``; a failed check raises `ExportError` and that format's files are
    not written. The manifest (``manifest.json``) records the input contract, the files and the figures.
    The eager model and the PyTorch-loaded formats compute on ``accelerator`` (``device.resolve_device``;
    without TF32), ONNX in onnxruntime on the CPU.
    """
    run_dir = Path(run_dir)
    chosen = parse_formats(formats)
    tune_allocator()
    device = resolve_device(accelerator)
    classifier, config = runs.load_model(run_dir)
    out = Path(out) if out is not None else run_dir / EXPORT_DIR
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the export")
    started = time.perf_counter()
    sample = check_images(run_dir, config, n_images, images, max(batch_sizes))
    manifest = _manifest(run_dir, config, sample) | {"parity_device": device.name}
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        with device.exact():
            reference = reference_outputs(classifier, sample, runs.temperature(config), device)
            atomic_write_json(staging / runs.CONFIG_NAME, config)
            for fmt in chosen:
                t0 = time.perf_counter()
                files, run, details = WRITERS[fmt](classifier, config, staging, device)
                figures = parity(run, sample, reference, batch_sizes)
                if not figures["passed"]:
                    raise ExportError(f"the {fmt} export of {run_dir} does not predict what the trained model "
                                      f"predicts: {_describe(figures)}; nothing was written for it. Please report "
                                      "this with the model name; other formats may still work (--format)")
                for name in files:
                    os.replace(staging / name, out / name)
                manifest["formats"][fmt] = {"files": {name: _file_entry(out / name) for name in files}, **details,
                                            "parity": figures, "seconds": round(time.perf_counter() - t0, 2)}
                log.info("exported %s: %s", fmt, _describe(figures))
        os.replace(staging / runs.CONFIG_NAME, out / runs.CONFIG_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _manifest(run_dir: Path, config: dict[str, Any], sample: CheckImages) -> dict[str, Any]:
    import onnx
    import onnxruntime

    cfg = config["pretrained_cfg"]
    return {
        "format": "finetune.export",
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_run": str(run_dir),
        "architecture": config["architecture"],
        "head": config.get("finetune", {}).get("head", "linear"),
        "label_names": config["label_names"],
        "temperature": runs.temperature(config),
        "input": {
            "name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW RGB",
            "shape": ["batch", *cfg["input_size"]],
            "preprocess": {k: cfg.get(k) for k in ("interpolation", "crop_pct", "crop_mode")},
            "normalisation": {"mean": cfg["mean"], "std": cfg["std"], "where": "inside the model"},
        },
        "outputs": {"logits": ["batch", config["num_classes"]],
                    "probabilities": "softmax(logits / temperature), same shape"},
        "parity_images": sample.paths,
        "formats": {},
        "versions": {"finetune": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _describe(figures: dict[str, Any]) -> str:
    parts = [f"batch {bs}: top-1 agreement {f['top1_agreement']:.0%}, max |dp| {f['max_abs_prob_diff']:.1e}"
             for bs, f in figures["batch_sizes"].items()]
    return f"{figures['images']} images, " + "; ".join(parts)
