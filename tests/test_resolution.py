"""The input resolution from the images' size: recipes that train the backbone run at 2x the native side, and the
run's model is exported and served at the side it was trained at."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from finetune import recipes
from finetune.data import scan_image_folder
from finetune.predict import load
from finetune.resolution import choose_resolution
from finetune.train import fit


@pytest.mark.parametrize("native, expected", [(28, 64), (48, 96), (100, 224), (500, 224)])
def test_recipes_that_train_the_backbone_run_at_twice_the_native_side(native, expected, tmp_path, image_folder):
    splits = scan_image_folder(image_folder(tmp_path / "d", per_class=4, size=native))
    chosen = choose_resolution(recipes.get("large-different"), splits, backbone_side=224)
    assert (chosen.side, chosen.native) == (expected, native)


def test_probe_recipes_keep_the_backbones_side_and_a_recipe_can_set_it(tmp_path, image_folder):
    splits = scan_image_folder(image_folder(tmp_path / "d", per_class=4, size=28))
    assert choose_resolution(recipes.get("small-similar"), splits, backbone_side=224).side == 224
    assert choose_resolution(recipes.get("large-similar").override({"resolution": 128}), splits, 224).side == 128


@pytest.mark.parametrize("native, crop", [(28, "whole"), (100, "whole"), (224, "center"), (500, "center")])
def test_images_smaller_than_the_input_are_evaluated_whole(native, crop, tmp_path, image_folder):
    splits = scan_image_folder(image_folder(tmp_path / "d", per_class=4, size=native))
    chosen = choose_resolution(recipes.get("small-different"), splits, backbone_side=224)
    assert chosen.crop == crop
    config = chosen.data_config({"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "center"})
    assert (config["crop_pct"], config["crop_mode"]) == ((1.0, "squash") if crop == "whole" else (0.875, "center"))
    forced = recipes.get("small-different").override({"crop": "center"})
    assert choose_resolution(forced, splits, backbone_side=224).crop == "center"


def test_a_run_trained_at_a_reduced_resolution_exports_and_predicts_at_it(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=8, size=40, split=True)  # 40 px -> 96 px, not timm's 160
    result = fit(folder, "large-similar", model="test_efficientnet", pretrained=False, progress=False,
                 num_workers=0, out=tmp_path / "run", export="safetensors,onnx",
                 overrides={"epochs": 2, "batch_size": 8, "freeze_epochs": 1, "head_stages": 2})
    assert result.summary["resolution"]["side"] == 96 and result.summary["resolution"]["native"] == 40
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 96, 96]
    assert (config["pretrained_cfg"]["crop_pct"], config["pretrained_cfg"]["crop_mode"]) == (1.0, "squash")
    manifest = json.loads((result.run_dir / "export" / "manifest.json").read_text())
    assert manifest["input"]["shape"][1:] == [3, 96, 96]
    assert manifest["formats"]["onnx"]["parity"]["passed"]
    graph = onnx.load(result.run_dir / "export" / "model.onnx").graph.input[0]
    assert [d.dim_value for d in graph.type.tensor_type.shape.dim][1:] == [3, 96, 96]
    image = np.asarray(Image.open(next((folder / "val" / "red").iterdir())).convert("RGB")).copy()
    image[:2], image[-2:], image[:, :2], image[:, -2:] = 255, 255, 255, 255  # a white frame: a centre crop cuts it
    for backend in ("onnx", "torch"):
        predictor = load(result.run_dir / "export", backend)
        pixels = predictor.preprocess(image)
        assert pixels.shape[-2:] == (96, 96)
        channels = pixels.reshape(3, 96, 96)
        corners = channels[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.allclose(corners, channels.max(axis=(1, 2))[:, None])  # whole: the frame reaches every corner
        assert predictor.predict([image])[0]  # a prediction, at 96 px
