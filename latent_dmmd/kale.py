"""The KALE variant: a noise-conditional critic and its particle velocity.

KALE (KL Approximate Lower-bound Estimator, Glaser, Arbel & Gretton 2021) replaces the MMD
by the regularised variational lower bound of KL(P || Q):

    KALE(P || Q) = (1 + λ) max_h  1 + E_P[h] - E_Q[exp h] - (λ/2) ||h||²,

whose maximiser approaches log dP/dQ as λ -> 0. Here P is the clean data and Q its
forward-noised copy at level t, exactly the pairs DMMD trains on, and ``h(x, t)`` is a scalar
critic (a ``DMMDDiscriminator`` with ``projection_dim=1``). ``||h||²`` (an RKHS norm in the
paper) becomes the mean of h² over both samples. The critic is bounded from above only,
``h = c - softplus(c - raw)`` (the identity for ``raw << c``, never above ``c``), so ``exp h``
cannot blow up while ``h << 0`` keeps its gradient: at high noise the optimal critic,
``log(p_0 / p_t)``, is of order -300 for face latents, where a two-sided clip such as
``c tanh(raw / c)`` has a gradient of exactly zero in fp32.

Particles move along ``(1 + λ) grad h``: with ``h ≈ log(p / q)`` this is the ``grad log(p / q)``
end of the DiffFlow family (method §7), the Wasserstein gradient flow of KL(Q || P). (Weighting it
by ``exp h``, the forward-KL direction, makes it vanish wherever ``h << 0``, i.e. wherever the
particles are at the start.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .mmd import _flat, math_attention

Critic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> (B,) clipped critic


def clip_critic(raw: torch.Tensor, clip: float) -> torch.Tensor:
    """``c - softplus(c - raw)``: bounded by ``c`` from above only, ``≈ raw`` (gradient ≈ 1) for ``raw << c``."""
    return clip - torch.nn.functional.softplus(clip - raw)


@dataclass
class KALELossOutput:
    """Scalars of one KALE loss evaluation."""

    loss: torch.Tensor
    kale: torch.Tensor
    critic_clean: torch.Tensor
    critic_noisy: torch.Tensor
    gradient_penalty: torch.Tensor


def kale_loss(
    critic: Critic,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    *,
    kale_lambda: float = 0.1,
    lambda_gp: float = 0.0,
    gp_target: float = 1.0,
    interpolation: torch.Tensor | None = None,
    critic_penalty: Critic | None = None,
) -> KALELossOutput:
    """The KALE critic loss, minimised: ``-(1 + E_P h - E_Q e^h) + (λ/2) mean(h²) + λ_gp R_gp``.

    ``x0`` are clean samples, ``xt`` their forward-noised copies at levels ``t`` (B,). The
    optional gradient penalty ``(||grad_x h(x_hat)|| - gp_target)²`` on ``x_hat = u x0 + (1-u) xt``
    mirrors the DMMD loss (same interpolates, same separate forward).
    """
    batch = x0.shape[0]
    h = critic(torch.cat([x0, xt]), torch.cat([t, t]))
    h_p, h_q = h[:batch], h[batch:]
    bound = 1 + h_p.mean() - h_q.exp().mean()
    loss = -bound + kale_lambda / 2 * h.square().mean()
    gp = h.new_zeros(())
    if lambda_gp:
        if interpolation is None:
            raise ValueError("the KALE gradient penalty needs interpolation weights u (B,)")
        u = interpolation.to(x0.device, x0.dtype).view((batch,) + (1,) * (x0.dim() - 1))
        x_hat = (u * x0 + (1 - u) * xt).detach().requires_grad_(True)
        with math_attention():
            (grad,) = torch.autograd.grad((critic_penalty or critic)(x_hat, t).sum(), x_hat, create_graph=True)
        gp = (_flat(grad).norm(dim=1) - gp_target).square().mean()
        loss = loss + lambda_gp * gp
    return KALELossOutput(
        loss=loss,
        kale=((1 + kale_lambda) * bound).detach(),
        critic_clean=h_p.mean().detach(),
        critic_noisy=h_q.mean().detach(),
        gradient_penalty=gp.detach(),
    )


def kale_direction(kale_lambda: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cotangent for ``witness_gradient`` so that ``Z - eta G`` moves along ``(1 + λ) grad h``.

    Takes the (N, 1) critic values of the particles and returns ``-(1 + λ)`` for each (N, 1).
    """
    return lambda h: torch.full_like(h, -(1 + kale_lambda))
