"""benchmarks/curve.py: learning-curve points from the checkpoints of a DMMD run and a DDPM run, at equal steps
and at equal optimisation seconds, resumable row by row."""

import json
import os
import sys

import pytest
import torch

from latent_dmmd.evaluation import FIDKID, reference_images

from .conftest import write_image_folder
from .test_training import fresh_accelerate_state, run  # noqa: F401 (the fixture resets accelerate between runs)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import common
import curve


class Pixels(torch.nn.Module):
    """A stand-in feature extractor (the offline Inception weights are not needed to test the bookkeeping)."""

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images.float() / 255, 4).flatten(1)


def test_nearest_checkpoint_in_seconds_is_nearest_in_log_time():
    clock = {1000: 100.0, 2000: 210.0, 4000: 400.0, 8000: 820.0}
    assert curve.nearest_in_seconds(clock, 390.0) == 4000
    assert curve.nearest_in_seconds(clock, 150.0) == 2000  # 150/100 = 1.5 > 210/150 = 1.4
    assert curve.nearest_in_seconds(clock, 5000.0) == 8000


def two_runs(tmp_path, monkeypatch) -> list[str]:
    """A DMMD run and a DDPM run of 4 steps on 16 images, results under tmp_path, pixel features: curve.py's flags."""
    data = str(tmp_path / "imgs")
    write_image_folder(data, n=16, size=12)
    for method in ("dmmd", "ddpm"):
        (tmp_path / method).mkdir()
        run(tmp_path / method, "--method", method, data=data, steps=4)
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(curve, "RESULTS", str(tmp_path / "results"))

    def metric(args, resolution, kid_subset_size=100):
        m = FIDKID(kid_subset_size=4, extractor=Pixels(), num_features=12)
        for batch in reference_images(args.reference, resolution):
            m.update(batch, real=True)
        return m

    monkeypatch.setattr(curve, "reference_metric", metric)
    return ["--dmmd_run", str(tmp_path / "dmmd" / "out"), "--ddpm_run", str(tmp_path / "ddpm" / "out"),
            "--steps", "2", "4", "--reference", data, "--num_samples", "6", "--last_num_samples", "8",
            "--batch_size", "4", "--scratch", str(tmp_path / "scratch"), "--name", "c"]  # fmt: skip


def test_curve_scores_dmmd_and_the_baseline_per_checkpoint_and_resumes(tmp_path, monkeypatch):
    argv = two_runs(tmp_path, monkeypatch)
    rows = curve.main(argv)
    dmmd = [r for r in rows if r["method"] == "dmmd"]
    assert [(r["step"], r["num_fake"]) for r in dmmd] == [(2, 6), (4, 8)]
    assert all(r["nfe"] == 6 and 0 <= r["noise_memory_r2"] <= 1 for r in dmmd)
    for r in dmmd:  # the export's step rule: calibrated, or the constant the selection preferred (recorded)
        chosen = r["step_size_selection"]["chosen"]
        assert (r["sampler"], chosen) == ("calibrated", "calibrated") or chosen == f"constant {r['step_size']:.4g}"
    assert all(r["statistics_samples"] == 16 for r in dmmd)  # the whole training folder
    for step in (2, 4):
        base = {(r["method"], r["nfe"]) for r in rows if r["method"] != "dmmd" and r["step"] == step}
        assert base == set(curve.BASELINE_POINTS)
    for r in rows:
        assert r["train_seconds"] > 0 and math_ok(r) and r["num_real"] == 16
    saved = json.loads((tmp_path / "results" / "c.json").read_text())
    assert len(saved["rows"]) == len(rows) and set(saved["clock"]) == {"dmmd", "ddpm"}
    assert (tmp_path / "results" / "c.png").is_file()
    again = curve.main(argv)  # every point is there: nothing is sampled again
    assert again == saved["rows"]
    # a later point whose checkpoint does not exist yet is skipped, not an error
    later = argv[: argv.index("--steps")] + ["--steps", "2", "16", "--equal_seconds", "none"] + argv[argv.index("--reference"):]
    assert curve.main(later) == saved["rows"]


@pytest.mark.slow
def test_a_curve_scored_in_parts_and_merged_equals_the_whole(tmp_path, monkeypatch):
    """Two processes scoring one curve's parts (DMMD rows; baseline rows), each with its own results file and
    scratch folder, merged: the same rows as one process scoring everything."""
    argv = two_runs(tmp_path, monkeypatch)
    parts = argv[: argv.index("--scratch")] + ["--equal_seconds", "last"]
    whole = curve.main(parts + ["--scratch", str(tmp_path / "s0"), "--name", "whole"])
    curve.main(parts + ["--scratch", str(tmp_path / "s1"), "--name", "p1", "--parts", "dmmd"])
    curve.main(parts + ["--scratch", str(tmp_path / "s2"), "--name", "p2", "--parts", "equal_steps", "equal_seconds"])
    assert not (tmp_path / "s2" / "dmmd_out_4").exists()  # the baseline part exported no DMMD checkpoint
    merged = curve.main(["--merge", "p1", "p2"])

    def table(rows):
        return sorted((r["method"], r["step"], r["nfe"], r["num_fake"], r["comparison"], round(r["fid"], 6)) for r in rows)

    assert table(merged) == table(whole)


def math_ok(row):
    return all(row[k] == row[k] for k in ("fid", "kid", "precision", "recall"))  # no NaN


@pytest.mark.parametrize("missing", ["progress.jsonl"])
def test_a_run_without_a_clock_is_refused_with_a_reason(tmp_path, missing):
    with pytest.raises(SystemExit, match=missing):
        curve.progress(str(tmp_path))


def test_report_lists_every_row():
    rows = [{"method": "dmmd", "step": 1000, "train_seconds": 10.0, "nfe": 20, "num_fake": 1000, "fid": 50.0, "kid": 0.05,
             "precision": 0.5, "recall": 0.2, "comparison": "equal_steps"},
            {"method": "ddim", "step": 1000, "train_seconds": 2.0, "nfe": 20, "num_fake": 1000, "fid": 40.0, "kid": 0.04,
             "precision": 0.6, "recall": 0.3, "comparison": "equal_steps"}]  # fmt: skip
    table = curve.report(rows).splitlines()
    assert len(table) == 4 and "| DMMD | 20 |" in table[2] and "| DDIM | 20 |" in table[3]
