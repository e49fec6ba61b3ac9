"""Autoencoders: TAEF2 from ../shared, scaled encode/decode, fp16 NaN retry, scale warning."""

import logging
import os

import numpy as np
import pytest
import torch

from latent_dmmd.autoencoders import (
    check_latent_scale,
    decode_latents,
    encode_images,
    load_autoencoder,
    load_taef2,
    vae_factors,
)

from .conftest import CELEBA_DIR, TAEF2_DIR, tiny_vae_folder


def test_scaled_encode_decode_round_trip_uses_the_config_factors(tmp_path):
    vae = load_autoencoder(tiny_vae_folder(tmp_path / "vae", scaling_factor=0.5))
    assert vae_factors(vae) == (0.5, 0.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    post = encode_images(vae, x)
    raw = vae.encode(x).latent_dist
    assert torch.allclose(post.mean, raw.mean * 0.5) and torch.allclose(post.std, raw.std * 0.5)
    assert torch.allclose(decode_latents(vae, post.mean), vae.decode(raw.mean).sample, atol=1e-6)


class HalfOverflowVAE(torch.nn.Module):
    """Decodes to inf in half precision, like the classic fp16 SD-VAE overflow."""

    class config:
        scaling_factor, shift_factor, latent_channels = 1.0, 0.0, 4

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def decode(self, z):
        out = (z * 2e5 * self.w).repeat(1, 1, 2, 2)[:, :3] if self.w.dtype == torch.float16 else z[:, :3].repeat(1, 1, 2, 2)
        return type("Out", (), {"sample": out})


def test_fp16_decode_that_overflows_is_retried_in_fp32(caplog):
    vae = HalfOverflowVAE().to(torch.float16)
    z = torch.full((1, 4, 2, 2), 0.5)
    with caplog.at_level(logging.WARNING):
        images = decode_latents(vae, z)
    assert torch.isfinite(images).all() and torch.allclose(images, torch.full_like(images, 0.5))
    assert "retrying in float32" in caplog.text
    assert vae.w.dtype == torch.float16  # put back as it was


def test_wrong_latent_scale_warns_with_the_value(caplog):
    with caplog.at_level(logging.WARNING):
        check_latent_scale(torch.randn(64, 4, 8, 8) * 5.5)
    assert "standard deviation 5.5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_latent_scale(torch.randn(64, 4, 8, 8))
    assert caplog.text == ""


def test_taef2_loader_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="taef2_encoder.safetensors"):
        load_taef2(tmp_path)


@pytest.mark.skipif(not os.path.isdir(TAEF2_DIR), reason="../shared/weights/taef2 absent")
def test_taef2_loads_strictly_and_reconstructs_a_real_face():
    from PIL import Image

    vae = load_autoencoder(TAEF2_DIR)
    assert type(vae).__name__ == "TAEF2" and vae.config.latent_channels == 32
    if not os.path.isdir(CELEBA_DIR):
        pytest.skip("../shared CelebA-HQ faces absent")
    img = np.asarray(Image.open(os.path.join(CELEBA_DIR, "03999.jpg")).convert("RGB").resize((128, 128)))
    x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z = encode_images(vae, x).mean
    assert z.shape == (1, 32, 16, 16) and 0.5 < z.std().item() < 1.5
    y = decode_latents(vae, z)
    psnr = 10 * np.log10(4 / ((y.clamp(-1, 1) - x) ** 2).mean().item())
    assert psnr > 25, psnr  # the README of the weights reports 29-33 dB at 256 px
