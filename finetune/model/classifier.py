"""A pretrained timm backbone with a fresh head, its stage groups and its per-group learning rates.

Stages come from timm's own coarse grouping (``group_matcher(coarse=True)``): the stem, then one group per
stage, then the classifier. "The top two stages" therefore means the same thing on every architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from timm.models import group_parameters
from torch import nn

from ..errors import RecipeError
from ..recipes import Recipe


class MultiStageHead(nn.Module):
    """Linear classifier on globally pooled features of several stages, concatenated.

    Top-layer features are specific to the pretraining task; earlier stages carry more generic texture and
    shape information, which is what a small, different target data set needs. Each stage's features live
    on their own scale, so they are standardised (BatchNorm1d) before the linear layer.
    """

    def __init__(self, in_features: list[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = list(in_features)
        total = sum(in_features)
        self.norm = nn.BatchNorm1d(total)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(total, num_classes)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.drop(self.norm(torch.cat(pooled, dim=1))))


HEAD_KINDS = ("linear", "multistage")


def pooled_features(backbone: nn.Module, x: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
    """Globally pooled outputs of ``stages`` (feature-stage indices) and the final pooled features, in float32."""
    if not stages:
        return [backbone.forward_head(backbone.forward_features(x), pre_logits=True).float()]
    final, intermediates = backbone.forward_intermediates(x, indices=list(stages))
    pooled = [f.float().mean(dim=(2, 3)) for f in intermediates]
    pooled.append(backbone.forward_head(final, pre_logits=True).float())
    return pooled


def stage_channels(backbone: nn.Module, stages: Sequence[int]) -> list[int]:
    return [backbone.feature_info[i]["num_chs"] for i in stages] + [backbone.num_features]


def top_stages(backbone: nn.Module, count: int) -> list[int]:
    n_levels = len(backbone.feature_info)
    if not 1 <= count <= n_levels:
        raise head_stages_error(count, type(backbone).__name__, n_levels)
    return list(range(n_levels - count, n_levels))


class Member(nn.Module):
    """One more frozen backbone of an ensemble (``fit --ensemble``). It reads the ensemble's input, which is
    normalised with the first backbone's mean and std, re-normalised to its own (``x * scale + shift``, per
    channel), at the same side, and gives the same pooled features as the first: its top ``head_stages``
    stages and its final features (``head_stages`` 0: the final ones only)."""

    def __init__(self, backbone: nn.Module, name: str, head_stages: int, mean: Sequence[float],
                 std: Sequence[float], input_mean: Sequence[float], input_std: Sequence[float]) -> None:
        super().__init__()
        backbone.reset_classifier(0)
        self.backbone, self.name = backbone, name
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.stages = top_stages(backbone, head_stages) if head_stages else []
        self.channels = stage_channels(backbone, self.stages)
        scale = torch.tensor([a / b for a, b in zip(input_std, std, strict=True)])
        shift = torch.tensor([(a - m) / b for a, m, b in zip(input_mean, mean, std, strict=True)])
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return pooled_features(self.backbone, x * self.scale.to(x.dtype) + self.shift.to(x.dtype), self.stages)

    def to_config(self) -> dict:
        return {"architecture": self.name, "head_stages": len(self.stages), "mean": self.mean, "std": self.std,
                "num_features": self.backbone.num_features}


class Classifier(nn.Module):
    """``backbone`` is a timm model. With ``head="linear"`` its own classifier is the head (plain timm can
    load the weights); with ``head="multistage"`` timm's classifier is removed and a MultiStageHead reads
    the last ``head_stages`` feature stages plus the final pooled features. With ``test_flip`` the model in
    eval mode returns the mean of the logits of each image and of its mirror image (the export does too);
    training batches are never mirrored here (that is the augmentation's job). ``members``: more frozen
    backbones (an ensemble); the head is then always a MultiStageHead on the features of all of them (the final
    features of each with ``head="linear"``, its top stages too with ``"multistage"``)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: str = "linear",
        head_stages: int = 3,
        head_dropout: float = 0.0,
        test_flip: bool = False,
        members: Sequence[Member] = (),
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.backbone = backbone
        self.head_kind = head
        self.num_classes = num_classes
        self.test_flip = test_flip
        self.members = nn.ModuleList(members)
        if members:
            if head not in HEAD_KINDS:
                raise ValueError(f"head must be 'linear' or 'multistage', got {head!r}")
            self.head_stages = top_stages(backbone, head_stages) if head == "multistage" else []
            backbone.reset_classifier(0)
            channels = stage_channels(backbone, self.head_stages) + [c for m in members for c in m.channels]
            self.multistage = MultiStageHead(channels, num_classes, head_dropout)
        elif head == "linear":
            self.head_stages: list[int] = []
            if backbone.num_classes != num_classes or _needs_reset(backbone):
                backbone.reset_classifier(num_classes)
            if head_dropout:
                backbone.drop_rate = head_dropout  # timm applies drop_rate before its classifier
            self.multistage = None
        elif head == "multistage":
            self.head_stages = top_stages(backbone, head_stages)
            backbone.reset_classifier(0)
            self.multistage = MultiStageHead(stage_channels(backbone, self.head_stages), num_classes, head_dropout)
        else:
            raise ValueError(f"head must be 'linear' or 'multistage', got {head!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.test_flip and not self.training:  # the image, then its mirror: two passes, so that an exported
            # graph computes no shapes at run time (slicing one batch of twice the size would)
            return (self._logits(x) + self._logits(x.flip(-1))) / 2
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.multistage is None:
            return self.backbone(x)
        return self.multistage(self._pooled(x))

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What the multi-stage head reads: this backbone's pooled features, then each ensemble member's."""
        return pooled_features(self.backbone, x, self.head_stages) + [f for m in self.members for f in m(x)]

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """The vector the head reads: what a frozen backbone computes once and caches."""
        if self.multistage is None:
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return torch.cat(self._pooled(x), dim=1)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head alone, on cached ``head_features``."""
        if self.multistage is None:
            return self.backbone.get_classifier()(features)
        return self.multistage.fc(self.multistage.drop(self.multistage.norm(features)))

    def set_linear_head(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Install a linear classifier fitted on standardised features ``(f - mean) / std``.

        The multi-stage head keeps the standardisation in its BatchNorm (running statistics = the feature
        statistics, identity affine); timm's linear head absorbs it into its weights, so the exported model is
        still plain timm.
        """
        with torch.no_grad():
            if self.multistage is None:
                fc = self.backbone.get_classifier()
                if not isinstance(fc, nn.Linear):
                    raise TypeError(f"{type(self.backbone).__name__}'s classifier is not a Linear layer")
                fc.weight.copy_(weight / std)
                fc.bias.copy_(bias - (weight * mean / std).sum(dim=1))
            else:
                norm = self.multistage.norm
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(std**2 - norm.eps)
                norm.weight.fill_(1.0)
                norm.bias.zero_()
                self.multistage.fc.weight.copy_(weight)
                self.multistage.fc.bias.copy_(bias)

    def start_head_near_zero(self, seed: int = 0) -> None:
        """Give the new head small weights (normal, std 0.01, from a generator of its own: the global random
        state is left alone) and zero biases, so that its first predictions are about uniform and the first loss
        about ln(C) (../shared/METHOD.md). timm initialises a new classifier for training from scratch: on
        ``tf_efficientnet_lite0``'s pooled features its logits start large (a first loss of 6.0 against
        ln(10) = 2.3 on Fashion-MNIST, `finetune check`)."""
        fc = self.multistage.fc if self.multistage is not None else self.backbone.get_classifier()
        if isinstance(fc, nn.Linear):
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.no_grad():
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * 0.01)
                fc.bias.zero_()

    # --- groups -----------------------------------------------------------------------------------
    def head_parameter_names(self) -> list[str]:
        if self.multistage is not None:
            return [f"multistage.{n}" for n, _ in self.multistage.named_parameters()]
        classifier = self.backbone.get_classifier()
        ids = {id(p) for p in classifier.parameters()}
        return [f"backbone.{n}" for n, p in self.backbone.named_parameters() if id(p) in ids]

    def stage_groups(self) -> list[list[str]]:
        """Parameter names of the pretrained backbone, one list per stage, stem first, head excluded."""
        head = set(self.head_parameter_names())
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        stages = []
        for _, names in sorted(groups.items()):
            names = [f"backbone.{n}" for n in names if f"backbone.{n}" not in head]
            if names:
                stages.append(names)
        return stages

    def set_trainable(self, unfrozen_stages: int) -> None:
        """Freeze every pretrained stage except the top ``unfrozen_stages`` (-1 = all); the head always trains.

        Frozen parameters get ``requires_grad=False`` (no gradient, so no optimizer state), and their
        BatchNorm layers are kept in eval mode by :meth:`train`.
        """
        stages = self.stage_groups()
        n = len(stages) if unfrozen_stages < 0 else min(unfrozen_stages, len(stages))
        trainable = {name for group in stages[len(stages) - n:] for name in group}
        trainable.update(self.head_parameter_names())
        for name, p in self.named_parameters():
            p.requires_grad_(name in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        """Like ``nn.Module.train``, but modules whose parameters are all frozen stay in eval mode.

        Lightning calls ``.train()`` at the start of every training epoch; without this, frozen BatchNorm
        layers would update their running statistics from target-domain batches (Lightning's own
        ``BackboneFinetuning`` has exactly that bug).
        """
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self


def _needs_reset(backbone: nn.Module) -> bool:
    # A head that came with the pretrained weights (same class count by coincidence) must still be new.
    return getattr(backbone, "pretrained_cfg", {}).get("num_classes") == backbone.num_classes


@dataclass(frozen=True)
class GroupSpec:
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float
    start_epoch: int  # when this group starts training (its warm-up starts then)


def param_groups(
    model: Classifier,
    *,
    lr: float,
    backbone_lr_scale: float,
    layer_decay: float,
    weight_decay: float,
    unfreeze_stages: int,
    freeze_epochs: int,
) -> list[GroupSpec]:
    """One group for the head and one per pretrained stage (top stage at ``lr * backbone_lr_scale``, each
    stage below ``layer_decay`` times the one above). Biases and norm weights get no weight decay.
    Stages that are never unfrozen are left out, so they never get optimizer state."""
    named = dict(model.named_parameters())
    stages = model.stage_groups()
    n = len(stages) if unfreeze_stages < 0 else min(unfreeze_stages, len(stages))
    specs: list[GroupSpec] = []
    head = model.head_parameter_names()
    specs.extend(_split_decay("head", [named[k] for k in head], lr, weight_decay, 0))
    for depth, names in enumerate(reversed(stages[len(stages) - n:])):
        stage_lr = lr * backbone_lr_scale * layer_decay**depth
        index = len(stages) - 1 - depth
        specs.extend(_split_decay(f"stage{index}", [named[k] for k in names], stage_lr, weight_decay, freeze_epochs))
    return specs


def _split_decay(name: str, params: list[nn.Parameter], lr: float, wd: float, start: int) -> list[GroupSpec]:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    out = []
    if decay:
        out.append(GroupSpec(name, decay, lr, wd, start))
    if no_decay:
        out.append(GroupSpec(f"{name}.no_decay", no_decay, lr, 0.0, start))
    return out


def check_head_stages(recipe: Recipe) -> None:
    """Refuse a multi-stage head that reads more feature stages than the recipe's backbone has, before any
    weights are loaded: the architecture is built on the meta device (no memory, no weights)."""
    if recipe.head != "multistage" or not timm.is_model(recipe.model):
        return  # an unknown name is reported where the backbone is created, with the offline choices
    with torch.device("meta"):
        levels = len(timm.create_model(recipe.model, pretrained=False).feature_info)
    if recipe.head_stages > levels:
        raise head_stages_error(recipe.head_stages, recipe.model, levels)


def head_stages_error(head_stages: int, model: str, levels: int) -> RecipeError:
    return RecipeError(f"head_stages={head_stages}: {model} has {levels} feature stages; "
                       f"use --set head_stages=N with N from 1 to {levels}")
