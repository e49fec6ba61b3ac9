"""Autoencoders: load any diffusers VAE, load TAEF2 offline, encode and decode with the
VAE's own ``scaling_factor`` and ``shift_factor``.

Latents seen by the discriminator are always *scaled*: ``z = (vae_latent - shift) * scale``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import AutoencoderTinyBlock
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

TAEF2_ENCODER = "taef2_encoder.safetensors"
TAEF2_DECODER = "taef2_decoder.safetensors"
# encoder blocks and decoder blocks (diffusers indices) that carry TAEF2's extra pooling branch
_TAEF2_POOLED_ENCODER = (11, 12, 13)
_TAEF2_POOLED_DECODER = (2, 3, 4)


# ---------------------------------------------------------------------------- TAEF2


class PooledTinyBlock(AutoencoderTinyBlock):
    """``AutoencoderTinyBlock`` with TAEF2's extra branch, added to the input: ``x + pool(x)``."""

    def __init__(self, channels: int, act_fn: str = "relu", pool_channels: int = 256):
        super().__init__(channels, channels, act_fn)
        self.pool = nn.Sequential(
            nn.Conv2d(channels, pool_channels, 1, bias=False),
            nn.GroupNorm(4, pool_channels),
            nn.ReLU(),
            nn.Conv2d(pool_channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.pool(x))


class TAEF2(AutoencoderTiny):
    """TAEF2, the tiny distilled FLUX.2 autoencoder: diffusers' ``AutoencoderTiny`` layout with
    32 latent channels plus a pooling branch in six blocks. Images in [-1, 1] in and out."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 32,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        latent_magnitude: int = 3,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        block_out_channels: tuple[int, ...] | None = None,  # written by AutoencoderTiny's config; unused
    ):
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, encoder_block_out_channels=tuple(encoder_block_out_channels),
            decoder_block_out_channels=tuple(decoder_block_out_channels), act_fn=act_fn, upsample_fn=upsample_fn,
            latent_channels=latent_channels, upsampling_scaling_factor=upsampling_scaling_factor,
            num_encoder_blocks=tuple(num_encoder_blocks), num_decoder_blocks=tuple(num_decoder_blocks),
            latent_magnitude=latent_magnitude, latent_shift=latent_shift, force_upcast=force_upcast,
            scaling_factor=scaling_factor, shift_factor=shift_factor,
        )  # fmt: skip
        act = self.config.act_fn
        for i in _TAEF2_POOLED_ENCODER:
            self.encoder.layers[i] = PooledTinyBlock(self.encoder.layers[i].conv[0].in_channels, act)
        for i in _TAEF2_POOLED_DECODER:
            self.decoder.layers[i] = PooledTinyBlock(self.decoder.layers[i].conv[0].in_channels, act)


def taef2_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map the upstream TAEF2 safetensors keys onto ``TAEF2``'s parameter names."""
    state = {}
    for key, value in load_file(os.path.join(folder, TAEF2_ENCODER)).items():
        state[f"encoder.layers.{key}"] = value
    for key, value in load_file(os.path.join(folder, TAEF2_DECODER)).items():
        index, rest = key.split(".", 1)
        # upstream decoder index 0 is a weightless clamp that DecoderTiny applies in forward
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return state


def load_taef2(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TAEF2:
    """Load TAEF2 from its two safetensors files (e.g. ``../shared/weights/taef2``)."""
    missing = [f for f in (TAEF2_ENCODER, TAEF2_DECODER) if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"TAEF2 weights not found in {folder}: missing {', '.join(missing)}")
    vae = TAEF2()
    vae.load_state_dict(taef2_state_dict(folder), strict=True)
    if dtype != torch.float32:  # ModelMixin.to(dtype) warns about an empty list of fp32 modules on every load
        vae = vae.type(dtype)
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- any diffusers VAE


def load_autoencoder(
    name_or_path: str, subfolder: str | None = None, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """Load a diffusers autoencoder by Hub id or local path (``AutoencoderKL``, ``AutoencoderTiny``,
    …, picked from its config), or TAEF2 from a folder holding its two safetensors files."""
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, TAEF2_ENCODER)):
        return load_taef2(name_or_path, dtype)
    import diffusers

    config = AutoencoderKL.load_config(name_or_path, subfolder=subfolder, revision=revision)
    class_name = config.get("_class_name", "AutoencoderKL")
    cls = TAEF2 if class_name == "TAEF2" else getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "decode"):
        raise ValueError(f"{name_or_path} holds a {class_name}, which is not a diffusers autoencoder")
    vae = cls.from_pretrained(name_or_path, subfolder=subfolder, revision=revision, torch_dtype=dtype)
    return vae.eval().requires_grad_(False)


def vae_factors(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` read from a diffusers autoencoder's config."""
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scale), float(shift)


def vae_identity(vae, name_or_path: str | None = None) -> dict:
    """What identifies a VAE for a latent cache: class, source, factors and a hash of its weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(vae.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    scale, shift = vae_factors(vae)
    return {
        "class": type(vae).__name__,
        "source": name_or_path,
        "scaling_factor": scale,
        "shift_factor": shift,
        "latent_channels": int(vae.config.latent_channels),
        "weights_sha256": digest.hexdigest(),
    }


@dataclass
class Posterior:
    """Scaled posterior of an image batch: ``mean`` and ``std`` (zero for deterministic VAEs)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if not bool(self.std.any()):
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> Posterior:
    """Encode images in [-1, 1] to the scaled latent posterior (mean, std)."""
    scale, shift = vae_factors(vae)
    dtype = next(vae.parameters()).dtype
    out = vae.encode(images.to(dtype))
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        mean, std = dist.mean, dist.std
    else:  # AutoencoderTiny and friends are deterministic
        mean = out.latents
        std = torch.zeros_like(mean)
    return Posterior(mean=((mean.float() - shift) * scale), std=(std.float() * scale))


def check_latent_scale(latents: torch.Tensor, low: float = 0.5, high: float = 2.0) -> float:
    """Warn when scaled latents are far from unit standard deviation (a wrong scaling factor)."""
    std = float(latents.float().std())
    if not low <= std <= high:
        logger.warning(
            "scaled latents have standard deviation %.3f, far from 1: the VAE's scaling_factor may be wrong "
            "for this data; DMMD's forward process assumes roughly unit-scale latents",
            std,
        )
    return std


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
