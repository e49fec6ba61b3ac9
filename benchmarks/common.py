"""Shared helpers of the benchmark scripts: the reference-set and output flags, timing, JSON + plot output
(with the environment record), model builders."""

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


def run_summary(folder: str, name: str = "training_summary.json") -> dict:
    """The run's summary JSON beside an exported folder (``<run>/pipeline`` or ``<run>/baseline``); {} if absent."""
    path = os.path.join(os.path.dirname(os.path.normpath(folder)), name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def add_reference_args(p, what: str = "reference images", count: int | None = None, prefix: str = "reference",
                       required: bool = True) -> None:
    """``--reference`` (folder or IDX file), ``--reference_first_index``, ``--reference_count``; ``prefix="data"``
    spells them ``--data``, ``--first_index``, ``--count``."""
    names = (prefix, f"{prefix}_first_index", f"{prefix}_count") if prefix == "reference" else (prefix, "first_index", "count")
    p.add_argument(f"--{names[0]}", required=required, help=f"{what} (folder or IDX file)")
    p.add_argument(f"--{names[1]}", type=int, default=0, help="index of the first image used")
    p.add_argument(f"--{names[2]}", type=int, default=count, help="images used" + ("" if count else " (default: all)"))


def add_sampling_args(p, num_samples: int = 500, seed: int = 0) -> None:
    """``--num_samples`` (generated images per point), ``--batch_size`` (images per flow), ``--seed``."""
    p.add_argument("--num_samples", type=int, default=num_samples, help="generated images per point")
    p.add_argument("--batch_size", type=int, default=100, help="images per flow / sampler call")
    p.add_argument("--seed", type=int, default=seed, help="first per-image seed (image i uses seed + i)")


def add_real_features_arg(p) -> None:
    """``--real_features`` (the reference set's cached features) and the feature space the metrics use."""
    p.add_argument("--real_features", default=None,
                   help="file caching the reference set's features: computed and saved if absent, else loaded")
    p.add_argument("--metric_features", choices=("inception", "dinov2"), default="inception",
                   help="FID/KID in the Inception network's features, or FD-/KD-DINOv2 in a DINOv2 ViT's CLS token")
    p.add_argument("--dinov2_model", default="facebook/dinov2-base", help="DINOv2 Hub id or folder (--metric_features dinov2)")


def reference_metric(args, resolution: int, kid_subset_size: int = 100):
    """``latent_dmmd.evaluation.reference_metric`` from a benchmark's reference flags (``--real_features`` the cache)."""
    from latent_dmmd.evaluation import reference_metric as metric

    try:
        return metric(args.reference, resolution, args.reference_first_index, args.reference_count,
                      features=getattr(args, "metric_features", "inception"), dinov2_model=getattr(args, "dinov2_model", None),
                      cache=getattr(args, "real_features", None), kid_subset_size=kid_subset_size)  # fmt: skip
    except ValueError as err:  # a cache of another set
        raise SystemExit(str(err)) from None


def add_name_arg(p, default: str) -> None:
    p.add_argument("--name", default=default, help="output file stem in benchmarks/results (.json and .png)")


def write(name: str, record: dict) -> str:
    from latent_dmmd.evaluation import environment

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**record, "environment": environment()}, f, indent=2)
    return path


def save_figure(fig, path: str, dpi: int = 90) -> str:
    """Save ``fig`` as the PNG beside the benchmark's JSON ``path``."""
    png = path.replace(".json", ".png")
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    print("wrote", path, "and", png)
    return png


def save_sample_grid(images, name: str, label: str, count: int, nrow: int = 4) -> str | None:
    """The first ``count`` of a row's uint8 images (N, 3, H, W) as ``results/<name>_<label>.png``, at full resolution."""
    if count <= 0:
        return None
    from diffusers.utils import make_image_grid
    from PIL import Image

    picked = images[:count]
    rows = -(-len(picked) // nrow)
    tiles = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in picked]
    tiles += [Image.new("RGB", tiles[0].size)] * (rows * nrow - len(tiles))  # pad the last row with black tiles
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}_{label}.png")
    make_image_grid(tiles, rows=rows, cols=nrow).save(path, optimize=True)
    print("wrote", path)
    return path


def plt():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def config_discriminator(config_name: str, seed: int = 0):
    """The discriminator a config trains, built from that file (TAEF2 configs: 32 latent channels at 1/8 of the
    resolution; pixel configs: the config's channels at its resolution), so benchmarks measure what the config
    trains rather than a hand copy of it."""
    from latent_dmmd import DMMDDiscriminator
    from latent_dmmd.training.config import load_config

    config = load_config(["--config", os.path.join(os.path.dirname(RESULTS), "..", "configs", config_name)])
    torch.manual_seed(seed)
    size, channels = (config.resolution // 8, 32) if config.pretrained_vae else (config.resolution, config.channels)
    return DMMDDiscriminator(sample_size=size, in_channels=channels, **config.model_kwargs()).requires_grad_(False)


def latent64_discriminator(seed: int = 0):
    """The discriminator of configs/celebahq_taef2_64.yaml (32 x 8 x 8 TAEF2 latents)."""
    return config_discriminator("celebahq_taef2_64.yaml", seed)


def latent256_cpu_discriminator(seed: int = 0):
    """The discriminator of configs/celebahq_taef2_256_cpu.yaml (32 x 32 x 32 TAEF2 latents)."""
    return config_discriminator("celebahq_taef2_256_cpu.yaml", seed)
