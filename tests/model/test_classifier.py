import pytest
import timm
import torch

from finetune import recipes
from finetune.model.classifier import Classifier, param_groups

TINY = ["test_efficientnet", "test_resnet", "test_vit"]


def make(name="test_efficientnet", num_classes=3, **kwargs):
    torch.manual_seed(0)
    return Classifier(timm.create_model(name, pretrained=False, num_classes=num_classes), num_classes, **kwargs)


@pytest.mark.parametrize("name", TINY)
def test_stage_groups_come_from_timm_and_exclude_the_head(name):
    model = make(name)
    stages = model.stage_groups()
    head = set(model.head_parameter_names())
    names = [n for n, _ in model.named_parameters()]
    flat = [n for group in stages for n in group]
    assert len(stages) >= 3
    assert set(flat) | head == set(names) and not set(flat) & head  # a partition of all parameters
    assert stages[0][0].startswith(("backbone.conv_stem", "backbone.conv1", "backbone.cls_token"))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("unfrozen", [0, 1, 2, -1])
def test_set_trainable_unfreezes_only_the_top_stages(name, unfrozen):
    model = make(name)
    model.set_trainable(unfrozen)
    stages = model.stage_groups()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n = len(stages) if unfrozen == -1 else unfrozen
    expected = set(model.head_parameter_names()) | {p for g in stages[len(stages) - n:] for p in g}
    assert trainable == expected


def test_frozen_batchnorm_stays_in_eval_mode_through_train_calls():
    model = make()
    model.set_trainable(1)
    model.train()
    frozen_bn = [m for n, m in model.backbone.named_modules()
                 if isinstance(m, torch.nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters())]
    live_bn = [m for m in model.backbone.modules()
               if isinstance(m, torch.nn.BatchNorm2d) and any(p.requires_grad for p in m.parameters())]
    assert frozen_bn and live_bn
    assert not any(m.training for m in frozen_bn)
    assert all(m.training for m in live_bn)
    model.eval().train()
    assert not any(m.training for m in frozen_bn)


def test_frozen_running_statistics_do_not_move_in_training_forward():
    model = make()
    model.set_trainable(0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", TINY)
def test_multistage_head_reads_several_stages(name):
    model = make(name, num_classes=5, head="multistage", head_stages=2)
    assert model.backbone.num_classes == 0  # timm's classifier is gone
    assert len(model.multistage.in_features) == 3  # two stages + the final pooled features
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5)


def test_multistage_rejects_more_stages_than_the_backbone_has():
    with pytest.raises(ValueError, match="head_stages=99"):
        make(head="multistage", head_stages=99)


def test_head_is_reinitialised_for_the_new_class_count():
    backbone = timm.create_model("test_efficientnet", pretrained=False)  # 1000-class head
    old = backbone.get_classifier().weight.clone()
    model = Classifier(backbone, 7)
    head = model.backbone.get_classifier()
    assert head.out_features == 7 and model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    # a head that happens to have the right size is still replaced: its weights are not the pretrained ones
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000)
    old = backbone.get_classifier().weight.clone()
    model = Classifier(backbone, 1000)
    assert not torch.equal(model.backbone.get_classifier().weight, old)


@pytest.mark.parametrize("name", recipes.names())
def test_param_groups_give_pretrained_layers_a_lower_rate(name):
    r = recipes.get(name)
    model = make(head=r.head, head_stages=min(r.head_stages, 3))
    groups = param_groups(model, lr=r.lr, backbone_lr_scale=r.backbone_lr_scale, layer_decay=r.layer_decay,
                          weight_decay=r.weight_decay, unfreeze_stages=r.unfreeze_stages,
                          freeze_epochs=r.freeze_epochs)
    head = [g for g in groups if g.name.startswith("head")]
    body = [g for g in groups if not g.name.startswith("head")]
    assert head and all(g.lr == r.lr for g in head)
    if not r.trains_backbone:
        assert not body  # a frozen backbone never enters the optimizer
        return
    assert body and all(g.lr < r.lr for g in body)
    assert all(g.start_epoch == r.freeze_epochs for g in body)
    rates = [g.lr for g in body if not g.name.endswith("no_decay")]
    assert rates == sorted(rates, reverse=True)  # top stage first, decaying towards the stem
    if r.layer_decay < 1:
        assert rates[-1] < rates[0]
    no_decay = [p for g in groups if g.weight_decay == 0 for p in g.params]
    assert no_decay and all(p.ndim <= 1 for p in no_decay)


@pytest.mark.parametrize("head", ["linear", "multistage"])
def test_the_test_time_flip_is_the_mean_of_the_two_views_computed_apart(head):
    """On an image that is not mirror-symmetric (a left-to-right ramp and a block on the left), the model with
    test_flip returns the mean of its logits on the image and on the mirror image, each computed on its own."""
    ramp = torch.linspace(-2, 2, 64).expand(1, 3, 64, 64).clone()
    ramp[..., 20:40, 4:20] = 2.5
    ramp = torch.cat([ramp, ramp.roll(8, dims=-2)])  # two images: BatchNorm1d in training needs a batch
    assert not torch.equal(ramp, ramp.flip(-1))
    plain = make(head=head, head_stages=2).eval()
    flipping = make(head=head, head_stages=2, test_flip=True).eval()
    flipping.load_state_dict(plain.state_dict())
    with torch.no_grad():
        image, mirror = plain(ramp), plain(ramp.flip(-1))
        assert not torch.allclose(image, mirror, atol=1e-4)  # the views disagree, so the mean is not either one
        torch.testing.assert_close(flipping(ramp), (image + mirror) / 2, rtol=1e-5, atol=1e-6)
        flipping.train()
        torch.testing.assert_close(flipping(ramp), plain.train()(ramp))  # training batches are never mirrored
