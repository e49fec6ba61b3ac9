"""Where the particles sit for a Gaussian-kernel (rff_gaussian) discriminator: per level, its stored bandwidth
beside the median feature distances within training latents, within pure noise, and across the two, and the
mean kernel value across (the pull of the data on a noise particle scales with it).

    python benchmarks/rff_bandwidth.py --pipeline pooled=outputs/c64_rff/pipeline --cache outputs/c64_rff/latent_cache \
        --name rff_bandwidth_celebahq64

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_name_arg, write


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", action="append", required=True, help="NAME=FOLDER of an rff_gaussian model (repeatable)")
    p.add_argument("--cache", required=True, help="latent cache of the training data")
    p.add_argument("--levels", type=int, nargs="+", default=[999, 500, 20], help="levels t probed")
    p.add_argument("--num_images", type=int, default=64, help="latents and noise draws per level")
    add_name_arg(p, "rff_bandwidth")
    args = p.parse_args()

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.latent_cache import LatentCacheDataset
    from latent_dmmd.mmd import median_pairwise_distance

    data = LatentCacheDataset(args.cache).tensors["mean"][: args.num_images]
    noise = torch.randn(data.shape, generator=torch.Generator().manual_seed(1))
    models = {}
    for item in args.pipeline:
        name, folder = item.split("=", 1)
        disc = DMMDPipeline.from_pretrained(folder).discriminator
        if disc.config.kernel != "rff_gaussian":
            raise SystemExit(f"{folder} has kernel={disc.config.kernel!r}, not rff_gaussian")
        rows = []
        for t in args.levels:
            level = torch.full((len(data),), t)
            with torch.no_grad():
                clean, particles = disc(data, level, raw=True), disc(noise, level, raw=True)
            bandwidth = float(disc.bandwidth_at(level)[0])
            cross = torch.cdist(particles, clean)
            rows.append({"t": t, "bandwidth": bandwidth,
                         "median_within_data": float(median_pairwise_distance(clean[None])[0]),
                         "median_within_noise": float(median_pairwise_distance(particles[None])[0]),
                         "median_cross": float(cross.median()),
                         "mean_kernel_cross": float(torch.exp(-cross.square() / (2 * bandwidth**2)).mean())})  # fmt: skip
        models[name] = {"bandwidths": disc.rff_bandwidth.tolist(), "levels": rows}
    record = {"benchmark": "rff bandwidth", "args": vars(args), "models": models}
    print(json.dumps(record, indent=1))
    print("wrote", write(args.name, record))


if __name__ == "__main__":
    main()
