"""The frozen-part cache: the top stages on cached activations train on the loss the whole network gives, the
view schedule is deterministic and uses every view, and a run with it exports and predicts."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from finetune import caches, recipes
from finetune.data import ImageFolderDataModule, scan_image_folder
from finetune.distributed import Ranks
from finetune.errors import RecipeError
from finetune.model.classifier import Classifier
from finetune.phases import frozen_cache
from finetune.predict import load
from finetune.train import fit


def _classifier(unfreeze_stages: int) -> Classifier:
    torch.manual_seed(0)
    classifier = Classifier(timm.create_model("test_efficientnet", pretrained=False), 3)
    classifier.set_trainable(unfreeze_stages)
    return classifier


def _augmented_batch(folder, classifier) -> tuple[torch.Tensor, torch.Tensor]:
    splits = scan_image_folder(folder, val_fraction=0.25, seed=0)
    config = timm.data.resolve_model_data_config(classifier.backbone)
    datamodule = ImageFolderDataModule(splits, config, batch_size=6, num_workers=0,
                                       augment={"scale_min": 0.35, "hflip": 0.5, "color_jitter": 0.2})
    images, labels, _ = next(iter(datamodule.train_dataloader()))
    return images, labels


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_cached_path_gives_the_whole_networks_loss(dtype, atol, tiny_folder):
    classifier = _classifier(3)
    owners = frozen_cache.frozen_owners(classifier)
    assert owners and all(not p.requires_grad for o in owners for p in classifier.get_submodule(o).parameters())
    images, labels = _augmented_batch(tiny_folder, classifier)
    assert frozen_cache.check_split(classifier, owners, images) is None
    classifier.train()  # frozen modules stay in eval mode: their BatchNorm and stochastic depth are off
    torch.manual_seed(1)
    whole = F.cross_entropy(classifier(images), labels)
    last = frozen_cache._execution_order(classifier, owners, images)[-1]
    with torch.no_grad():
        activations = frozen_cache.FrozenPrefix(classifier, last)(images).to(dtype).float()  # as stored
    torch.manual_seed(1)
    with frozen_cache.skipping(classifier, owners):
        cached = F.cross_entropy(classifier(activations), labels)
    assert cached.item() == pytest.approx(whole.item(), abs=atol)
    assert all("forward" not in vars(classifier.get_submodule(o)) for o in owners)  # the whole network again


def test_view_schedule_is_deterministic_and_uses_every_view():
    def epoch(e, sampler):
        sampler.set_epoch(e)
        return list(sampler)

    a, b = frozen_cache.ViewSampler(10, 3, seed=7), frozen_cache.ViewSampler(10, 3, seed=7)
    assert [epoch(e, a) for e in range(3)] == [epoch(e, b) for e in range(3)]
    seen = {}
    for e in range(3):
        for index, view in epoch(e, a):
            assert view == (e + index) % 3
            seen.setdefault(index, set()).add(view)
    assert all(views == {0, 1, 2} for views in seen.values()) and len(seen) == 10
    assert frozen_cache.view_seed(7, 1, 4) == frozen_cache.view_seed(7, 1, 4) != frozen_cache.view_seed(7, 2, 4)


def test_field_acts_only_where_a_frozen_part_trains_on_top_of_it():
    assert "frozen_cache_views" in recipes.get("large-similar").active_fields()
    for name in ("large-different", "small-similar", "small-different"):
        recipe = recipes.get(name).override({"frozen_cache_views": "2"})
        assert "frozen_cache_views" not in recipe.active_fields() and not recipe.caches_frozen_part, name
    assert not recipes.get("large-similar").override({"test_flip": "true"}).caches_frozen_part
    with pytest.raises(RecipeError, match="frozen_cache_views=-1"):
        recipes.get("large-similar").override({"frozen_cache_views": "-1"})
    assert "activations" in caches.KINDS


def test_fit_with_the_cache_exports_and_predicts(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(frozen_cache, "MEMORY_SHARE", 0.0)  # the memory-mapped file, as for a large set
    folder = image_folder(tmp_path / "data", per_class=8, size=32, split=True)
    result = fit(folder, "large-similar", model="test_efficientnet", pretrained=False, out=tmp_path / "run",
                 overrides={"epochs": 2, "batch_size": 6, "frozen_cache_views": "2"}, progress=False, num_workers=0,
                 export=["safetensors"], precision="fp32")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    cache = summary["frozen_cache"]
    assert cache["used"] and cache["views"] == 2 and cache["bytes"] > 0 and cache["fill_s"] > 0, cache
    assert cache["train_shape"][:2] == [2, summary["train_images"]]
    assert "frozen_cache_s" in summary["timings"] and summary["epochs_run"] == 1
    predictions = load(result.run_dir, backend="torch").predict([next(folder.rglob("*.png"))])
    assert len(predictions) == 1
    assert cache["storage"] == "disk" and not list(caches.KINDS["activations"].folder.iterdir())  # removed


def test_falls_back_with_a_reason_where_it_cannot_store_or_be_exact(tmp_path, monkeypatch, caplog):
    recipe = recipes.get("large-similar")
    cache, summary = frozen_cache.build(None, None, recipe, device=None, precision=None, ranks=Ranks(world=2),
                                        phases=None, name="run")
    assert cache is None and summary == {"used": False, "reason": "it runs on one process only"}
    assert "frozen-part cache not used (it runs on one process only)" in caplog.text
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(frozen_cache, "MEMORY_SHARE", 0.0)
    assert frozen_cache._storage(1000, "run")[0].parent == caches.KINDS["activations"].folder  # on disk
    monkeypatch.setattr(frozen_cache, "DISK_HEADROOM", 1 << 60)  # a full disk
    assert "do not fit in memory or on" in frozen_cache._storage(1000, "run")[1]
    monkeypatch.setitem(caches.KINDS, "activations", caches.Kind("activations", "", 100))
    assert "exceed the activations cache's budget" in frozen_cache._storage(1000, "run")[1]
