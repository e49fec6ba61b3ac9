"""Known-answer checks of the particle flow (method §5, §6)."""

import pytest
import torch

from latent_dmmd.flow import data_reference, sample_flow
from latent_dmmd.reference import compute_reference_statistics
from latent_dmmd.schedulers import DMMDScheduler
from latent_dmmd.toy import ToyFeatureNet, eight_gaussians


def linear_phi(x, t):
    return x


def test_linear_features_step_contracts_the_mean_and_keeps_the_covariance():
    # method §6: with phi(x) = x one step gives mean' - m_P = (1 - eta)(mean - m_P), covariance unchanged
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    m_p = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    eta = 0.3
    out = sample_flow(linear_phi, z, [0], m_p, flow_steps=1, update=eta)
    assert torch.allclose(out.mean(0) - m_p[0], (1 - eta) * (z.mean(0) - m_p[0]), atol=1e-12)
    assert torch.allclose(torch.cov(out.T), torch.cov(z.T), atol=1e-12)


def test_quadratic_features_flow_a_gaussian_onto_a_gaussian():
    # method §6: phi(x) = (x, x^2) in 1-D, N(0, 1) -> N(1.5, 0.7^2), eta 0.05, 4000 steps
    phi = lambda x, t: torch.cat([x, x.square()], 1)
    m_p = torch.tensor([[1.5, 1.5**2 + 0.7**2]], dtype=torch.float64)
    z = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_flow(phi, z, [0], m_p, flow_steps=4000, update=0.05)
    assert out.mean().item() == pytest.approx(1.50, abs=0.01)
    assert out.std().item() == pytest.approx(0.70, abs=0.01)
    # the law stays Gaussian: the flow is affine in x, so the skewness of the source is kept (~0)
    skew = ((out - out.mean()) ** 3).mean() / out.std() ** 3
    assert abs(skew.item()) < 0.15


def _toy_setup():
    torch.manual_seed(0)
    phi = ToyFeatureNet(hidden=32, features=16).requires_grad_(False)
    sched = DMMDScheduler(num_inference_steps=4, flow_steps_per_level=3, step_size=0.2)
    data = eight_gaussians(600, torch.Generator().manual_seed(1))
    return phi, sched, data


def test_cached_and_data_reference_give_the_same_trajectory():
    phi, sched, data = _toy_setup()
    stats = compute_reference_statistics(phi, [data], sched.timesteps, sched.alphas_cumprod)
    z0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    cached = sample_flow(phi, z0, sched.timesteps, stats.mean_data, flow_steps=3, update=0.2)
    exact = sample_flow(phi, z0, sched.timesteps, data_reference(phi, data, batch_size=250), flow_steps=3, update=0.2)
    assert torch.allclose(cached, exact, atol=1e-5)
    assert not torch.allclose(cached, z0)  # the particles did move


def test_forward_marginal_moves_particles_independently():
    phi, sched, data = _toy_setup()
    stats = compute_reference_statistics(phi, [data], sched.timesteps, sched.alphas_cumprod)
    z0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    kwargs = dict(flow_steps=3, update=0.2, particle_mean="forward_marginal", marginal_means=stats.mean_noised)
    together = sample_flow(phi, z0, sched.timesteps, stats.mean_data, **kwargs)
    alone = sample_flow(phi, z0[:5], sched.timesteps, stats.mean_data, **kwargs)
    assert torch.allclose(together[:5], alone, atol=1e-6)
    ensemble = sample_flow(phi, z0[:5], sched.timesteps, stats.mean_data, flow_steps=3, update=0.2)
    ensemble_all = sample_flow(phi, z0, sched.timesteps, stats.mean_data, flow_steps=3, update=0.2)
    assert not torch.allclose(ensemble, ensemble_all[:5], atol=1e-6)  # ensemble particles interact


def test_forward_marginal_needs_marginal_means():
    with pytest.raises(ValueError, match="marginal_means"):
        sample_flow(linear_phi, torch.zeros(4, 2), [0], torch.zeros(1, 2), particle_mean="forward_marginal")
    with pytest.raises(ValueError, match="particle_mean"):
        sample_flow(linear_phi, torch.zeros(4, 2), [0], torch.zeros(1, 2), particle_mean="median")


def test_callback_sees_every_step_and_can_replace_particles():
    seen = []

    def callback(step, k, t, z):
        seen.append((step, k, int(t)))
        return torch.zeros_like(z) if step == 2 else None

    out = sample_flow(linear_phi, torch.ones(3, 2), [900, 100], torch.zeros(2, 2), flow_steps=2, update=0.0, callback=callback)
    assert seen == [(0, 0, 900), (1, 0, 900), (2, 1, 100), (3, 1, 100)]
    assert torch.equal(out, torch.zeros(3, 2))


def test_progress_factory_is_updated_once_per_flow_step():
    updates = []

    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self):
            updates.append(1)

    totals = []
    sample_flow(linear_phi, torch.ones(2, 2), [5, 3, 1], torch.zeros(3, 2), flow_steps=4,
                progress=lambda total: totals.append(total) or Bar())  # fmt: skip
    assert totals == [12] and len(updates) == 12


def test_noise_injection_keeps_the_fixed_point_of_the_quadratic_flow():
    """Noise injection evaluates the witness gradient at z + beta u but keeps the witness of the particles
    themselves: with phi = (x, x^2) the expected gradient is unchanged, so the flow still lands on
    N(1.5, 0.7^2) (mean +-0.02, std +-0.02). Taking the particle mean at the perturbed points instead
    would shrink the variance to 0.49 - beta^2 (std 0.49 at beta = 0.5), which this rules out."""
    phi = lambda x, t: torch.cat([x, x.square()], 1)
    m_p = torch.tensor([[1.5, 1.5**2 + 0.7**2]], dtype=torch.float64)
    z = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    jitter = lambda z, k: z + 0.5 * torch.randn(z.shape, generator=g, dtype=z.dtype)
    out = sample_flow(phi, z, [0], m_p, flow_steps=4000, update=0.05, perturb=jitter)
    assert out.mean().item() == pytest.approx(1.50, abs=0.02)
    assert out.std().item() == pytest.approx(0.70, abs=0.02)
    # and perturb returning None is the plain flow, bit for bit
    plain = sample_flow(phi, z, [0], m_p, flow_steps=50, update=0.05)
    assert torch.equal(plain, sample_flow(phi, z, [0], m_p, flow_steps=50, update=0.05, perturb=lambda z, k: None))
