"""One-step sampling from a DMMD model (method §10): what a generator ``x = G(z)`` regresses onto.

Two ways, both with the discriminator and its statistics frozen (no min–max):

- distillation: the flow's own endpoints from the generator's noise (``flow_endpoints``); plain regression;
- the field: for a batch ``x = G(z)``, a level ``t`` and ``x_t = alpha_t x + sigma_t eps``, the stop-gradient target
  ``x - eta alpha_t grad`` (``field_target``), where ``grad`` is the input gradient of

  * the linear-kernel witness (``kernel="linear"``): one direction ``m_Q(t) - m_P(t)`` shared by every sample, the
    field the particle flow follows; a generator whose outputs share parameters tends to follow it together;
  * a local, normalised attraction–repulsion field on the discriminator's features (``kernel="local"``): each
    sample's features pulled towards the softmax-weighted mean of nearby data features and pushed from that of
    nearby generated ones (temperature ``tau`` times the median feature distance); zero in expectation when the
    generated batch is distributed as the data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .mmd import median_pairwise_distance, witness_gradient

FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def flow_endpoints(pipe, num: int, batch_size: int, seed: int = 0, progress: bool = False, **call):
    """``(noise, endpoints)``: ``num`` initial particles and where the pipeline's flow takes them, ``batch_size``
    particles flowed together (large batches make an endpoint nearly a function of its own noise). Noise of
    sample ``i`` is drawn from seed ``seed + i``."""
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    noise, ends = [], []
    for first in tqdm(range(0, num, batch_size), desc="flow endpoints", disable=not progress):
        n = min(batch_size, num - first)
        gens = [torch.Generator().manual_seed(seed + first + i) for i in range(n)]
        z = randn_tensor((n, *pipe.particle_shape), generator=gens)
        x = pipe(num_images=n, latents=z, output_type="latent", use_generator=False, **call).images
        noise.append(z)
        ends.append(x.float().cpu())
    return torch.cat(noise), torch.cat(ends)


def local_direction(features: torch.Tensor, data_features: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-sample feature-space drift ``V_i = sum_j a_ij y_j - sum_{k != i} r_ik f_k`` (N, D): attraction to the
    softmax(-distance / tau')-weighted data features ``y``, repulsion from the generated ones ``f``, with
    ``tau' = tau * median distance`` (so the temperature is scale-free)."""
    f, y = features.float(), data_features.float()
    d_fy = torch.cdist(f, y)
    d_ff = torch.cdist(f, f)
    scale = tau * median_pairwise_distance(torch.cat([f, y])).clamp_min(1e-12)
    attract = torch.softmax(-d_fy / scale, dim=1) @ y
    d_ff = d_ff + torch.diag(torch.full((f.shape[0],), float("inf"), device=f.device))  # no self-repulsion
    repel = torch.softmax(-d_ff / scale, dim=1) @ f
    return attract - repel


def field_target(
    phi: FeatureFn,
    x: torch.Tensor,
    t: int,
    alpha: float,
    sigma: float,
    eta: float,
    noise: torch.Tensor,
    mean_data: torch.Tensor | None = None,
    kernel: str = "linear",
    data: torch.Tensor | None = None,
    data_noise: torch.Tensor | None = None,
    tau: float = 1.0,
) -> torch.Tensor:
    """``stopgrad(x - eta alpha_t grad)`` for the batch ``x = G(z)`` noised to level ``t`` (method §10).

    ``kernel="linear"`` needs ``mean_data`` (the cached ``m_P(t)``); ``kernel="local"`` needs clean ``data`` (noised
    to ``t`` with ``data_noise``). The regression ``|G(z) - target|^2`` then has the parameter gradient
    ``2 eta alpha_t J_G^T grad``: a descent step on the field's objective through the frozen discriminator.
    """
    x = x.detach().float()
    x_t = alpha * x + sigma * noise
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    if kernel == "linear":
        if mean_data is None:
            raise ValueError("the linear-kernel field needs mean_data, the cached m_P(t)")
        grad, _ = witness_gradient(phi, x_t, tt, lambda f: f.float().mean(0) - mean_data.to(f.device).float())
    elif kernel == "local":
        if data is None or data_noise is None:
            raise ValueError("the local field needs clean data and its noise")
        data_t = alpha * data.float() + sigma * data_noise
        with torch.no_grad():
            data_features = phi(data_t, torch.full((data.shape[0],), int(t), device=x.device, dtype=torch.long))
        # the move that brings each sample's features along V_i is -grad of <phi(x_t), -V_i>; V_i is read from the
        # features of the gradient's own forward (one forward of the batch, not two)
        grad, _ = witness_gradient(phi, x_t, tt, lambda f: -local_direction(f, data_features, tau))
    else:
        raise ValueError(f"kernel must be 'linear' or 'local', got {kernel!r}")
    return (x - eta * alpha * grad.float()).detach()


def diversity(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean pairwise distance of a generated batch over that of a reference batch: near 1 when the batch spreads
    like the data, near 0 when it collapses (the figure a field-trained generator's log must show)."""
    x, reference = x.detach().flatten(1).float(), reference.detach().flatten(1).float()
    return float(torch.pdist(x).mean() / torch.pdist(reference).mean().clamp_min(1e-12))
