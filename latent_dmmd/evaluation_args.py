"""The flags of ``latent-dmmd evaluate`` / ``scripts/evaluate.py``, apart from the evaluator so that
``--help`` and argument errors come back without importing torch."""

from __future__ import annotations

import argparse
import math

from .argparsing import FlagParser

# below this many images a Fréchet distance has no covariance to compare; below the protocol's count it is biased upward
MIN_FID_IMAGES, PROTOCOL_IMAGES = 2, 2000
# what each feature space's Fréchet and kernel distances are called in metrics files, cards and the CLI
METRIC_NAMES = {"inception": ("FID", "KID"), "dinov2": ("FD-DINOv2", "KD-DINOv2")}


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum`` (0 is never read as 'use the default')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def evaluate_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Every flag is checked by its type: 0 is never read as 'use the default'."""
    p = FlagParser(prog=prog, description="FID/KID of a DMMD pipeline against a reference image set")
    p.add_argument("model", help="pipeline folder or Hub id")
    p.add_argument("--vae", default=None,
                   help="autoencoder of a latent model that ships without one: a diffusers folder or Hub id, or a "
                        "TAEF2 folder (e.g. ../shared/weights/taef2)")  # fmt: skip
    p.add_argument("--reference", required=True, help="reference images: a folder (recursive) or an IDX file")
    p.add_argument("--reference_first_index", type=_count(0), default=0,
                   help="first reference image (e.g. 3500 for the held-out faces)")  # fmt: skip
    p.add_argument("--reference_count", type=_count(MIN_FID_IMAGES), default=None,
                   help="number of reference images (default: all)")  # fmt: skip
    p.add_argument("--num_samples", type=_count(MIN_FID_IMAGES), default=500, help="generated images")
    p.add_argument("--batch_size", type=_count(1), default=100, help="particles flowed together (they interact under 'ensemble')")
    p.add_argument("--num_inference_steps", type=_count(1), default=None, help="T levels (default: the scheduler config)")
    p.add_argument("--flow_steps_per_level", type=_count(1), default=None, help="N_s (default: the scheduler config)")
    p.add_argument("--step_size", type=_positive, default=None, help="eta (default: the scheduler config)")
    p.add_argument("--seed", type=_count(0), default=0, help="first per-image seed")
    p.add_argument("--kid_subset_size", type=_count(2), default=100, help="KID subset size (capped by the set sizes)")
    p.add_argument("--metric_features", choices=("inception", "dinov2"), default="inception",
                   help="feature space of the Fréchet and kernel distances: the FID Inception network (FID, KID) or a "
                        "DINOv2 ViT's CLS token (FD-DINOv2, KD-DINOv2; Stein et al. 2023)")  # fmt: skip
    p.add_argument("--dinov2_model", default="facebook/dinov2-base",
                   help="DINOv2 weights for --metric_features dinov2: a Hub id or a local folder")  # fmt: skip
    p.add_argument("--real_features", default=None,
                   help="file caching the reference set's features: computed and saved if absent, loaded if it holds "
                        "this very set (a 10k-image reference is half an hour of Inception on a CPU)")  # fmt: skip
    p.add_argument("--output", default="metrics.json", help="metrics JSON to write; a sample grid goes next to it")
    return p
