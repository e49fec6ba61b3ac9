"""Balance across noise levels (method §3): the per-group weights and their running statistics."""

import pytest
import torch

from latent_dmmd import DMMDScheduler
from latent_dmmd.balance import LevelWeighting


def test_none_weights_every_group_one():
    w = LevelWeighting("none")
    assert torch.equal(w(torch.tensor([5, 995]), torch.tensor([1e-3, 1e3])), torch.ones(2))


def test_normalized_weights_divide_by_the_running_mean_of_the_bucket():
    w = LevelWeighting("normalized", num_buckets=10, decay=0.5, floor=1e-6)
    # first sight of a bucket: the running mean is the value itself, so the weighted term is 1
    first = w(torch.tensor([20, 990]), torch.tensor([0.01, 1000.0]))
    assert torch.allclose(first, torch.tensor([100.0, 1e-3]))
    # second step: EMA 0.5 * old + 0.5 * mean of this step's groups in the bucket
    second = w(torch.tensor([30, 40, 990]), torch.tensor([0.02, 0.04, 500.0]))
    assert torch.allclose(second, torch.tensor([1 / 0.02, 1 / 0.02, 1 / 750.0]))
    assert w.summary() == pytest.approx({"running_mmd2/t000": 0.02, "running_mmd2/t900": 750.0})
    # a non-positive running mean is floored, never divided by
    w(torch.tensor([500]), torch.tensor([-3.0]))
    assert w.weights(torch.tensor([500])).item() == pytest.approx(1e6)


def test_normalized_terms_are_of_order_one_across_six_orders_of_magnitude():
    """What the option is for: per-level MMD² from 1e-2 to 1e3 all weigh ~1 once the running means settle."""
    w = LevelWeighting("normalized", decay=0.9)
    t = torch.tensor([20, 250, 500, 999])
    truth = torch.tensor([1e-2, 1.0, 50.0, 1e3])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        noisy = truth * (1 + 0.1 * torch.randn(4, generator=g))
        weights = w(t, noisy)
    assert torch.allclose(weights * truth, torch.ones(4), rtol=0.1)


def test_sigma_weights_are_a_power_of_one_over_sigma():
    sched = DMMDScheduler()
    w = LevelWeighting("sigma", sched.alphas_cumprod, power=2.0)
    t = torch.tensor([20, 999])
    sigma2 = 1 - sched.alphas_cumprod[t]
    assert torch.allclose(w(t, torch.zeros(2)), (1 / sigma2).float())


def test_state_dict_round_trip_and_mode_check():
    a = LevelWeighting("normalized")
    a(torch.tensor([20, 700]), torch.tensor([0.5, 7.0]))
    b = LevelWeighting("normalized")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights(torch.tensor([20, 700])), b.weights(torch.tensor([20, 700])))
    with pytest.raises(ValueError, match="trained with level_weighting='normalized'"):
        LevelWeighting("none").load_state_dict(a.state_dict())


def test_reduce_makes_processes_agree():
    """Two processes' groups, summed over processes, give the running mean one process would get."""
    one = LevelWeighting("normalized")
    one.update(torch.tensor([20, 30]), torch.tensor([1.0, 3.0]))
    other_half = (torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))
    other_half[0][0], other_half[1][0] = 3.0, 1.0  # the other process saw one group with MMD² 3 in bucket 0
    calls = iter(other_half)
    two = LevelWeighting("normalized")
    two.update(torch.tensor([20]), torch.tensor([1.0]), reduce=lambda x: x + next(calls))
    assert torch.equal(one.running, two.running)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="level_weighting='equal'"):
        LevelWeighting("equal")
    with pytest.raises(ValueError, match="needs the forward process"):
        LevelWeighting("sigma")
