"""benchmarks/gpu_256.py refuses to measure without CUDA, and its whole path runs as a CPU smoke run."""

import json
import os
import sys

import pytest
import torch

from .conftest import CELEBA_DIR, TAEF2_DIR

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import common
import gpu_256


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        gpu_256.main(["--steps", "1"])


def test_cpu_smoke_run_trains_samples_and_reports(tmp_path, monkeypatch):
    if not (os.path.isdir(TAEF2_DIR) and os.path.isdir(CELEBA_DIR)):
        pytest.skip("needs ../shared (TAEF2 weights and the CelebA-HQ images)")
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results"))
    record = gpu_256.main(["--allow_cpu", "--config", "configs/debug_cpu.yaml", "--steps", "2", "--num_images", "2",
                           "--output_dir", str(tmp_path / "run"), "--name", "smoke", "--train_args",
                           "--max_train_samples", "32", "--train_batch_size", "32", "--num_inference_steps", "2",
                           "--flow_steps_per_level", "1"])  # fmt: skip
    assert record["train_steps"] == 2 and record["seconds_per_step"] > 0
    assert record["image_shape"] == [3, 64, 64] and record["seconds_per_image"] > 0 and record["nfe"] == 2
    with open(tmp_path / "results" / "smoke.json") as f:
        assert json.load(f)["device"] == "cpu (smoke run)"


@pytest.mark.slow
def test_cpu_smoke_run_of_the_learning_curve(tmp_path, monkeypatch):
    """--curve_steps: DMMD and DDPM on the config's backbone, then the curve's rows at every requested step."""
    if not (os.path.isdir(TAEF2_DIR) and os.path.isdir(CELEBA_DIR)):
        pytest.skip("needs ../shared (TAEF2 weights and the CelebA-HQ images)")
    import curve

    from latent_dmmd.evaluation import FIDKID, reference_images

    class Pooled(torch.nn.Module):  # a stand-in for the Inception features: the bookkeeping is under test
        def forward(self, images):
            return torch.nn.functional.avg_pool2d(images.float() / 255, 16).flatten(1)

    def metric(args, resolution, kid_subset_size=100):
        m = FIDKID(kid_subset_size=4, extractor=Pooled(), num_features=48)
        for batch in reference_images(args.reference, resolution, args.reference_first_index, args.reference_count):
            m.update(batch, real=True)
        return m

    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(curve, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(curve, "reference_metric", metric)
    record = gpu_256.main(["--allow_cpu", "--config", "configs/debug_cpu.yaml", "--curve_steps", "2", "4",
                           "--curve_samples", "10", "--reference_count", "8", "--output_dir", str(tmp_path / "run"),
                           "--name", "smoke", "--train_args", "--max_train_samples", "32", "--train_batch_size", "32",
                           "--num_inference_steps", "2", "--flow_steps_per_level", "1", "--calibration_samples", "16",
                           "--reference_max_samples", "32"])  # fmt: skip
    rows = record["rows"]
    assert sorted({r["step"] for r in rows if r["method"] == "dmmd"}) == [2, 4]
    assert {(r["method"], r["nfe"]) for r in rows if r["method"] != "dmmd" and r["step"] == 4} == set(curve.BASELINE_POINTS)
    assert json.loads((tmp_path / "results" / "smoke_curve.json").read_text())["rows"] == rows
