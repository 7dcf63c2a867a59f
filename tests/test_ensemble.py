"""Ensembles (``fit --ensemble A,B``): several frozen backbones on one input, one head on their concatenated
features, one run folder and one ONNX graph that predict, evaluate and export use like a single model."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from finetune.errors import RecipeError
from finetune.evaluate import evaluate
from finetune.model.classifier import Member
from finetune.predict import load
from finetune.runs import load_model
from finetune.serving import ServingModel
from finetune.train import fit


def test_a_member_reads_the_first_backbones_input_as_its_own():
    """test_resnet normalises with mean 0.5; the input comes normalised with ImageNet's mean and std."""
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    member = Member(backbone, "test_resnet", 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), *imagenet).eval()
    raw = torch.rand(2, 3, 64, 64)
    as_input = (raw - torch.tensor(imagenet[0]).view(1, 3, 1, 1)) / torch.tensor(imagenet[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        got = member(as_input)
        final, stages = backbone.forward_intermediates((raw - 0.5) / 0.5, indices=[3, 4])
        want = [s.mean((2, 3)) for s in stages] + [backbone.forward_head(final, pre_logits=True)]
    assert [g.shape[1] for g in got] == member.channels
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    from imagefolders import make_image_folder

    root = tmp_path_factory.mktemp("ens")
    folder = make_image_folder(root / "data", per_class=6, split=True)
    for part in ("test",):  # a held-out split, scored by fit and by evaluate
        make_image_folder(root / "extra", per_class=4, seed=5)
        (root / "extra").rename(folder / part)
    result = fit(folder, "small-different", model="test_efficientnet", pretrained=False, progress=False,
                 num_workers=0, out=root / "run", export="safetensors,onnx",
                 overrides={"ensemble": "test_resnet", "head_stages": 2})
    return folder, result


def test_the_run_folder_describes_the_ensemble_and_its_exports_pass_parity(ensemble_run):
    _, result = ensemble_run
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet"
    [member] = config["finetune"]["ensemble"]
    assert member["architecture"] == "test_resnet" and member["head_stages"] == 2
    assert member["mean"] == [0.5, 0.5, 0.5]
    classifier, _ = load_model(result.run_dir)
    assert len(classifier.members) == 1
    assert classifier.multistage.in_features[-3:] == classifier.members[0].channels
    manifest = json.loads((result.run_dir / "export" / "manifest.json").read_text())
    for name in ("safetensors", "onnx"):
        assert manifest["formats"][name]["parity"]["passed"], name
    assert "ensemble" in manifest["formats"]["safetensors"]["loaded_with"]


def test_predict_and_evaluate_use_it_like_a_single_model(ensemble_run):
    folder, result = ensemble_run
    classifier, config = load_model(result.run_dir)
    image = np.asarray(Image.open(next((folder / "test" / "red").iterdir())).convert("RGB"))
    outputs = {}
    for backend, path in (("torch", result.run_dir), ("onnx", result.run_dir / "export")):
        predictor = load(path, backend)
        [prediction] = predictor.predict([image], top_k=3)
        outputs[backend] = dict(prediction.top_k)
        evaluation = evaluate(predictor, folder / "test", out=result.run_dir / f"eval-{backend}")
        assert evaluation.images == 12
        assert evaluation.accuracy == pytest.approx(result.summary["test"]["acc"], abs=1e-6), backend
    for label, score in outputs["torch"].items():
        assert outputs["onnx"][label] == pytest.approx(score, abs=1e-4)
    serving = ServingModel.from_config(classifier, config)  # the model itself: both members and the head
    with torch.no_grad():
        probs = serving(torch.as_tensor(load(result.run_dir, "torch").preprocess(image))[None])[1][0]
    assert outputs["torch"] == pytest.approx({label: probs[i].item() for i, label in enumerate(config["label_names"])
                                              if label in outputs["torch"]}, abs=1e-5)


def test_an_ensemble_needs_a_frozen_backbone_recipe():
    from finetune import recipes

    with pytest.raises(RecipeError, match="ensemble combines frozen backbones"):
        recipes.get("large-different").override({"ensemble": "mobilenetv2_100"})
