"""FID/KID plumbing: the uint8/float contract and sanity of the offline Inception features."""

import numpy as np
import pytest
import torch
from PIL import Image

from latent_dmmd.evaluation import FIDKID, to_uint8


def test_to_uint8_contract():
    f = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3).expand(2, 1, 2, 3)
    u = to_uint8(f)
    assert u.dtype == torch.uint8 and u.shape == (2, 3, 2, 3) and u[0, 0, 0].tolist() == [0, 128, 255]
    assert torch.equal(to_uint8(u), u)
    hwc = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    assert torch.equal(to_uint8(hwc), to_uint8(torch.from_numpy(hwc).permute(0, 3, 1, 2)))
    pil = [Image.fromarray((hwc[i] * 255).round().astype(np.uint8)) for i in range(2)]
    assert torch.equal(to_uint8(pil), to_uint8(hwc))
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        to_uint8(torch.full((1, 3, 2, 2), -0.5))


@pytest.fixture(scope="module")
def inception():
    pytest.importorskip("torchmetrics")
    from latent_dmmd.evaluation import FIDInceptionFeatures

    try:
        return FIDInceptionFeatures()
    except ImportError as err:
        pytest.skip(str(err))


def test_inception_refuses_float_images(inception):
    with pytest.raises(ValueError, match="uint8"):
        inception(torch.rand(1, 3, 32, 32))


def test_fid_is_near_zero_for_the_same_set_and_larger_for_a_different_one(inception):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(40, 3, 32, 32, generator=g)
    smooth = torch.nn.functional.avg_pool2d(base, 5, 1, 2)
    m = FIDKID(kid_subset_size=20, extractor=inception)
    m.update(smooth, real=True)
    m.update(to_uint8(smooth), real=False)  # uint8 and float [0, 1] inputs are the same images
    same = m.compute()
    m.reset_fake()
    m.update(base, real=False)
    other = m.compute()
    # identical sets: FID ~0; KID's random subsets make it only ~0 (unbiased, can be negative)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 0.01
    assert other["fid"] > 10 and other["kid"] > 0.05
    assert other["num_real"] == 40 and other["num_fake"] == 40


def test_evaluate_script_writes_metrics_with_protocol(inception, tmp_path):
    import json

    from latent_dmmd.evaluation import evaluate_main

    from .conftest import tiny_pipeline, write_image_folder

    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    write_image_folder(tmp_path / "ref", n=8, size=8)
    out = tmp_path / "m" / "metrics.json"
    evaluate_main([str(tmp_path / "pipe"), "--reference", str(tmp_path / "ref"), "--num_samples", "6",
                   "--batch_size", "3", "--kid_subset_size", "4", "--output", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    assert record["metrics"]["num_fake"] == 6 and record["metrics"]["num_real"] == 8
    proto = record["protocol"]
    assert proto["nfe"] == 6 and proto["forward_equivalents"] == 18 and proto["sampler"]["particles_per_batch"] == 3
    assert proto["reference"]["resolution"] == 8 and "bilinear" in proto["feature_extractor"]
    assert {"torch", "diffusers", "torchmetrics", "device"} <= set(record["environment"])
    assert (tmp_path / "m" / "metrics_samples.png").exists()
    # --real_features: the reference features computed once, then loaded (same numbers); another set's cache refused
    cache = tmp_path / "ref_features.pt"
    argv = [str(tmp_path / "pipe"), "--reference", str(tmp_path / "ref"), "--num_samples", "6", "--batch_size", "3",
            "--kid_subset_size", "4", "--real_features", str(cache)]  # fmt: skip
    first = evaluate_main([*argv, "--output", str(tmp_path / "a.json")])["metrics"]
    assert cache.is_file()
    again = evaluate_main([*argv, "--output", str(tmp_path / "b.json")])["metrics"]
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-6) and again["num_real"] == 8
    assert first["fid"] == pytest.approx(record["metrics"]["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="another reference set"):
        evaluate_main([*argv, "--reference_count", "7", "--output", str(tmp_path / "c.json")])


def test_precision_recall_separate_fidelity_from_coverage():
    from latent_dmmd.evaluation import precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = torch.randn(400, 8, generator=g)
    collapsed = 0.1 * torch.randn(400, 8, generator=g)  # inside the real cloud, covering a sliver of it
    far = 10 + torch.randn(400, 8, generator=g)
    pr_same, pr_collapsed, pr_far = (precision_recall(real, x) for x in (same, collapsed, far))
    assert pr_same["precision"] > 0.7 and pr_same["recall"] > 0.7
    assert pr_collapsed["precision"] > 0.9 and pr_collapsed["recall"] < 0.2
    assert pr_far["precision"] == 0.0 and pr_far["recall"] == 0.0


def test_update_feeds_the_extractor_in_chunks_with_the_same_result():
    """2,000 generated images at 299x299 in one Inception batch need ~20 GB: update() chunks them."""

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 4 * 4, 2048)
            self.batches = []

        def forward(self, x):
            self.batches.append(x.shape[0])
            return self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))

    torch.manual_seed(0)
    extractor = Recording()
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(50, 3, 8, 8, generator=g), torch.rand(50, 3, 8, 8, generator=g) ** 2
    results = []
    for chunk in (7, 100):
        m = FIDKID(kid_subset_size=10, extractor=extractor)
        m.update(real, real=True, chunk=chunk)
        m.update(fake, real=False, chunk=chunk)
        results.append(m.compute())
    assert max(extractor.batches[: 2 * 8]) == 7 and extractor.batches[-1] == 50
    assert abs(results[0]["fid"] - results[1]["fid"]) < 1e-6 * max(1.0, results[1]["fid"])
    assert results[0]["num_fake"] == results[1]["num_fake"] == 50


def test_saved_reference_features_give_the_same_scores(inception):
    """quality_vs_nfe --real_features: the reference set's features computed once and reused."""
    g = torch.Generator().manual_seed(3)
    real, fake = torch.rand(30, 3, 32, 32, generator=g), torch.rand(30, 3, 32, 32, generator=g) * 0.5
    direct = FIDKID(kid_subset_size=10, extractor=inception)
    direct.update(real, real=True)
    direct.update(fake, real=False)
    reused = FIDKID(kid_subset_size=10, extractor=inception)
    reused.add_features(direct.real_features().clone(), real=True)
    reused.update(fake, real=False)
    a, b = direct.compute(), reused.compute()
    assert a["num_real"] == b["num_real"] == 30
    assert abs(a["fid"] - b["fid"]) < 1e-6 and abs(a["precision"] - b["precision"]) < 1e-9
