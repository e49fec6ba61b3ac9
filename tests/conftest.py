"""Tiny, seeded components shared by the tests (diffusers style: small and fast)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from latent_dmmd import DMMDDiscriminator, DMMDPipeline, DMMDScheduler  # noqa: E402
from latent_dmmd.reference import compute_reference_statistics  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_discriminator(in_channels: int = 3, sample_size: int = 8, seed: int = 0) -> DMMDDiscriminator:
    torch.manual_seed(seed)
    return DMMDDiscriminator(
        sample_size=sample_size,
        in_channels=in_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


def tiny_data(in_channels: int = 3, sample_size: int = 8, n: int = 16) -> torch.Tensor:
    """The tiny 'dataset' the tiny pipelines' reference statistics are computed on."""
    return torch.rand(n, in_channels, sample_size, sample_size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def tiny_pipeline(in_channels: int = 3, sample_size: int = 8, vae=None, **scheduler_kwargs) -> DMMDPipeline:
    disc = tiny_discriminator(in_channels, sample_size)
    sched = DMMDScheduler(**{"num_inference_steps": 3, "flow_steps_per_level": 2, "step_size": 0.5, **scheduler_kwargs})
    data = tiny_data(in_channels, sample_size)
    stats = compute_reference_statistics(
        disc, data.split(8), sched.timesteps, sched.alphas_cumprod, generator=torch.Generator().manual_seed(2)
    )
    disc.set_reference_statistics(stats)
    pipe = DMMDPipeline(disc, sched, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe():
    return tiny_pipeline()
