"""The effective-noise diagnostic (energy-distance level matching) and the adaptive grid."""

import pytest
import torch

from latent_dmmd import DMMDScheduler
from latent_dmmd.diagnostics import (
    adaptive_grid,
    effective_noise_level,
    flow_report,
    noise_memory,
    plot_effective_noise,
    plot_flow_report,
    trace_effective_noise,
)
from latent_dmmd.mmd import witness_gradient
from latent_dmmd.reference import compute_reference_statistics

from .conftest import tiny_data, tiny_pipeline


def clustered_data(n=400, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(5, d, generator=g)
    return centres[torch.randint(0, 5, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("level", [0, 150, 400, 700, 999])
def test_effective_level_of_forward_noised_data_is_its_own_level(level):
    sched = DMMDScheduler()
    data, held_out = clustered_data(seed=0), clustered_data(seed=0)[200:]
    noise = torch.randn(held_out.shape, generator=torch.Generator().manual_seed(5))
    a, s = sched.alpha_sigma(level)
    found, _, _ = effective_noise_level(a * held_out + s * noise, data[:200], sched,
                                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    # judged by the signal coefficient alpha_t: near t = 999 levels 100 apart differ by 0.01 in alpha,
    # below what 200 samples can resolve, and the match is that loose there only
    assert abs(sched.alpha_sigma(found)[0] - sched.alpha_sigma(level)[0]).item() < 0.03, (level, found)


def test_adaptive_grid_is_the_identity_on_schedule_and_re_times_lagging_particles():
    scheduled = [999, 750, 500, 250, 0, 0]
    assert adaptive_grid(scheduled, [999, 750, 500, 250, 0, 30]) == [999, 750, 500, 250, 0]
    # particles lag behind (noisier than scheduled) and even go back up: monotone, strictly decreasing,
    # and the last level stays at t_min
    assert adaptive_grid(scheduled, [999, 990, 820, 840, 300, 30]) == [999, 990, 820, 819, 0]
    # far ahead of schedule near the end: clipped at t_min with room for every level
    assert adaptive_grid([999, 500, 20, 0], [999, 10, 5, 0], t_min=20) == [999, 21, 20]


def test_trace_and_custom_grid_through_the_pipeline(tmp_path):
    pipe = tiny_pipeline(num_inference_steps=3, flow_steps_per_level=2)
    data = tiny_data(n=64)
    trace = trace_effective_noise(pipe, data, num_images=32, seed=0)
    assert trace["scheduled"] == [*pipe.scheduler.timesteps.tolist(), 0]
    assert len(trace["effective"]) == 4 and trace["effective"][0] > 800  # the initial noise is pure noise
    grid = adaptive_grid(trace["scheduled"], trace["effective"], t_min=0)
    assert len(grid) == 3 and all(a > b for a, b in zip(grid, grid[1:]))
    sched = pipe.scheduler
    with pytest.raises(ValueError, match="statistics"):
        pipe(num_images=2, timesteps=[900, 500, 1], output_type="latent")
    stats = compute_reference_statistics(pipe.discriminator, data.split(16), torch.tensor([900, 500, 1]),
                                         sched.alphas_cumprod, generator=torch.Generator().manual_seed(0))  # fmt: skip
    pipe.discriminator.set_reference_statistics(stats)
    out = pipe(num_images=2, timesteps=[900, 500, 1], generator=torch.Generator().manual_seed(0), output_type="latent")
    assert torch.isfinite(out.images).all() and sched.timesteps.tolist() == [900, 500, 1]
    with pytest.raises(ValueError, match="strictly decreasing"):
        pipe(num_images=2, timesteps=[500, 900, 1])
    plot_effective_noise({"tiny": trace}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_noise_memory_of_a_shrink_and_shift_is_one_and_of_fresh_samples_is_zero():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(500, 4, 3, 3, generator=g)
    shrunk = noise_memory(init, 0.56 * init + torch.randn(1, 4, 3, 3, generator=g))
    assert shrunk["r2"] == pytest.approx(1.0, abs=1e-6) and shrunk["coefficient"] == pytest.approx(0.56, abs=1e-6)
    fresh = noise_memory(init, torch.randn(500, 4, 3, 3, generator=g))
    assert abs(fresh["r2"]) < 0.01  # E[R²] ~ 1/(N·d) for independent draws
    # half signal, half fresh noise of equal variance: R² = 0.5
    half = noise_memory(init, init + torch.randn(500, 4, 3, 3, generator=g))
    assert half["r2"] == pytest.approx(0.5, abs=0.02)


def test_flow_report_gradient_norm_is_the_witness_gradient_the_particles_follow(tmp_path):
    """Level 1's reported norm equals |J^T (mean phi(Z) - m_P)| evaluated directly at the initial noise
    (one flow step per level, so level 1 is exactly that gradient); path shares sum to 1; gaps are >= 0."""
    pipe = tiny_pipeline(num_inference_steps=3, flow_steps_per_level=1, step_size=0.5)
    data = tiny_data(n=16)
    report = flow_report(pipe, data, num_images=16, seed=3)
    init = torch.randn((16, *pipe.particle_shape), generator=torch.Generator().manual_seed(3))
    disc, sched = pipe.discriminator, pipe.scheduler
    m_p = disc.reference_statistics(sched.timesteps, sched.alphas_cumprod).mean_data[0]
    t = torch.full((16,), int(sched.timesteps[0]))
    grad, _ = witness_gradient(lambda x, tt: disc(x, tt).float(), init, t, lambda f: f.mean(0) - m_p)
    assert report["witness_gradient_norm"][0] == pytest.approx(grad.flatten(1).norm(dim=1).mean().item(), rel=1e-4)
    assert report["witness_gradient_norm"][0] > 0
    assert sum(report["path_share"]) == pytest.approx(1.0)
    assert len(report["feature_gap_generated"]) == 3 and min(report["feature_gap_data"]) >= 0
    assert 0 <= report["noise_memory"]["r2"] <= 1
    # DiffFlow noise moves particles at random: the step is no longer the gradient, so no norm is claimed
    noisy = flow_report(pipe, data, num_images=16, seed=3, noise_scale=0.5)
    assert noisy["witness_gradient_norm"] is None and noisy["step_norm"][0] > 0
    plot_flow_report({"tiny": report}, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 1000
