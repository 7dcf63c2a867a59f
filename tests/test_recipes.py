import dataclasses

import pytest

from finetune import Recipe, RecipeError, recipes


def test_four_builtin_recipes_one_per_case():
    assert recipes.names() == ["large-different", "large-similar", "small-different", "small-similar"]


@pytest.mark.parametrize("name", recipes.names())
def test_builtin_recipe_loads_and_matches_its_case(name):
    r = recipes.get(name)
    assert r.name == name
    size, domain = name.split("-")
    assert r.trains_backbone == (size == "large")  # little data: the backbone stays frozen
    assert (r.head == "multistage") == (name == "small-different")
    if r.trains_backbone:
        assert r.freeze_epochs >= 1  # a random head never back-propagates into pretrained layers
        assert r.backbone_lr_scale < 1
    if name == "large-different":
        assert r.unfreeze_stages == -1 and r.layer_decay < 1


def test_override_parses_strings_to_field_types():
    r = recipes.get("small-similar").override({"lr": "3e-4", "epochs": "12", "pretrained": "false"})
    assert r.lr == 3e-4 and r.epochs == 12 and r.pretrained is False
    assert dataclasses.replace(r, lr=1e-2).lr == 1e-2


@pytest.mark.parametrize(
    "values, match",
    [
        ({"lr": "fast"}, "cannot read 'fast' as float"),
        ({"lr": "-1"}, "lr=-1.0 is invalid"),
        ({"learning_rate": "1"}, "unknown recipe field 'learning_rate'"),
        ({"head": "mlp"}, "head='mlp' is invalid"),
        ({"epochs": "0"}, "epochs=0"),
        ({"hflip": "2"}, "hflip=2.0"),
    ],
)
def test_bad_overrides_name_the_field(values, match):
    with pytest.raises(RecipeError, match=match):
        recipes.get("large-similar").override(values)


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('lr = "1e-3"\n')
    with pytest.raises(RecipeError, match=r"mine.toml.*lr='1e-3'.*float"):
        recipes.load(bad)
    bad.write_text("learning_rate = 1\n")
    with pytest.raises(RecipeError, match=r"mine.toml: unknown keys \['learning_rate'\]"):
        recipes.load(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        recipes.load(tmp_path / "missing.toml")
    with pytest.raises(RecipeError, match="unknown recipe 'tiny'.*small-similar"):
        recipes.get("tiny")


def test_custom_recipe_file_is_a_recipe(tmp_path):
    path = tmp_path / "quick.toml"
    path.write_text('epochs = 2\nlr = 1e-2\n')
    r = recipes.get(path)
    assert isinstance(r, Recipe) and r.name == "quick" and r.epochs == 2


@pytest.mark.parametrize(
    "per_class, domain, expected",
    [(10, "similar", "small-similar"), (249, "different", "small-different"),
     (250, "similar", "large-similar"), (5000, "different", "large-different")],
)
def test_choose_by_images_per_class_and_domain(per_class, domain, expected):
    name, reason = recipes.choose(per_class, domain)
    assert name == expected
    assert str(recipes.SMALL_DATA_IMAGES_PER_CLASS) in reason and domain in reason


def test_active_fields_follow_the_training_path():
    similar = recipes.get("small-similar")
    assert "lr" not in similar.active_fields() and "flip_views" in similar.active_fields()
    uncached = similar.override({"cached_features": "false"})
    assert {"lr", "epochs", "hflip"} <= set(uncached.active_fields()) and "flip_views" not in uncached.active_fields()
    assert "scale_min" in similar.override({"feature_views": "1"}).active_fields()
    large = recipes.get("large-different")
    assert {"flip_views", "lr", "layer_decay", "freeze_epochs"} <= set(large.active_fields())
    assert "momentum" not in large.active_fields()
    assert "momentum" in large.override({"optimizer": "sgd"}).active_fields()


def test_max_train_images_cuts_the_lightning_epochs():
    """large-different: 15 epochs, the first replaced by the probe; on a large set the cap acts, never below 1."""
    r = recipes.get("large-different")
    assert r.max_train_images == 270_000
    assert r.lightning_epochs(1_000, probed=True) == 14  # the demo keeps the recipe's epochs
    assert r.lightning_epochs(54_000, probed=True) == 5  # full Fashion-MNIST
    assert r.lightning_epochs(54_000, probed=False) == 5
    assert r.lightning_epochs(1_000_000, probed=True) == 1
    assert r.override({"max_train_images": 0}).lightning_epochs(54_000, probed=True) == 14
    assert r.override({"epochs": 3}).lightning_epochs(54_000, probed=True) == 2  # the cap never adds epochs
    with pytest.raises(RecipeError, match="max_train_images"):
        r.override({"max_train_images": -1})
