"""Benchmark d: time per generated 256x256 image, pixel-space vs latent-space DMMD.

Both discriminators are UNets of the same width (block_out_channels 64, 128, 128, 256; random
weights: timing only). Pixel space flows 3 x 256 x 256 particles; latent space flows the
32 x 32 x 32 latents of TAEF2 (../shared/weights/taef2) and decodes them, or, when it is absent,
4 x 32 x 32 latents decoded by an SD-VAE-shaped AutoencoderKL with random weights. A full pixel
sample (T x N_s = 100 flow steps) takes hours on a CPU, so it is extrapolated from measured flow
steps; the latent full sample is both measured and extrapolated, which checks the extrapolation.

    python benchmarks/pixel_vs_latent.py         # writes benchmarks/results/pixel_vs_latent.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import plt, save_figure, timeit, write

WIDTH = (64, 128, 128, 256)
TAEF2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "weights", "taef2")


def discriminator(channels: int, size: int):
    from latent_dmmd import DMMDDiscriminator

    torch.manual_seed(0)
    return DMMDDiscriminator(
        sample_size=size, in_channels=channels, block_out_channels=WIDTH, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=32,
        norm_num_groups=32,
    ).requires_grad_(False)  # fmt: skip


def autoencoder():
    from latent_dmmd.autoencoders import load_taef2

    if os.path.isfile(os.path.join(TAEF2, "taef2_encoder.safetensors")):
        return load_taef2(TAEF2), "TAEF2 (../shared, real weights)"
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)  # fmt: skip
    return vae.eval().requires_grad_(False), "SD-VAE-shaped AutoencoderKL (random weights)"


def flow_step_fn(disc, z):
    from latent_dmmd.flow import sample_flow

    ref = torch.zeros(1, disc.feature_dim)
    return lambda steps=1: sample_flow(disc, z, [500], ref, flow_steps=steps, update=0.01)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="images per flow (per batch)")
    p.add_argument("--levels", type=int, default=10, help="T")
    p.add_argument("--flow_steps", type=int, default=10, help="N_s")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats")
    args = p.parse_args()
    total_steps = args.levels * args.flow_steps
    from latent_dmmd.autoencoders import decode_latents

    vae, vae_name = autoencoder()
    c = vae.config.latent_channels
    latent_disc, pixel_disc = discriminator(c, 32), discriminator(3, 256)
    z_lat = torch.randn(args.batch, c, 32, 32)
    z_pix = torch.randn(args.batch, 3, 256, 256)
    lat_step, pix_step = flow_step_fn(latent_disc, z_lat), flow_step_fn(pixel_disc, z_pix)
    t_lat = timeit(lat_step, args.repeats)
    t_pix = timeit(pix_step, max(1, args.repeats - 1))
    with torch.no_grad():
        t_dec = timeit(lambda: decode_latents(vae, z_lat), args.repeats)
    t_lat_full = timeit(lambda: (lat_step(total_steps), decode_latents(vae, z_lat)), 1, warmup=0)
    per = lambda s: s / args.batch
    record = {
        "benchmark": "time per 256x256 image, pixel vs latent DMMD",
        "width": WIDTH, "batch": args.batch, "flow_steps_total": total_steps, "autoencoder": vae_name,
        "latent_shape": [c, 32, 32],
        "flow_step_s_per_image": {"pixel": per(t_pix["median_s"]), "latent": per(t_lat["median_s"])},
        "decode_s_per_image": per(t_dec["median_s"]),
        "full_sample_s_per_image": {
            "pixel_extrapolated": per(total_steps * t_pix["median_s"]),
            "latent_extrapolated": per(total_steps * t_lat["median_s"] + t_dec["median_s"]),
            "latent_measured": per(t_lat_full["median_s"]),
        },
        "raw": {"pixel_step": t_pix, "latent_step": t_lat, "decode": t_dec, "latent_full": t_lat_full},
    }
    record["speedup_flow_step"] = record["flow_step_s_per_image"]["pixel"] / record["flow_step_s_per_image"]["latent"]
    record["speedup_full_sample"] = (record["full_sample_s_per_image"]["pixel_extrapolated"]
                                     / record["full_sample_s_per_image"]["latent_measured"])  # fmt: skip
    print(json.dumps({k: v for k, v in record.items() if k != "raw"}, indent=1))
    path = write("pixel_vs_latent", record)
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.5))
    names = ["pixel: flow step", "latent: flow step", "pixel: full sample\n(extrapolated)", "latent: full sample\n(measured, + decode)"]
    vals = [record["flow_step_s_per_image"]["pixel"], record["flow_step_s_per_image"]["latent"],
            record["full_sample_s_per_image"]["pixel_extrapolated"], record["full_sample_s_per_image"]["latent_measured"]]  # fmt: skip
    ax.bar(range(4), vals, color=["tab:red", "tab:blue", "tab:red", "tab:blue"])
    ax.set_yscale("log")
    ax.set_xticks(range(4), names, fontsize=7)
    ax.set_ylabel("seconds per 256x256 image (CPU)")
    ax.set_title(f"latent is {record['speedup_full_sample']:.0f}x faster per image (full sample)", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
