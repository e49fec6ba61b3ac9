"""Known-answer checks of the MMD math (method §2, §3, §6)."""

import math

import pytest
import torch

from latent_dmmd.mmd import (
    dmmd_loss,
    energy_distance,
    gaussian_kernel,
    gaussian_mmd2_closed_form,
    gaussian_mmd2_unbiased,
    mmd2_unbiased,
    witness_gradient,
)

from .conftest import tiny_discriminator


def gram_mmd2_unbiased(a, b):
    """Reference implementation with the full Gram matrices (what mmd2_unbiased avoids)."""
    n, m = len(a), len(b)
    kaa, kbb, kab = a @ a.T, b @ b.T, a @ b.T
    return (kaa.sum() - kaa.trace()) / (n * (n - 1)) + (kbb.sum() - kbb.trace()) / (m * (m - 1)) - 2 * kab.mean()


def test_linear_mmd_matches_gram_matrix_estimator():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 11, generator=g, dtype=torch.float64), torch.randn(23, 11, generator=g, dtype=torch.float64) + 0.3
    assert torch.allclose(mmd2_unbiased(a, b), gram_mmd2_unbiased(a, b), rtol=1e-12, atol=1e-12)


def test_linear_mmd_is_batched_over_groups():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 16, 5, generator=g), torch.randn(4, 16, 5, generator=g)
    per_group = torch.stack([mmd2_unbiased(a[i], b[i]) for i in range(4)])
    assert torch.allclose(mmd2_unbiased(a, b), per_group, atol=1e-6)


def test_linear_mmd_population_value():
    # population value |m_P - m_Q|^2: mean shift (1, 1, 0, ...) gives 2
    g = torch.Generator().manual_seed(2)
    shift = torch.zeros(6)
    shift[:2] = 1.0
    est = mmd2_unbiased(torch.randn(20000, 6, generator=g), torch.randn(20000, 6, generator=g) + shift)
    assert abs(est.item() - 2.0) < 0.05


def test_linear_mmd_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(torch.randn(1, 3), torch.randn(5, 3))


@pytest.mark.parametrize("bandwidth, expected", [(0.5, 0.1309), (1.0, 0.3244)])
def test_gaussian_mmd_closed_form_and_estimator(bandwidth, expected):
    # method §6: d=2, s=1, |m|=2
    assert gaussian_mmd2_closed_form(2.0, 1.0, bandwidth, 2) == pytest.approx(expected, abs=1e-4)
    estimates = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        p = torch.randn(2000, 2, generator=g, dtype=torch.float64)
        q = torch.randn(2000, 2, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0.0], dtype=torch.float64)
        estimates.append(gaussian_mmd2_unbiased(p, q, bandwidth).item())
    mean = sum(estimates) / len(estimates)
    spread = (sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)) ** 0.5
    # unbiased: the mean of 4 runs lies within 4 standard errors (and the runs do vary)
    assert 0 < spread < 0.02
    assert abs(mean - expected) < 4 * spread / 2 + 1e-3


@pytest.mark.parametrize("shift, best", [(1, 1.46), (2, 1.59), (4, 2.03), (8, 3.17)])
def test_mmd_maximising_bandwidth_grows_with_the_shift(shift, best):
    # method §6: for N(0, I_2) vs N(m, I_2) the MMD-maximising width grows with |m|
    widths = torch.linspace(0.5, 6.0, 5501)
    values = torch.tensor([gaussian_mmd2_closed_form(shift, 1.0, w.item(), 2) for w in widths])
    assert widths[values.argmax()].item() == pytest.approx(best, abs=0.01)


def test_energy_distance_is_zero_for_same_law_and_positive_for_shift():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g)
    assert abs(energy_distance(x, y).item()) < 0.01
    assert energy_distance(x, y + 1).item() > 0.5


def test_witness_gradient_is_jacobian_transpose_times_direction():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    phi = lambda x, t: net(x)
    z, g = torch.randn(4, 3), torch.randn(5)
    grad, feats = witness_gradient(phi, z, torch.zeros(4), g)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: net(v), z[i])  # (5, 3)
        assert torch.allclose(grad[i], jac.T @ g, atol=1e-6)
    assert torch.allclose(feats, net(z).detach())


def test_witness_gradient_with_ensemble_direction_uses_the_same_forward():
    phi = lambda x, t: torch.cat([x, x.square()], 1)
    z = torch.tensor([[1.0], [3.0]])
    m_p = torch.tensor([0.0, 1.0])
    grad, _ = witness_gradient(phi, z, torch.zeros(2), lambda f: f.mean(0) - m_p)
    # m_Q = (2, 5); g = (2, 4); grad = g0 + 2 z g1
    assert torch.allclose(grad, torch.tensor([[10.0], [26.0]]))


def _toy_phi():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    return net, (lambda x, t: net(torch.cat([x, t.float()[:, None] / 1000], 1)))


def test_dmmd_loss_terms_match_a_direct_computation():
    net, phi = _toy_phi()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    t = torch.tensor([100] * 4 + [700] * 4)
    xt = 0.5 * x0 + 0.8 * eps
    out = dmmd_loss(phi, x0, xt, t, 2, lambda_l2=0.1, lambda_gp=0.5, generator=torch.Generator().manual_seed(9))

    a, b = phi(x0, t), phi(xt, t)
    mmd = torch.stack([gram_mmd2_unbiased(a[s], b[s]) for s in (slice(0, 4), slice(4, 8))])
    l2 = a.square().sum(1).mean() + b.square().sum(1).mean()
    u = torch.rand((8, 1), generator=torch.Generator().manual_seed(9))
    x_hat = (u * x0 + (1 - u) * xt).requires_grad_(True)
    gdir = torch.stack([b[:4].mean(0) - a[:4].mean(0), b[4:].mean(0) - a[4:].mean(0)]).repeat_interleave(4, 0)
    (grad,) = torch.autograd.grad((phi(x_hat, t) * gdir).sum(), x_hat)
    gp = (grad.norm(dim=1) - 1).square().mean()

    assert torch.allclose(out.mmd2_per_group, mmd.detach(), atol=1e-6)
    assert torch.allclose(out.l2, l2.detach(), atol=1e-6)
    assert torch.allclose(out.gradient_penalty, gp.detach(), atol=1e-6)
    assert torch.allclose(out.loss, -mmd.mean() + 0.1 * l2 + 0.5 * gp, atol=1e-6)


def test_witness_l2_reading_is_mean_squared_witness():
    net, phi = _toy_phi()
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    t = torch.full((8,), 500)
    out = dmmd_loss(phi, x0, xt, t, 1, l2_mode="witness", lambda_gp=0.0)
    a, b = phi(x0, t), phi(xt, t)
    witness = torch.cat([a, b]) @ (b.mean(0) - a.mean(0))
    assert torch.allclose(out.l2, witness.square().mean().detach(), atol=1e-6)
    with pytest.raises(ValueError, match="l2_mode"):
        dmmd_loss(phi, x0, xt, t, 1, l2_mode="nope")


def test_gradient_penalty_double_backward_through_attention_unet():
    disc = tiny_discriminator()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([50] * 4 + [600] * 4)
    xt = 0.7 * x0 + 0.7 * torch.randn(x0.shape, generator=g)
    out = dmmd_loss(disc, x0, xt, t, 2, generator=g)
    out.loss.backward()
    grads = [p.grad for p in disc.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    # the penalty's own gradient reaches the weights: weight grads differ with and without it
    disc.zero_grad()
    dmmd_loss(disc, x0, xt, t, 2, lambda_gp=0.0).loss.backward()
    no_gp = [p.grad.clone() for p in disc.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(grads, no_gp))


def test_gaussian_kernel_is_one_on_the_diagonal():
    x = torch.randn(5, 3)
    k = gaussian_kernel(x, x, 0.7)
    assert torch.allclose(k.diagonal(), torch.ones(5))
    assert math.isclose(k[0, 1].item(), math.exp(-((x[0] - x[1]).norm().item() ** 2) / (2 * 0.49)), rel_tol=1e-5)
