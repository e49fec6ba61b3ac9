"""benchmarks/sweep.py, the one sampler-sweep entry: the arm grammar (call options vs scheduler settings, an arm's
own grid), --grid products, an arm's scheduler settings confined to that arm, and a whole energy-distance sweep."""

import os
import sys

import pytest

from .conftest import tiny_data, tiny_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sweep as sr


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


def test_grid_flags_expand_to_one_arm_per_combination_on_every_model():
    arms = sr.grid_arms(["noise_mode=plain,score", "noise_scale=0.3,1"], ["a", "b"])
    assert len(arms) == 8
    assert arms[0] == {"label": "noise_mode=plain noise_scale=0.3@a", "model": "a",
                       "options": {"noise_mode": "plain", "noise_scale": 0.3}}
    assert [a["label"] for a in sr.grid_arms(["step_size=0.1,1"], ["m"])] == ["step_size=0.1", "step_size=1"]
    assert sr.grid_arms([], ["m"]) == []
    with pytest.raises(SystemExit, match="KEY=V1"):
        sr.grid_arms(["step_size"], ["m"])
    assert sr.parse_value("980/500/20") == [980, 500, 20]


def test_scheduler_settings_of_an_arm_apply_to_that_arm_only():
    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    args = type("Args", (), {"num_samples": 4, "batch_size": 4, "seed": 0, "levels": 2, "flow_steps": 1,
                             "energy_particles": 4})()
    metric = _Metric()
    plain = sr.score_arm(pipe, {"label": "plain", "model": "m", "options": {}}, metric, args)
    flow = sr.score_arm(pipe, {"label": "flow", "model": "m", "options": {"final_denoise": "flow",
                                                                           "final_denoise_steps": 3}}, metric, args)
    assert pipe.scheduler.config.final_denoise_steps != 3  # restored after the arm
    assert plain["nfe"] == 2 and flow["nfe"] == 2 + 3  # the arm's extra flow steps were counted, and run
    assert flow["settings"]["final_denoise"] == "flow" and plain["settings"]["final_denoise"] == "none"
    again = sr.score_arm(pipe, {"label": "plain", "model": "m", "options": {}}, metric, args)
    assert again["fid"] == plain["fid"] and flow["fid"] != plain["fid"]  # same seeds: the same samples
    arms = [{"label": "T3", "model": "m", "options": {"levels": 3, "flow_steps": 2}},
            {"label": "g", "model": "m", "options": {"timesteps": [900, 400]}}]
    sr.set_statistics(pipe, tiny_data(), arms, args)  # --statistics_data: every level the arms visit
    split = sr.score_arm(pipe, arms[0], metric, args)
    assert (split["levels"], split["flow_steps"], split["nfe"], len(split["grid"])) == (3, 2, 6, 3)
    grid = sr.score_arm(pipe, arms[1], metric, args)
    assert grid["grid"] == [900, 400] and grid["nfe"] == 2


def test_an_energy_distance_sweep_runs_end_to_end_without_reference_images(tmp_path, monkeypatch):
    """The cheap selection on training data: no Inception pass, one energy distance per arm, the JSON and plot."""
    import json

    import common

    from .conftest import write_image_folder

    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results"))
    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    pipe.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "train", n=8, size=8)
    rows = sr.main(["--model", f"m={tmp_path / 'model'}", "--energy_data", str(tmp_path / "train"), "--grid",
                    "step_size=0.01,3", "--levels", "2", "--flow_steps", "1", "--num_samples", "6", "--batch_size", "6",
                    "--energy_particles", "6", "--rows", str(tmp_path / "rows.jsonl"), "--name", "s"])  # fmt: skip
    assert [r["label"] for r in rows] == ["step_size=0.01", "step_size=3"]
    assert all(r["energy_distance_train"] > 0 and "fid" not in r for r in rows)
    assert rows[0]["energy_distance_train"] != rows[1]["energy_distance_train"]  # the step size moves them
    assert json.loads((tmp_path / "results" / "s.json").read_text())["benchmark"] == "sampler sweep at fixed NFE"
    assert (tmp_path / "results" / "s.png").is_file()
    again = sr.main(["--model", f"m={tmp_path / 'model'}", "--energy_data", str(tmp_path / "train"), "--grid",
                     "step_size=0.01,3", "--rows", str(tmp_path / "rows.jsonl"), "--name", "s"])  # fmt: skip
    assert again == rows  # every arm is in --rows: nothing runs again


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


def test_every_committed_sweep_result_still_renders_in_report():
    """Results of the scripts sweep.py replaced (options_sweep, diffflow_sweep, sampler_remedies, select_sampler,
    tune_step_size) keep their tables in report.py."""
    import glob
    import json

    import report

    rendered = set()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "*.json"))):
        with open(path) as f:
            record = json.load(f)
        render = report.renderer(record)
        if render is not None:
            assert render(record).startswith("| "), path
            rendered.add(os.path.basename(path))
    for name in ("remedies_celebahq64.json", "options_celebahq64.json", "diffflow_celebahq64.json"):
        assert name in rendered
    assert any(n.startswith("sampler_selection") for n in rendered) and any(n.startswith("step_size") for n in rendered)
