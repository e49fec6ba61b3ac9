"""The DiffFlow sampler (method §7): noise modes, the score end, and exact reduction to DMMD.

The Gaussian checks use a target where everything is analytic: P = N(M, S² I) in 2-D,
features phi(x) = (x, x²) (the flow is affine, so Gaussians stay Gaussian), reference
m_P = (M, M² + S²), and the score of the forward marginal p_t = N(alpha_t M, alpha_t² S² + sigma_t²).
"""

import statistics
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DModel

from latent_dmmd import DMMDPipeline
from latent_dmmd.flow import sample_flow
from latent_dmmd.schedulers import DMMDScheduler
from latent_dmmd.schedulers.scheduling_dmmd import ornstein_uhlenbeck

from .conftest import tiny_pipeline

M = torch.tensor([1.5, -0.5], dtype=torch.float64)
S = 0.7
N = 4000


def quadratic_phi(x, t):
    return torch.cat([x, x.square()], 1)


def gaussian_run(seed=1, levels=5, flow_steps=40, eta=0.05, **diffflow):
    """Final ensemble mean and variance (per dimension) of the flow from N(0, I)."""
    sched = DMMDScheduler(num_inference_steps=levels, t_min=0, step_size=eta, **diffflow)
    timesteps = sched.timesteps
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = torch.cat([M, M.square() + S**2])[None].expand(levels, -1)

    def score(z, t):  # grad log p_t, analytic
        acp = sched.alphas_cumprod[int(t)].double()
        return -(z - acp.sqrt() * M) / (acp * S**2 + 1 - acp)

    def update(grad, k, z):
        return sched.step(grad, timesteps[k], z, generator=gen, score=score(z, timesteps[k])).prev_sample

    out = sample_flow(quadratic_phi, z0, timesteps, reference, flow_steps=flow_steps, update=update,
                      witness=sched.config.score_weight < 1)  # fmt: skip
    return out.mean(0), out.var(0)


@pytest.mark.parametrize("mode", ["plain", "compensated", "score"])
def test_zero_noise_is_the_plain_flow_bit_for_bit_and_draws_no_random_numbers(mode):
    sched = DMMDScheduler(num_inference_steps=3, t_min=0, step_size=0.05, noise_scale=0.0, noise_mode=mode)
    z0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = torch.cat([M, M.square() + S**2])[None].expand(3, -1)
    plain = sample_flow(quadratic_phi, z0, sched.timesteps, reference, flow_steps=5, update=0.05)
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    update = lambda g, k, z: sched.step(g, sched.timesteps[k], z, generator=gen).prev_sample
    diffflow = sample_flow(quadratic_phi, z0, sched.timesteps, reference, flow_steps=5, update=update)
    assert torch.equal(plain, diffflow)
    assert torch.equal(gen.get_state(), state)


def test_pipeline_with_zero_noise_matches_the_default_sampler_and_leaves_the_generator_after_the_noise(pipe):
    gen = torch.Generator().manual_seed(0)
    default = pipe(num_images=4, generator=gen, output_type="latent").images
    after_default = gen.get_state()
    gen = torch.Generator().manual_seed(0)
    zero = pipe(num_images=4, generator=gen, output_type="latent", noise_scale=0.0, noise_mode="compensated").images
    assert torch.equal(default, zero)
    assert torch.equal(gen.get_state(), after_default)
    torch.randn(4, 3, 8, 8, generator=(probe := torch.Generator().manual_seed(0)))
    assert torch.equal(probe.get_state(), after_default)  # only the initial particles were drawn


def test_compensated_noise_keeps_the_ensemble_mean_and_variance_of_the_noiseless_run():
    mean0, var0 = gaussian_run()
    runs = [gaussian_run(seed, noise_scale=1.0, noise_schedule="constant", noise_mode="compensated") for seed in range(6)]
    for d in range(2):
        for stat, ref in ((0, mean0[d]), (1, var0[d])):
            values = [r[stat][d].item() for r in runs]
            # Monte-Carlo error of the 6-seed average, from the spread of the seeds themselves
            tol = 4 * statistics.stdev(values) / len(values) ** 0.5 + 1e-3
            assert abs(statistics.mean(values) - ref.item()) < tol, (d, stat, values, ref.item())
    # the same noise without compensation spreads the ensemble far beyond that error
    _, var_plain = gaussian_run(0, noise_scale=1.0, noise_schedule="constant", noise_mode="plain")
    assert (var_plain - var0).min() > 0.3


def test_score_end_is_annealed_langevin_reaching_the_target_mean_and_variance():
    # score_weight = 1: no witness; eta g²/2 = 0.01 per step (ULA variance bias ~1%), 300 steps per level
    mean, var = gaussian_run(1, eta=0.02, flow_steps=300, noise_scale=1.0, noise_schedule="constant",
                             noise_mode="score", score_weight=1.0)  # fmt: skip
    se_mean, se_var = (S**2 / N) ** 0.5, S**2 * (2 / N) ** 0.5  # 0.011 both
    assert torch.allclose(mean, M, atol=4 * se_mean), mean
    assert torch.allclose(var, torch.full_like(var, S**2), atol=4 * se_var + 0.01 * S**2), var


def test_ornstein_uhlenbeck_step_keeps_a_narrow_ensemble_stable():
    # a 1e-4-wide ensemble under g = 3: an Euler step of the compensating drift would overshoot by 1e5
    z = 2 + 1e-4 * torch.randn(1000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xi = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ornstein_uhlenbeck(z, xi, 0.1, 3.0)
    assert torch.allclose(out.mean(0), z.mean(0), atol=1e-5)
    assert torch.allclose(out.std(0), z.std(0), rtol=0.15)


def test_noise_schedules_and_nfe_accounting():
    sched = DMMDScheduler(num_inference_steps=4, flow_steps_per_level=5, noise_scale=2.0)
    t = int(sched.timesteps[1])
    assert sched.noise_level(t) == pytest.approx(2.0 * float(1 - sched.alphas_cumprod[t]) ** 0.5)
    assert sched.noise_level(t, noise_schedule="constant") == 2.0
    window = DMMDScheduler(noise_scale=1.0, noise_schedule="window", noise_window=[100, 400])
    assert [window.noise_level(x) for x in (50, 100, 400, 401)] == [0.0, 1.0, 1.0, 0.0]
    assert sched.nfe() == {"nfe": 20, "forward_equivalents": 60}
    assert sched.nfe(noise_mode="score") == {"nfe": 20, "forward_equivalents": 80}
    assert sched.nfe(noise_mode="score", score_weight=1.0) == {"nfe": 20, "forward_equivalents": 20}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_scale": -1.0}, "noise_scale"),
        ({"noise_mode": "churn"}, "noise_mode"),
        ({"noise_schedule": "cosine"}, "noise_schedule"),
        ({"noise_window": [500, 100]}, "noise_window"),
        ({"score_weight": 1.5}, "score_weight"),
        ({"score_weight": 0.5}, "noise_mode='score'"),
        ({"score_weight": 1.0, "noise_mode": "score"}, "noise_scale > 0"),
    ],
)
def test_bad_diffflow_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DMMDScheduler(**kwargs)


def test_pipeline_score_mode_uses_the_score_model_and_saves_its_settings(tmp_path):
    pipe = tiny_pipeline(noise_scale=0.5, noise_mode="score")
    with pytest.raises(ValueError, match="score model"):
        pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    pipe.register_modules(score_model=unet)  # attach a denoiser to an existing pipeline
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    out = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.isfinite(out).all() and len(calls) == 3 * 2  # one score forward per flow step
    langevin = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="latent", score_weight=1.0)
    assert not torch.allclose(langevin.images, out)
    pipe.save_pretrained(tmp_path)
    cfg = DMMDScheduler.from_pretrained(tmp_path / "scheduler").config
    assert cfg.noise_scale == 0.5 and cfg.noise_mode == "score" and cfg.score_weight == 0.0
    loaded = DMMDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(num_images=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert isinstance(loaded.score_model, UNet2DModel) and torch.allclose(again, out, atol=1e-5)


class MixtureScore(torch.nn.Module):
    """The exact epsilon network of the forward-noised empirical law of ``data`` (a Gaussian mixture):
    eps_hat(z, t) = (z - alpha_t E[x0 | z]) / sigma_t, the posterior mean over the data points."""

    def __init__(self, data, scheduler):
        super().__init__()
        self.data, self.acp = data.flatten(1).double(), scheduler.alphas_cumprod.double()
        c, h, w = data.shape[1:]
        self.config = SimpleNamespace(in_channels=c, sample_size=h)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    device = property(lambda self: self.anchor.device)  # what a diffusers pipeline asks its components
    dtype = property(lambda self: self.anchor.dtype)

    def forward(self, z, t):
        a, s = self.acp[t[0]].sqrt(), (1 - self.acp[t[0]]).sqrt()
        zf = z.flatten(1).double()
        logits = -torch.cdist(zf, a * self.data).square() / (2 * s * s)
        x0 = logits.softmax(1) @ self.data
        return SimpleNamespace(sample=((zf - a * x0) / s).float().view_as(z))


def test_score_end_with_a_final_tweedie_step_lands_on_the_data():
    """score_weight = 1 with the exact score of 200 data points, 2 Langevin steps per level (which alone
    stops short of the data), then one Tweedie step at the last level: every sample ends within 0.01 per
    coordinate (RMS) of a data point. Without the Tweedie step the residual is that of level t_min's noise."""
    pipe = tiny_pipeline(num_inference_steps=10, flow_steps_per_level=2, t_min=20)
    data = torch.rand(200, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    pipe.register_modules(score_model=MixtureScore(data, pipe.scheduler))
    kw = dict(num_images=16, output_type="latent", noise_scale=1.0, noise_schedule="constant", noise_mode="score",
              score_weight=1.0, step_size=0.01)  # fmt: skip

    def residual(out):
        d = torch.cdist(out.flatten(1).double(), data.flatten(1).double()).min(1).values
        return (d / (3 * 8 * 8) ** 0.5).max().item()  # RMS per coordinate to the nearest data point

    denoised = pipe(generator=torch.Generator().manual_seed(0), final_denoise="tweedie", **kw).images
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert residual(denoised) <= 0.01 < residual(plain)
    assert pipe.scheduler.nfe(final_denoise="tweedie", noise_scale=1.0, noise_mode="score", score_weight=1.0)["nfe"] == 21


def test_final_flow_steps_run_at_the_last_level_and_count():
    pipe = tiny_pipeline(num_inference_steps=3, flow_steps_per_level=2, final_denoise_steps=4)
    seen = []
    pipe(num_images=2, output_type="latent", final_denoise="flow",
         callback_on_step_end=lambda p, step, t, tensors: seen.append(int(t)) or {})  # fmt: skip
    levels = pipe.scheduler.timesteps.tolist()
    assert seen == [levels[0]] * 2 + [levels[1]] * 2 + [levels[2]] * 6
    assert pipe.scheduler.nfe(final_denoise="flow")["nfe"] == 10
    with pytest.raises(ValueError, match="score model"):
        pipe(num_images=2, final_denoise="tweedie")
    with pytest.raises(ValueError, match="final_denoise"):
        pipe(num_images=2, final_denoise="twice")


def test_witness_and_score_drifts_are_mixed_on_one_scale():
    """drift_scale='rms' (default): at 0 < w < 1 the witness step is rescaled to the score step's RMS, so at
    w = 0.5 the witness part of the move is half the score step's size whatever their raw sizes (here
    1e-3 against 50); 'raw' keeps the raw mix, where the score step owns the move."""
    sched = DMMDScheduler(num_inference_steps=3, step_size=0.1, noise_mode="score")
    t = int(sched.timesteps[1])
    z = torch.zeros(64, 4)
    g = torch.Generator().manual_seed(0)
    grad, score = 1e-3 * torch.randn(64, 4, generator=g), 50.0 * torch.randn(64, 4, generator=g)
    kw = dict(score=score, score_weight=0.5, noise_scale=1.0, noise_schedule="constant")
    xi = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))  # the noise step() will draw
    score_step = 0.1 * 0.5 * score  # eta g^2 / 2 grad log p_t, g = 1
    rms = lambda x: x.square().mean().sqrt()
    moved = sched.step(grad, t, z, generator=torch.Generator().manual_seed(1), **kw).prev_sample
    witness_part = moved - 0.1**0.5 * xi - score_step
    assert rms(witness_part) == pytest.approx(0.5 * rms(score_step).item(), rel=1e-4)
    assert torch.allclose(witness_part / witness_part.norm(), -grad / grad.norm(), atol=1e-5)
    raw = DMMDScheduler(num_inference_steps=3, step_size=0.1, noise_mode="score", drift_scale="raw")
    raw_moved = raw.step(grad, t, z, generator=torch.Generator().manual_seed(1), **kw).prev_sample
    assert torch.allclose(raw_moved - 0.1**0.5 * xi, -0.1 * 0.5 * grad + score_step, atol=1e-4)
