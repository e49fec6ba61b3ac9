"""Pure tensor math of DMMD: kernels, unbiased MMD², witness gradients, penalties, loss.

Nothing here knows about diffusers; every function works on plain tensors and on any
feature network ``phi(x, t) -> (B, D)``, so the whole module is testable on 2-D toys.
Section numbers (§) refer to ``docs/method.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange, repeat

FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
L2Mode = Literal["feature", "witness"]
# how the clean and noisy sides of a training group are paired (method §2 "Paired samples")
Pairing = Literal["paired", "permuted", "independent"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- kernels (§1-2)


def mmd2_unbiased(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased linear-kernel MMD² of feature sets ``a`` (…, n, D) and ``b`` (…, m, D), §2.

    Costs O((n + m)·D): the Gram matrix is never built. Leading dimensions are batch
    dimensions (one MMD per group), which is how the training loss uses it.
    """
    n, m = a.shape[-2], b.shape[-2]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per side, got n={n}, m={m}")
    sum_a, sum_b = a.sum(-2), b.sum(-2)
    self_a = (sum_a.square().sum(-1) - a.square().sum((-2, -1))) / (n * (n - 1))
    self_b = (sum_b.square().sum(-1) - b.square().sum((-2, -1))) / (m * (m - 1))
    cross = (sum_a * sum_b).sum(-1) / (n * m)
    return self_a + self_b - 2 * cross


def mmd2_unbiased_paired(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased linear-kernel MMD² of *paired* features, ``b_i`` computed from ``a_i``'s own sample, §2.

    The U-statistic over pairs ``i != j`` of ``k(a_i,a_j) + k(b_i,b_j) - k(a_i,b_j) - k(a_j,b_i)``:
    the cross term leaves out the correlated ``(i, i)`` pairs just as the self terms leave out
    the diagonal, so the estimate stays unbiased however strongly ``b_i`` depends on ``a_i``
    (``mmd2_unbiased`` on such data is biased by ``-(2/n) tr Cov(a, b)``). O(n·D); leading
    dimensions are batch dimensions.
    """
    n = a.shape[-2]
    if b.shape[-2] != n:
        raise ValueError(f"paired features need the same number of samples per side, got {n} and {b.shape[-2]}")
    if n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 pairs, got {n}")
    sum_a, sum_b = a.sum(-2), b.sum(-2)
    self_a = (sum_a.square().sum(-1) - a.square().sum((-2, -1))) / (n * (n - 1))
    self_b = (sum_b.square().sum(-1) - b.square().sum((-2, -1))) / (n * (n - 1))
    cross = ((sum_a * sum_b).sum(-1) - (a * b).sum((-2, -1))) / (n * (n - 1))
    return self_a + self_b - 2 * cross


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Gram matrix ``exp(-|x - y|² / (2 l²))`` of two point sets (n, d), (m, d)."""
    return torch.exp(-torch.cdist(_flat(x), _flat(y)).square() / (2 * bandwidth**2))


def gaussian_mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Unbiased MMD² with a Gaussian kernel of width ``bandwidth`` (for tests and ablations)."""
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = gaussian_kernel(x, x, bandwidth), gaussian_kernel(y, y, bandwidth), gaussian_kernel(x, y, bandwidth)
    return (
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def rff_frequencies(num_features: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The random Fourier frequencies of §5 ``kernel="rff_gaussian"``: ``W ~ N(0, I)`` (R, D) and
    ``b ~ U[0, 2 pi)`` (R,), drawn in float64 from ``seed`` (the same draws wherever they are rebuilt)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_features, dim, generator=gen, dtype=torch.float64)
    bias = 2 * torch.pi * torch.rand(num_features, generator=gen, dtype=torch.float64)
    return weight, bias


def rff_map(scaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sqrt(2/R) cos(W f + b)`` of features already divided by their bandwidth (N, D)."""
    return (2.0 / weight.shape[0]) ** 0.5 * torch.cos(scaled @ weight.T + bias)


def random_fourier_features(
    features: torch.Tensor, bandwidth: torch.Tensor | float, num_features: int, seed: int = 0
) -> torch.Tensor:
    """``psi(f) = sqrt(2/R) cos(W f / l + b)`` with the frequencies of :func:`rff_frequencies`: ``<psi(f),
    psi(f')>`` is an unbiased estimate of the Gaussian kernel ``exp(-|f - f'|^2 / (2 l^2))``, so a
    linear-kernel MMD on ``psi`` is a Gaussian-kernel MMD on ``f`` whose means can be cached.
    ``features`` (N, D); ``bandwidth`` a scalar or (N,) per row.
    """
    weight, bias = (x.to(features.device, features.dtype) for x in rff_frequencies(num_features, features.shape[-1], seed))
    bw = torch.as_tensor(bandwidth, dtype=features.dtype, device=features.device)
    bw = bw.view(-1, 1) if bw.dim() else bw
    return rff_map(features / bw, weight, bias)


def median_pairwise_distance(features: torch.Tensor) -> torch.Tensor:
    """Median Euclidean distance over the pairs ``i < j`` of each set in ``features`` (…, n, D): the
    median heuristic for a Gaussian kernel's bandwidth (§5). Returns (…,)."""
    n = features.shape[-2]
    if n < 2:
        raise ValueError(f"the median pairwise distance needs at least 2 samples, got {n}")
    dist = torch.cdist(features, features)
    i, j = torch.triu_indices(n, n, offset=1, device=features.device)
    return dist[..., i, j].median(-1).values


def gaussian_mmd2_closed_form(mean_shift: float, std: float, bandwidth: float, dim: int) -> float:
    """Population MMD² between N(0, s²I) and N(m, s²I) under a Gaussian kernel (§6)."""
    l2, s2 = bandwidth**2, std**2
    return 2 * (l2 / (l2 + 2 * s2)) ** (dim / 2) * (1 - torch.exp(torch.tensor(-(mean_shift**2) / (2 * (l2 + 2 * s2)))).item())


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance ``2E|x-y| - E|x-x'| - E|y-y'|`` (the MMD of the distance kernel).

    A bandwidth-free sample distance, used to judge flows without favouring any kernel.
    """
    x, y = _flat(x), _flat(y)
    n, m = x.shape[0], y.shape[0]
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return 2 * torch.cdist(x, y).mean() - dxx - dyy


# --------------------------------------------------------------------------- witness (§2)


def witness_gradient(
    phi: FeatureFn, z: torch.Tensor, t: torch.Tensor, direction: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient of the witness ``f(z) = <phi(z, t), g>``: one forward, one backward.

    ``direction`` is ``g`` (D,), or a function of the detached features ``F`` (N, D)
    returning ``g`` (the ensemble particle mean needs ``F`` from this very forward).
    Returns ``(grad_z f, F)``; ``g`` is treated as a constant (stop-gradient).
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        features = phi(z, t)
        g = direction(features.detach()) if callable(direction) else direction
        (grad,) = torch.autograd.grad((features * g.detach().to(features.dtype)).sum(), z)
    return grad, features.detach()


# --------------------------------------------------------------------------- training loss (§3)


def math_attention():
    """Context that forces the math SDPA kernel: fused kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@dataclass
class DMMDLossOutput:
    """Scalars of one DMMD loss evaluation (averaged over groups) and per-group MMD²."""

    loss: torch.Tensor
    mmd2: torch.Tensor
    l2: torch.Tensor
    gradient_penalty: torch.Tensor
    mmd2_per_group: torch.Tensor
    feature_norm: torch.Tensor
    level_per_group: torch.Tensor | None = None


def dmmd_loss(
    phi: FeatureFn,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    num_groups: int,
    *,
    lambda_l2: float = 1e-3,
    lambda_gp: float = 1.0,
    l2_mode: L2Mode = "feature",
    gp_target: float = 1.0,
    generator: torch.Generator | None = None,
    interpolation: torch.Tensor | None = None,
    phi_penalty: FeatureFn | None = None,
    pairing: Pairing = "paired",
    xt_unpaired: torch.Tensor | None = None,
    group_weights: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    penalty_index: torch.Tensor | None = None,
    kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_raw_features: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    feature_scale: Literal["none", "group"] = "none",
) -> DMMDLossOutput:
    """DMMD discriminator loss of §3, minimised: ``-MMD²_u + λ_l2 R_l2 + λ_gp R_gp``.

    ``x0`` and ``xt`` (B, …) are clean samples and their forward-noised copies; ``t`` (B,)
    holds one noise level per group of ``B / num_groups`` consecutive samples. Clean and noisy
    samples go through one batched forward; the gradient penalty runs the interpolates
    ``x_hat = u x0 + (1 - u) xt`` (``u`` given as ``interpolation`` (B,) or drawn from
    ``generator``) through ``phi_penalty`` (default ``phi``; under DDP, the unwrapped module, whose
    gradients reach the same parameters in the same backward) and needs a double backward.

    ``pairing`` (§2 "Paired samples"): ``"paired"`` scores ``x0_i`` against its own noisy copy
    ``xt_i`` with the paired U-statistic (diagonal left out of the cross term); ``"permuted"``
    scores ``x0`` against ``xt_unpaired``, noisy copies of *other* clean samples (independent of
    ``x0``), with the two-sample estimator, and keeps the pairs ``(x0_i, xt_i)`` for the penalty's
    interpolates; ``"independent"`` is the two-sample estimator on the paired copies, biased by
    ``-(2/n) tr Cov`` (kept only to reproduce the old loss in ablations).
    ``group_weights`` (num_groups,), or a function of the detached per-group MMD² returning them,
    scales each group's MMD term (§3 "Balance across noise levels"); the penalties keep their weights.
    ``penalty_index`` (indices into the batch) evaluates the gradient penalty on those interpolates
    only: its forward and double backward then cost that fraction of the full penalty.
    ``kernel(features, t) -> psi`` maps ``phi``'s raw features (and the penalty's) into the space where
    the MMD is linear (§5 ``rff_gaussian``); ``on_raw_features(clean (G, n, D), noisy (G, n, D), levels (G,))``
    sees each group's detached raw features of both samples first (how the kernel's bandwidth is measured).
    ``feature_scale="group"`` divides each group's features by their RMS norm before the MMD: the objective no
    longer grows with the features' scale (method §9, a cheaper control than the penalty to measure).
    """
    batch = x0.shape[0]
    if batch % num_groups:
        raise ValueError(f"batch size {batch} is not divisible by num_groups={num_groups}")
    size = batch // num_groups
    if size < 2:
        raise ValueError(f"each of the {num_groups} groups needs at least 2 samples, got {size}")

    if pairing == "permuted":
        if xt_unpaired is None or xt_unpaired.shape != xt.shape:
            raise ValueError("pairing='permuted' needs xt_unpaired: noisy copies of other clean samples, shaped like xt")
        scored = xt_unpaired
    elif pairing in ("paired", "independent"):
        scored = xt
    else:
        raise ValueError(f"unknown pairing {pairing!r}; expected 'paired', 'permuted' or 'independent'")
    features = phi(torch.cat([x0, scored]), torch.cat([t, t]))
    # one forward over [clean; noisy]: split it into (side, group, sample, feature)
    by_group = "(side group n) d -> side group n d"
    levels = rearrange(t, "(group n) -> group n", group=num_groups)[:, 0]
    if on_raw_features is not None:
        raw = rearrange(features.detach(), by_group, side=2, group=num_groups)
        on_raw_features(raw[0], raw[1], levels)
    if kernel is not None:
        features = kernel(features, torch.cat([t, t]))
    a, b = rearrange(features, by_group, side=2, group=num_groups)
    if feature_scale == "group":  # a scale-invariant objective: each group's features over their RMS norm
        rms = ((a.square().sum(-1).mean(1) + b.square().sum(-1).mean(1)) / 2).clamp_min(1e-12).sqrt()
        a, b = a / rms[:, None, None], b / rms[:, None, None]
    elif feature_scale != "none":
        raise ValueError(f"unknown feature_scale {feature_scale!r}; expected 'none' or 'group'")
    mmd2 = mmd2_unbiased_paired(a, b) if pairing == "paired" else mmd2_unbiased(a, b)
    if callable(group_weights):
        group_weights = group_weights(mmd2.detach())
    weights = None if group_weights is None else group_weights.to(mmd2.device, mmd2.dtype).detach()
    # witness direction per group: m_noisy - m_clean (the MMD-flow sign convention)
    g = b.mean(1) - a.mean(1)

    if l2_mode == "feature":
        l2 = a.square().sum(-1).mean() + b.square().sum(-1).mean()
    elif l2_mode == "witness":
        l2 = torch.einsum("gnd,gd->gn", torch.cat([a, b], 1), g).square().mean()
    else:
        raise ValueError(f"unknown l2_mode {l2_mode!r}; expected 'feature' or 'witness'")

    if lambda_gp:
        if interpolation is None:
            u = torch.rand((batch,) + (1,) * (x0.dim() - 1), generator=generator, dtype=x0.dtype).to(x0.device)
        else:
            u = interpolation.to(x0.device, x0.dtype).view((batch,) + (1,) * (x0.dim() - 1))
        x_hat = u * x0 + (1 - u) * xt
        t_hat, g_hat = t, repeat(g, "group d -> (group n) d", n=size)  # each interpolate's own group direction
        if penalty_index is not None:  # the penalty on a subset of the interpolates only
            index = penalty_index.to(x0.device)
            x_hat, t_hat, g_hat = x_hat[index], t[index], g_hat[index]
        x_hat = x_hat.detach().requires_grad_(True)
        # a separate forward keeps the double-backward graph to the B interpolates (a joint forward
        # over all 3B inputs made the penalty ~3x dearer); math attention has a double backward
        with math_attention():
            f_hat = (phi_penalty or phi)(x_hat, t_hat)
            if kernel is not None:
                f_hat = kernel(f_hat, t_hat)
            witness = (f_hat * g_hat).sum()
            (grad,) = torch.autograd.grad(witness, x_hat, create_graph=True)
        gp = (_flat(grad).norm(dim=1) - gp_target).square().mean()
    else:
        gp = features.new_zeros(())

    mmd_term = mmd2.mean() if weights is None else (weights * mmd2).mean()
    loss = -mmd_term + lambda_l2 * l2 + lambda_gp * gp
    return DMMDLossOutput(
        loss=loss,
        mmd2=mmd2.mean().detach(),
        l2=l2.detach(),
        gradient_penalty=gp.detach(),
        mmd2_per_group=mmd2.detach(),
        feature_norm=features.detach().norm(dim=1).mean(),
        level_per_group=levels.detach(),
    )
