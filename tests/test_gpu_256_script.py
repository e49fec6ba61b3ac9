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
