"""Where do the particles really sit? The effective-noise diagnostic and an adaptive grid.

DMMD applies, at sampling level ``t_k``, features trained to tell clean data from data noised
to level ``t_k``: the sampler assumes that the particles entering level ``k`` look like the
forward marginal ``P_{t_k}``. ``effective_noise_level`` checks that assumption with a kernel
independent of the discriminator: the energy distance (the MMD of the distance kernel,
bandwidth-free) between the particles and forward-noised data at every candidate level; the
level where it is smallest is the particles' effective noise level. ``trace_effective_noise``
records it along a sampling run, ``plot_effective_noise`` draws it against the schedule, and
``adaptive_grid`` re-times the grid so that each level is applied where the particles are.
"""

from __future__ import annotations

import numpy as np
import torch

from .mmd import energy_distance


def candidate_levels(scheduler, num: int = 96) -> torch.Tensor:
    """``num`` distinct levels spread uniformly in log-SNR over the whole forward process."""
    snr = scheduler._all_log_snr
    targets = torch.linspace(float(snr[0]), float(snr[-1]), num, dtype=torch.float64)
    return (snr[None, :] - targets[:, None]).abs().argmin(1).unique()


@torch.no_grad()
def effective_noise_level(
    particles: torch.Tensor,
    data: torch.Tensor,
    scheduler,
    candidates: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_points: int = 512,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The forward level whose marginal the particles match best under the energy distance.

    ``particles`` (N, …) and clean ``data`` (M, …) live in the same particle space. Every
    candidate level noises the same data with the same noise (common random numbers), so the
    distance curve is smooth in the level. Returns ``(level, candidates, distances)``.
    """
    candidates = candidate_levels(scheduler) if candidates is None else torch.as_tensor(candidates)
    x = particles[:max_points].double().flatten(1)
    y0 = data[:max_points].double().flatten(1)
    eps = torch.randn(y0.shape, generator=generator, dtype=torch.float64)
    alpha, sigma = scheduler.alpha_sigma(candidates)
    dist = torch.stack([energy_distance(x, a * y0 + s * eps) for a, s in zip(alpha.double(), sigma.double())])
    return int(candidates[dist.argmin()]), candidates, dist


def trace_effective_noise(pipe, data: torch.Tensor, num_images: int = 256, seed: int = 0, **call_kwargs) -> dict:
    """Sample with ``pipe`` and estimate the effective noise level of the particles as they
    enter every level (the initial noise enters level 1; the final particles "enter" level 0,
    the data). ``data`` are clean particles (latents in latent space). Returns the scheduled
    and effective levels and the final particles."""
    sched = pipe.scheduler
    entering = []
    flow_steps = call_kwargs.get("flow_steps_per_level") or sched.config.flow_steps_per_level

    def callback(p, step, t, tensors):
        if (step + 1) % flow_steps == 0:  # the last flow step of a level
            entering.append(tensors["latents"].detach().clone())
        return {}

    gen = torch.Generator().manual_seed(seed)
    init = torch.randn((num_images, *pipe.particle_shape), generator=gen)
    final = pipe(num_images=num_images, latents=init, output_type="latent", callback_on_step_end=callback,
                 **call_kwargs).images  # fmt: skip
    scheduled = [int(t) for t in sched.timesteps] + [0]
    noise_gen = torch.Generator().manual_seed(seed + 1)
    effective = [effective_noise_level(z, data, sched, generator=noise_gen)[0] for z in [init, *entering]]
    return {"scheduled": scheduled, "effective": effective, "particles": final}


def adaptive_grid(scheduled: list[int], effective: list[int], t_min: int | None = None, t_max: int | None = None) -> list[int]:
    """Re-time a grid from a pilot run's effective levels: level ``k`` is applied at the level
    the particles entering it actually sat at, kept strictly decreasing within ``[t_min, t_max]``;
    the last level stays at ``t_min`` (the flow must end at the data, however far behind it is).

    ``scheduled``/``effective`` are what ``trace_effective_noise`` returns (their last entry, the
    final particles, is not a level and is dropped).
    """
    levels = np.asarray(effective[: len(scheduled) - 1], dtype=np.int64)
    t_max = int(scheduled[0]) if t_max is None else t_max
    t_min = int(scheduled[-2]) if t_min is None else t_min
    levels = np.clip(levels, t_min, t_max)
    levels = np.minimum.accumulate(levels)  # particles never get noisier: keep the grid monotone
    out = []
    for k, t in enumerate(levels):  # strictly decreasing, leaving room for the levels still to come
        room = len(levels) - 1 - k
        t = min(int(t), out[-1] - 1 if out else t_max)
        out.append(max(t, t_min + room))
    out[-1] = t_min
    return out


def plot_effective_noise(traces: dict[str, dict], path: str, title: str = "") -> None:
    """Effective vs scheduled noise level, one line per trace, with the identity for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    top = max(max(tr["scheduled"]) for tr in traces.values())
    ax.plot([0, top], [0, top], color="0.6", ls="--", lw=1, label="particles on schedule")
    for name, tr in traces.items():
        ax.plot(tr["scheduled"], tr["effective"], marker="o", label=name)
    ax.set_xlabel("scheduled level t_k (particles entering level k)")
    ax.set_ylabel("effective level (energy-distance match)")
    ax.set_title(title or "Effective noise level of the particles")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- does the flow move?


def noise_memory(initial: torch.Tensor, final: torch.Tensor) -> dict:
    """How much of the final particles is a linear function of their own starting noise.

    Fits ``final_i ≈ c_j + beta * initial_i`` (one slope ``beta`` for every coordinate, one intercept
    per coordinate) over the particles and returns ``{"r2", "coefficient"}``: the share of the final
    particles' variance the fit explains. A flow that only shrinks and shifts the noise scores
    near 1; one whose outputs owe nothing to where each particle started scores near 0.
    """
    x = initial.double().flatten(1)
    y = final.double().flatten(1)
    x, y = x - x.mean(0), y - y.mean(0)
    beta = (x * y).sum() / x.square().sum()
    r2 = 1 - (y - beta * x).square().sum() / y.square().sum()
    return {"r2": float(r2), "coefficient": float(beta)}


def flow_report(pipe, data: torch.Tensor, num_images: int = 256, seed: int = 0, **call_kwargs) -> dict:
    """Per-level diagnostics of one sampling run of a DMMD pipeline (method §3 "Balance"):

    - ``witness_gradient_norm[k]``: mean per-particle norm of the witness gradient at level ``k``
      (the step ``Z_{s+1} - Z_s`` divided by the level's step size; plain flow only: no DiffFlow
      noise or score drift, no RMS-normalised steps), and ``path_share[k]``, the share of the
      particles' total path length travelled at level ``k``;
    - ``feature_gap_generated[k]`` = ``|mean phi(final particles, t_k) - m_P(t_k)|`` beside
      ``feature_gap_data[k]``, the same for as many clean held-out ``data`` particles: if the first
      is no larger than the second, the discriminator's own features cannot tell the samples from data;
    - ``noise_memory``: the R² of the final particles on their starting noise (``noise_memory``).
    """
    sched, disc = pipe.scheduler, pipe.discriminator
    flow_steps = call_kwargs.get("flow_steps_per_level") or sched.config.flow_steps_per_level
    settings = sched.diffflow(**{k: call_kwargs.get(k) for k in ("noise_scale", "noise_mode", "score_weight")})
    exact = settings["noise_scale"] == 0 and settings["score_weight"] == 0 and sched.config.step_size_schedule not in ("rms", "level")
    steps: list[torch.Tensor] = []
    previous: list[torch.Tensor] = []

    def callback(p, step, t, tensors):
        z = tensors["latents"].detach()
        steps.append((z - previous[-1]).flatten(1).norm(dim=1))
        previous.append(z.clone())
        return {}

    gen = torch.Generator().manual_seed(seed)
    init = torch.randn((num_images, *pipe.particle_shape), generator=gen)
    previous.append(init.clone())
    final = pipe(num_images=num_images, latents=init, output_type="latent", callback_on_step_end=callback,
                 **call_kwargs).images.detach()  # fmt: skip
    levels = [int(t) for t in sched.timesteps]
    eta = sched.step_sizes(call_kwargs.get("step_size"), flow_steps)
    per_level = torch.stack(steps).view(len(levels), flow_steps, num_images)  # (T, N_s, N)
    travelled = per_level.sum((1, 2))
    report = {
        "levels": levels,
        "step_norm": per_level.mean((1, 2)).tolist(),
        "path_share": (travelled / travelled.sum().clamp_min(1e-30)).tolist(),
        "witness_gradient_norm": [float(per_level[k].mean() / eta[k]) for k in range(len(levels))] if exact else None,
        "noise_memory": noise_memory(init, final),
        "num_images": num_images,
    }
    if disc.config.objective == "mmd":
        stats = disc.reference_statistics(sched.timesteps, sched.alphas_cumprod)
        n = min(num_images, len(data))
        gaps_gen, gaps_data = [], []
        with torch.no_grad():
            for k, t in enumerate(levels):
                m_p = stats.mean_data[k].double()

                def mean_features(x, t=t):  # this level's t, bound here
                    out = [disc(c.to(disc.device, disc.dtype), torch.full((len(c),), t, device=disc.device)).double().sum(0)
                           for c in x.split(128)]  # fmt: skip
                    return (sum(out) / len(x)).cpu()

                gaps_gen.append(float((mean_features(final[:n]) - m_p).norm()))
                gaps_data.append(float((mean_features(data[:n].float()) - m_p).norm()))
        report |= {"feature_gap_generated": gaps_gen, "feature_gap_data": gaps_data, "feature_gap_samples": n}
    return report


def plot_flow_report(reports: dict[str, dict], path: str, title: str = "") -> None:
    """Witness-gradient norm and feature gaps per level, one line per report (e.g. before / after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in reports.items():
        if "heldout_mmd2" in r:
            ax0.plot(r["levels"], [max(v, 1e-8) for v in r["heldout_mmd2"]], marker="o", label=name)
        norms = r["witness_gradient_norm"] or r["step_norm"]
        ax1.plot(r["levels"], norms, marker="o", label=name)
        if "feature_gap_generated" in r:
            (line,) = ax2.plot(r["levels"], r["feature_gap_generated"], marker="o", label=f"{name}: samples")
            ax2.plot(r["levels"], r["feature_gap_data"], marker="x", ls="--", color=line.get_color(),
                     label=f"{name}: held-out data")  # fmt: skip
    ax1.set(xlabel="level t_k", ylabel="mean witness-gradient norm", yscale="log", title="does the flow move?")
    ax2.set(xlabel="level t_k", ylabel="|mean phi(x, t_k) - m_P(t_k)|", yscale="log", title="feature gap to m_P")
    ax0.set(xlabel="level t_k", ylabel="held-out paired MMD²_t (floored at 1e-8)", yscale="log",
            title="what the discriminator sees")
    for ax in (ax0, ax1, ax2):
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
