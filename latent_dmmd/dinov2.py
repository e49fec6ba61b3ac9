"""DINOv2 features for the Fréchet distance next to FID (FD-DINOv2; Stein et al., NeurIPS 2023).

Inception features miss much of what people see in generated images; the CLS token of a DINOv2 ViT ranks
models closer to human judgement. ``DINOv2Features`` wraps transformers' ``Dinov2Model`` as the ``feature=``
module of torchmetrics' FID/KID (through ``evaluation.FIDKID``): uint8 images in, the layer-normalised CLS
token out (``pooler_output``, what DINOv2's own ``x_norm_clstoken`` is), after a bicubic resize to 224×224
and ImageNet normalisation, the preprocessing of Stein et al.'s evaluation code.
"""

from __future__ import annotations

import os

import torch
from torch import nn

DEFAULT_DINOV2 = "facebook/dinov2-base"
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = "uint8 RGB / 255, bicubic resize to 224x224 (antialiased), ImageNet mean/std, CLS token (pooler_output)"


def load_dinov2(model: str = DEFAULT_DINOV2, revision: str | None = None):
    """A ``Dinov2Model`` from a Hub id or a local folder, with a one-line way out when it cannot be had."""
    try:
        from transformers import Dinov2Model
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise ImportError("FD-DINOv2 needs transformers: pip install transformers") from err
    try:
        return Dinov2Model.from_pretrained(model, revision=revision)
    except OSError as err:
        where = "folder" if os.path.isdir(model) else "Hub model"
        raise OSError(
            f"cannot load the DINOv2 {where} {model!r} ({str(err).splitlines()[0][:120]}); get it once with "
            f"`huggingface-cli download {DEFAULT_DINOV2} --local-dir dinov2-base` and pass --dinov2_model dinov2-base"
        ) from None


class DINOv2Features(nn.Module):
    """CLS-token features of a DINOv2 ViT for torchmetrics' ``feature=`` (uint8 images (B, 3, H, W) in)."""

    def __init__(self, model: str | nn.Module = DEFAULT_DINOV2, image_size: int = DINOV2_SIZE):
        super().__init__()
        self.model = load_dinov2(model) if isinstance(model, str) else model
        self.model.eval().requires_grad_(False)
        self.num_features = int(self.model.config.hidden_size)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"DINOv2Features takes uint8 images in [0, 255], got {images.dtype}; use to_uint8()")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        x = images.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                          align_corners=False, antialias=True).clamp(0, 1)  # fmt: skip
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        with torch.no_grad():
            return self.model(pixel_values=x).pooler_output
