"""The LightningModule and the freezing callback, trained for real on tiny models and random tensors."""

import math

import pytest
import pytorch_lightning as pl
import timm
import torch
from torch.utils.data import DataLoader

from finetune import recipes
from finetune.model.classifier import Classifier
from finetune.model.freezing import StagedFinetuning
from finetune.model.module import TransferModule, make_metrics, warmup_cosine


def loader(n=16, classes=3, size=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g) * 2 + 0.5  # far from the BN statistics of a fresh model
    y = torch.arange(n) % classes
    data = [(x[i], y[i]) for i in range(n)]
    return DataLoader(data, batch_size=4, collate_fn=lambda b: (torch.stack([i for i, _ in b]),
                                                                torch.stack([t for _, t in b]), []))


def train(recipe, epochs, callbacks=(), **trainer_kwargs):
    torch.manual_seed(0)
    model = Classifier(timm.create_model("test_efficientnet", pretrained=False, num_classes=3), 3,
                       head=recipe.head, head_stages=2)
    module = TransferModule(model, recipe)
    finetuning = StagedFinetuning(recipe.freeze_epochs, recipe.unfreeze_stages)
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0) | trainer_kwargs
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[finetuning, *callbacks], **options)
    return module, finetuning, trainer


class Snapshot(pl.Callback):
    """Records, per epoch, which parameters were trainable and the BN statistics at its end."""

    def __init__(self):
        self.trainable, self.stats = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        cls = pl_module.classifier
        self.trainable.append({n for n, p in cls.named_parameters() if p.requires_grad})
        self.stats.append({k: v.clone() for k, v in cls.state_dict().items() if "running" in k})


@pytest.mark.parametrize("name", recipes.names())
def test_each_recipe_trains_the_right_parameters_in_each_phase(name):
    r = recipes.get(name).override({"freeze_epochs": 1, "epochs": 2} if recipes.get(name).trains_backbone else
                                   {"epochs": 2})
    snap = Snapshot()
    module, finetuning, trainer = train(r, 2, callbacks=[snap])
    before = {k: v.clone() for k, v in module.classifier.state_dict().items() if "running" in k}
    trainer.fit(module, loader(), loader())
    cls = module.classifier
    head = set(cls.head_parameter_names())
    stages = cls.stage_groups()
    assert snap.trainable[0] == head  # phase 1: the head alone, whatever the recipe
    if r.trains_backbone:
        n = len(stages) if r.unfreeze_stages == -1 else r.unfreeze_stages
        assert snap.trainable[1] == head | {p for g in stages[len(stages) - n:] for p in g}
        assert finetuning.phase == "finetune"
    else:
        assert snap.trainable[1] == head
        # frozen BatchNorm statistics are exactly as pretrained after training epochs
        body = {k: v for k, v in snap.stats[1].items() if k.startswith("backbone.")}
        assert body and all(torch.equal(before[k], v) for k, v in body.items())
    # frozen parameters have no gradient and no optimizer state
    optimizer = trainer.optimizers[0]
    frozen = [p for n, p in cls.named_parameters() if n not in snap.trainable[-1]]
    assert all(p.grad is None and p not in optimizer.state for p in frozen)
    if not r.trains_backbone:
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in in_optimizer for p in frozen)


def test_frozen_stage_statistics_unchanged_while_top_stages_train():
    r = recipes.get("large-similar").override({"freeze_epochs": 0, "epochs": 1, "unfreeze_stages": 1})
    module, _, trainer = train(r, 1)
    before = {k: v.clone() for k, v in module.classifier.state_dict().items() if "running_mean" in k}
    trainer.fit(module, loader())
    after = module.classifier.state_dict()
    top = module.classifier.stage_groups()[-1]
    top_modules = {n.rsplit(".", 1)[0] for n in top}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[0] in top_modules for k in changed)


def test_phase_is_saved_and_restored():
    cb = StagedFinetuning(freeze_epochs=2, unfreeze_stages=-1)
    assert cb.phase_for_epoch(1) == "head" and cb.phase_for_epoch(2) == "finetune"
    cb.phase = "finetune"
    restored = StagedFinetuning(freeze_epochs=2, unfreeze_stages=-1)
    restored.load_state_dict(cb.state_dict())
    assert restored.phase == "finetune"
    assert StagedFinetuning(0, 0).phase_for_epoch(5) == "head"  # nothing to unfreeze, ever


class AtTrainStart(pl.Callback):
    """Records the weights the resumed fit starts from and the epochs it runs."""

    def __init__(self):
        self.weights, self.epochs = None, []

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.classifier.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)


def test_resumed_run_continues_from_the_checkpoint_in_the_finetune_phase(tmp_path):
    r = recipes.get("large-similar").override({"freeze_epochs": 1, "epochs": 3})
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module, _, trainer = train(r, 2, callbacks=[ckpt], enable_checkpointing=True)
    initial = {k: v.clone() for k, v in module.classifier.state_dict().items()}
    trainer.fit(module, loader())
    saved = {k.removeprefix("classifier."): v for k, v in
             torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"].items()
             if k.startswith("classifier.")}  # (the recipe's moving average is under "ema.")
    assert any(not torch.equal(initial[k], saved[k]) for k in initial)  # two epochs moved the weights

    start = AtTrainStart()
    module, finetuning, trainer = train(r, 3, callbacks=[start])  # same seed: starts from `initial`
    trainer.fit(module, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert start.epochs == [2]  # only the epoch the first run had not done
    assert all(torch.equal(start.weights[k], saved[k]) for k in saved)  # resumed from the checkpoint's weights
    assert finetuning.phase == "finetune"
    params = dict(module.classifier.named_parameters())
    assert all(params[n].requires_grad for n in module.classifier.stage_groups()[-1])


def test_warmup_then_cosine():
    assert warmup_cosine(4, start=5, warmup=2, total=20, min_ratio=0.1) == 0.0
    assert warmup_cosine(5, start=5, warmup=2, total=20, min_ratio=0.1) == 0.5
    assert warmup_cosine(6, start=5, warmup=2, total=20, min_ratio=0.1) == 1.0
    assert warmup_cosine(7, start=5, warmup=2, total=20, min_ratio=0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, start=5, warmup=2, total=20, min_ratio=0.1) == pytest.approx(0.1)
    mid = warmup_cosine(7 + 13 // 2, start=5, warmup=2, total=20, min_ratio=0.0)
    assert 0.4 < mid < 0.6


def test_first_loss_is_close_to_log_classes():
    # babysitting check: a fresh head on C classes starts near ln(C)
    r = recipes.get("small-similar")
    module, _, _ = train(r, 1)
    x, y, _ = next(iter(loader()))
    loss = torch.nn.functional.cross_entropy(module(x), y)
    assert abs(loss.item() - math.log(3)) < 0.5


def test_metrics_include_top5_only_with_five_classes():
    assert "top5" not in make_metrics(4)
    assert {"acc", "balanced_acc", "macro_f1", "top5"} <= set(make_metrics(5))
