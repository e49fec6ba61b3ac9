"""A flow step size per level, calibrated on training data (method §5, "Defaults").

One constant ``eta`` is a cliff: on a converged digits model 0.3 gave good samples, 1 garbage and 3
NaN, and which ``eta`` a new model needs cannot be known without a sweep. The calibration replaces
the sweep by a criterion that needs only training data: run the flow from noise level by level, and
at level ``k`` keep the step size whose ``N_s`` steps leave the particles closest (energy distance,
in data space) to the forward marginal of the *next* level, ``alpha_{k+1} x0 + sigma_{k+1} eps``
(clean data after the last level). The particles' effective noise then follows the grid by
construction. The search walks a geometric ladder (factor 2) from the previous level's choice in the
direction that improves and stops two rungs past the best (or where the flow blew up): a level costs
about five short flows of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .flow import Reference, as_reference, sample_flow
from .mmd import FeatureFn, energy_distance

# where the search starts at the first level (later levels start at the previous level's choice),
# the factor between rungs, and the range it may search
START, FACTOR, LOWEST, HIGHEST = 1e-2, 2.0, 1e-6, 1e4


@dataclass
class Calibration:
    """Per-level step sizes and what the scan saw (for the record and the plots)."""

    timesteps: list[int]
    step_sizes: list[float]
    flow_steps: int
    num_particles: int
    distances: list[dict[str, float]] = field(default_factory=list)  # per level: {eta: energy distance}

    def as_config(self) -> dict:
        """The scheduler-config keys that store this calibration."""
        return {
            "step_size_schedule": "calibrated",
            "calibrated_timesteps": list(self.timesteps),
            "calibrated_step_sizes": [float(s) for s in self.step_sizes],
            "calibrated_flow_steps": int(self.flow_steps),
        }


def _search_level(run, target, start: float, factor: float = FACTOR, patience: int = 2):
    """Local search over ``start · factor^i`` for the step whose flow ``run(eta)`` lands closest to
    ``target``: walk in the improving direction and stop ``patience`` rungs past the best (distances are
    noisy; a non-finite flow counts as infinitely far). Returns (best eta, its particles, all scores)."""
    scores: dict[float, float] = {}
    particles: dict[float, torch.Tensor] = {}

    def score(eta):
        if eta not in scores:
            try:
                z = run(eta)
                d = float(energy_distance(z, target)) if torch.isfinite(z).all() else float("inf")
            except FloatingPointError:
                z, d = None, float("inf")
            scores[eta], particles[eta] = d, z
        return scores[eta]

    first = score(start)
    if score(start * factor) < first:
        direction = factor
    elif score(start / factor) < first or not first < float("inf"):
        direction = 1 / factor  # smaller steps improve, or the start itself blew up
    else:
        return start, particles[start], scores  # the start is a local minimum
    best = min(scores, key=scores.get)
    eta, since = best, 0
    while since < patience and LOWEST <= eta * direction <= HIGHEST:
        eta = eta * direction
        if score(eta) < scores[best]:
            best, since = eta, 0
        elif scores[best] < float("inf"):  # patience counts only once something finite was found
            since += 1
    if not scores[best] < float("inf"):
        err = FloatingPointError("every step size tried gave non-finite particles: the model or its statistics are damaged")
        err.scores = scores
        raise err
    return best, particles[best], scores


def calibrate_step_sizes(
    phi: FeatureFn,
    data: torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    reference: torch.Tensor | Reference,
    *,
    flow_steps: int,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    start: float = START,
    factor: float = FACTOR,
    particle_mean: str = "ensemble",
    marginal_means: torch.Tensor | Reference | None = None,
    progress: bool = False,
) -> Calibration:
    """Choose ``eta_k`` per level so the flow's particles track the forward marginals (method §5).

    ``data`` (N, …) are training samples (targets are drawn from them; N particles are flowed, or
    ``noise.shape[0]``); ``reference`` the cached ``m_P(t_k)`` of ``timesteps``. Greedy and
    sequential: level ``k`` starts where the chosen step of level ``k - 1`` left the particles, so the
    choice corrects what earlier levels got wrong, as a sampler would see it. ``factor`` is the ratio
    between rungs of the search (the resolution of the answer).
    """
    timesteps = [int(t) for t in timesteps]
    reference = as_reference(reference)
    marginal = as_reference(marginal_means) if marginal_means is not None else None
    z = torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device) if noise is None else noise
    alphas = alphas_cumprod.double()
    steps, record = [], []
    levels = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm

        levels = tqdm(levels, desc="calibrating step sizes")
    for k in levels:
        if k + 1 < len(timesteps):
            acp = alphas[timesteps[k + 1]]
            eps = torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
            target = acp.sqrt().to(data.dtype) * data + (1 - acp).sqrt().to(data.dtype) * eps
        else:
            target = data

        def run(eta, k=k, start=z):
            return sample_flow(
                phi,
                start,
                [timesteps[k]],
                lambda _, t: reference(k, t),
                flow_steps=flow_steps,
                update=eta,
                particle_mean=particle_mean,
                marginal_means=None if marginal is None else (lambda _, t: marginal(k, t)),
            )

        eta, z, scores = _search_level(run, target, steps[-1] if steps else start, factor)
        steps.append(eta)
        record.append({f"{e:.6g}": d for e, d in sorted(scores.items())})
    return Calibration(timesteps, steps, flow_steps, int(z.shape[0]), record)


def calibrated_step_size(
    timestep: int,
    calibrated_timesteps: Sequence[int],
    calibrated_step_sizes: Sequence[float],
    calibrated_flow_steps: int,
    flow_steps: int,
) -> float:
    """``eta`` at ``timestep`` from a stored calibration: exact on its grid, log-linear in ``t`` between
    its levels (flat beyond its ends), scaled by ``calibrated_flow_steps / flow_steps`` so a level's
    total displacement stays what was calibrated when ``N_s`` changes."""
    order = np.argsort(calibrated_timesteps)
    ts = np.asarray(calibrated_timesteps, dtype=np.float64)[order]
    log_eta = np.log(np.asarray(calibrated_step_sizes, dtype=np.float64))[order]
    return float(np.exp(np.interp(float(timestep), ts, log_eta))) * calibrated_flow_steps / flow_steps


def calibrate_pipeline(pipe, data: torch.Tensor, *, generator: torch.Generator | None = None, progress: bool = True,
                       step_size: float = 1.0) -> Calibration:
    """Calibrate a ``DMMDPipeline``'s step sizes on training samples and store them in its scheduler.

    ``data`` (N, …) are clean training samples in the space the flow runs in (VAE latents, scaled as the
    pipeline's ``encode`` returns them, for a latent model); N particles are flowed, so N is also the
    ensemble size the calibration assumes (256–1024 is plenty). The pipeline's scheduler is replaced by a
    copy with ``step_size_schedule="calibrated"`` and ``step_size`` (the multiplier of the calibrated steps,
    1: as calibrated), on the grid its statistics were computed for.
    """
    disc, sched = pipe.discriminator, pipe.scheduler
    if disc.config.objective != "mmd":
        raise ValueError("step-size calibration follows the MMD witness; a KALE critic has no reference statistics")
    if data.shape[1:] != tuple(pipe.particle_shape):
        raise ValueError(f"calibration data must be shaped like the particles (N, {', '.join(map(str, pipe.particle_shape))}), "
                         f"got {tuple(data.shape)}: for a latent model pass encoded latents")  # fmt: skip
    sched.set_timesteps(sched.config.num_inference_steps)
    stats = disc.reference_statistics(sched.timesteps, sched.alphas_cumprod)
    device = pipe._execution_device

    def phi(x, t):
        return disc(x.to(disc.dtype), t).float()

    calibration = calibrate_step_sizes(
        phi, data.to(device, torch.float32), sched.timesteps, sched.alphas_cumprod, stats.mean_data.float().to(device),
        flow_steps=sched.config.flow_steps_per_level, generator=generator, particle_mean=sched.config.particle_mean,
        marginal_means=stats.mean_noised.float().to(device), progress=progress,
    )  # fmt: skip
    pipe.register_modules(scheduler=type(sched).from_config(sched.config, step_size=step_size, **calibration.as_config()))
    return calibration


# the constant step sizes the selection walks (start, factor between rungs), and how many rungs past the best
SELECT_START, SELECT_FACTOR, SELECT_PATIENCE = 1.0, 3.0, 1


@dataclass
class Selection:
    """Which step rule a pipeline samples with, chosen on training data, and what each candidate scored."""

    chosen: str
    distances: dict[str, float]  # candidate label -> energy distance of its final particles to training samples
    num_particles: int
    eta: float | None = None  # the constant step chosen (None: the calibrated steps stay)

    def as_record(self) -> dict:
        return {"chosen": self.chosen, "num_particles": self.num_particles,
                "energy_distances": {k: round(v, 6) for k, v in self.distances.items()}}  # fmt: skip


def select_step_rule(pipe, data: torch.Tensor, *, generator: torch.Generator | None = None,
                     progress: bool = False) -> Selection:  # fmt: skip
    """Choose the step rule of a ``DMMDPipeline`` by where its whole flow lands: the calibrated per-level steps
    (when the scheduler holds a calibration) against constant ``eta`` on a factor-3 ladder walked from 1, each
    scored by the energy distance between the flow's final particles (as many as ``data`` has, from one noise
    draw) and the training samples ``data``. The winner replaces the pipeline's scheduler.

    The per-level calibration is greedy: each level's steps only see the next level's marginal, and on a
    Fashion-MNIST model trained 8,000 steps it kept 0.01-0.16 over the first eight levels where a constant 0.3
    lands 4x closer to the training data (docs/benchmarks.md). Scoring the final particles asks what FID asks.
    ``data`` is in the space the flow runs in (latents for a latent model), never held-out data.
    """
    sched = pipe.scheduler
    noise = torch.randn((data.shape[0], *pipe.particle_shape), generator=generator, dtype=torch.float32)

    def final(**overrides) -> torch.Tensor:  # the pipeline's own class (no import: schedulers import this module)
        variant = type(pipe)(pipe.discriminator, type(sched).from_config(sched.config, **overrides), vae=pipe.vae)
        variant.set_progress_bar_config(disable=True)
        return variant(num_images=data.shape[0], latents=noise.clone(), output_type="latent").images.float()

    selection = choose_step_rule(final, data.float(), sched.config.step_size_schedule == "calibrated", progress)
    selection.num_particles = int(data.shape[0])
    if selection.eta is not None:
        pipe.register_modules(scheduler=type(sched).from_config(sched.config, step_size_schedule="constant",
                                                                step_size=selection.eta))  # fmt: skip
    return selection


def choose_step_rule(final, target: torch.Tensor, calibrated: bool, progress: bool = False) -> Selection:
    """The comparison behind :func:`select_step_rule`: ``final(**scheduler_overrides)`` runs the whole flow from one
    fixed noise draw and returns its final particles; ``calibrated`` adds the unchanged (calibrated) rule as a
    candidate. Constant ``eta`` walks a factor-3 ladder from 1 in the improving direction, one rung past the best;
    a flow that blows up counts as infinitely far."""
    distances: dict[str, float] = {}
    etas: dict[str, float] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="selecting the step rule", unit="flow")

    def scored(label: str, z: torch.Tensor) -> torch.Tensor:
        distances[label] = float(energy_distance(z, target)) if torch.isfinite(z).all() else float("inf")
        if bar is not None:
            bar.update(1)
        return z

    def constant(eta: float) -> torch.Tensor:  # _search_level scores it (once) and records a blow-up as inf
        if bar is not None:
            bar.update(1)
        return final(step_size_schedule="constant", step_size=eta)

    if calibrated:
        scored("calibrated", final())
    try:
        _, _, scores = _search_level(constant, target, SELECT_START, SELECT_FACTOR, SELECT_PATIENCE)
    except FloatingPointError as err:  # every constant blew up: the calibrated steps stay if they did not
        if not calibrated or not distances["calibrated"] < float("inf"):
            raise
        scores = err.scores
    for eta, d in sorted(scores.items()):
        distances[f"constant {eta:.4g}"], etas[f"constant {eta:.4g}"] = d, eta
    if bar is not None:
        bar.close()
    chosen = min(distances, key=distances.get)
    return Selection(chosen, distances, int(target.shape[0]), etas.get(chosen))
