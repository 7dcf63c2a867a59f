"""Benchmark training speed (issue 5), side by side in one run, on tf_efficientnet_lite0 at batch size 32.

    python scripts/bench_train.py                       # about 10 minutes; writes bench/train.json
    python scripts/bench_train.py --quick --out /tmp/t.json        # smoke run on tiny settings
    python scripts/bench_train.py --parts steps,cache   # some parts only
    python scripts/bench_train.py --parts frozen_forward,frozen --out bench/train-avx2.json   # machine B

Parts:
- ``steps``: images/s of a bare PyTorch training loop with this machine's best settings (bf16 autocast +
  channels_last where `choose_precision` says so, allocator fixed) against finetune's fine-tuning step (a
  Lightning Trainer with `TransferModule`, recipe large-different with everything unfrozen), on the same
  in-memory batches and the same model object. The two take turns (one block of steps each per round), so
  load from other processes hits both alike; figures are medians over rounds. Target: ratio >= 0.9.
- ``frozen``: small-similar on the Fashion-MNIST demo folder through the backbone every epoch
  (``cached_features=False``) against the default (features computed once, head by L-BFGS), and the default
  with the features computed in eager PyTorch instead of onnxruntime (``feature_backend="torch"``).
  Target: >= 10x faster, accuracy not lower.
- ``frozen_forward``: images/s of the frozen pass that computes cached features (the multi-stage head's input)
  in eager PyTorch (this machine's precision and memory format) and in onnxruntime, on the same in-memory
  batches, taking turns; and the seconds to trace and check the ONNX graph.
- ``cache``: epochs (a train pass with the train transform + a val pass) over 1000 x 800 JPEGs made from
  scikit-image photos, with and without the decoded-image cache. Target: epochs after the first at most a
  third of the first.
- ``allocator``: eval-mode inference images/s with and without `tune_allocator()`, each in its own child
  process (mallopt settings are process-wide and cannot be undone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
NUM_CLASSES = 10
PARTS = ("steps", "frozen", "frozen_forward", "cache", "allocator")


@dataclass(frozen=True)
class Settings:
    batch_size: int = 32
    image_size: int = 224  # training input of the steps and allocator parts
    rounds: int = 4  # steps part: rounds of (bare block, Lightning block)
    warmup_steps: int = 1  # per Lightning fit (the bare loop warms up with one more: the first steps of a
    # process are 3x slower while oneDNN builds its kernels, and both loops share that cache)
    block_steps: int = 3  # timed steps per block
    fashion_mnist: str = "data/fashion-mnist"
    frozen_epochs: int | None = None  # None: the recipe's
    frozen_limit_batches: int | None = None
    forward_rounds: int = 3  # frozen_forward part: rounds of (torch block, onnx block)
    forward_batches: int = 4  # batches per block
    jpegs: int = 300
    jpeg_size: tuple[int, int] = (800, 1000)  # (h, w)
    cache_epochs: int = 4
    allocator_pairs: int = 3
    infer_batches: int = 8


QUICK = Settings(batch_size=2, image_size=32, rounds=1, warmup_steps=1, block_steps=1, fashion_mnist="",
                 frozen_epochs=1, frozen_limit_batches=2, forward_rounds=1, forward_batches=1, jpegs=12,
                 jpeg_size=(256, 320), cache_epochs=2,
                 allocator_pairs=1, infer_batches=2)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child_infer:
        return _child_infer(args.child_infer == "on", args.precision, args.batch_size, args.image_size, args.batches)
    from finetune.runtime import choose_precision, tune_allocator

    settings = QUICK if args.quick else Settings()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    for name in ("finetune", "pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    tune_allocator()
    prec = choose_precision()
    report: dict = {"command": "python scripts/bench_train.py" + (" --quick" if args.quick else ""),
                    "quick": args.quick, "model": MODEL, "batch_size": settings.batch_size,
                    "precision": prec.lightning, "channels_last": prec.channels_last, "machine": _machine()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for part in PARTS:
            if part in parts:
                load = os.getloadavg()
                t0 = time.perf_counter()
                result = BENCHES[part](settings, prec, Path(tmp))
                result.update(load_average_before=[round(x, 2) for x in load],
                              seconds=round(time.perf_counter() - t0, 1))
                report[part] = result
                print(f"{part}: {json.dumps(_headline(part, result))}", flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_s']} s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "train.json")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of every part")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--child-infer", choices=("on", "off"), help=argparse.SUPPRESS)  # allocator part
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    return parser


def _headline(part: str, result: dict) -> dict:
    keys = {"steps": ("bare_images_per_s", "lightning_images_per_s", "ratio"),
            "frozen": ("speedup_wall", "speedup_train", "val_acc_cached", "val_acc_uncached",
                       "onnx_over_torch_features"),
            "frozen_forward": ("torch_images_per_s", "onnx_images_per_s", "ratio", "onnx_setup_s"),
            "cache": ("uncached_epoch_s", "cached_first_epoch_s", "cached_later_epoch_s", "later_over_first"),
            "allocator": ("with_images_per_s", "without_images_per_s", "speedup", "fp32_speedup")}[part]
    return {k: result.get(k) for k in keys}


# --- part 1 + 2: bare loop against finetune's Lightning step ---------------------------------------------


def bench_steps(s: Settings, prec, tmp: Path) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from finetune import create_backbone, recipes
    from finetune.model.classifier import Classifier
    from finetune.model.freezing import StagedFinetuning
    from finetune.model.module import TransferModule

    recipe = recipes.get("large-different").override({"freeze_epochs": 0})
    torch.manual_seed(0)
    backbone = create_backbone(MODEL, pretrained=True, num_classes=NUM_CLASSES, drop_path_rate=recipe.drop_path)
    model = Classifier(backbone, NUM_CLASSES, head=recipe.head, head_dropout=recipe.head_dropout)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_trainable(-1)
    n_batches = s.warmup_steps + s.block_steps
    batches = [(torch.randn(s.batch_size, 3, s.image_size, s.image_size),
                torch.randint(0, NUM_CLASSES, (s.batch_size,)), []) for _ in range(n_batches)]

    bare = _BareLoop(model, prec, recipe.label_smoothing)
    module = TransferModule(model, recipe, channels_last=prec.channels_last)
    class StepStamps(pl.Callback):
        """The time at the end of every step: differences are whole step periods, Lightning included."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter())

    stamps = StepStamps()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    def lightning_block() -> float:
        stamps.times.clear()
        trainer = pl.Trainer(
            max_epochs=1, max_steps=n_batches, accelerator="cpu", devices=1, precision=prec.lightning,
            logger=CSVLogger(tmp / "steps", name="", version=""), log_every_n_steps=5,
            callbacks=[StagedFinetuning(0, recipe.unfreeze_stages), stamps], enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=loader)
        return stamps.times[-1] - stamps.times[s.warmup_steps - 1]  # from the end of the last warm-up step

    for x, y, _ in batches[: s.warmup_steps + 1]:
        bare.step(x, y)
    bare_s, lightning_s = [], []
    for _ in range(s.rounds):
        t0 = time.perf_counter()
        for x, y, _ in batches[s.warmup_steps:]:
            bare.step(x, y)
        bare_s.append(time.perf_counter() - t0)
        lightning_s.append(lightning_block())
    images = s.block_steps * s.batch_size
    bare_ips = [images / t for t in bare_s]
    lightning_ips = [images / t for t in lightning_s]
    ratios = [b / a for a, b in zip(bare_s, lightning_s, strict=True)]
    return {
        "recipe": "large-different, freeze_epochs=0 (everything trains), drop_path and head dropout as the recipe",
        "image_size": s.image_size, "rounds": s.rounds, "steps_per_block": s.block_steps,
        "bare_images_per_s": round(statistics.median(bare_ips), 2),
        "lightning_images_per_s": round(statistics.median(lightning_ips), 2),
        "ratio": round(statistics.median([1 / r for r in ratios]), 3), "target_ratio": 0.9,
        "bare_per_round": [round(v, 2) for v in bare_ips],
        "lightning_per_round": [round(v, 2) for v in lightning_ips],
    }


class _BareLoop:
    """What a PyTorch user would write: one AdamW group, autocast, channels_last input, set_to_none."""

    def __init__(self, model: torch.nn.Module, prec, label_smoothing: float) -> None:
        self.model, self.prec, self.label_smoothing = model, prec, label_smoothing
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                           weight_decay=0.05)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.train()
        if self.prec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.prec.lightning == "bf16-mixed" else nullcontext()
        with autocast:
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


# --- part 3: frozen backbone every epoch against cached features ---------------------------------------


def bench_frozen(s: Settings, prec, tmp: Path) -> dict:
    import finetune
    from finetune.data.doctor import preflight
    from finetune.train import load_splits

    data_dir = Path(s.fashion_mnist) if s.fashion_mnist else _tiny_folder(tmp / "tiny")
    if not data_dir.is_dir():
        raise SystemExit(f"{data_dir} is missing: python scripts/make_fashion_mnist.py --out {data_dir} "
                         "--per-class 100 --val-per-class 100")
    preflight(load_splits(data_dir), progress=False)  # the doctor's scan cache is warm for both runs
    kwargs = {"progress": False, "export": None}  # the export costs both runs the same (5-15 s): left out
    if s.frozen_epochs is not None:
        kwargs |= {"epochs": s.frozen_epochs, "limit_batches": s.frozen_limit_batches}
    runs = {}
    for name, overrides, backend in (("cached", {}, "auto"), ("uncached", {"cached_features": False}, "auto"),
                                     ("cached_torch", {}, "torch")):
        t0 = time.perf_counter()
        result = finetune.fit(data_dir, "small-similar", overrides=overrides, out=tmp / f"frozen-{name}",
                              feature_backend=backend, **kwargs)
        wall = time.perf_counter() - t0
        summary = result.summary
        runs[name] = {"wall_s": round(wall, 1), "total_s": round(summary["timings"]["total_s"], 1),
                      "train_s": round(summary["timings"]["train_s"], 1), "epochs_run": summary["epochs_run"],
                      "val_acc": round(result.val["acc"], 4), "training": summary["training"]}
        if summary["probe"]:
            runs[name] |= {k: round(summary["probe"][k], 1) for k in ("features_s", "fit_s")}
            runs[name]["features_backend"] = summary["probe"]["features_backend"]
    cached, uncached = runs["cached"], runs["uncached"]
    return {"data": str(data_dir), "recipe": "small-similar", "export": None, "train_images": summary["train_images"],
            "val_images": summary["val_images"], **runs,
            # each uncached epoch passes the train and val images through the backbone once; the cached run
            # passes each once in all, so the speedup cannot exceed the epoch count
            "speedup_bound": uncached["epochs_run"],
            "speedup_wall": round(uncached["wall_s"] / cached["wall_s"], 2),
            "speedup_train": round(uncached["train_s"] / cached["train_s"], 2),
            "val_acc_cached": cached["val_acc"], "val_acc_uncached": uncached["val_acc"], "target_speedup": 10,
            "onnx_over_torch_features": round(runs["cached_torch"]["features_s"] / cached["features_s"], 2)}


# --- part 4: the frozen pass in eager PyTorch against onnxruntime ----------------------------------------


def bench_frozen_forward(s: Settings, prec, tmp: Path) -> dict:
    from finetune import create_backbone
    from finetune.model.classifier import Classifier
    from finetune.model.frozen_forward import frozen_forward
    from finetune.model.probe import HeadFeatures

    size = s.image_size
    backbone = create_backbone(MODEL, pretrained=True, num_classes=NUM_CLASSES)
    classifier = Classifier(backbone, NUM_CLASSES, head="multistage", head_stages=3).eval()
    if prec.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    module = HeadFeatures(classifier)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(s.batch_size, 3, size, size, generator=g) for _ in range(s.forward_batches)]
    t0 = time.perf_counter()
    onnx, used = frozen_forward(module, batches[0], backend="onnx")
    setup_s = time.perf_counter() - t0
    torch_run, _ = frozen_forward(module, batches[0], backend="torch", bf16=prec.lightning == "bf16-mixed",
                                  channels_last=prec.channels_last)
    torch_run(batches[0]), onnx(batches[0])  # warm-up: oneDNN kernels, onnxruntime arenas
    rates: dict[str, list[float]] = {"torch": [], "onnx": []}
    for _ in range(s.forward_rounds):
        for name, run in (("torch", torch_run), ("onnx", onnx)):
            t0 = time.perf_counter()
            for x in batches:
                run(x)
            rates[name].append(len(batches) * s.batch_size / (time.perf_counter() - t0))
    torch_rate, onnx_rate = statistics.median(rates["torch"]), statistics.median(rates["onnx"])
    return {"module": "multi-stage head features (top 3 stages + final), eval", "image_size": size,
            "onnx_backend_used": used, "onnx_setup_s": round(setup_s, 2),
            "torch_precision": prec.lightning, "torch_channels_last": prec.channels_last,
            "torch_images_per_s": round(torch_rate, 1), "onnx_images_per_s": round(onnx_rate, 1),
            "ratio": round(onnx_rate / torch_rate, 2), "torch_runs": [round(r, 1) for r in rates["torch"]],
            "onnx_runs": [round(r, 1) for r in rates["onnx"]]}


def _tiny_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    from PIL import Image

    for c, colour in enumerate(((200, 40, 40), (40, 180, 60), (40, 60, 200))):
        for i in range(8):
            folder = root / ("val" if i % 4 == 0 else "train") / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# --- part 5: decoded-image cache ---------------------------------------------------------------------------


def bench_cache(s: Settings, prec, tmp: Path) -> dict:
    import timm

    from finetune.data import DecodedImageCache, ImageFolderDataModule, scan_image_folder
    from finetune.recipes import get

    t0 = time.perf_counter()
    root = make_photo_jpegs(tmp / "jpegs", s.jpegs, s.jpeg_size)
    made = time.perf_counter() - t0
    config = timm.data.resolve_data_config({}, model=timm.create_model(MODEL, pretrained=False))
    splits = scan_image_folder(root)
    r = get("large-different")
    augment = {"scale_min": r.scale_min, "hflip": r.hflip, "color_jitter": r.color_jitter}

    def datamodule(cache) -> ImageFolderDataModule:
        return ImageFolderDataModule(splits, config, batch_size=s.batch_size, augment=augment, decoded_cache=cache)

    uncached = _epochs(datamodule(False), s.cache_epochs)
    cache = DecodedImageCache.for_dataset(root, config, directory=tmp / "decoded-cache")
    dm = datamodule(cache)
    cached = _epochs(dm, s.cache_epochs)
    first, later = cached[0], statistics.median(cached[1:])
    return {
        "images": s.jpegs, "train_images": len(splits.train), "val_images": len(splits.val),
        "jpeg": f"{s.jpeg_size[1]} x {s.jpeg_size[0]}, quality 90, crops of scikit-image photos, 5 classes",
        "megabytes": round(sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1e6, 1),
        "generate_s": round(made, 1), "num_workers": dm.num_workers, "cache_side": cache.side,
        "cache_megabytes": round(cache.nbytes / 1e6, 1),
        "epoch": "one pass over the train loader (train transform of large-different) + one over the val loader",
        "uncached_epochs_s": [round(t, 2) for t in uncached], "cached_epochs_s": [round(t, 2) for t in cached],
        "uncached_epoch_s": round(statistics.median(uncached), 2), "cached_first_epoch_s": round(first, 2),
        "cached_later_epoch_s": round(later, 2), "later_over_first": round(later / first, 3),
        "later_over_uncached": round(later / statistics.median(uncached), 3), "target_later_over_first": 1 / 3,
    }


def _epochs(dm, epochs: int) -> list[float]:
    """Seconds per epoch; the loaders are built inside the first (that is when the cache is filled)."""
    times, loaders = [], None
    for _ in range(epochs):
        t0 = time.perf_counter()
        loaders = loaders or (dm.train_dataloader(), dm.val_dataloader())
        for loader in loaders:
            for _batch in loader:
                pass
        times.append(time.perf_counter() - t0)
    return times


def make_photo_jpegs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` JPEGs of (h, w) = ``size``: random crops (at least half the area) of five scikit-image photos,
    resized, flipped at random, with light noise so they compress like camera images; one class per photo."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
              "rocket": skimage.data.rocket(), "chelsea": skimage.data.chelsea(),
              "hubble": skimage.data.hubble_deep_field()}
    for i in range(count):
        name = list(photos)[i % len(photos)]
        photo = photos[name]
        h, w = photo.shape[:2]
        ch, cw = (int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0)))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((size[1], size[0]), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 3, (size[0], size[1], 3)).astype(np.int16)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


# --- part 6: allocator, one child process per setting ------------------------------------------------------


def bench_allocator(s: Settings, prec, tmp: Path) -> dict:
    """Both settings in turn, per precision: this machine's choice, and fp32 (CPUs without native bf16)."""
    result: dict = {"mode": "eval, inference_mode; 'auto' = choose_precision() (autocast + memory format)",
                    "image_size": s.image_size, "pairs": s.allocator_pairs, "batches_per_child": s.infer_batches}
    for precision in ("auto", "fp32"):
        runs: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(s.allocator_pairs):
            for setting in ("off", "on"):
                runs[setting].append(_run_child(setting, precision, s))
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        prefix = "" if precision == "auto" else "fp32_"
        result |= {f"{prefix}with_images_per_s": round(on, 2), f"{prefix}without_images_per_s": round(off, 2),
                   f"{prefix}speedup": round(on / off, 2), f"{prefix}with_runs": runs["on"],
                   f"{prefix}without_runs": runs["off"]}
    return result


def _run_child(setting: str, precision: str, s: Settings) -> float:
    command = [sys.executable, __file__, "--child-infer", setting, "--precision", precision,
               "--batch-size", str(s.batch_size), "--image-size", str(s.image_size), "--batches", str(s.infer_batches)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # nothing tunes glibc for "off"
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


def _child_infer(allocator: bool, precision: str, batch_size: int, image_size: int, batches: int) -> int:
    from finetune import create_backbone
    from finetune.runtime import choose_precision, tune_allocator

    applied = tune_allocator() if allocator else False
    prec = choose_precision(precision)
    model = create_backbone(MODEL, pretrained=True).eval()
    x = torch.randn(batch_size, 3, image_size, image_size)
    if prec.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if prec.lightning == "bf16-mixed" else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for i in range(batches + 2):  # two warm-up batches
            t0 = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    print(json.dumps({"allocator": applied, "images_per_s": round(batch_size / statistics.median(times), 2)}))
    return 0


def write_result(result: dict, out: Path | None) -> None:
    """Print a benchmark's result as JSON, and write it to ``out`` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


def _machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    from finetune.runtime import cpu_has_bf16

    return {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "native_bf16": cpu_has_bf16(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


BENCHES: dict[str, Callable[..., dict]] = {"steps": bench_steps, "frozen": bench_frozen,
                                           "frozen_forward": bench_frozen_forward, "cache": bench_cache,
                                           "allocator": bench_allocator}

if __name__ == "__main__":
    raise SystemExit(main())
