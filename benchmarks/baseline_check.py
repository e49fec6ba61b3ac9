"""Does the DDPM baseline behave like one? Held-out epsilon MSE per level of a --method ddpm run.

    python benchmarks/baseline_check.py --ddpm outputs/c64_ddpm/baseline --data ../shared/data/celebahq256/images \
        --first_index 3500 --count 500 --train_first_index 0 --name baseline_check_celebahq64

A diffusion sampler adds each level's denoising error once per step it spends there, so a network
whose error is large at some levels can get worse with more steps. This writes the epsilon MSE per
coordinate at 20 levels for held-out and for training images (the gap is overfitting), next to the
MSE of the trivial predictor eps_hat = 0 (1.0), as benchmarks/results/<name>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import add_name_arg, add_reference_args, plt, save_figure, write
from flow_diagnostics import heldout_particles


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ddpm", required=True, help="baseline folder written by --method ddpm (unet/, scheduler/, vae/)")
    add_reference_args(p, "images", count=500, prefix="data")
    p.add_argument("--train_first_index", type=int, default=None, help="first training image (to compare with)")
    p.add_argument("--train_data", default=None, help="training images if not --data (e.g. the train IDX file)")
    p.add_argument("--resolution", type=int, default=64, help="image resolution")
    p.add_argument("--channels", type=int, default=3, help="image channels in pixel space")
    add_name_arg(p, "baseline_check")
    args = p.parse_args()

    from diffusers import DDPMScheduler, UNet2DModel

    from latent_dmmd.baselines import epsilon_mse_per_level

    unet = UNet2DModel.from_pretrained(os.path.join(args.ddpm, "unet")).eval()
    sched = DDPMScheduler.from_pretrained(os.path.join(args.ddpm, "scheduler"))
    vae = os.path.join(args.ddpm, "vae") if os.path.isdir(os.path.join(args.ddpm, "vae")) else None
    levels = torch.linspace(0, 999, 20).round().long().tolist()
    sets = {"held-out": (args.data, args.first_index)}
    if args.train_first_index is not None or args.train_data:
        sets["train"] = (args.train_data or args.data, args.train_first_index or 0)
    curves = {}
    for name, (path, first) in sets.items():
        x0 = heldout_particles(path, first, args.count, args.resolution, vae, args.channels)
        curves[name] = epsilon_mse_per_level(unet, sched, x0, levels)
        print(name, json.dumps(curves[name]), flush=True)
    out = write(args.name, {"benchmark": "DDPM baseline: epsilon MSE per level", "args": vars(args), "curves": curves})
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot([r["t"] for r in rows], [r["eps_mse"] for r in rows], "o-", label=name)
    ax.set(xlabel="level t", ylabel="epsilon MSE per coordinate", yscale="log", title="DDPM baseline denoising error")
    ax.legend()
    save_figure(fig, out, dpi=100)


if __name__ == "__main__":
    main()
