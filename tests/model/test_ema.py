"""The moving average of the weights (recipe ``ema_decay``): timm's ModelEmaV3 updated after every optimiser
step, scored beside the raw weights, and the better of the two kept and exported."""

import pytorch_lightning as pl
import safetensors.torch
import timm
import torch
from test_module import loader

from finetune import recipes
from finetune.model.classifier import Classifier
from finetune.model.module import EMA_WARMUP_POWER, TransferModule
from finetune.runs import WEIGHTS_NAME, export_state_dict
from finetune.train import fit


class Weights(pl.Callback):
    """The raw weights after each optimiser step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.classifier.state_dict().items()})


def test_the_average_after_three_steps_is_the_hand_computed_one():
    recipe = recipes.get("large-different").override({"ema_decay": 0.9998, "drop_path": 0.0, "head_dropout": 0.0})
    torch.manual_seed(0)
    classifier = Classifier(timm.create_model("test_efficientnet", pretrained=False, num_classes=3), 3)
    module = TransferModule(classifier, recipe, probed=True)
    weights = Weights()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[weights])
    trainer.fit(module, loader())
    assert len(weights.steps) == 3
    # step 1 copies the weights; step s after it mixes in (1 - d) of the new ones, d = 1 - s^-3/4
    expected = weights.steps[0]
    for s, raw in enumerate(weights.steps[1:], start=1):
        d = min(1 - (1 + s) ** -EMA_WARMUP_POWER, recipe.ema_decay)
        expected = {k: d * expected[k] + (1 - d) * raw[k] if raw[k].is_floating_point() else raw[k] for k in raw}
    averaged = module.ema.module.state_dict()
    changed = [k for k in expected if not torch.equal(weights.steps[0][k], weights.steps[2][k])]
    assert changed  # the steps moved the weights, so the average is not trivially any one of them
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in module.ema.module.parameters())


def test_the_kept_weights_are_the_exported_ones(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=8, split=True)
    result = fit(folder, "large-similar", model="test_efficientnet", pretrained=False, progress=False,
                 num_workers=0, out=tmp_path / "run", export=None,
                 overrides={"epochs": 3, "batch_size": 4, "cached_features": False, "freeze_epochs": 1,
                            "ema_decay": 0.9, "early_stopping": 0})
    ema = result.summary["ema"]
    assert ema["kept"] in ("ema", "raw") and {"val_acc_raw", "val_acc_ema"} <= set(ema)
    assert ema["kept"] == ("ema" if ema["val_acc_ema"] > ema["val_acc_raw"] else "raw")
    best = torch.load(result.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    prefix = {"ema": "ema.module.", "raw": "classifier."}[ema["kept"]]
    kept = {k.removeprefix(prefix): v for k, v in best["state_dict"].items() if k.startswith(prefix)}
    classifier = Classifier(timm.create_model("test_efficientnet", pretrained=False, num_classes=3), 3)
    classifier.load_state_dict(kept)
    saved = safetensors.torch.load_file(result.run_dir / WEIGHTS_NAME)
    for k, v in export_state_dict(classifier).items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    assert result.summary["val"]["acc"] == max(ema["val_acc_raw"], ema["val_acc_ema"])
