"""Balance across noise levels (method §3): per-group weights of the DMMD loss's MMD term.

Population MMD² between ``P`` and ``P_t`` spans orders of magnitude over ``t``, so a plain
average lets the high-noise groups own the gradient. ``LevelWeighting`` gives each group a
weight from its level:

- ``none``: 1 for every group (the plain average);
- ``normalized``: ``1 / max(EMA_b, floor)``, with ``EMA_b`` a running mean of the MMD² of the
  group's level bucket ``b`` (``num_buckets`` equal slices of ``[0, num_train_timesteps)``), so
  every bucket's term is of order one;
- ``sigma``: ``sigma_t ** -power``, the kind of weighting diffusion losses use (VDM, EDM).

The running means are training state: ``state_dict``/``load_state_dict`` let accelerate
checkpoint them (``accelerator.register_for_checkpointing``), so a resumed run weights its
groups exactly as the uninterrupted one does. Several processes pass a ``reduce`` that sums
over processes, so they all hold the same running means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MODES = ("none", "normalized", "sigma")


class LevelWeighting:
    """Per-group weights of the MMD term by noise level; see the module docstring."""

    def __init__(
        self,
        mode: str = "none",
        alphas_cumprod: torch.Tensor | None = None,
        num_buckets: int = 10,
        decay: float = 0.99,
        power: float = 1.0,
        floor: float = 1e-4,
    ):
        if mode not in MODES:
            raise ValueError(f"level_weighting={mode!r} is not supported; choose one of {MODES}")
        if mode == "sigma" and alphas_cumprod is None:
            raise ValueError("level_weighting='sigma' needs the forward process (alphas_cumprod)")
        if num_buckets < 1 or not 0 <= decay < 1 or floor <= 0:
            raise ValueError(f"need num_buckets >= 1, 0 <= decay < 1 and floor > 0, got {num_buckets}, {decay}, {floor}")
        self.mode, self.decay, self.power, self.floor = mode, decay, power, floor
        self.num_train_timesteps = 1000 if alphas_cumprod is None else len(alphas_cumprod)
        self.sigma = None if alphas_cumprod is None else (1 - alphas_cumprod.double()).clamp_min(1e-12).sqrt()
        self.running = torch.zeros(num_buckets, dtype=torch.float64)  # EMA of MMD² per bucket
        self.seen = torch.zeros(num_buckets, dtype=torch.float64)  # updates per bucket (0: no EMA yet)

    @property
    def num_buckets(self) -> int:
        return len(self.running)

    def bucket(self, t: torch.Tensor) -> torch.Tensor:
        """Bucket index of each level: equal slices of ``[0, num_train_timesteps)``."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        return (t * self.num_buckets // self.num_train_timesteps).clamp(0, self.num_buckets - 1)

    @torch.no_grad()
    def update(self, t_group: torch.Tensor, mmd2_group: torch.Tensor, reduce: Callable | None = None) -> None:
        """Fold this step's per-group MMD² into the running mean of their buckets (``normalized`` only)."""
        if self.mode != "normalized":
            return
        b = self.bucket(t_group)
        sums = torch.zeros(self.num_buckets, dtype=torch.float64).index_add_(0, b, mmd2_group.detach().double().cpu())
        counts = torch.zeros(self.num_buckets, dtype=torch.float64).index_add_(0, b, torch.ones(len(b), dtype=torch.float64))
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        hit = counts > 0
        mean = sums[hit] / counts[hit]
        first = self.seen[hit] == 0
        self.running[hit] = torch.where(first, mean, self.decay * self.running[hit] + (1 - self.decay) * mean)
        self.seen[hit] += 1

    def weights(self, t_group: torch.Tensor) -> torch.Tensor:
        """Weight of each group's MMD term, from its level (and the running means)."""
        t_group = torch.as_tensor(t_group, dtype=torch.long).cpu()
        if self.mode == "none":
            return torch.ones(len(t_group))
        if self.mode == "sigma":
            return self.sigma[t_group].pow(-self.power).float()
        running = self.running[self.bucket(t_group)]
        return (1.0 / running.clamp_min(self.floor)).float()

    def __call__(self, t_group: torch.Tensor, mmd2_group: torch.Tensor, reduce: Callable | None = None) -> torch.Tensor:
        """Update with this step's MMD², then return the weights (what ``dmmd_loss`` calls)."""
        self.update(t_group, mmd2_group, reduce)
        return self.weights(t_group).to(mmd2_group.device)

    def summary(self) -> dict:
        """Running MMD² per bucket, for logs (``normalized`` only)."""
        width = self.num_train_timesteps // self.num_buckets
        return {f"running_mmd2/t{b * width:03d}": float(v) for b, v in enumerate(self.running) if self.seen[b] > 0}

    # accelerate's register_for_checkpointing needs these two
    def state_dict(self) -> dict:
        return {"running": self.running.clone(), "seen": self.seen.clone(), "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"checkpoint was trained with level_weighting={state['mode']!r}, this run uses {self.mode!r}")
        self.running.copy_(state["running"])
        self.seen.copy_(state["seen"])
