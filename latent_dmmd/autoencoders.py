"""Autoencoder helpers: latents <-> images with the VAE's own scaling and shift factors."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def vae_factors(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` read from a diffusers autoencoder's config."""
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scale), float(shift)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents to images in [-1, 1].

    Undoes ``(z - shift) * scale``; a half-precision decode that produces NaN/inf (the
    classic fp16 VAE overflow) is retried in float32 instead of returning black images.
    """
    scale, shift = vae_factors(vae)
    z = latents / scale + shift
    dtype = next(vae.parameters()).dtype
    images = vae.decode(z.to(dtype)).sample
    if dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(images).all():
        logger.warning("VAE decode in %s produced NaN/inf; retrying in float32", dtype)
        vae.to(torch.float32)
        try:
            images = vae.decode(z.float()).sample
        finally:
            vae.to(dtype)
    if not torch.isfinite(images).all():
        raise ValueError("VAE decode produced NaN/inf even in float32; the latents are probably diverged")
    return images.float()
