"""Shared helpers of the benchmark scripts: timing, JSON + plot output, model builders."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timeit(fn, repeats: int = 5, warmup: int = 1) -> dict:
    """Median and spread of wall-clock seconds of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def timeit_pair(a, b, repeats: int = 5, warmup: int = 1) -> tuple[dict, dict]:
    """Time ``a()`` and ``b()`` alternately, so both see the same machine noise."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    summary = lambda ts: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}
    return summary(ta), summary(tb)


def write(name: str, record: dict) -> str:
    from latent_dmmd.evaluation import environment

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**record, "environment": environment()}, f, indent=2)
    return path


def plt():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def latent64_discriminator(seed: int = 0):
    """The discriminator of configs/celebahq_taef2_64.yaml (32 x 8 x 8 TAEF2 latents)."""
    from latent_dmmd import DMMDDiscriminator

    torch.manual_seed(seed)
    return DMMDDiscriminator(
        sample_size=8, in_channels=32, block_out_channels=(64, 128), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32, norm_num_groups=16,
    ).requires_grad_(False)  # fmt: skip
