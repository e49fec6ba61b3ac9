"""Does the flow move, and where do the particles sit? Per-level diagnostics of DMMD models.

    python benchmarks/flow_diagnostics.py --pipeline before=models/celebahq-taef2-64-dmmd \
        --pipeline after=outputs/c64_dmmd/pipeline --vae ../shared/weights/taef2 \
        --data ../shared/data/celebahq256/images --first_index 3500 --count 256 --name flow_celebahq64

For every pipeline: the held-out paired MMD²_t at every sampling level, the witness-gradient norm and the share of the path at each sampling level,
the feature gap |mean phi(x, t_k) - m_P(t_k)| of the samples beside that of held-out data, the R²
of the final particles on their own starting noise, and the effective-noise trace (energy
distance to the forward marginals) with the adaptive grid it suggests. Writes benchmarks/results/<name>.{json,png} and
<name>_effective_noise.png.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_name_arg, add_reference_args, write


def heldout_particles(path: str, first_index: int, count: int, resolution: int, vae_path: str | None, channels: int):
    """Clean held-out particles: images (pixel space) or their posterior-mean latents."""
    from latent_dmmd.data import build_image_dataset

    images = build_image_dataset(train_data_dir=path, resolution=resolution, channels=channels,
                                 first_index=first_index, max_train_samples=count)  # fmt: skip
    pixels = torch.stack([images[i]["pixel_values"] for i in range(min(count, len(images)))])
    if vae_path is None:
        return pixels
    from latent_dmmd.autoencoders import encode_images, load_autoencoder

    vae = load_autoencoder(vae_path)
    with torch.no_grad():
        return torch.cat([encode_images(vae, chunk).mean for chunk in pixels.split(32)])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", action="append", required=True, help="NAME=FOLDER of a DMMD pipeline (repeatable)")
    add_reference_args(p, "held-out images", count=256, prefix="data")
    p.add_argument("--resolution", type=int, default=64, help="image resolution fed to the VAE (or the model)")
    p.add_argument("--channels", type=int, default=3, help="image channels in pixel space")
    p.add_argument("--vae", default=None, help="autoencoder of latent-space pipelines (encodes the held-out images)")
    p.add_argument("--num_images", type=int, default=256, help="particles flowed together")
    p.add_argument("--num_inference_steps", type=int, default=None, help="T (default: the scheduler config)")
    p.add_argument("--flow_steps_per_level", type=int, default=None, help="N_s (default: the scheduler config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial particles")
    add_name_arg(p, "flow_diagnostics")
    args = p.parse_args()

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.diagnostics import (
        adaptive_grid,
        flow_report,
        plot_effective_noise,
        plot_flow_report,
        trace_effective_noise,
    )
    from latent_dmmd.training import level_mmd

    data = heldout_particles(args.data, args.first_index, args.count, args.resolution, args.vae, args.channels)
    call = {k: v for k, v in (("num_inference_steps", args.num_inference_steps),
                              ("flow_steps_per_level", args.flow_steps_per_level)) if v is not None}  # fmt: skip
    reports, traces = {}, {}
    for item in args.pipeline:
        name, folder = item.split("=", 1)
        pipe = DMMDPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        reports[name] = flow_report(pipe, data, num_images=args.num_images, seed=args.seed, **call)
        if pipe.discriminator.config.objective == "mmd":  # what the discriminator sees at each level (method §3)
            rows = level_mmd(pipe.discriminator, data, pipe.scheduler.timesteps, pipe.scheduler, seed=args.seed)
            reports[name]["heldout_mmd2"] = [r["mmd2"] for r in rows]
        trace = trace_effective_noise(pipe, data, num_images=args.num_images, seed=args.seed, **call)
        traces[name] = {"scheduled": trace["scheduled"], "effective": trace["effective"]}
        reports[name]["effective_noise"] = traces[name]
        # the grid that puts each level where the particles effectively are: sweep it with
        # benchmarks/sweep.py --statistics_data ... --arm "adaptive:timesteps=<the levels joined by />"
        reports[name]["adaptive_grid"] = adaptive_grid(trace["scheduled"], trace["effective"], t_min=pipe.scheduler.config.t_min)
        reports[name]["folder"] = folder
        print(name, json.dumps({k: v for k, v in reports[name].items() if k != "folder"}), flush=True)
    path = write(args.name, {"benchmark": "flow diagnostics", "args": vars(args), "heldout_samples": len(data),
                             "reports": reports})  # fmt: skip
    plot_flow_report(reports, path.replace(".json", ".png"))
    plot_effective_noise(traces, path.replace(".json", "_effective_noise.png"))
    print("wrote", path)


if __name__ == "__main__":
    main()
