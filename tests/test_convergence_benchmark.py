"""benchmarks/convergence.py: its 2-D path reaches a known answer (every checkerboard cell covered, close to
held-out samples in energy distance) with the library's loss, statistics, calibrated and selected step rules and
flow."""

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import convergence


def args(**kw):
    base = dict(batch_size=512, num_groups=16, learning_rate=3e-4, ema_decay=0.999, lambda_gp=None, lambda_l2=1e-3,
                levels=10, flow_steps=10, t_min=0, calibration_particles=1000)  # fmt: skip
    return argparse.Namespace(**(base | kw))


def test_checkerboard_cells_and_plane_features():
    gen = torch.Generator().manual_seed(0)
    x = convergence.checkerboard(4000, gen)
    cells = convergence.checkerboard_cell(x)
    assert (cells >= 0).all() and torch.bincount(cells, minlength=8).min() > 400  # 8 black cells, ~500 each
    assert (convergence.checkerboard_cell(torch.tensor([[-1.5, -0.5], [0.5, -0.5]])) == -1).all()  # white cells
    feats = convergence.PlaneFeatures()(x[:10])
    assert feats.shape == (10, 66) and torch.equal(feats[:, :2], x[:10])


@pytest.mark.slow
def test_dmmd_on_the_checkerboard_covers_every_cell_after_500_steps():
    torch.set_num_threads(2)
    data = convergence.Dataset("checkerboard")
    a = args()
    (ck,) = convergence.train("dmmd", data, 0, {500}, a)
    model = convergence.load("dmmd", data, ck["state"])
    x, _, info = convergence.dmmd_sample(model, data, 1000, 0, a)
    m = convergence.Scorer(data)(x)
    assert m["coverage"] == 1.0, m["class_share"]  # each of the 8 cells holds at least half its share
    assert m["energy_distance"] < 0.01, m  # held-out samples against each other: ~0.002
    assert m["precision"] > 0.7 and m["recall"] > 0.85, m
    assert len(info["step_sizes"]) == 10 and all(s > 0 for s in info["step_sizes"])
    # run() computes a model's statistics and calibration once for its sample, sweep and selection: same numbers
    setup = convergence.flow_setup(model, data, 0, a)
    again, _, info_again = convergence.dmmd_sample(model, data, 1000, 0, a, setup=setup)
    assert torch.equal(again, x) and info_again == info
    # the library's default rule (calibrated against constants, by the final particles' energy distance to
    # the calibration samples) lands on the same answer, and records the candidates it compared
    selection, steps = convergence.select(model, data, 0, a)
    shared, shared_steps = convergence._select(model, data, 0, a, setup)[:2]
    assert shared.distances == selection.distances and shared_steps == steps
    assert "calibrated" in selection.distances and len(selection.distances) >= 3
    assert selection.distances[selection.chosen] == min(selection.distances.values())
    x, _, _ = convergence.dmmd_sample(model, data, 1000, 0, a, step_sizes=steps)
    m = convergence.Scorer(data)(x)
    assert m["coverage"] == 1.0 and m["energy_distance"] < 0.01, m
