"""DMMDGenerator: a one-step generator ``x = G(z)`` in particle space, trained from a DMMD model (method §10).

A diffusers ``UNet2DModel`` evaluated at one fixed timestep maps a noise draw ``z`` (the flow's initial particles,
same shape) to the displacement of a sample from it, ``x = z + UNet(z)``, so that, like the flow, it starts from
the noise's spread (a generator whose outputs all start at one point follows a local field to one mode): one network evaluation instead of the flow's T·N_s forward-backward pairs. It is an
optional component of a pipeline folder, like the autoencoder; ``scripts/train_generator.py`` trains it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import UNet2DModel
from diffusers.models.modeling_utils import ModelMixin


class DMMDGenerator(ModelMixin, ConfigMixin):
    """One-step generator ``G(z) = z + UNet(z, timestep)`` with ``z ~ N(0, I)`` of the particles' shape.

    Args:
        sample_size, in_channels: the particles' shape (pixels, or latent cells in latent space).
        block_out_channels, layers_per_block, down_block_types, up_block_types, attention_head_dim,
        norm_num_groups: passed to ``UNet2DModel``.
        timestep: the fixed timestep the UNet sees (its time embedding becomes a learned constant).
        mode: how it was trained: ``distill`` (regression onto flow endpoints) or ``field`` (the stop-gradient
            regression along the DMMD field, method §10); recorded for the model card.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D"),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D"),
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        timestep: int = 999,
        mode: str = "distill",
    ):
        super().__init__()
        if len(block_out_channels) != len(down_block_types) or len(down_block_types) != len(up_block_types):
            raise ValueError(
                f"block_out_channels {tuple(block_out_channels)}, down_block_types {tuple(down_block_types)} and "
                f"up_block_types {tuple(up_block_types)} must have the same length"
            )
        if mode not in ("distill", "field"):
            raise ValueError(f"mode must be 'distill' or 'field', got {mode!r}")
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
        )  # fmt: skip

    @property
    def particle_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.sample_size, self.config.sample_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != self.particle_shape:
            raise ValueError(f"the generator takes noise of shape (N, {self.particle_shape}), got {tuple(z.shape)}")
        t = torch.full((z.shape[0],), self.config.timestep, device=z.device, dtype=torch.long)
        return z.to(self.dtype) + self.unet(z.to(self.dtype), t).sample
