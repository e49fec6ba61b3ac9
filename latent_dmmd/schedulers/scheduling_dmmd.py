"""DMMDScheduler: the forward diffusion, the sampling grid and the particle update.

The forward process uses exactly the betas → alphas_cumprod of diffusers'
``DDPMScheduler`` so that a DDPM baseline trained on the same data shares it. The
sampling options of method §5 live in the config, so a published scheduler config is
the sampler behind every reported number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("linear", "log_snr"),
    "step_size_schedule": ("constant", "sigma2", "rms"),
    "particle_mean": ("ensemble", "forward_marginal"),
    "reference": ("cached", "data"),
    "train_timestep_sampling": ("uniform", "log_snr", "grid"),
}


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
            update normalised by the RMS of the witness gradient, times eta.
        particle_mean: ``"ensemble"`` or ``"forward_marginal"`` (§5).
        reference: ``"cached"`` statistics stored with the model, or ``"data"`` (exact).
        train_timestep_sampling: how training draws a level per group (§3):
            ``"uniform"`` over all train steps, ``"log_snr"``, or ``"grid"`` (sampling grid only).
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

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None):
        """Set the grid ``t_1 > … > t_T`` used by ``step`` (defaults to the config's T)."""
        num_inference_steps = num_inference_steps or self.config.num_inference_steps
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = self.grid(num_inference_steps).to(device)
        self._level = {int(t): k for k, t in enumerate(self.timesteps)}

    def level_step_size(self, timestep: int, step_size: float | None = None) -> float:
        """The step size ``eta_t`` at one level (``step_size`` overrides the config's eta)."""
        eta = self.config.step_size if step_size is None else step_size
        if self.config.step_size_schedule == "sigma2":
            return eta * float(1 - self.alphas_cumprod[int(timestep)])
        return eta

    def step_sizes(self, step_size: float | None = None) -> list[float]:
        """The step size ``eta_k`` of every level of the current grid (``step_size`` overrides eta)."""
        return [self.level_step_size(int(t), step_size) for t in self.timesteps]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        step_size: float | None = None,
        return_dict: bool = True,
    ) -> DMMDSchedulerOutput | tuple[torch.Tensor]:
        """One particle update ``Z <- Z - eta_t G``; ``model_output`` is the witness gradient ``G``.

        ``step_size`` overrides the config's ``eta`` for this call (the schedule still applies).
        """
        t = int(timestep)
        if t not in self._level:
            raise ValueError(f"timestep {t} is not on the current grid {self.timesteps.tolist()}; call set_timesteps")
        eta = self.level_step_size(t, step_size)
        grad = model_output
        if self.config.step_size_schedule == "rms":
            grad = grad / grad.float().square().mean().sqrt().clamp_min(1e-12).to(grad.dtype)
        prev = sample - eta * grad
        if not return_dict:
            return (prev,)
        return DMMDSchedulerOutput(prev_sample=prev)

    def nfe(self) -> dict:
        """Network evaluations of one sample with the current grid: NFE and forward-equivalents."""
        flows = self.num_inference_steps * self.config.flow_steps_per_level
        # a flow step is one forward plus one input-gradient backward (~2 forwards)
        return {"nfe": flows, "forward_equivalents": 3 * flows}

    def __len__(self):
        return self.config.num_train_timesteps

