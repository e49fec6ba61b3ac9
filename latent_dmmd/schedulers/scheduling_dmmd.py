"""DMMDScheduler: the forward diffusion, the sampling grid and the particle update.

The forward process uses exactly the betas → alphas_cumprod of diffusers'
``DDPMScheduler`` so that a DDPM baseline trained on the same data shares it. The
sampling options of method §5 live in the config, so a published scheduler config is
the sampler behind every reported number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..calibration import calibrated_step_size

_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("linear", "log_snr"),
    "step_size_schedule": ("constant", "sigma2", "rms", "level", "calibrated"),
    "particle_mean": ("ensemble", "forward_marginal"),
    "reference": ("cached", "data"),
    "train_timestep_sampling": ("uniform", "log_snr", "grid"),
    "noise_mode": ("plain", "compensated", "score"),
    "noise_schedule": ("sigma", "constant", "window"),
    "noise_injection_schedule": ("constant", "linear"),
    "final_denoise": ("none", "tweedie", "flow"),
    "drift_scale": ("rms", "raw"),
}


def check_diffflow(noise_scale, noise_schedule, noise_window, noise_mode, score_weight) -> None:
    """Refuse DiffFlow settings that cannot mean what the user wants (method §7)."""
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    for key, value in (("noise_schedule", noise_schedule), ("noise_mode", noise_mode)):
        if value not in _CHOICES[key]:
            raise ValueError(f"{key}={value!r} is not supported; choose one of {_CHOICES[key]}")
    if noise_window is not None and (len(noise_window) != 2 or noise_window[0] > noise_window[1]):
        raise ValueError(f"noise_window must be [t_lo, t_hi] with t_lo <= t_hi, got {noise_window}")
    if not 0 <= score_weight <= 1:
        raise ValueError(f"score_weight must be in [0, 1], got {score_weight}")
    if score_weight > 0 and noise_mode != "score":
        raise ValueError("score_weight > 0 replaces witness drift by score drift: it needs noise_mode='score'")
    if score_weight == 1 and noise_scale == 0:
        raise ValueError("score_weight=1 with noise_scale=0 moves nothing: annealed Langevin needs noise_scale > 0")


def _positive_number(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0 (not a bool, not a string), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_calibration(timesteps, step_sizes, flow_steps) -> None:
    """Refuse a stored step-size calibration that cannot be read (method §5, "calibrated")."""
    if timesteps is None or step_sizes is None or flow_steps is None:
        raise ValueError(
            "step_size_schedule='calibrated' needs calibrated_timesteps, calibrated_step_sizes and calibrated_flow_steps "
            "(run latent_dmmd.calibration.calibrate_pipeline on training data, or `latent-dmmd calibrate`)"
        )
    if len(timesteps) != len(step_sizes) or not timesteps:
        raise ValueError(f"calibrated_timesteps ({len(timesteps)}) and calibrated_step_sizes ({len(step_sizes)}) must be non-empty and of one length")
    for k, eta in enumerate(step_sizes):
        _positive_number(f"calibrated_step_sizes[{k}]", eta)
    if isinstance(flow_steps, bool) or not isinstance(flow_steps, int) or flow_steps < 1:
        raise ValueError(f"calibrated_flow_steps must be an integer >= 1, got {flow_steps!r}")


def ornstein_uhlenbeck(z: torch.Tensor, xi: torch.Tensor, eta: float, g: float) -> torch.Tensor:
    """Noise ``g dW`` with the drift ``(g²/2) grad log q`` of a per-dimension Gaussian fit ``q`` of
    the particles, integrated exactly over time ``eta``: an OU step towards the fit's mean whose
    stationary law is the fit itself, so the ensemble's mean and variance are kept however
    narrow it is. ``z`` is (N, ...) particles; ``xi`` standard normal noise of the same shape."""
    if z.shape[0] < 2:
        raise ValueError("noise_mode='compensated' fits a Gaussian to the particles: it needs num_images >= 2")
    mean = z.mean(0, keepdim=True)
    var = z.var(0, keepdim=True).clamp_min(1e-12)
    decay = torch.exp(-(g * g / 2) * eta / var)  # theta = g² / (2 var)
    return mean + (z - mean) * decay + (var * (1 - decay * decay)).sqrt() * xi


@dataclass
class DMMDSchedulerOutput(BaseOutput):
    """Output of ``DMMDScheduler.step``: the particles after one flow step."""

    prev_sample: torch.Tensor


class DMMDScheduler(SchedulerMixin, ConfigMixin):
    """Forward process, sampling grid and flow options of DMMD (method §1, §3, §5).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the
            variance-preserving forward process, as in ``DDPMScheduler``.
        num_inference_steps: ``T``, the number of noise levels visited when sampling.
        flow_steps_per_level: ``N_s``, flow steps at each level (NFE = T · N_s).
        t_min, t_max: ends of the sampling grid.
        timestep_spacing: grid uniform in ``t`` (``"linear"``) or in log-SNR (``"log_snr"``).
        step_size: the flow step ``eta``.
        step_size_schedule: ``"constant"`` eta; ``"sigma2"`` eta·sigma_t²; ``"rms"`` the
            update normalised by the RMS of the witness gradient, times eta; ``"level"`` the same
            normalised update sized to the gap to the next level, eta·(sigma_k - sigma_{k+1}) / N_s
            per step, so a level moves each particle about eta·sqrt(d)·(sigma_k - sigma_{k+1});
            ``"calibrated"`` per-level steps chosen on training data (``latent_dmmd.calibration``: each level's
            steps land the particles closest to the next level's forward marginal), stored in
            ``calibrated_timesteps`` / ``calibrated_step_sizes`` for ``calibrated_flow_steps`` steps per
            level, log-linear in t between stored levels, times ``calibrated_flow_steps / N_s``; ``eta``
            then multiplies them (1: as calibrated).
        particle_mean: ``"ensemble"`` or ``"forward_marginal"`` (§5).
        reference: ``"cached"`` statistics stored with the model, or ``"data"`` (exact).
        train_timestep_sampling: how training draws a level per group (§3):
            ``"uniform"`` over all train steps, ``"log_snr"``, or ``"grid"`` (sampling grid only).
        noise_scale: ``g_0`` of the DiffFlow noise term (method §7); 0 is the plain DMMD flow.
        noise_schedule: ``g(t) = g_0 sigma_t`` (``"sigma"``), ``g_0`` (``"constant"``), or ``g_0``
            inside ``noise_window = [t_lo, t_hi]`` and 0 outside (``"window"``).
        noise_mode: ``"plain"`` adds ``sqrt(eta) g xi`` (entropy-regularised flow);
            ``"compensated"`` adds it with the drift ``(g²/2) grad log q_t`` of a per-dimension
            Gaussian fit of the particles, as the exact Ornstein–Uhlenbeck step (marginals kept);
            ``"score"`` adds it with the data-score drift ``(g²/2) grad log p_t`` of a denoiser.
        score_weight: ``w`` in [0, 1]; the witness drift is scaled by ``1 - w`` (needs
            ``noise_mode="score"``): ``w = 0`` is DMMD plus score churn, ``w = 1`` annealed
            Langevin on the score alone.
        noise_injection: ``beta`` of noise injection (§5, Arbel et al. 2019): the witness gradient
            is evaluated at ``z + beta_k sigma_t u`` (fresh ``u ~ N(0, I)`` every step) and ``z`` is
            moved; 0 is the plain flow and draws nothing.
        noise_injection_schedule: ``beta_k = beta`` (``"constant"``) or ``beta (T - 1 - k) / (T - 1)``,
            decaying linearly to 0 at the last level (``"linear"``).
        final_denoise: after the last level, ``"tweedie"``: one denoising step with the pipeline's
            score model, ``x0 = (z - sigma_t eps_hat(z, t)) / alpha_t`` at the last level;
            ``"flow"``: ``final_denoise_steps`` more flow steps at the last level; ``"none"``.
        final_denoise_steps: the extra flow steps of ``final_denoise="flow"``.
        drift_scale: with both a witness drift and a score drift (``noise_mode="score"``, ``w < 1``),
            ``"rms"`` (at ``0 < w < 1``) first rescales the witness step ``eta G`` to the RMS over the
            particles of the score step ``eta (g²/2) grad log p_t``, so that ``score_weight`` weighs
            two drifts of one size: ``Z <- Z - (1 - w) r eta G + eta (g²/2) grad log p_t + sqrt(eta) g xi``
            with ``r = rms(eta (g²/2) grad log p_t) / rms(eta G)``; the score step stays whole, paired
            with its noise as Langevin dynamics needs. ``"raw"`` uses ``r = 1`` (the score step outweighs
            the witness step 50-200x below t ~ 670 on the CelebA-64 models).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        num_inference_steps: int = 10,
        flow_steps_per_level: int = 10,
        t_min: int = 0,
        t_max: int = 999,
        timestep_spacing: str = "linear",
        step_size: float = 1.0,
        step_size_schedule: str = "constant",
        particle_mean: str = "ensemble",
        reference: str = "cached",
        train_timestep_sampling: str = "uniform",
        noise_scale: float = 0.0,
        noise_schedule: str = "sigma",
        noise_window: list[int] | None = None,
        noise_mode: str = "plain",
        score_weight: float = 0.0,
        noise_injection: float = 0.0,
        noise_injection_schedule: str = "constant",
        final_denoise: str = "none",
        final_denoise_steps: int = 10,
        drift_scale: str = "rms",
        calibrated_timesteps: list[int] | None = None,
        calibrated_step_sizes: list[float] | None = None,
        calibrated_flow_steps: int | None = None,
    ):
        for key, allowed in _CHOICES.items():
            value = locals()[key]
            if key == "beta_schedule" and trained_betas is not None:
                continue
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not supported; choose one of {allowed}")
        if not 0 <= t_min < t_max < num_train_timesteps:
            raise ValueError(f"need 0 <= t_min < t_max < num_train_timesteps, got t_min={t_min}, t_max={t_max}")
        if num_inference_steps < 1 or flow_steps_per_level < 1:
            raise ValueError("num_inference_steps and flow_steps_per_level must be >= 1")
        _positive_number("step_size", step_size)  # from a folder, a YAML or a flag alike
        if step_size_schedule == "calibrated":
            check_calibration(calibrated_timesteps, calibrated_step_sizes, calibrated_flow_steps)
        check_diffflow(noise_scale, noise_schedule, noise_window, noise_mode, score_weight)
        if noise_injection < 0:
            raise ValueError(f"noise_injection must be >= 0, got {noise_injection}")
        if final_denoise_steps < 0:
            raise ValueError(f"final_denoise_steps must be >= 0, got {final_denoise_steps}")

        if trained_betas is not None:
            self.betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            self.betas = betas_for_alpha_bar(num_train_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._all_log_snr = self.log_snr(torch.arange(num_train_timesteps))  # used by log-SNR grids and sampling
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.set_timesteps(num_inference_steps)

    # ------------------------------------------------------------------ forward process
    def alpha_sigma(self, timesteps: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` with ``alpha_t² + sigma_t² = 1`` for integer timesteps."""
        acp = self.alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long).cpu()]
        return acp.sqrt(), (1 - acp).sqrt()

    def log_snr(self, timesteps: torch.Tensor | int) -> torch.Tensor:
        acp = self.alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long).cpu()].double()
        return (acp / (1 - acp)).log()

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha_t x0 + sigma_t eps`` (same signature as ``DDPMScheduler.add_noise``)."""
        alpha, sigma = self.alpha_sigma(timesteps)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        alpha = alpha.to(original_samples.device, original_samples.dtype).view(shape)
        sigma = sigma.to(original_samples.device, original_samples.dtype).view(shape)
        return alpha * original_samples + sigma * noise

    def sample_training_timesteps(
        self, num_groups: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """One noise level per training group, drawn as ``train_timestep_sampling`` says (§3)."""
        mode = self.config.train_timestep_sampling
        n = self.config.num_train_timesteps
        if mode == "uniform":
            t = torch.randint(0, n, (num_groups,), generator=generator)
        elif mode == "grid":
            grid = self.grid(self.config.num_inference_steps)
            t = grid[torch.randint(0, len(grid), (num_groups,), generator=generator)]
        else:
            all_snr = self._all_log_snr
            lo, hi = all_snr[-1].item(), all_snr[0].item()
            target = lo + (hi - lo) * torch.rand(num_groups, generator=generator, dtype=torch.float64)
            t = (all_snr[None, :] - target[:, None]).abs().argmin(1)
        return t.to(device)

    # ------------------------------------------------------------------ sampling grid
    def grid(self, num_inference_steps: int) -> torch.Tensor:
        """The levels ``t_1 > … > t_T`` of a grid of ``num_inference_steps`` levels (without setting it)."""
        c = self.config
        if c.timestep_spacing == "linear":
            grid = np.linspace(c.t_max, c.t_min, num_inference_steps).round().astype(np.int64)
        else:
            all_snr = self._all_log_snr.numpy()
            targets = np.linspace(all_snr[c.t_max], all_snr[c.t_min], num_inference_steps)
            grid = np.abs(all_snr[None, :] - targets[:, None]).argmin(1).astype(np.int64)
        if len(np.unique(grid)) != len(grid):
            raise ValueError(
                f"num_inference_steps={num_inference_steps} does not fit in [t_min={c.t_min}, t_max={c.t_max}] "
                f"with {c.timestep_spacing} spacing without repeating a level"
            )
        return torch.from_numpy(grid)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        """Set the grid ``t_1 > … > t_T`` used by ``step``: the config's spacing with
        ``num_inference_steps`` levels (default: the config's T), or a custom strictly decreasing
        list ``timesteps`` (e.g. from ``latent_dmmd.diagnostics.adaptive_grid``)."""
        if timesteps is not None:
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError("give num_inference_steps or timesteps, not both")
            grid = torch.as_tensor([int(t) for t in timesteps], dtype=torch.long)
            n = self.config.num_train_timesteps
            if grid.numel() < 1 or (grid[:-1] <= grid[1:]).any() or grid.min() < 0 or grid.max() >= n:
                raise ValueError(f"timesteps must be strictly decreasing levels in [0, {n - 1}], got {grid.tolist()}")
        else:
            if num_inference_steps is None:
                num_inference_steps = self.config.num_inference_steps
            if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            num_inference_steps = int(num_inference_steps)
            grid = self.grid(num_inference_steps)
        self.num_inference_steps = len(grid)
        self.timesteps = grid.to(device)
        self._level = {int(t): k for k, t in enumerate(self.timesteps)}

    def level_step_size(self, timestep: int, step_size: float | None = None, flow_steps: int | None = None) -> float:
        """The step size ``eta_t`` at one level (``step_size`` overrides the config's eta; ``flow_steps``
        the config's ``N_s``, which only the ``"level"`` schedule reads)."""
        eta = self.config.step_size if step_size is None else step_size
        if self.config.step_size_schedule == "sigma2":
            return eta * float(1 - self.alphas_cumprod[int(timestep)])
        if self.config.step_size_schedule == "level":
            k = self._level[int(timestep)]
            nxt = int(self.timesteps[k + 1]) if k + 1 < len(self.timesteps) else 0
            gap = float(1 - self.alphas_cumprod[int(timestep)]) ** 0.5 - float(1 - self.alphas_cumprod[nxt]) ** 0.5
            return eta * gap / (flow_steps or self.config.flow_steps_per_level)
        if self.config.step_size_schedule == "calibrated":
            c = self.config
            return eta * calibrated_step_size(int(timestep), c.calibrated_timesteps, c.calibrated_step_sizes,
                                              c.calibrated_flow_steps, flow_steps or c.flow_steps_per_level)  # fmt: skip
        return eta

    def step_sizes(self, step_size: float | None = None, flow_steps: int | None = None) -> list[float]:
        """The step size ``eta_k`` of every level of the current grid (``step_size`` overrides eta)."""
        return [self.level_step_size(int(t), step_size, flow_steps) for t in self.timesteps]

    def injection_scale(self, level_index: int, noise_injection: float | None = None) -> float:
        """``beta_k sigma_t`` of noise injection at level ``k`` of the current grid (0: none)."""
        beta = self.config.noise_injection if noise_injection is None else noise_injection
        if beta < 0:
            raise ValueError(f"noise_injection must be >= 0, got {beta}")
        if beta == 0:
            return 0.0
        levels = len(self.timesteps)
        if self.config.noise_injection_schedule == "linear":
            beta = beta * ((levels - 1 - level_index) / (levels - 1) if levels > 1 else 0.0)
        return beta * float(1 - self.alphas_cumprod[int(self.timesteps[level_index])]) ** 0.5

    # ------------------------------------------------------------------ DiffFlow noise (§7)
    def diffflow(self, **overrides) -> dict:
        """The DiffFlow settings of the config, with ``overrides`` (None values ignored) checked."""
        keys = ("noise_scale", "noise_schedule", "noise_window", "noise_mode", "score_weight")
        settings = {k: self.config[k] for k in keys} | {k: v for k, v in overrides.items() if v is not None}
        check_diffflow(**settings)
        return settings

    def noise_level(self, timestep: int, **overrides) -> float:
        """``g(t)`` of the DiffFlow noise term at one level."""
        s = self.diffflow(**overrides)
        g0, t = float(s["noise_scale"]), int(timestep)
        if g0 == 0:
            return 0.0
        if s["noise_schedule"] == "sigma":
            return g0 * float(1 - self.alphas_cumprod[t]) ** 0.5
        if s["noise_schedule"] == "window":
            lo, hi = s["noise_window"] or (0, self.config.num_train_timesteps - 1)
            return g0 if lo <= t <= hi else 0.0
        return g0

    def uses_score(self, **overrides) -> bool:
        """Whether sampling with these settings needs the data score (a denoising network)."""
        s = self.diffflow(**overrides)
        return s["noise_mode"] == "score" and (s["noise_scale"] > 0 or s["score_weight"] > 0)

    def step(
        self,
        model_output: torch.Tensor | None,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        step_size: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        score: torch.Tensor | None = None,
        return_dict: bool = True,
        flow_steps: int | None = None,
        **diffflow,
    ) -> DMMDSchedulerOutput | tuple[torch.Tensor]:
        """One particle update: ``Z <- Z - eta_t (1 - w) G`` plus the DiffFlow noise term.

        ``model_output`` is the witness gradient ``G`` (None when ``w = 1``: not needed).
        ``step_size`` overrides the config's ``eta`` for this call (the schedule still applies);
        ``score`` is ``grad log p_t`` at ``sample`` (``noise_mode="score"``); ``diffflow``
        overrides ``noise_scale``/``noise_schedule``/``noise_window``/``noise_mode``/``score_weight``.
        With ``g(t) = 0`` and ``w = 0`` this is exactly the plain flow and draws no random numbers.
        """
        t = int(timestep)
        if t not in self._level:
            raise ValueError(f"timestep {t} is not on the current grid {self.timesteps.tolist()}; call set_timesteps")
        s = self.diffflow(**diffflow)
        eta = self.level_step_size(t, step_size, flow_steps)
        w = float(s["score_weight"])
        prev = sample
        if w < 1:
            grad = model_output
            if grad is None:
                raise ValueError("step needs the witness gradient (model_output) unless score_weight is 1")
            if self.config.step_size_schedule in ("rms", "level"):
                grad = grad / grad.float().square().mean().sqrt().clamp_min(1e-12).to(grad.dtype)
            prev = sample - eta * grad if w == 0 else sample - (eta * (1 - w)) * grad
        g = self.noise_level(t, **diffflow)
        if s["noise_mode"] == "score" and (g > 0 or w > 0):
            if score is None:
                raise ValueError("noise_mode='score' needs the data score (pass score=, or a score_model to the pipeline)")
            score_step = (eta * g * g / 2) * score.to(prev.dtype)
            if 0 < w < 1 and self.config.drift_scale == "rms":  # both drifts on the score step's scale, then mixed
                witness_step = sample - prev  # (1 - w) eta G
                ratio = score_step.float().square().mean().sqrt() / (witness_step / (1 - w)).float().square().mean().sqrt()
                prev = sample - ratio.clamp_max(1e12).to(prev.dtype) * witness_step
            prev = prev + score_step
        if g > 0:
            xi = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            if s["noise_mode"] == "compensated":
                prev = ornstein_uhlenbeck(prev, xi, eta, g)
            else:
                prev = prev + (eta**0.5 * g) * xi
        if not return_dict:
            return (prev,)
        return DMMDSchedulerOutput(prev_sample=prev)

    def nfe(self, final_denoise: str | None = None, **diffflow) -> dict:
        """Network evaluations of one sample with the current grid: NFE and forward-equivalents."""
        final = final_denoise or self.config.final_denoise
        extra = self.config.final_denoise_steps if final == "flow" else 0
        flows = self.num_inference_steps * self.config.flow_steps_per_level + extra
        s = self.diffflow(**diffflow)
        # a flow step is one forward plus one input-gradient backward (~3 forward-equivalents);
        # the score drift adds one denoiser forward; w = 1 needs no witness; Tweedie is one forward
        witness = 0 if s["score_weight"] >= 1 else 3
        score = 1 if self.uses_score(**diffflow) else 0
        tweedie = 1 if final == "tweedie" else 0
        return {"nfe": flows + tweedie, "forward_equivalents": (witness + score) * flows + tweedie}

    def __len__(self):
        return self.config.num_train_timesteps

