"""Which augmented views help the probe (the head fitted on cached features), on held-out test images.

    python scripts/bench_probe_views.py --data data/fm-eval --out bench/probe-views.json

For each head of the `small-*` recipes (linear on top-layer features, multi-stage) the frozen backbone runs
once over train, val and test, and once more over their mirror images (and over one augmented view of train
with the recipe's crop + colour jitter). The head is then fitted by `fit_linear_probe` (weight decay chosen on
validation) on several training sets and scored on the test split, which nothing is selected on:

- `plain`: the images only (the toolkit before flip views);
- `flip_train`: each training image and its mirror image, evaluated on the images only;
- `flip_train_avg_eval`: the same, evaluated on the average of each image's and its mirror's features;
- `avg_eval`: plain training, evaluated on the averaged features;
- `aug_view`: the images plus one augmented view (crop + colour jitter of the recipe), evaluated plainly.
The data folder needs train/, val/ and test/ (scripts/make_fashion_mnist.py --test-per-class 300).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import timm
import torch

from finetune import recipes
from finetune.data import ImageFolderDataModule, scan_image_folder
from finetune.model.backbones import create_backbone
from finetune.model.classifier import Classifier
from finetune.model.probe import CachedFeatures, extract_features, feature_pass, fit_linear_probe


def _flipped(batches):
    for images, labels, bad in batches:
        yield images.flip(-1), labels, bad


def _cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" if "avx512_bf16" in flags else ("avx2" if "avx2" in flags else platform.machine())


def measure(data: Path, recipe_name: str) -> dict:
    r = recipes.get(recipe_name)
    splits = scan_image_folder(data)
    backbone = create_backbone(r.model, pretrained=True, num_classes=len(splits.classes))
    config = timm.data.resolve_model_data_config(backbone)
    classifier = Classifier(backbone, len(splits.classes), head=r.head, head_stages=r.head_stages)
    dm = ImageFolderDataModule(splits, config, batch_size=32, num_workers=0, seed=0,
                               augment={"scale_min": r.scale_min, "hflip": r.hflip, "color_jitter": r.color_jitter})
    runner = feature_pass(classifier, backend="onnx")
    started = time.perf_counter()
    feats = {}
    for split in ("train", "val", "test"):
        feats[split] = extract_features(classifier, dm.feature_loader(split), runner=runner)
        feats[split + "_flip"] = extract_features(classifier, _flipped(dm.feature_loader(split)), runner=runner)
    feats["train_aug"] = extract_features(classifier, dm.feature_loader("train", augment=True), runner=runner)
    seconds = time.perf_counter() - started

    def cat(*views: CachedFeatures) -> CachedFeatures:
        return CachedFeatures(torch.cat([v.features for v in views]), torch.cat([v.labels for v in views]))

    def avg(split: str) -> CachedFeatures:
        return CachedFeatures((feats[split].features + feats[split + "_flip"].features) / 2, feats[split].labels)

    variants = {
        "plain": (feats["train"], feats["val"], feats["test"]),
        "flip_train": (cat(feats["train"], feats["train_flip"]), feats["val"], feats["test"]),
        "flip_train_avg_eval": (cat(feats["train"], feats["train_flip"]), avg("val"), avg("test")),
        "avg_eval": (feats["train"], avg("val"), avg("test")),
        "aug_view": (cat(feats["train"], feats["train_aug"]), feats["val"], feats["test"]),
    }
    rows = {}
    for name, (train, val, test) in variants.items():
        probe = fit_linear_probe(train, val, len(splits.classes))
        z = (test.features - probe.mean) / probe.std
        test_acc = ((z @ probe.weight.T + probe.bias).argmax(1) == test.labels).float().mean().item()
        val_acc = next(row["val_acc"] for row in probe.sweep if row["weight_decay"] == probe.weight_decay)
        rows[name] = {"val_acc": round(val_acc, 4), "test_acc": round(test_acc, 4),
                      "weight_decay": probe.weight_decay}
        print(recipe_name, name, rows[name], flush=True)
    return {"recipe": recipe_name, "head": r.head, "feature_seconds": round(seconds, 1),
            "images": {k: len(v.labels) for k, v in feats.items()}, "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/fm-eval"))
    parser.add_argument("--out", type=Path, default=Path("bench/probe-views.json"))
    parser.add_argument("--recipes", nargs="*", default=["small-similar", "small-different"],
                        help="measured one after the other; rows of other recipes already in --out are kept")
    args = parser.parse_args(argv)
    old = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
    results = [row for row in old if row["recipe"] not in args.recipes]  # other recipes' rows are kept
    for name in args.recipes:
        results.append(measure(args.data, name) | {"cpu": _cpu()})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"data": str(args.data), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
