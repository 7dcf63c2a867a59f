"""Frozen one-off passes in onnxruntime: same numbers as eager PyTorch, and a fallback that keeps them right."""

import logging

import pytest
import timm
import torch
from torch import nn

from finetune.model import frozen_forward as ff
from finetune.model.classifier import Classifier
from finetune.model.domain import measure_domain_gap
from finetune.model.probe import extract_features, feature_pass


def classifier(name="test_efficientnet", head="linear"):
    torch.manual_seed(0)
    model = Classifier(timm.create_model(name, pretrained=False, num_classes=3), 3, head=head, head_stages=2)
    # non-trivial BatchNorm statistics, so that folding them into the convolutions is exercised
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def batches(n=3, size=64, batch=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch - i, 3, size, size, generator=g), torch.arange(batch - i) % 3, []) for i in range(n)]


@pytest.mark.parametrize(("name", "head"), [("test_efficientnet", "linear"), ("test_efficientnet", "multistage"),
                                            ("test_resnet", "linear")])
def test_onnx_features_match_eager_pytorch(name, head):
    model = classifier(name, head)
    eager = extract_features(model, batches(), backend="torch")
    onnx = extract_features(model, batches(), backend="onnx")
    assert onnx.backend == "onnx" and eager.backend == "torch"
    assert onnx.features.shape == eager.features.shape == (12, eager.features.shape[1])  # batches of 5, 4 and 3
    torch.testing.assert_close(onnx.features, eager.features, atol=1e-4, rtol=1e-4)
    assert torch.equal(onnx.labels, eager.labels)


def test_onnx_domain_gap_matches_eager_pytorch():
    model = classifier().backbone
    eager = measure_domain_gap(model, batches(), backend="torch")
    onnx = measure_domain_gap(model, batches(), backend="onnx")
    assert onnx.images == eager.images == 12
    assert len(onnx.per_layer) == len(eager.per_layer) > 5
    torch.testing.assert_close(torch.tensor(onnx.per_layer), torch.tensor(eager.per_layer), atol=1e-4, rtol=1e-3)
    assert model.training  # the caller's mode is restored


class Doubles(nn.Module):
    """Leaves the graph through NumPy: the trace freezes the result for the traced images as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)


def test_a_graph_that_disagrees_with_eager_falls_back_to_pytorch(caplog):
    with caplog.at_level(logging.WARNING, logger="finetune"):
        forward, used = ff.frozen_forward(Doubles(), torch.randn(2, 3), backend="onnx")
    assert used == "torch" and "eager PyTorch" in caplog.text
    x = torch.randn(4, 3)
    torch.testing.assert_close(forward(x)[0], x * 2)


def test_choose_backend():
    assert ff.choose_backend("auto", "cpu").name == "onnx"
    assert ff.choose_backend("torch", "cpu").name == "torch"
    assert ff.choose_backend("auto", "cuda").name == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        ff.choose_backend("onnx", "cuda")
    with pytest.raises(ValueError, match="feature backend must be one of"):
        ff.choose_backend("tensorrt", "cpu")


def test_without_onnxruntime_auto_uses_pytorch(monkeypatch):
    monkeypatch.setattr(ff, "find_spec", lambda name: None)
    assert ff.choose_backend("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        ff.choose_backend("onnx", "cpu")


def test_one_trace_serves_every_pass(monkeypatch):
    traces = []
    real = ff._onnx_forward
    monkeypatch.setattr(ff, "_onnx_forward", lambda module, example: traces.append(1) or real(module, example))
    model = classifier()
    runner = feature_pass(model, backend="onnx")
    assert runner.backend is None  # nothing built before the first batch
    train = extract_features(model, batches(), runner=runner)
    val = extract_features(model, batches(n=1), runner=runner)
    assert len(traces) == 1 and train.backend == val.backend == runner.backend == "onnx"
    torch.testing.assert_close(val.features, train.features[:5])
