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
