"""FD-DINOv2 (issue 31): transformers' Dinov2Model as the feature space of torchmetrics' FID/KID, offline on a
tiny random DINOv2 saved to a local folder."""

import json

import pytest
import torch

from latent_dmmd.cli import main as cli
from latent_dmmd.dinov2 import DINOv2Features
from latent_dmmd.evaluation import FIDKID

from .conftest import tiny_pipeline, write_image_folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)  # fmt: skip
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


def images(n, seed, shift=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=gen) * 120 + 40 + torch.rand(n, 3, 16, 16, generator=gen) * 60
    return (base + shift).clamp(0, 255).to(torch.uint8)


def test_features_are_the_cls_token_deterministic_and_shaped(tiny_dinov2):
    feats = DINOv2Features(tiny_dinov2, image_size=56)
    x = images(4, 0)
    a, b = feats(x), feats(x)
    assert a.shape == (4, 32) and feats.num_features == 32 and torch.equal(a, b)
    with pytest.raises(ValueError, match="uint8"):
        feats(x.float())
    # the CLS token of transformers' model (its last_hidden_state is after the final layer norm), preprocessed input
    x224 = torch.nn.functional.interpolate(x.float() / 255, size=(56, 56), mode="bicubic", antialias=True).clamp(0, 1)
    norm = (x224 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = feats.model(pixel_values=norm)
    assert torch.allclose(a, out.last_hidden_state[:, 0], atol=1e-6)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_known_shift(tiny_dinov2):
    feats = DINOv2Features(tiny_dinov2, image_size=56)
    real = images(64, 0)
    fd = {}
    for shift in (0, 30, 90):
        metric = FIDKID(kid_subset_size=32, extractor=feats, num_features=feats.num_features)
        metric.update(real, real=True)
        metric.update(images(64, 0, shift), real=False)
        fd[shift] = metric.compute()["fid"]
    assert abs(fd[0]) < 1e-3
    assert 0 < fd[30] < fd[90]


def test_evaluate_with_dinov2_features_writes_fd_dinov2_and_the_card_says_so(tmp_path, tiny_dinov2, capsys):
    model = tmp_path / "m"
    tiny_pipeline().save_pretrained(model)
    write_image_folder(tmp_path / "refs", n=6, size=8)
    out = tmp_path / "metrics.json"
    assert cli(["evaluate", str(model), "--reference", str(tmp_path / "refs"), "--num_samples", "4", "--batch_size", "4",
                "--metric_features", "dinov2", "--dinov2_model", tiny_dinov2, "--output", str(out)]) == 0  # fmt: skip
    assert "FD-DINOv2" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["metrics"]["features"] == "dinov2" and record["protocol"]["features"] == "dinov2"
    assert "DINOv2" in record["protocol"]["feature_extractor"] and record["metrics"]["num_real"] == 6
    assert cli(["card", str(model), "--metrics", str(out)]) == 0
    card = (model / "README.md").read_text()
    assert "FD-DINOv2" in card and "| FID |" not in card


def test_missing_dinov2_weights_say_how_to_get_them(tmp_path, capsys):
    model = tmp_path / "m"
    tiny_pipeline().save_pretrained(model)
    write_image_folder(tmp_path / "refs", n=4, size=8)
    assert cli(["evaluate", str(model), "--reference", str(tmp_path / "refs"), "--num_samples", "2", "--metric_features",
                "dinov2", "--dinov2_model", str(tmp_path / "no-such-dinov2"), "--output", str(tmp_path / "x.json")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "huggingface-cli download facebook/dinov2-base" in err
