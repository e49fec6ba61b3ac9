"""The KALE variant: the bound's known answer, the particle velocity, the pipeline and training paths."""

import math

import pytest
import torch

from latent_dmmd import DMMDDiscriminator, DMMDPipeline, DMMDScheduler
from latent_dmmd.flow import sample_flow
from latent_dmmd.kale import clip_critic, kale_loss

from .test_training import load, run


def test_kale_bound_recovers_the_log_density_ratio_and_the_kl_of_two_gaussians():
    # P = N(0, 1), Q = N(1, 1): log dP/dQ = 0.5 - x, KL(P || Q) = 0.5. A linear critic h = a x + b
    # trained on the bound (lambda small) must find a ~ -1, b ~ 0.5, and the bound ~ KL.
    g = torch.Generator().manual_seed(0)
    p = torch.randn(20000, generator=g, dtype=torch.float64)
    q = 1 + torch.randn(20000, generator=g, dtype=torch.float64)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    critic = lambda x, t: params[0] * x + params[1]
    opt = torch.optim.Adam([params], lr=0.05)
    t = torch.zeros(20000, dtype=torch.long)
    for _ in range(600):
        opt.zero_grad()
        out = kale_loss(critic, p, q, t, kale_lambda=1e-3)
        out.loss.backward()
        opt.step()
    a, b = params.detach().tolist()
    assert a == pytest.approx(-1.0, abs=0.05) and b == pytest.approx(0.5, abs=0.05)
    assert out.kale.item() == pytest.approx(0.5, abs=0.03)


def test_kale_velocity_is_one_plus_lambda_grad_h_and_moves_where_h_is_very_negative():
    # h(x) = -x1 - 300 (per particle, 2-D; the size of log(p0/pt) at high noise): velocity (1 + lam)(-1, 0),
    # not the (1 + lam) e^h grad h that is exactly 0 in fp32 there
    lam, eta = 0.1, 0.2
    h = lambda x, t: (-300.0 - x[:, :1])
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    out = sample_flow(h, z, [0], None, flow_steps=1, update=eta, kale_lambda=lam)
    expected = z.clone()
    expected[:, 0] -= eta * (1 + lam)
    assert torch.allclose(out, expected, atol=1e-6) and (out - z).abs().max() > 0.2


def test_kale_flow_with_the_exact_log_ratio_lands_on_the_target_gaussian():
    """h = log p - log q with q the particles' own Gaussian fit (the KALE optimum as lambda -> 0): moving
    along (1 + lambda) grad h is the Wasserstein gradient flow of KL(q || p), which for Gaussians ends on p.
    N(0, 1) -> N(2, 0.5^2), 4,000 particles, eta 0.02, 200 steps: mean within 0.01, std within 0.01. With
    the old e^h weighting the same flow stalls (h ~ -7 at the start): mean 0.6, std 1.5."""
    m, s = 2.0, 0.5

    def log_ratio(x, t):
        mu, var = x.mean().detach(), x.var().detach()
        return -((x - m) ** 2) / (2 * s * s) - math.log(s) + (x - mu) ** 2 / (2 * var) + 0.5 * torch.log(var)

    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_flow(log_ratio, z, [0], None, flow_steps=200, update=0.02, kale_lambda=0.1)
    assert out.mean().item() == pytest.approx(2.0, abs=0.01) and out.std().item() == pytest.approx(0.5, abs=0.01)


def test_critic_bound_is_one_sided_and_keeps_the_gradient_of_very_negative_critics():
    raw = torch.tensor([-300.0, -1.0, 0.0, 1.0, 100.0], requires_grad=True)
    clipped = clip_critic(raw, 5.0)
    assert clipped.max() <= 5.0 and math.isfinite(clipped.exp().max().item())
    assert torch.allclose(clipped[:2], raw[:2], atol=0.02)  # the identity well below the bound
    (grad,) = torch.autograd.grad(clipped.sum(), raw)
    assert grad[0] == pytest.approx(1.0, abs=1e-6) and grad[-1] < 1e-6  # alive at -300, saturated above c


def tiny_critic():
    torch.manual_seed(0)
    return DMMDDiscriminator(sample_size=8, in_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                             down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                             projection_dim=1, objective="kale")  # fmt: skip


def test_kale_discriminator_needs_a_scalar_head_and_samples_without_statistics(tmp_path):
    with pytest.raises(ValueError, match="projection_dim=1"):
        DMMDDiscriminator(objective="kale")
    with pytest.raises(ValueError, match="objective"):
        DMMDDiscriminator(objective="wasserstein")
    with pytest.raises(ValueError, match="KALE critic"):
        DMMDDiscriminator().critic(torch.zeros(1, 3, 32, 32), 0)
    pipe = DMMDPipeline(tiny_critic(), DMMDScheduler(num_inference_steps=3, flow_steps_per_level=2, step_size=0.5))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_images=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and not torch.allclose(out, noise)
    pipe.save_pretrained(tmp_path)
    again = load(tmp_path)(num_images=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.allclose(out, again, atol=1e-6)


def test_training_with_the_kale_objective_exports_a_sampling_pipeline(tmp_path):
    folder = run(tmp_path, "--objective", "kale", "--lambda_gp", "1.0")
    pipe = load(folder)
    assert pipe.discriminator.config.objective == "kale" and pipe.discriminator.feature_dim == 1
    assert pipe.discriminator.config.num_reference_levels == 0  # no statistics are needed or stored
    images = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3)
