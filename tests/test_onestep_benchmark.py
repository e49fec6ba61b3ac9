"""benchmarks/onestep.py on the 8 Gaussians with the committed converged model: a one-step generator distilled from
the flow covers every mode (the known answer of issue 29), one evaluation per sample against the flow's 100."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

WEIGHTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "runs", "convergence")


@pytest.mark.slow
def test_a_distilled_generator_covers_every_mode_of_the_8_gaussians(tmp_path, monkeypatch):
    if not os.path.isfile(os.path.join(WEIGHTS, "gaussians8_dmmd_gp_seed0.safetensors")):
        pytest.skip("the committed converged 8-Gaussian weights are missing")
    import common
    import onestep

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    onestep.main(["--data", "gaussians8", "--num_samples", "1000", "--num_endpoints", "4000", "--distill_steps", "1500",
                  "--field_steps", "50", "--field_etas", "1", "--log_every", "25"])  # fmt: skip
    rows = json.loads((tmp_path / "onestep_gaussians8.json").read_text())["rows"]
    by = {(r["method"], r.get("mode"), r["nfe"]): r for r in rows}
    flow, distilled = by[("flow", None, 100)], by[("onestep", "distill", 1)]
    assert flow["coverage"] == 1.0
    assert distilled["coverage"] == 1.0 and distilled["recall"] > 0.5  # every mode, and most of the data covered
    assert distilled["seconds_per_image"] * 20 < flow["seconds_per_image"]
    field = by[("onestep", "field_local", 1)]
    assert [e["step"] for e in field["log"]] == [25, 50] and all(e["diversity"] > 0 for e in field["log"])


def test_the_image_mode_scores_the_generator_against_the_folders_own_flow(tmp_path, monkeypatch, capsys):
    import common
    import onestep
    import torch

    from latent_dmmd import DMMDGenerator, DMMDPipeline
    from latent_dmmd.evaluation import FIDKID, reference_images

    from .conftest import tiny_pipeline, write_image_folder

    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    gen = DMMDGenerator(sample_size=8, in_channels=3, block_out_channels=(8, 16), norm_num_groups=4)
    DMMDPipeline(pipe.discriminator, pipe.scheduler, generator=gen).save_pretrained(tmp_path / "p")
    write_image_folder(tmp_path / "ref", n=10, size=8)

    class Pooled(torch.nn.Module):
        def forward(self, images):
            return torch.nn.functional.avg_pool2d(images.float() / 255, 4).flatten(1)

    def metric(args, resolution, kid_subset_size=100):
        m = FIDKID(kid_subset_size=4, extractor=Pooled(), num_features=12)
        for batch in reference_images(args.reference, resolution):
            m.update(batch, real=True)
        return m

    from diffusers import DDPMScheduler, UNet2DModel

    baseline = tmp_path / "ddpm_7" / "baseline"  # a DDPM checkpoint of the same backbone, exported
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(baseline / "unet")  # fmt: skip
    DDPMScheduler().save_pretrained(baseline / "scheduler")
    (tmp_path / "ddpm_7" / "training_summary.json").write_text(json.dumps({"train_steps": 7, "optimize_seconds": 3.5}))

    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(onestep, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(onestep, "reference_metric", metric)
    onestep.main(["--pipeline", str(tmp_path / "p"), "--reference", str(tmp_path / "ref"), "--num_samples", "6",
                  "--ddpm", str(baseline), "--name", "img"])  # fmt: skip
    rows = json.loads((tmp_path / "results" / "img.json").read_text())["rows"]
    assert [(r["method"], r["nfe"]) for r in rows] == [("onestep", 1), ("flow", 2), ("ddim", 1), ("ddim", 10)]
    assert all(r["num_fake"] == 6 and r["fid"] == r["fid"] and r["seconds_per_image"] > 0 for r in rows)
    assert [r.get("ddpm_step") for r in rows] == [None, None, 7, 7] and rows[2]["train_seconds"] == 3.5
    onestep.main(["--report", "--name", "img"])
    assert "| ddim (DDPM step 7) | 10 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no one-step generator"):
        pipe.save_pretrained(tmp_path / "plain")
        onestep.main(["--pipeline", str(tmp_path / "plain"), "--reference", str(tmp_path / "ref"), "--name", "x"])
