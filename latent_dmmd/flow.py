"""The noise-adaptive MMD gradient flow (method §5) as a plain function.

``sample_flow`` moves particles along the witness gradient of any feature network
``phi(x, t) -> (N, D)``, level by level from high noise to low. It knows nothing of
diffusers: the pipeline passes its discriminator, the scheduler's grid and step rule,
and a progress-bar factory; tests pass a 2-D MLP or an analytic feature map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from .kale import kale_direction
from .mmd import FeatureFn, witness_gradient

ParticleMean = Literal["ensemble", "forward_marginal"]
# reference(level_index, t) -> m_P(t) of shape (D,)
Reference = Callable[[int, torch.Tensor], torch.Tensor]
# update(grad, level_index, particles) -> new particles (grad is None when witness=False)
Update = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
# callback(step_index, level_index, t, particles) -> particles or None
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor | None]
# perturb(particles, level_index) -> the points where the witness gradient is evaluated, or None (at the particles)
Perturb = Callable[[torch.Tensor, int], torch.Tensor | None]


def as_reference(means: torch.Tensor | Reference) -> Reference:
    """Turn a (T, D) tensor of cached means, one row per level, into a reference function."""
    if callable(means):
        return means
    return lambda k, t: means[k]


def data_reference(phi: FeatureFn, data: torch.Tensor, batch_size: int = 1024) -> Reference:
    """Exact reference: ``m_P(t)`` recomputed from a data batch at every call (§5 option)."""

    @torch.no_grad()
    def reference(k: int, t: torch.Tensor) -> torch.Tensor:
        total = None
        for chunk in data.split(batch_size):
            f = phi(chunk, t.expand(chunk.shape[0])).double().sum(0)
            total = f if total is None else total + f
        return (total / data.shape[0]).float()

    return reference


def euler_update(step_sizes: float | Sequence[float]) -> Update:
    """``Z <- Z - eta_k * G``: the plain particle update with a per-level step size."""

    def update(grad: torch.Tensor, k: int, z: torch.Tensor) -> torch.Tensor:
        eta = step_sizes if isinstance(step_sizes, (int, float)) else step_sizes[k]
        return z - eta * grad

    return update


def sample_flow(
    phi: FeatureFn,
    particles: torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    reference: torch.Tensor | Reference,
    *,
    flow_steps: int = 10,
    update: Update | float = 1.0,
    particle_mean: ParticleMean = "ensemble",
    marginal_means: torch.Tensor | Reference | None = None,
    callback: Callback | None = None,
    progress: bool | Callable[[int], contextlib.AbstractContextManager] = False,
    witness: bool = True,
    kale_lambda: float | None = None,
    perturb: Perturb | None = None,
    final_steps: int = 0,
    interrupt: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run the DMMD particle flow of §5 and return the final particles.

    Args:
        phi: feature network, ``phi(x, t)`` with ``t`` of shape (N,), returning (N, D).
        particles: initial particles (N, …), usually standard normal noise.
        timesteps: the grid ``t_1 > … > t_T``.
        reference: ``m_P(t_k)`` as a (T, D) tensor, or a function ``(k, t) -> (D,)``.
        flow_steps: ``N_s``, flow steps per level.
        update: ``(grad, k, z) -> z`` (e.g. ``DMMDScheduler.step``) or a constant step size.
        particle_mean: ``"ensemble"`` (mean over the N interacting particles) or
            ``"forward_marginal"`` (cached ``m_Pt(t_k)``; particles move independently).
        marginal_means: ``m_Pt(t_k)``, required by ``forward_marginal``.
        callback: called after every flow step; may return replacement particles.
        progress: ``True`` for a tqdm bar, or a factory ``total -> context manager``
            whose object has ``update()`` (what ``DiffusionPipeline.progress_bar`` returns).
        witness: False skips the witness gradient (``update`` gets ``None``): the DiffFlow
            sampler at ``score_weight = 1`` moves on the score alone.
        kale_lambda: set for a KALE critic (``phi`` returns its (N, 1) clipped values): particles
            then move along ``(1 + λ) e^h grad h`` and ``reference``/``particle_mean`` are unused.
        perturb: noise injection (§5, Arbel et al. 2019): ``perturb(Z, k)`` returns the points
            ``Z + beta_k sigma_t u`` where the witness gradient is evaluated, while ``Z`` itself is
            moved; the witness stays that of the unperturbed particles (their ensemble mean costs
            one more forward, without backward). ``None`` from it (or no ``perturb``) is the plain flow.
        final_steps: extra flow steps at the last level (``final_denoise="flow"``).
        interrupt: checked before every flow step; once it returns True the flow stops and the
            particles are returned as they are (diffusers' ``pipe._interrupt``).
    """
    if particle_mean not in ("ensemble", "forward_marginal"):
        raise ValueError(f"unknown particle_mean {particle_mean!r}; expected 'ensemble' or 'forward_marginal'")
    if kale_lambda is None and reference is None:
        raise ValueError("the MMD flow needs the reference means m_P(t)")
    if kale_lambda is None and particle_mean == "forward_marginal" and marginal_means is None:
        raise ValueError("particle_mean='forward_marginal' needs marginal_means (the cached m_Pt(t) statistics)")
    reference = as_reference(reference) if reference is not None else None
    marginal = as_reference(marginal_means) if marginal_means is not None else None
    if not callable(update):
        update = euler_update(float(update))
    timesteps = [int(t) for t in timesteps]

    total = len(timesteps) * flow_steps + final_steps
    if progress is True:
        bar = tqdm(total=total, desc="DMMD flow")
    elif callable(progress):
        bar = progress(total)
    else:
        bar = contextlib.nullcontext()

    z = particles
    step = 0
    with bar as pbar:
        for k, t_int in enumerate(timesteps):
            t = torch.full((z.shape[0],), t_int, device=z.device, dtype=torch.long)
            if kale_lambda is not None:
                direction = kale_direction(kale_lambda)
            elif particle_mean == "ensemble":
                m_p = reference(k, t[:1]).to(z.device)
                direction = lambda f, m_p=m_p: f.float().mean(0) - m_p
            else:
                direction = marginal(k, t[:1]).to(z.device) - reference(k, t[:1]).to(z.device)
            for _ in range(flow_steps + (final_steps if k == len(timesteps) - 1 else 0)):
                if interrupt is not None and interrupt():
                    return z
                if witness:
                    at = perturb(z, k) if perturb is not None else None
                    if at is None:
                        grad, _ = witness_gradient(phi, z, t, direction)
                    else:
                        g = direction
                        if callable(direction) and kale_lambda is None:  # the ensemble mean of the particles themselves
                            with torch.no_grad():
                                g = direction(phi(z, t).detach())
                        grad, _ = witness_gradient(phi, at, t, g)
                    z = update(grad.to(z.dtype), k, z)
                else:
                    z = update(None, k, z)
                if callback is not None:
                    replaced = callback(step, k, t[0], z)
                    z = replaced if replaced is not None else z
                step += 1
                if pbar is not None:
                    pbar.update()
            if not torch.isfinite(z).all():
                raise FloatingPointError(
                    f"the particles became non-finite (NaN or inf) at level {k} (t = {t_int}): the step size is too "
                    f"large for this model, or its weights or statistics are damaged"
                )
    return z
