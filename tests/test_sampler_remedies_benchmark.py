"""The arm grammar of benchmarks/sampler_remedies.py: call options vs scheduler settings, and an arm's scheduler
settings confined to that arm."""

import os
import sys

import pytest

from .conftest import tiny_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sampler_remedies as sr


def test_arm_spec_parses_label_model_and_typed_options():
    arm = sr.parse_arm("beta=1 lin@rff:noise_injection=1,noise_injection_schedule=linear,final_denoise=none", ["dmmd", "rff"])
    assert arm == {"label": "beta=1 lin", "model": "rff",
                   "options": {"noise_injection": 1, "noise_injection_schedule": "linear", "final_denoise": None}}
    assert sr.parse_arm("plain", ["dmmd"]) == {"label": "plain", "model": "dmmd", "options": {}}
    with pytest.raises(SystemExit, match="names model"):
        sr.parse_arm("x@kale", ["dmmd"])
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        sr.parse_arm("x:noise_injection", ["dmmd"])


def test_options_split_between_the_call_and_the_scheduler_and_unknown_keys_are_refused():
    pipe = tiny_pipeline()
    call, config = sr.split_options(pipe, {"noise_injection": 0.5, "step_size_schedule": "level", "final_denoise": "flow"})
    assert call == {"noise_injection": 0.5, "final_denoise": "flow"}
    assert config == {"step_size_schedule": "level"}
    with pytest.raises(SystemExit, match="unknown option"):
        sr.split_options(pipe, {"noise_injektion": 0.5})


class _Metric:
    """Stands in for FIDKID: records the fake images it is given."""

    def reset_fake(self):
        self.images = None

    def update(self, images, real):
        self.images = images

    def compute(self):
        return {"fid": float(self.images.float().mean()), "num_fake": len(self.images)}


def test_scheduler_settings_of_an_arm_apply_to_that_arm_only():
    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    args = type("Args", (), {"num_samples": 4, "batch_size": 4, "seed": 0, "levels": 2, "flow_steps": 1})()
    metric = _Metric()
    plain = sr.score_arm(pipe, {"label": "plain", "model": "m", "options": {}}, metric, args)
    flow = sr.score_arm(pipe, {"label": "flow", "model": "m", "options": {"final_denoise": "flow",
                                                                           "final_denoise_steps": 3}}, metric, args)
    assert pipe.scheduler.config.final_denoise_steps != 3  # restored after the arm
    assert plain["nfe"] == 2 and flow["nfe"] == 2 + 3  # the arm's extra flow steps were counted, and run
    assert flow["settings"]["final_denoise"] == "flow" and plain["settings"]["final_denoise"] == "none"
    again = sr.score_arm(pipe, {"label": "plain", "model": "m", "options": {}}, metric, args)
    assert again["fid"] == plain["fid"] and flow["fid"] != plain["fid"]  # same seeds: the same samples


def test_sample_grid_keeps_the_first_images_in_order_at_full_resolution(tmp_path, monkeypatch):
    """benchmarks/quality_vs_nfe.py --save_grid: a row's first images, pixel for pixel, padded to full rows."""
    import common
    import numpy as np
    import torch
    from PIL import Image

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    images = torch.stack([torch.full((3, 5, 7), 20 * i, dtype=torch.uint8) for i in range(8)])
    images[1, 0, 2, 3] = 255  # one marked pixel, to check placement
    path = common.save_sample_grid(images, "bench", "dmmd_nfe20", count=6, nrow=4)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 5, 4 * 7, 3)
    for i in range(6):
        r, c = divmod(i, 4)
        tile = grid[5 * r : 5 * r + 5, 7 * c : 7 * c + 7]
        expected = images[i].permute(1, 2, 0).numpy()
        assert (tile == expected).all(), i
    assert (grid[5:, 14:] == 0).all()  # the two padding tiles
    assert common.save_sample_grid(images, "bench", "none", count=0) is None
