"""The DDPM/DDIM baseline's sampler settings and its held-out denoising error per level."""

from types import SimpleNamespace

import pytest
import torch

from latent_dmmd import DMMDScheduler
from latent_dmmd.baselines import baseline_scheduler, epsilon_mse_per_level


class OracleEpsilon(torch.nn.Module):
    """The exact epsilon network of data that is identically zero: x_t = sigma_t eps, so eps = x_t / sigma_t."""

    def __init__(self, scheduler, scale: float = 1.0):
        super().__init__()
        self.sigma = (1 - scheduler.alphas_cumprod).sqrt()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x, t):
        return SimpleNamespace(sample=self.scale * x / self.sigma[t].view(-1, 1, 1, 1))


def test_trailing_spacing_starts_every_run_at_the_last_level():
    ours = DMMDScheduler()
    leading, trailing = baseline_scheduler(ours, "ddim"), baseline_scheduler(ours, "ddim", timestep_spacing="trailing")
    leading.set_timesteps(10)
    trailing.set_timesteps(10)
    assert int(leading.timesteps[0]) == 900 and int(trailing.timesteps[0]) == 999
    assert torch.equal(trailing.alphas_cumprod, ours.alphas_cumprod)


def test_epsilon_mse_is_zero_for_the_oracle_and_known_for_a_scaled_one():
    sched = DMMDScheduler()
    x0 = torch.zeros(200, 2, 4, 4)
    exact = epsilon_mse_per_level(OracleEpsilon(sched), sched, x0, [20, 500, 999])
    assert [r["t"] for r in exact] == [20, 500, 999] and max(r["eps_mse"] for r in exact) < 1e-10
    # eps_hat = 0.5 eps: error 0.25 E[eps^2] = 0.25 (Monte-Carlo over 6,400 coordinates: +-3%)
    half = epsilon_mse_per_level(OracleEpsilon(sched, 0.5), sched, x0, [20, 999])
    assert all(r["eps_mse"] == pytest.approx(0.25, rel=0.05) for r in half)
