"""DMMDScheduler: forward process identical to DDPM's, grids, step rules, options."""

import pytest
import torch
from diffusers import DDPMScheduler

from latent_dmmd import DMMDScheduler


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {"beta_schedule": "squaredcos_cap_v2"}],
)
def test_alphas_are_exactly_ddpm_alphas(kwargs):
    ours, ddpm = DMMDScheduler(**kwargs), DDPMScheduler(**kwargs)
    assert torch.equal(ours.betas, ddpm.betas)
    assert torch.equal(ours.alphas_cumprod, ddpm.alphas_cumprod)
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    assert torch.allclose(ours.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), atol=1e-6)
    alpha, sigma = ours.alpha_sigma(t)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(5), atol=1e-6)


def test_default_grid_runs_from_t_max_to_t_min():
    s = DMMDScheduler()
    assert s.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    s = DMMDScheduler(t_min=20, num_inference_steps=5)
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 20
    assert (s.timesteps[:-1] > s.timesteps[1:]).all()


def test_log_snr_grid_is_uniform_in_log_snr():
    s = DMMDScheduler(timestep_spacing="log_snr", num_inference_steps=8, t_min=10)
    snr = s.log_snr(s.timesteps)
    gaps = snr[1:] - snr[:-1]
    assert (gaps > 0).all()
    assert gaps.max() / gaps.min() < 1.6  # integer rounding of t only


def test_grid_that_repeats_a_level_is_refused():
    with pytest.raises(ValueError, match="repeating"):
        DMMDScheduler(num_inference_steps=50, t_min=990)


def test_step_rules():
    z, g = torch.ones(4, 2), torch.full((4, 2), 2.0)
    s = DMMDScheduler(num_inference_steps=2, step_size=0.1)
    assert torch.allclose(s.step(g, 999, z).prev_sample, z - 0.2)
    assert torch.allclose(s.step(g, 999, z, step_size=0.5).prev_sample, z - 1.0)
    s = DMMDScheduler(num_inference_steps=2, step_size=0.1, step_size_schedule="sigma2")
    _, sigma = s.alpha_sigma(0)
    assert torch.allclose(s.step(g, 0, z).prev_sample, z - 0.1 * sigma**2 * 2)
    s = DMMDScheduler(num_inference_steps=2, step_size=0.1, step_size_schedule="rms")
    assert torch.allclose(s.step(g, 0, z).prev_sample, z - 0.1)  # normalised: RMS of g is 2
    with pytest.raises(ValueError, match="not on the current grid"):
        s.step(g, 500, z)


def test_training_timesteps():
    g = torch.Generator().manual_seed(0)
    s = DMMDScheduler()
    t = s.sample_training_timesteps(1000, g)
    assert t.min() >= 0 and t.max() <= 999 and len(t.unique()) > 400
    s = DMMDScheduler(train_timestep_sampling="grid", num_inference_steps=5)
    assert set(s.sample_training_timesteps(200, g).tolist()) == set(s.timesteps.tolist())
    s = DMMDScheduler(train_timestep_sampling="log_snr")
    snr = s.log_snr(s.sample_training_timesteps(4000, g))
    lo, hi = s.log_snr(999).item(), s.log_snr(0).item()
    # uniform in log-SNR: the middle third of the log-SNR range holds about a third of the draws
    middle = ((snr > lo + (hi - lo) / 3) & (snr < lo + 2 * (hi - lo) / 3)).float().mean()
    assert abs(middle.item() - 1 / 3) < 0.05


@pytest.mark.parametrize(
    "kwargs",
    [{"particle_mean": "median"}, {"reference": "online"}, {"step_size_schedule": "adam"}, {"t_min": 999}, {"beta_schedule": "x"}],
)
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        DMMDScheduler(**kwargs)


def test_config_round_trip(tmp_path):
    s = DMMDScheduler(num_inference_steps=7, flow_steps_per_level=3, particle_mean="forward_marginal", step_size=0.25)
    s.save_config(tmp_path)
    loaded = DMMDScheduler.from_pretrained(tmp_path)
    drop = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert drop(loaded.config) == drop(s.config)
    assert torch.equal(loaded.timesteps, s.timesteps)
    assert s.nfe() == {"nfe": 21, "forward_equivalents": 63}


def test_noise_injection_schedule_decays_linearly_to_zero_at_the_last_level():
    sched = DMMDScheduler(num_inference_steps=5, noise_injection=0.4, noise_injection_schedule="linear")
    sigma = (1 - sched.alphas_cumprod[sched.timesteps]).sqrt()
    scales = [sched.injection_scale(k) for k in range(5)]
    expected = [0.4 * (4 - k) / 4 * float(sigma[k]) for k in range(5)]
    assert scales == pytest.approx(expected) and scales[-1] == 0.0
    with pytest.raises(ValueError, match="noise_injection"):
        DMMDScheduler(noise_injection=-0.1)


def test_level_sized_steps_move_each_particle_by_the_gap_to_the_next_level():
    """step_size_schedule='level': over the N_s steps of level k a particle moves eta sqrt(d) (sigma_k -
    sigma_{k+1}) whatever the gradient's scale (here a gradient the same for every particle)."""
    sched = DMMDScheduler(num_inference_steps=4, flow_steps_per_level=5, step_size=1.0, step_size_schedule="level")
    sigma = lambda t: float(1 - sched.alphas_cumprod[int(t)]) ** 0.5
    d = 48
    grad = torch.full((3, 3, 4, 4), 1e-3)  # tiny: the schedule must not care
    for k, t in enumerate(sched.timesteps):
        nxt = sched.timesteps[k + 1] if k + 1 < 4 else 0
        z = torch.zeros(3, 3, 4, 4)
        for _ in range(5):
            z = sched.step(grad, t, z).prev_sample
        moved = z.flatten(1).norm(dim=1)
        assert torch.allclose(moved, torch.full((3,), d**0.5 * (sigma(t) - sigma(nxt))), rtol=1e-5)
    # the pipeline's N_s override sizes the steps for its own count
    assert sched.level_step_size(int(sched.timesteps[0]), flow_steps=10) == pytest.approx(
        sched.level_step_size(int(sched.timesteps[0])) / 2)
