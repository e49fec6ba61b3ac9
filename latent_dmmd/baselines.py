"""The DDPM baseline: epsilon prediction on the same UNet backbone and forward process.

``DMMDDiscriminator.unet`` is a ``UNet2DModel`` whose output has the input's channels, which is
exactly an epsilon-prediction network; the baseline trains that same backbone with the
denoising loss. Sampling uses diffusers' ``DDPMScheduler`` or ``DDIMScheduler`` built from the
DMMD scheduler's betas, so both models share the forward process bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from .seeding import keyed_generator, keyed_randn


@dataclass
class DDPMLossOutput:
    loss: torch.Tensor


def ddpm_step_loss(unet, scheduler, x0: torch.Tensor, index: torch.Tensor, seed: int, step: int, micro: int):
    """Epsilon-prediction MSE with one keyed level and noise per sample."""
    keys = [int(i) for i in index]
    t = torch.cat([scheduler.sample_training_timesteps(1, keyed_generator(seed, "t", step, micro, k)) for k in keys])
    t = t.to(x0.device)
    eps = keyed_randn([(seed, "eps", step, micro, k) for k in keys], x0.shape[1:], device=x0.device, dtype=x0.dtype)
    xt = scheduler.add_noise(x0, eps, t)
    pred = unet(xt, t).sample
    return DDPMLossOutput(loss=torch.nn.functional.mse_loss(pred.float(), eps.float()))


def baseline_scheduler(
    source_scheduler, kind: str = "ddim", clip_sample_range: float | None = None, timestep_spacing: str = "leading"
):
    """A diffusers DDPM or DDIM scheduler with the same betas as ``source_scheduler``
    (a ``DMMDScheduler`` or the saved ``DDPMScheduler`` of a baseline: their config names match).

    ``clip_sample_range`` clips the predicted clean sample to ``[-r, r]`` at every step, as
    diffusers' pixel-space DDPM/DDIM do with ``r = 1`` by default; a short-trained epsilon network
    otherwise lets a few samples run away (its x0 error is amplified by ``sigma_t / alpha_t``).
    For latents use the range of the training latents; ``None`` disables clipping.
    ``timestep_spacing`` is diffusers' (``"leading"``, its default, starts a 10-step run at t = 900;
    ``"trailing"`` starts every run at t = 999, where the sampler's pure noise belongs).
    """
    c = source_scheduler.config
    clip = {"clip_sample": clip_sample_range is not None, "clip_sample_range": clip_sample_range or 1.0}
    kwargs = dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                  beta_schedule=c.beta_schedule, trained_betas=c.trained_betas, timestep_spacing=timestep_spacing,
                  **clip)  # fmt: skip
    if kind == "ddpm":
        return DDPMScheduler(**kwargs)
    if kind == "ddim":
        return DDIMScheduler(**kwargs, set_alpha_to_one=True)
    raise ValueError(f"unknown baseline sampler {kind!r}: ddpm or ddim")


@torch.no_grad()
def sample_baseline(
    unet: UNet2DModel,
    scheduler,
    num_images: int,
    num_inference_steps: int,
    generator: list[torch.Generator] | torch.Generator | None = None,
    vae=None,
    progress: bool = False,
) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) from the epsilon network with a DDPM/DDIM scheduler (NFE = steps)."""
    from diffusers.utils.torch_utils import randn_tensor

    from .autoencoders import decode_latents

    c = unet.config
    device = next(unet.parameters()).device
    x = randn_tensor((num_images, c.in_channels, c.sample_size, c.sample_size), generator=generator, device=device)
    scheduler.set_timesteps(num_inference_steps)
    step_kwargs = {"generator": generator[0] if isinstance(generator, list) else generator}
    if isinstance(scheduler, DDIMScheduler):
        step_kwargs = {"eta": 0.0}
    for t in tqdm(scheduler.timesteps, disable=not progress, desc=type(scheduler).__name__):
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return decode_latents(vae, x) if vae is not None else x


@torch.no_grad()
def epsilon_mse_per_level(unet: UNet2DModel, scheduler, x0: torch.Tensor, levels, seed: int = 0, batch_size: int = 100) -> list[dict]:
    """Held-out denoising error of an epsilon network: ``E |eps_hat(x_t, t) - eps|^2`` per coordinate at
    every level, noise keyed by (sample, level). ``scheduler`` is the DMMD or DDPM scheduler of the
    forward process (``add_noise``). What a baseline that gets worse with more sampling steps is
    checked with: a level where this error is large is a level where every step adds error."""
    device = next(unet.parameters()).device
    rows = []
    for t in [int(t) for t in levels]:
        total = 0.0
        for first, chunk in zip(range(0, len(x0), batch_size), x0.split(batch_size)):
            chunk = chunk.to(device)
            tt = torch.full((len(chunk),), t, dtype=torch.long, device=device)
            eps = keyed_randn([(seed, "eps-mse", first + i, t) for i in range(len(chunk))], chunk.shape[1:], device=device)
            pred = unet(scheduler.add_noise(chunk, eps, tt), tt).sample
            total += float((pred.float() - eps).square().sum())
        rows.append({"t": t, "eps_mse": total / x0.numel()})
    return rows
