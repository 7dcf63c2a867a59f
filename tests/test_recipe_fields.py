"""The fields `finetune recipes NAME` shows are the ones that act: changing any of them changes the trained
model, and changing the ones it hides changes nothing."""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import timm
import torch
from imagefolders import make_image_folder

from finetune import recipes
from finetune.runs import load_model
from finetune.train import fit

# a value other than small-similar's for every field it shows (name and description are labels only)
CHANGED = {"model": "test_resnet", "pretrained": True, "unfreeze_stages": 1, "head": "multistage",
           "balance": "none", "cached_features": False, "test_flip": False, "flip_views": False,
           "feature_views": 1, "crop": "center", "ensemble": "test_resnet",
           "probe_weight_decay": 0.5}
# fields it hides, each set far from its value: together they must leave the model as it was
HIDDEN = {"epochs": 3, "batch_size": 5, "lr": 0.5, "weight_decay": 0.3, "label_smoothing": 0.3, "head_dropout": 0.5,
          "scale_min": 0.1, "color_jitter": 0.9, "drop_path": 0.3, "head_stages": 1, "optimizer": "sgd",
          "frozen_cache_views": 3, "ema_decay": 0.5, "divergence_factor": 0.0, "gradient_clip": 5.0}


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """red has 4x the images of green and blue: above the imbalance ratio, so `balance` acts."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root, classes=3, per_class=6, split=True, seed=1)
    make_image_folder(root / "extra", classes=1, per_class=20, split=True, seed=2)
    for path in (root / "extra").rglob("*.*"):
        part, name = path.parent.parent.name, path.name
        path.rename(root / part / "red" / f"extra{name}")
    shutil.rmtree(root / "extra")
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """"Pretrained" weights for the tiny test model, so that `pretrained = true` has something to load."""
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    torch.manual_seed(123)
    safetensors.torch.save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    return path


def _outcome(folder, out, overrides, weights=None):
    values = {"model": "test_efficientnet", "pretrained": False} | overrides
    fit(folder, "small-similar", overrides=values, out=out, progress=False, num_workers=0, export=None,
        weights=weights if values["pretrained"] else None)
    classifier, _ = load_model(out)
    x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return classifier(x)


def test_shown_fields_are_exactly_those_changed_here():
    shown = set(recipes.get("small-similar").active_fields()) - {"name", "description"}
    assert shown == set(CHANGED)
    assert not shown & set(HIDDEN)


@pytest.fixture(scope="module")
def baseline(imbalanced, tmp_path_factory):
    return _outcome(imbalanced, tmp_path_factory.mktemp("runs") / "base", {})


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_changing_a_shown_field_changes_the_model(field, imbalanced, baseline, weights_file, tmp_path):
    changed = _outcome(imbalanced, tmp_path / "run", {field: CHANGED[field]}, weights_file)
    assert changed.shape != baseline.shape or not torch.allclose(changed, baseline, atol=1e-6), field


def test_changing_hidden_fields_changes_nothing(imbalanced, baseline, tmp_path):
    # (the frozen passes run in other batch sizes: the same numbers up to float rounding)
    assert torch.allclose(_outcome(imbalanced, tmp_path / "run", HIDDEN), baseline, atol=1e-5)


@pytest.mark.parametrize("name", recipes.names())
def test_recipe_toml_shows_the_active_fields_and_loads_back(name, tmp_path):
    r = recipes.get(name)
    text = r.to_toml()
    shown = [line.split(" = ")[0] for line in text.splitlines() if " = " in line and not line.startswith("#")]
    assert tuple(shown) == r.active_fields()
    path = tmp_path / "r.toml"
    path.write_text(text)
    loaded = recipes.load(path)
    assert {k: getattr(loaded, k) for k in shown} == {k: getattr(r, k) for k in shown}
    assert loaded.active_fields() == r.active_fields()
